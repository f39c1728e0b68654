"""NAR parity with the official code (ThisisBillhe/NAR at commit 225c1fb).

The reference below is re-derived here, apart from the package, from `NAR-images/autoregressive/`:
* `models/gpt.py` l. 139-150 (RMSNorm in fp32), l. 153-169 (SwiGLU), l. 172-187 (KVCache.update: k/v written at
  `input_pos`), l. 190-243 (fused wqkv, RoPE on q and k, SDPA under the mask over the whole cache), l. 246-259
  (pre-norm block), l. 262-294 (n_layer + medusa_attention_num blocks; `output` after `norm`, `medusa_output`
  after `medusa_norm`), l. 324-337 (setup_proximity_mask: a token sees every token on its own or an earlier
  anti-diagonal), l. 339-357 (setup_caches: causal mask with the image block replaced by the proximity mask),
  l. 359-436 (forward: the right head's hidden state after block n_layer; training combines the two heads
  with rolls, l. 406-423; prefill averages both heads of the class position, l. 425-428; a decode step
  returns R(first), (B + R) / 2 of neighbours, B(last), l. 429-436), l. 468-494 (2D RoPE with a zero row for
  the class token, rotation of interleaved pairs);
* `models/generate.py` l. 59-72 (`sample`: sample_logits=False is the arg max), l. 75-84 (prefill with CFG on
  [cond; null] rows), l. 87-108 (a diagonal's step, CFG or the conditional logits when cfg_flag is off),
  l. 111-162 (decode_n_tokens: 2 g - 1 forwards, accept_first_last while the diagonals grow, input_pos of the
  next diagonal, tokens appended row by row), l. 165-217 (`generate`);
* `models/gpt.py` l. 263-294 and `train/train_c2i.py` l. 175-208 for the checkpoint layout and training mask.
"""

from __future__ import annotations

import functools

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


@functools.lru_cache(maxsize=None)
def tiny(grid: int):
    """A 2 + 1 block random NAR; weights x8 so that greedy tokens depend on their context. Cached; no test
    changes the weights."""
    lm = load_model("nar-L", random_init=True, seed=3 if grid == 4 else 11, overrides=dict(BASE, grid_size=grid))
    with torch.no_grad():
        for p in lm.model.parameters():
            if p.dim() > 1:
                p.mul_(8.0)
    return lm


# -- the re-derived reference --------------------------------------------------------------------------
def ref_freqs(grid: int, head_dim: int, base: float) -> torch.Tensor:
    """gpt.py l. 468-481, one class token: [1 + grid^2, head_dim / 2, 2] (cos, sin), row 0 zeros."""
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    f = torch.outer(torch.arange(grid).float(), freqs)
    fg = torch.cat([f[:, None, :].expand(-1, grid, -1), f[None, :, :].expand(grid, -1, -1)], -1)
    cache = torch.stack([torch.cos(fg), torch.sin(fg)], -1).flatten(0, 1)
    return torch.cat([torch.zeros(1, half, 2), cache])


def ref_rotate(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """gpt.py l. 484-494: x [B, L, H, D], f [L, D/2, 2]."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    f = f.view(1, xs.size(1), 1, xs.size(3), 2)
    out = torch.stack([xs[..., 0] * f[..., 0] - xs[..., 1] * f[..., 1], xs[..., 1] * f[..., 0] + xs[..., 0] * f[..., 1]], -1)
    return out.flatten(3).type_as(x)


def ref_rms(x, w, eps=1e-5):
    xf = x.float()
    return (xf * torch.rsqrt(torch.mean(xf * xf, -1, keepdim=True) + eps)).type_as(x) * w


def ref_block_mask(grid: int, size: int) -> torch.Tensor:
    """setup_caches (gpt.py l. 339-357) with setup_proximity_mask (l. 324-337): [size, size] bool."""
    m = torch.tril(torch.ones(size, size, dtype=torch.bool))
    block = m[1:1 + grid * grid, 1:1 + grid * grid]
    block[:, :] = False
    seen: list[int] = []
    for c in range(2 * grid - 1):
        cur = [h * grid + (c - h) for h in range(grid) if 0 <= c - h < grid]
        seen += cur
        for t in cur:
            block[t, seen] = True
    return m


class RefNAR:
    """The official Transformer's math over an arexport model's parameters (names are the official ones)."""

    def __init__(self, lm, swap_heads: bool = False):
        self.sd = {k: v.detach() for k, v in lm.model.state_dict().items()}
        c = lm.model.cfg
        self.c, self.swap = c, swap_heads
        self.layers = c.n_layer + c.medusa_attention_num
        self.freqs = ref_freqs(c.grid_size, c.dim // c.n_head, c.rope_base)

    def run(self, h, freqs, mask, caches=None, input_pos=None):
        """h [B, L, dim] through every block; mask [B, 1, L, keys]; caches: per block (k, v) [B, H, S, D]
        written at input_pos. Returns (right logits, below logits) fp32."""
        sd, c = self.sd, self.c
        b, n, _ = h.shape
        hd = c.dim // c.n_head
        right = None
        for i in range(self.layers):
            p = f"layers.{i}."
            x = ref_rms(h, sd[p + "attention_norm.weight"])
            q, k, v = (x @ sd[p + "attention.wqkv.weight"].T).split([c.dim, c.dim, c.dim], -1)
            q, k, v = (t.view(b, n, c.n_head, hd) for t in (q, k, v))
            q, k = ref_rotate(q, freqs), ref_rotate(k, freqs)
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            if caches is not None:
                caches[i][0][:, :, input_pos] = k
                caches[i][1][:, :, input_pos] = v
                k, v = caches[i]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            h = h + o.transpose(1, 2).reshape(b, n, c.dim) @ sd[p + "attention.wo.weight"].T
            x = ref_rms(h, sd[p + "ffn_norm.weight"])
            w1, w2, w3 = (sd[p + f"feed_forward.w{j}.weight"] for j in (1, 2, 3))
            h = h + (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T
            if i == c.n_layer - 1:
                right = h
        r = (ref_rms(right, sd["norm.weight"]) @ sd["output.weight"].T).float()
        d = (ref_rms(h, sd["medusa_norm.weight"]) @ sd["medusa_output.weight"].T).float()
        return (d, r) if self.swap else (r, d)

    def teacher_forced(self, classes, tokens, causal: bool = False):
        """gpt.py l. 369-423 with train_c2i.py's mask (l. 175-182): logits [B, N, V] in raster order."""
        sd, g = self.sd, self.c.grid_size
        n = g * g
        h = torch.cat([sd["cls_embedding.embedding_table.weight"][classes][:, None], sd["tok_embeddings.weight"][tokens]], 1)
        m = torch.tril(torch.ones(1 + n, 1 + n, dtype=torch.bool)) if causal else ref_block_mask(g, 1 + n)
        r, d = self.run(h, self.freqs[: 1 + n], m[None, None].expand(len(classes), 1, -1, -1))
        b, _, v = r.shape
        cond = (r[:, 0] + d[:, 0]) / 2
        rr = r[:, 1:].reshape(b, g, g, v).roll(shifts=1, dims=2)
        dd = d[:, 1:].reshape(b, g, g, v).roll(shifts=1, dims=1)
        out = torch.zeros_like(dd)
        out[:, 0, 0] = cond
        out[:, 0, 1:] = rr[:, 0, 1:]
        out[:, 1:, 0] = dd[:, 1:, 0]
        out[:, 1:, 1:] = (rr[:, 1:, 1:] + dd[:, 1:, 1:]) / 2
        return out.reshape(b, -1, v)

    def generate_greedy(self, classes, cfg_scale: float, cfg_interval: int = -1, causal: bool = False):
        """generate.py l. 75-217 with sample_logits=False (the arg max): raster tokens [B, N]."""
        sd, c = self.sd, self.c
        g, n = c.grid_size, c.grid_size ** 2
        size = -(-(1 + n) // 8) * 8  # setup_caches: find_multiple(max_seq_length, 8)
        guided = cfg_scale > 1.0
        cond = torch.cat([classes, torch.full_like(classes, c.num_classes)]) if guided else classes
        rows = len(cond)
        hd = c.dim // c.n_head
        caches = [(torch.zeros(rows, c.n_head, size, hd), torch.zeros(rows, c.n_head, size, hd)) for _ in range(self.layers)]
        pm = torch.tril(torch.ones(size, size, dtype=torch.bool)) if causal else ref_block_mask(g, size)
        full_freqs = torch.cat([self.freqs, torch.zeros(size - 1 - n, *self.freqs.shape[1:])])

        def forward(h, pos):
            pos = torch.tensor(pos)
            return self.run(h, full_freqs[pos], pm[pos][None, None].expand(rows, 1, -1, -1), caches, pos)

        def cfg(logits, flag=True):
            if not guided:
                return logits
            cl, ul = logits.split(len(logits) // 2)
            return ul + (cl - ul) * cfg_scale if flag else cl

        r, d = forward(sd["cls_embedding.embedding_table.weight"][cond][:, None], [0])
        cur = cfg((d[:, -1:] + r[:, -1:]) / 2).argmax(-1)  # [B, 1]
        grid_rows = [[cur]] + [[] for _ in range(g - 1)]
        pos, flag, generated = [1], True, 1
        for itera in range(1, 2 * g - 1):
            accept = itera + 1 if itera < g else 2 * g - 1 - itera
            if cfg_interval > -1 and generated > cfg_interval:
                flag = False
            x = torch.cat([cur, cur]) if guided else cur
            r, d = forward(sd["tok_embeddings.weight"][x], pos)
            middle = (d[:, :-1] + r[:, 1:]) / 2
            logits = torch.cat([r[:, :1], middle, d[:, -1:]], 1) if itera < g else middle
            cur = cfg(logits, flag).argmax(-1)
            pos = [1 + i * g + (itera - i) for i in range(g) if 0 <= itera - i < g]
            i = 0
            for row in grid_rows:
                if i >= cur.shape[1]:
                    break
                if len(row) < g:
                    row.append(cur[:, i:i + 1])
                    i += 1
            generated += accept
        return torch.cat([torch.cat(row, -1) for row in grid_rows], -1)


# -- tests ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", [4, 5])
def test_teacher_forced_logits_equal_the_reference(grid):
    lm = tiny(grid)
    g = torch.Generator().manual_seed(5)
    cls = torch.tensor([2, 10, 7])  # 10: the null class
    z = torch.randint(0, 64, (3, grid * grid), generator=g)
    with torch.no_grad():
        ours = lm.model(cls, z)
        ref = RefNAR(lm).teacher_forced(cls, z)
        causal = RefNAR(lm).teacher_forced(cls, z, causal=True)
        swapped = RefNAR(lm, swap_heads=True).teacher_forced(cls, z)
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), float((ours - ref).abs().max())
    # negative controls: LlamaGen's causal mask instead of the proximity mask; the two heads swapped
    assert (ours - causal).abs().max() > 1e-2
    assert (ours - swapped).abs().max() > 1e-2


@pytest.mark.parametrize("grid,scale,interval", [(4, 3.0, -1), (5, 1.0, -1), (5, 2.0, 6)])
def test_greedy_generation_equals_the_reference(grid, scale, interval):
    lm = tiny(grid)
    cls = torch.tensor([3, 8, 0])
    with torch.no_grad():
        ref = RefNAR(lm).generate_greedy(cls, scale, interval)
    out = Generator(TorchEngine(lm)).generate(classes=cls.tolist(), method="nar", images=False,
                                              sampling=SamplingParams(temperature=0.0, cfg_scale=scale, cfg_interval=interval))
    assert np.array_equal(out.tokens, ref.numpy())
    assert out.stats["target_forwards"] == 2 * grid - 1 and len(np.unique(out.tokens)) > 4
    with torch.no_grad():  # negative controls: the causal mask; the heads swapped
        causal = RefNAR(lm).generate_greedy(cls, scale, interval, causal=True)
        swapped = RefNAR(lm, swap_heads=True).generate_greedy(cls, scale, interval)
    assert not np.array_equal(out.tokens, causal.numpy())
    assert not np.array_equal(out.tokens, swapped.numpy())
    if interval > -1:  # negative control: guidance on every diagonal
        with torch.no_grad():
            always = RefNAR(lm).generate_greedy(cls, scale, -1)
        assert not np.array_equal(out.tokens, always.numpy())


def test_a_causal_runtime_mask_breaks_parity(monkeypatch):
    """Negative control on the implementation: the same decoder with a causal mask over the cache slots (a
    diagonal's tokens no longer see the ones after them on that diagonal) no longer equals the reference."""
    lm = tiny(4)
    eng = TorchEngine(lm)
    run = eng.run

    def causal(kind, cache, label=None, **feeds):
        feeds["attn_mask"] = cache.causal_mask(feeds["write_index"], feeds["tokens"].shape[1])
        return run(kind, cache, label=label, **feeds)

    monkeypatch.setattr(eng, "run", causal)
    cls = torch.tensor([3, 8, 0])
    out = Generator(eng).generate(classes=cls.tolist(), method="nar", images=False,
                                  sampling=SamplingParams(temperature=0.0, cfg_scale=3.0))
    with torch.no_grad():
        ref = RefNAR(lm).generate_greedy(cls, 3.0)
    assert not np.array_equal(out.tokens, ref.numpy())


def test_ort_engine_greedy_equals_the_reference(tmp_path):
    from arexport.exporter.build import BuildOptions, build_engine
    from arexport.format.manifest import read_manifest
    from arexport.runtime.loading import open_engine
    from arexport.verify import verify_engine

    lm = tiny(5)
    build_engine(lm, tmp_path / "nar", BuildOptions(batch_sizes=[2, 6], images=False))
    m = read_manifest(tmp_path / "nar")
    assert m.spec.family == "nar" and m.graphs["step"].step == "token_two_heads"
    eng = open_engine(str(tmp_path / "nar"), "ort")
    # against the in-memory model: a directory's torch backend re-draws the random init, not tiny()'s scaled weights
    rep = verify_engine(eng, TorchEngine(lm), "fp32", batch=2, verify_len=16, full_image=True, n_images=2)
    assert rep.passed and rep.token_agreement == 1.0
    cls = torch.tensor([4, 9, 1])
    with torch.no_grad():
        ref = RefNAR(lm).generate_greedy(cls, 2.5)
    out = Generator(eng).generate(classes=cls.tolist(), method="nar", images=False,
                                  sampling=SamplingParams(temperature=0.0, cfg_scale=2.5))
    assert np.array_equal(out.tokens, ref.numpy())


def test_continuous_batching_and_seeds():
    lm = tiny(4)
    gen = Generator(TorchEngine(lm))
    p = SamplingParams(cfg_scale=2.0, top_k=8)
    a = gen.generate(classes=[5, 6, 7], method="nar", sampling=p, seed=3, images=False, batch_size=3)
    b = gen.generate(classes=[5, 6, 7], method="nar", sampling=p, seed=3, images=False, batch_size=2)
    assert np.array_equal(a.tokens, b.tokens)  # rows join at different diagonals
    c = gen.generate(classes=[5, 6, 7], method="nar", sampling=p, seed=4, images=False)
    assert not np.array_equal(a.tokens, c.tokens)


def test_released_layout_loads_with_the_weights_only_loader(tmp_path):
    over = dict(BASE, grid_size=4)
    dim, hidden, v, blocks = 64, 192, 64, 3  # SwiGLU hidden: find_multiple(int(2 * 4 * 64 / 3), 32); 2 + medusa 1
    g = torch.Generator().manual_seed(0)
    shapes = {"tok_embeddings.weight": (v, dim), "cls_embedding.embedding_table.weight": (11, dim),
              "norm.weight": (dim,), "output.weight": (v, dim), "medusa_norm.weight": (dim,),
              "medusa_output.weight": (v, dim)}
    for i in range(blocks):  # the official Transformer's parameter names (gpt.py l. 120-133, 139-294)
        shapes.update({f"layers.{i}.attention.wqkv.weight": (3 * dim, dim), f"layers.{i}.attention.wo.weight": (dim, dim),
                       f"layers.{i}.feed_forward.w1.weight": (hidden, dim), f"layers.{i}.feed_forward.w3.weight": (hidden, dim),
                       f"layers.{i}.feed_forward.w2.weight": (dim, hidden), f"layers.{i}.attention_norm.weight": (dim,),
                       f"layers.{i}.ffn_norm.weight": (dim,)})
    sd = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    path = tmp_path / "last_version.pt"
    torch.save({"model": sd, "steps": 10, "args": {"gpt_model": "GPT-L"}}, path)  # train_c2i.py's DDP checkpoint
    got = load_model("nar-L", checkpoint=str(path), overrides=over)
    assert set(got.model.state_dict()) == set(sd)
    for k, t in sd.items():
        assert torch.equal(got.model.state_dict()[k], t), k
    with pytest.raises(ArexportError, match="holds a nar model, not a llamagen one"):
        load_model("llamagen-c2i-L", checkpoint=str(path), overrides=over)
    torch.save({"model": dict(sd, **{"medusa_output.weight": torch.zeros(v, dim + 1)})}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="medusa_output.weight"):
        load_model("nar-L", checkpoint=str(tmp_path / "bad.pt"), overrides=over)
    short = {k: t for k, t in sd.items() if not k.startswith("layers.2.")}  # a checkpoint without the extra block
    torch.save({"model": short}, tmp_path / "short.pt")
    with pytest.raises(CheckpointError, match="layers.2."):
        load_model("nar-L", checkpoint=str(tmp_path / "short.pt"), overrides=over)


def test_catalog_and_bad_inputs():
    from arexport.models.registry import canonical_name

    assert canonical_name("NAR-imagenet-256-B") == "nar-B" and canonical_name("nar_xl") == "nar-XL"
    lm = tiny(4)
    gen = Generator(TorchEngine(lm))
    with pytest.raises(ArexportError, match="does not apply"):
        gen.generate(classes=[1], method="ar", images=False)
    with pytest.raises(ArexportError, match="constant scale"):
        gen.generate(classes=[1], method="nar", images=False, sampling=SamplingParams(cfg_scale=2.0, cfg_schedule="linear"))
    with pytest.raises(ArexportError, match="released at 256 px"):
        load_model("nar-B", random_init=True, image_size=384)
