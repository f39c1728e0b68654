"""PAR parity with the official code (Epiphqny/PAR at commit d96acea8fa82f156689532610c5262a0ef096d00).

The reference below is re-derived here, apart from the package, from:
* `autoregressive/models/gpt.py` l. 153-183 (RMSNorm in fp32, SwiGLU), l. 204-273 (fused wqkv, RoPE on
  q and k, SDPA under the mask, pre-norm block), l. 298-325 (transition-token table, group mask:
  causal, column 0, rows of group [k + i (k), k + (i + 1) k) see up to its end), l. 383-396 and 419-433
  (teacher forcing: [cond, z_0..z_{k-1}, spe_0..spe_{k-2}, z_k..z_{N-2}], logits [0, N)), l. 466-486
  (2D RoPE cache permuted to the region-interleaved order, zero rows for cond and transitions),
  l. 489-499 (rotation of interleaved pairs);
* `autoregressive/models/generate.py` l. 94-174 and 177-231 (`generate`: prefill, k - 1 single-token
  decodes, then the first multi step feeding the last token + the transition tokens, then groups of
  k; CFG rows [cond; uncond] combined u + s (c - u) at every call);
* `autoregressive/train/train_c2i.py` l. 202-208 and `sample/sample_c2i_ddp.py` l. 144-149 (the
  permutation of the codes into and out of generation order).
The official generate keeps a KV cache; this re-derivation recomputes the whole prefix at every call
under the same mask rows, which gives the same numbers (every key a row sees was fed by then).
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from arexport.errors import ArexportError, CheckpointError
from arexport.models.registry import load_model
from arexport.runtime.backends.torch.runner import TorchEngine
from arexport.runtime.generator import Generator
from arexport.runtime.sampling import SamplingParams

BASE = {"n_layer": 2, "dim": 64, "n_head": 4, "multiple_of": 32, "vocab_size": 64, "num_classes": 10}


def tiny(grid: int, k: int, seed: int = 3):
    return load_model("par-XL-4x", random_init=True, seed=seed,
                      overrides=dict(BASE, grid_size=grid, ar_token_num=k, spe_token_num=k - 1))


# -- the re-derived reference --------------------------------------------------------------------------
def ref_rope(grid: int, head_dim: int, base: float, k: int) -> torch.Tensor:
    """gpt.py l. 466-486: [1 + k + (k - 1) + N - k, head_dim / 2, 2] (cos, sin) in sequence layout."""
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    f = torch.outer(torch.arange(grid).float(), freqs)
    fg = torch.cat([f[:, None, :].expand(-1, grid, -1), f[None, :, :].expand(grid, -1, -1)], -1)
    cg = torch.stack([torch.cos(fg), torch.sin(fg)], -1)
    s = int(k ** 0.5)
    cg = cg.reshape(s, grid // s, s, grid // s, half, 2).permute(1, 3, 0, 2, 4, 5).reshape(-1, half, 2)
    z = lambda n: torch.zeros(n, half, 2)  # noqa: E731
    return torch.cat([z(1), cg[:k], z(k - 1), cg[k:]])


def ref_rotate(x: torch.Tensor, fc: torch.Tensor) -> torch.Tensor:
    """gpt.py l. 489-499: x [B, L, H, D], fc [L, D/2, 2]."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    fc = fc.view(1, xs.shape[1], 1, xs.shape[3], 2)
    out = torch.stack([xs[..., 0] * fc[..., 0] - xs[..., 1] * fc[..., 1],
                       xs[..., 1] * fc[..., 0] + xs[..., 0] * fc[..., 1]], -1)
    return out.flatten(3).type_as(x)


def ref_norm(x, w, eps=1e-5):
    xf = x.float()
    return (xf * torch.rsqrt(torch.mean(xf * xf, -1, keepdim=True) + eps)).type_as(x) * w


def ref_group_mask(length: int, k: int) -> torch.Tensor:
    """gpt.py l. 316-325 (and setup_caches l. 359-366)."""
    m = torch.tril(torch.ones(length, length, dtype=torch.bool))
    m[:, 0] = True
    for i in range(length // k):
        start = k + i * k
        m[start:start + k, :start + k] = True
    return m


def ref_layers(sd, n_layer, n_head, h, fc, mask):
    """gpt.py l. 223-273 and 427-429: blocks, final norm, fp32 logits."""
    b, l, dim = h.shape
    hd = dim // n_head
    for i in range(n_layer):
        p = f"layers.{i}."
        x = ref_norm(h, sd[p + "attention_norm.weight"])
        q, kk, v = (x @ sd[p + "attention.wqkv.weight"].T).split([dim, dim, dim], -1)
        q, kk, v = (t.view(b, l, n_head, hd) for t in (q, kk, v))
        q, kk = ref_rotate(q, fc), ref_rotate(kk, fc)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), kk.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        h = h + o.transpose(1, 2).reshape(b, l, dim) @ sd[p + "attention.wo.weight"].T
        x = ref_norm(h, sd[p + "ffn_norm.weight"])
        ff = (F.silu(x @ sd[p + "feed_forward.w1.weight"].T) * (x @ sd[p + "feed_forward.w3.weight"].T)) @ sd[p + "feed_forward.w2.weight"].T
        h = h + ff
    return (ref_norm(h, sd["norm.weight"]) @ sd["output.weight"].T).float()


def ref_embed_sequence(sd, cls, z, k):
    """gpt.py l. 384-389: [cond, z[:k], spe, z[k:]] embeddings."""
    b = cls.shape[0]
    cond = sd["cls_embedding.embedding_table.weight"][cls][:, None]
    tok = sd["tok_embeddings.weight"][z]
    spe = sd["spe_tok_embeddings.special_embeddings.weight"][None].expand(b, -1, -1)
    return torch.cat([cond, tok[:, :k], spe, tok[:, k:]], 1)


def ref_teacher_forced(model, cls, z, mask_fn=ref_group_mask, rope=ref_rope):
    """gpt.py forward, training branch (dropouts off): z [B, N] in generation order -> logits [B, N, V]."""
    cfg = model.cfg
    sd = model.state_dict()
    k, n = cfg.ar_token_num, z.shape[1]
    h = ref_embed_sequence(sd, cls, z[:, :-1], k)
    length = h.shape[1]
    fc = rope(cfg.grid_size, cfg.head_dim, cfg.rope_base, k)[:length]
    return ref_layers(sd, cfg.n_layer, cfg.n_head, h, fc, mask_fn(length, k))[:, :n]


def ref_generate_greedy(model, cls, cfg_scale, k_start=None, cfg_interval=-1):
    """generate.py `generate` with sample_logits=False (argmax), c2i, CFG on when cfg_scale > 1; returns
    tokens in generation order [B, N]. `k_start` (negative control) moves the first parallel step.
    cfg_interval: l. 143-146 and 162-165 (cond logits once the loop's counter passes it; each loop
    counts from 0, the parallel one in steps of k)."""
    cfg = model.cfg
    sd = model.state_dict()
    k, n = cfg.ar_token_num, cfg.n_tokens
    k_start = k if k_start is None else k_start
    b = cls.shape[0]
    cond = torch.cat([cls, torch.full_like(cls, cfg.num_classes)]) if cfg_scale > 1 else cls
    rows = cond.shape[0]
    fc_all = ref_rope(cfg.grid_size, cfg.head_dim, cfg.rope_base, k)
    mask_all = ref_group_mask(fc_all.shape[0] + 8, k)
    emb = [sd["cls_embedding.embedding_table.weight"][cond][:, None]]  # the fed sequence so far

    def call(new_emb, guided=True):
        emb.append(new_emb)
        h = torch.cat(emb, 1)
        length = h.shape[1]
        logits = ref_layers(sd, cfg.n_layer, cfg.n_head, h, fc_all[:length], mask_all[:length, :length])
        out = logits[:, length - new_emb.shape[1]:]
        if cfg_scale > 1:
            c, u = out[:b], out[b:]
            out = u + (c - u) * cfg_scale if guided else c
        return out.argmax(-1)  # [B, q]

    tok = lambda t: sd["tok_embeddings.weight"][torch.cat([t, t]) if cfg_scale > 1 else t]  # noqa: E731
    seq = [call(emb.pop())]  # prefill (the class row is what is fed)
    flag = True
    for i in range(k_start - 1):
        flag = flag and not (cfg_interval > -1 and i > cfg_interval)
        seq.append(call(tok(seq[-1][:, -1:]), flag))
    spe = sd["spe_tok_embeddings.special_embeddings.weight"][None].expand(rows, -1, -1)
    flag, i = True, 0
    first = torch.cat([tok(seq[-1][:, -1:]), spe], 1)
    while sum(s.shape[1] for s in seq) < n:
        flag = flag and not (cfg_interval > -1 and i > cfg_interval)
        seq.append(call(first if i == 0 else tok(seq[-1]), flag))
        i += k
    return torch.cat(seq, 1)[:, :n]


def ref_to_raster(seq, grid, k):
    """sample_c2i_ddp.py l. 144-149."""
    s = int(k ** 0.5)
    x = seq.reshape(seq.shape[0], grid // s, grid // s, s, s).permute(0, 3, 1, 4, 2)
    return x.reshape(seq.shape[0], -1)


def ref_from_raster(z, grid, k):
    """train_c2i.py l. 202-208."""
    s = int(k ** 0.5)
    x = z.reshape(z.shape[0], s, grid // s, s, grid // s).permute(0, 2, 4, 1, 3)
    return x.reshape(z.shape[0], -1)


# -- tests ------------------------------------------------------------------------------------------
CONFIGS = [(4, 4), (6, 4), (8, 16)]  # (grid, k): the smallest 4x, odd region sizes, a 16x model


@pytest.mark.parametrize("grid,k", CONFIGS)
def test_order_is_the_reference_permutation(grid, k):
    lm = tiny(grid, k)
    z = torch.arange(grid * grid)[None]
    assert torch.equal(lm.model.order, ref_from_raster(z, grid, k)[0])
    assert torch.equal(ref_to_raster(ref_from_raster(z, grid, k), grid, k), z)


@pytest.mark.parametrize("grid,k", CONFIGS)
def test_teacher_forced_logits_equal_the_reference(grid, k):
    lm = tiny(grid, k)
    g = torch.Generator().manual_seed(grid + k)
    z = torch.randint(0, 64, (3, grid * grid), generator=g)
    cls = torch.tensor([1, 7, 10])  # 10: the null class
    with torch.no_grad():
        ours = lm.model(cls, z)
        ref = ref_teacher_forced(lm.model, cls, z)
        assert (ours - ref).abs().max() < 1e-4
        # negative controls: a plain causal mask (no group visibility) and raster RoPE (no remapping)
        causal = ref_teacher_forced(lm.model, cls, z, mask_fn=lambda n, kk: torch.tril(torch.ones(n, n, dtype=torch.bool)))
        assert (ours - causal).abs().max() > 1e-3

        def raster_rope(gr, hd, base, kk):
            r = ref_rope(gr, hd, base, 1)  # k = 1: no permutation; re-insert the transition zero rows
            return torch.cat([r[:1 + kk], torch.zeros(kk - 1, *r.shape[1:]), r[1 + kk:]])
        assert (ours - ref_teacher_forced(lm.model, cls, z, rope=raster_rope)).abs().max() > 1e-3


def test_step_path_equals_teacher_forcing():
    """The cache path (the `par` decoder's calls) gives the teacher-forced logits of the sampled sequence."""
    lm = tiny(4, 4)
    gen = Generator(TorchEngine(lm))
    out = gen.generate(classes=[2, 5], method="par", sampling=SamplingParams(temperature=0.0), images=False)
    raster = torch.as_tensor(out.tokens)
    seq = raster[:, lm.model.order]
    with torch.no_grad():
        tf = lm.model(torch.tensor([2, 5]), seq)
    assert torch.equal(tf.argmax(-1), seq)  # greedy: each token is the argmax of its teacher-forced row


@pytest.mark.parametrize("grid,k", CONFIGS)
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_greedy_generation_equals_the_reference(grid, k, cfg_scale):
    lm = tiny(grid, k, seed=grid * k)
    cls = torch.tensor([3, 8, 0])
    with torch.no_grad():
        ref = ref_generate_greedy(lm.model, cls, cfg_scale)
    out = Generator(TorchEngine(lm)).generate(classes=cls.tolist(), method="par", images=False,
                                              sampling=SamplingParams(temperature=0.0, cfg_scale=cfg_scale))
    assert np.array_equal(out.tokens, ref_to_raster(ref, grid, k).numpy())
    assert out.stats["target_forwards"] == k + grid * grid // k - 1
    with torch.no_grad():  # negative control: the parallel phase starting one token late
        late = ref_generate_greedy(lm.model, cls, cfg_scale, k_start=k + 1)
    assert not np.array_equal(out.tokens, ref_to_raster(late, grid, k).numpy())


def test_ort_engine_greedy_equals_the_reference(tmp_path):
    from arexport.exporter.build import BuildOptions, build_engine
    from arexport.format.manifest import read_manifest
    from arexport.runtime.backends import open_directory
    from arexport.runtime.loading import open_engine
    from arexport.verify import verify_engine

    lm = tiny(6, 4, seed=11)
    build_engine(lm, tmp_path / "par", BuildOptions(batch_sizes=[2, 6], images=False))
    m = read_manifest(tmp_path / "par")
    assert m.spec.family == "par" and m.graphs["step"].kinds == {"decode": 1, "verify": 16}
    eng = open_engine(str(tmp_path / "par"), "ort")
    ref_eng = open_directory("torch", eng.directory, eng.manifest)
    rep = verify_engine(eng, ref_eng, "fp32", batch=2, verify_len=16, full_image=True, n_images=2)
    assert rep.passed and rep.token_agreement == 1.0
    cls = torch.tensor([4, 9, 1])
    with torch.no_grad():
        ref = ref_to_raster(ref_generate_greedy(lm.model, cls, 2.5), 6, 4).numpy()
    out = Generator(eng).generate(classes=cls.tolist(), method="par", images=False,
                                  sampling=SamplingParams(temperature=0.0, cfg_scale=2.5))
    assert np.array_equal(out.tokens, ref)


def test_batch_invariance():
    lm = tiny(4, 4)
    gen = Generator(TorchEngine(lm))
    p = SamplingParams(cfg_scale=2.0, top_k=8)
    a = gen.generate(classes=[5, 6, 7], method="par", sampling=p, seed=3, images=False, batch_size=3)
    b = gen.generate(classes=[5, 6, 7], method="par", sampling=p, seed=3, images=False, batch_size=2)
    assert np.array_equal(a.tokens, b.tokens)  # continuous batching: rows join at different calls


@pytest.mark.parametrize("interval", [0, 2])
def test_cfg_interval_counts_as_the_reference(interval):
    """generate.py l. 143-146, 162-165: sequential token t guided while t - 1 <= interval, the parallel
    steps' counter restarts at 0 and grows by k."""
    lm = tiny(4, 4, seed=9)
    cls = torch.tensor([1, 6])
    out = Generator(TorchEngine(lm)).generate(classes=cls.tolist(), method="par", images=False,
                                              sampling=SamplingParams(temperature=0.0, cfg_scale=6.0, cfg_interval=interval))
    with torch.no_grad():
        ref = ref_to_raster(ref_generate_greedy(lm.model, cls, 6.0, cfg_interval=interval), 4, 4).numpy()
        always = ref_to_raster(ref_generate_greedy(lm.model, cls, 6.0), 4, 4).numpy()
    assert np.array_equal(out.tokens, ref)
    if interval < 3:  # negative control: guidance everywhere would give other tokens
        assert not np.array_equal(out.tokens, always)


def test_released_layouts_load_with_the_weights_only_loader(tmp_path):
    lm = tiny(4, 4)
    sd = lm.model.state_dict()
    assert "spe_tok_embeddings.special_embeddings.weight" in sd and "layers.0.attention.wqkv.weight" in sd
    over = dict(BASE, grid_size=4)
    # train_c2i.py's checkpoint: model, optimizer, steps, args (argparse.Namespace, GPT-XL: LlamaGen's name), ema
    args = argparse.Namespace(gpt_model="GPT-XL", ar_token_num=4, spe_token_num=3, image_size=384)
    torch.save({"model": sd, "steps": 5, "args": args, "ema": sd}, tmp_path / "0000005.pt")
    got = load_model("par-XL-4x", checkpoint=str(tmp_path / "0000005.pt"), overrides=over)
    assert torch.equal(got.model.spe_tok_embeddings.special_embeddings.weight, lm.model.spe_tok_embeddings.special_embeddings.weight)
    torch.save(sd, tmp_path / "consolidated.pth")  # a bare state dict (FSDP)
    load_model("par-XL-4x", checkpoint=str(tmp_path / "consolidated.pth"), overrides=over)
    with pytest.raises(ArexportError, match=r"holds a par model, not a llamagen one .*pass --model par-XL-4x"):
        load_model("llamagen-c2i-XL", checkpoint=str(tmp_path / "consolidated.pth"), overrides={k: v for k, v in over.items()})
    with pytest.raises(ArexportError, match=r"trained with --ar-token-num 4; par-3B-16x has 16"):
        load_model("par-3B-16x", checkpoint=str(tmp_path / "0000005.pt"), overrides=dict(over, grid_size=8))
    lg = load_model("llamagen-c2i-XL", random_init=True, overrides=over)
    torch.save({"model": lg.model.state_dict()}, tmp_path / "llamagen.pt")
    with pytest.raises(ArexportError, match="holds a llamagen model, not a par one"):
        load_model("par-XL-4x", checkpoint=str(tmp_path / "llamagen.pt"), overrides=over)
    sd_bad = dict(sd)
    sd_bad["spe_tok_embeddings.special_embeddings.weight"] = torch.zeros(2, 64)  # a k = 3 table: mis-shaped
    torch.save({"model": sd_bad}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="spe_tok_embeddings"):
        load_model("par-XL-4x", checkpoint=str(tmp_path / "bad.pt"), overrides=over)


def test_catalog_and_bad_configs():
    from arexport.models.registry import model_config

    for name, (layers, heads, dim, k) in {"par-XL-4x": (36, 20, 1280, 4), "par-XXL-4x": (48, 24, 1536, 4),
                                          "par-3B-4x": (24, 32, 3200, 4), "par-3B-16x": (24, 32, 3200, 16)}.items():
        c = model_config(name)
        assert (c.n_layer, c.n_head, c.dim, c.ar_token_num, c.grid_size) == (layers, heads, dim, k, 24)
    assert math.isclose(model_config("par-3B-4x").spec("par-3B-4x").extra["sampling_defaults"]["cfg_scale"], 1.345)
    with pytest.raises(ArexportError, match="ar_token_num must be a square"):
        model_config("par-XL-4x", {"ar_token_num": 6, "spe_token_num": 5})
    with pytest.raises(ArexportError, match="spe_token_num must be ar_token_num - 1"):
        model_config("par-XL-4x", {"spe_token_num": 2})
    lm = tiny(4, 4)
    with pytest.raises(ArexportError, match="method ar does not apply"):
        Generator(TorchEngine(lm)).generate(classes=[1], method="ar", images=False)


def test_shipped_demo_par_quality():
    """demo-par (scripts/train_demo.py --only par) at its default sampler: 19 forwards per image (4 sequential
    + 15 parallel steps of 4) and its accuracy under both judges (200 images, fixed seed); the floors
    leave sampling noise and CPU rounding differences below the measured figures (docs/benchmarks.md)."""
    from arexport.quality import score_digits
    from arexport.runtime.sampling import default_sampling

    gen = Generator.load("demo-par")
    classes = [i % 10 for i in range(200)]
    r = gen.generate(classes=classes, method="par", sampling=default_sampling(gen.spec), batch_size=200, images=False,
                     timings=False, seed=11)
    assert r.stats["target_forwards_per_image"] == 19
    acc = {j: score_digits(r.tokens, classes, j).accuracy for j in ("cnn", "mlp")}
    assert acc["cnn"] >= 0.92 and acc["mlp"] >= 0.92, acc
