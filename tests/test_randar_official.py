"""RandAR parity with the official code (ziqipang/RandAR at commit d374a72).

The reference below is re-derived here, apart from the package, from:
* `RandAR/model/llamagen_gpt.py` l. 68-104 (class table, null class row `num_classes`), l. 164-197 (RMSNorm
  in fp32, SwiGLU), l. 199-214 (KVCache.update: writes k/v at `input_pos`), l. 670-695 (2D RoPE table with
  zero rows for the class token);
* `RandAR/model/randar_gpt.py` l. 27-45 (rotation of interleaved pairs per batch row), l. 92-137 (fused wqkv,
  RoPE on q and k, cache update, keys cut at max(input_pos) + 1, SDPA under the mask), l. 170-181 (pre-norm
  block), l. 349-430 (teacher forcing: [cond, P_0, z_0, P_1, z_1, ...] with P_i the instruction at
  order[i] and z_i the token there, both rotated by order[i]'s RoPE, causal, logits at 1::2),
  l. 432-448 (forward_inference: rows input_pos of the causal mask), l. 450-458 (instruction tokens: the
  learned vector split into heads and rotated), l. 496-649 (`generate`: first forward [cond, P_0];
  then [z_f, P_{f+1}, z_{f+1}, ..., z_{f+n-1}, next instructions] written from the slot after P_f; linear
  CFG s0 + (s1 - s0) f / N on [cond; null] rows; the last n outputs sampled; back to raster order);
* `RandAR/model/utils.py` l. 41-46 (interleave) and l. 49-69 (calculate_num_query_tokens_for_parallel_decoding);
* `RandAR/model/generate.py` l. 63-86 (`sample`: sample_logits=False is the argmax).
The reference keeps its own KV cache as the official generate does (rewritten slots included).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from arexport.errors import ArexportError, CheckpointError
from arexport.models.registry import load_model
from arexport.runtime.backends.torch.runner import TorchEngine
from arexport.runtime.generator import Generator
from arexport.runtime.methods import randar as randar_method
from arexport.runtime.sampling import SamplingParams

BASE = {"n_layer": 2, "dim": 64, "n_head": 4, "multiple_of": 32, "vocab_size": 64, "num_classes": 10}


@functools.lru_cache(maxsize=None)
def tiny(grid: int, seed: int = 3):
    """A 2-layer random RandAR; weights x8 (std 0.16) so that greedy tokens depend on their context (x4 left 5 distinct tokens in a 6 x 6 image).
    Cached: building the random VQ decoder is most of the cost; no test changes the weights."""
    lm = load_model("randar-L", random_init=True, seed=seed, overrides=dict(BASE, grid_size=grid))
    with torch.no_grad():
        for p in lm.model.parameters():
            if p.dim() > 1:
                p.mul_(8.0)
    return lm


# -- the re-derived reference --------------------------------------------------------------------------
def ref_freqs(grid: int, head_dim: int, base: float) -> torch.Tensor:
    """llamagen_gpt.py l. 670-695 with one class token: [1 + grid^2, head_dim / 2, 2] (cos, sin)."""
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    f = torch.outer(torch.arange(grid).float(), freqs)
    fg = torch.cat([f[:, None, :].expand(-1, grid, -1), f[None, :, :].expand(grid, -1, -1)], -1)
    cache = torch.stack([torch.cos(fg), torch.sin(fg)], -1).flatten(0, 1)
    return torch.cat([torch.zeros(1, half, 2), cache])


def ref_rotate(x: torch.Tensor, fc: torch.Tensor) -> torch.Tensor:
    """randar_gpt.py l. 27-45: x [B, L, H, D], fc [B, L, D/2, 2]."""
    b, l, h, d = x.shape
    xs = x.float().reshape(b, l, h, d // 2, 2)
    fc = fc.view(b, l, 1, d // 2, 2)
    out = torch.stack([xs[..., 0] * fc[..., 0] - xs[..., 1] * fc[..., 1],
                       xs[..., 1] * fc[..., 0] + xs[..., 0] * fc[..., 1]], -1)
    return out.flatten(3).type_as(x)


def ref_norm(x, w, eps=1e-5):
    xf = x.float()
    return (xf * torch.rsqrt(torch.mean(xf * xf, -1, keepdim=True) + eps)).type_as(x) * w


def ref_blocks(sd, n_layer, n_head, h, fc, mask, cache=None, input_pos=None):
    """randar_gpt.py l. 92-137, 170-181, 415-416: blocks (cache: per-layer [k, v] buffers [B, H, S, D]
    written at input_pos, keys cut at max(input_pos) + 1, mask rows given), final norm, fp32 logits."""
    b, l, dim = h.shape
    hd = dim // n_head
    for i in range(n_layer):
        p = f"layers.{i}."
        x = ref_norm(h, sd[p + "attention_norm.weight"])
        q, kk, v = (x @ sd[p + "attention.wqkv.weight"].T).split([dim, dim, dim], -1)
        q, kk, v = (t.view(b, l, n_head, hd) for t in (q, kk, v))
        q, kk = ref_rotate(q, fc), ref_rotate(kk, fc)
        q, kk, v = (t.transpose(1, 2) for t in (q, kk, v))
        m = mask
        if cache is not None:
            cache[i][0][:, :, input_pos] = kk
            cache[i][1][:, :, input_pos] = v
            top = int(input_pos.max()) + 1
            kk, v, m = cache[i][0][:, :, :top], cache[i][1][:, :, :top], mask[..., :top]
        o = F.scaled_dot_product_attention(q, kk, v, attn_mask=m, is_causal=m is None)
        h = h + o.transpose(1, 2).reshape(b, l, dim) @ sd[p + "attention.wo.weight"].T
        x = ref_norm(h, sd[p + "ffn_norm.weight"])
        h = h + (F.silu(x @ sd[p + "feed_forward.w1.weight"].T) * (x @ sd[p + "feed_forward.w3.weight"].T)) @ sd[p + "feed_forward.w2.weight"].T
    return (ref_norm(h, sd["norm.weight"]) @ sd["output.weight"].T).float()


def ref_instructions(sd, n_head, fc_tok):
    """randar_gpt.py l. 450-458: the learned vector [1, dim] per head, rotated by each token's row."""
    b, n = fc_tok.shape[:2]
    dim = sd["pos_instruct_embeddings"].shape[1]
    x = sd["pos_instruct_embeddings"].view(1, 1, n_head, dim // n_head).repeat(b, n, 1, 1)
    return ref_rotate(x, fc_tok).reshape(b, n, dim)


def ref_interleave(a, b):
    """utils.py l. 41-46."""
    out = torch.zeros_like(torch.cat([a, b], 1))
    out[:, ::2], out[:, 1::2] = a, b
    return out


def ref_teacher_forced(model, cls, z_raster, order, instr_fn=ref_instructions):
    """randar_gpt.py l. 349-430 (eval: no dropout): z_raster [B, N] raster tokens, order [B, N] ->
    logits [B, N, V], row i predicting the token at order[:, i]."""
    cfg = model.cfg
    sd = model.state_dict()
    z = z_raster.gather(1, order)
    fc_all = ref_freqs(cfg.grid_size, cfg.head_dim, cfg.rope_base)
    fc_tok = fc_all[1:][order]
    h = torch.cat([sd["cls_embedding.embedding_table.weight"][cls][:, None],
                   ref_interleave(instr_fn(sd, cfg.n_head, fc_tok), sd["tok_embeddings.weight"][z])], 1)
    fc = torch.cat([fc_all[:1][None].expand(len(cls), -1, -1, -1), ref_interleave(fc_tok, fc_tok)], 1)
    return ref_blocks(sd, cfg.n_layer, cfg.n_head, h, fc, None)[:, 1::2]


def ref_num_query(cur_step, total, n, idx, num):
    """utils.py l. 49-69."""
    target = min(int((1.0 - math.cos(math.pi / 2.0 * (cur_step + 1) / total)) * n + 1), n)
    return min(max(target - idx - num, 1), n - idx - num)


def ref_generate_greedy(model, cls, order, cfg_scales, steps, num_query=ref_num_query):
    """randar_gpt.py `generate` l. 496-649 with sample(sample_logits=False): raster tokens [B, N] and the
    group sizes. `num_query` is the schedule (a negative control perturbs it)."""
    cfg = model.cfg
    sd = model.state_dict()
    n, b = cfg.n_tokens, cls.shape[0]
    fc_all = ref_freqs(cfg.grid_size, cfg.head_dim, cfg.rope_base)
    fc_tok = fc_all[1:][order]
    instr = ref_instructions(sd, cfg.n_head, fc_tok)
    guided = cfg_scales[-1] > 1.0
    cond = torch.cat([cls, torch.full_like(cls, cfg.num_classes)]) if guided else cls
    if guided:
        fc_tok, instr = torch.cat([fc_tok, fc_tok]), torch.cat([instr, instr])
    rows = cond.shape[0]
    s_len = 8 * math.ceil((1 + 2 * n) / 8)
    cache = [[torch.zeros(rows, cfg.n_head, s_len, cfg.head_dim) for _ in range(2)] for _ in range(cfg.n_layer)]
    causal = torch.tril(torch.ones(s_len, s_len, dtype=torch.bool))
    result = torch.zeros(b, n, dtype=torch.long)
    step, num, idx = 0, 1, 0
    x = torch.cat([sd["cls_embedding.embedding_table.weight"][cond][:, None], instr[:, :1]], 1)
    fc = torch.cat([fc_all[:1][None].expand(rows, -1, -1, -1), fc_tok[:, :1]], 1)
    pos = torch.arange(2)
    sizes = []
    while idx <= n - num and idx <= n - 1:
        logits = ref_blocks(sd, cfg.n_layer, cfg.n_head, x, fc, causal[None, None, pos], cache, pos)
        if guided:
            scale = cfg_scales[0] + (cfg_scales[-1] - cfg_scales[0]) * idx / n
            c, u = logits.chunk(2)
            logits = u + scale * (c - u)
        new = logits[:, -num:].argmax(-1)
        result[:, idx:idx + num] = new
        sizes.append(num)
        img = sd["tok_embeddings.weight"][torch.cat([new, new]) if guided else new]
        step += 1
        nxt = num_query(step, steps, n, idx, num)
        ni = idx + num
        parts, fparts = [img[:, :1]], [fc_tok[:, idx:idx + 1]]
        for j in range(1, num):
            parts += [instr[:, idx + j:idx + j + 1], img[:, j:j + 1]]
            fparts += [fc_tok[:, idx + j:idx + j + 1]] * 2
        x = torch.cat(parts + [instr[:, ni:ni + nxt]], 1)
        fc = torch.cat(fparts + [fc_tok[:, ni:ni + nxt]], 1)
        last = int(pos[len(pos) - num])  # the slot of the current group's first instruction
        pos = torch.arange(x.shape[1]) + last + 1
        idx, num = ni, nxt
    raster = torch.empty_like(result)
    raster.scatter_(1, order, result)
    return raster, sizes


def forced_orders(monkeypatch, orders):
    """The method's per-image orders replaced by `orders` [B, N], handed out in admission order."""
    it = iter(list(orders))
    monkeypatch.setattr(randar_method, "generation_order", lambda keys: torch.stack([next(it) for _ in range(keys.shape[0])]))


def random_orders(b, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g) for _ in range(b)])


# -- tests ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,steps", [(16, 6), (16, 16), (36, 7), (256, 88), (256, 16), (1024, 88)])
def test_schedule_equals_the_reference(n, steps):
    from arexport.families.randar import randar_group_sizes

    sizes, step, idx, num = [], 0, 0, 1
    while idx <= n - num and idx <= n - 1:  # randar_gpt.py l. 571-644
        sizes.append(num)
        step += 1
        num, idx = ref_num_query(step, steps, n, idx, num), idx + num
    assert randar_group_sizes(n, steps) == sizes and sum(sizes) == n
    if steps < n:  # negative control: the schedule counted from the step before
        assert randar_group_sizes(n, steps + 1) != sizes


def test_teacher_forced_logits_equal_the_reference():
    lm = tiny(4)
    g = torch.Generator().manual_seed(5)
    z = torch.randint(0, 64, (3, 16), generator=g)
    order = random_orders(3, 16, 1)
    cls = torch.tensor([1, 7, 10])  # 10: the null class
    with torch.no_grad():
        ours = lm.model(cls, z.gather(1, order), order)
        ref = ref_teacher_forced(lm.model, cls, z, order)
        assert (ours - ref).abs().max() < 1e-4
        # negative control: instructions not rotated (the bare learned vector at every position)
        flat = ref_teacher_forced(lm.model, cls, z, order,
                                  instr_fn=lambda sd, nh, fc: sd["pos_instruct_embeddings"].expand(fc.shape[0], fc.shape[1], -1))
        assert (ours - flat).abs().max() > 1e-3


def test_one_token_per_forward_is_teacher_forcing(monkeypatch):
    """steps -1: the cache path's greedy tokens are the argmax of the teacher-forced rows in that order."""
    lm = tiny(4)
    order = random_orders(2, 16, 2)
    forced_orders(monkeypatch, order)
    out = Generator(TorchEngine(lm)).generate(classes=[2, 5], method="randar", method_options={"steps": -1},
                                              sampling=SamplingParams(temperature=0.0), images=False)
    assert out.stats["target_forwards"] == 16
    z = torch.as_tensor(out.tokens)
    with torch.no_grad():
        tf = lm.model(torch.tensor([2, 5]), z.gather(1, order), order)
    assert torch.equal(tf.argmax(-1), z.gather(1, order))


@pytest.mark.parametrize("grid,steps,scales", [(4, 6, (1.0, 4.0)), (6, 9, (1.0, 3.0)), (4, 5, (1.0, 1.0))])
def test_greedy_generation_equals_the_reference(monkeypatch, grid, steps, scales):
    lm = tiny(grid, seed=3 if grid == 4 else 11)
    n = grid * grid
    cls = torch.tensor([3, 8, 0])
    order = random_orders(3, n, steps)
    forced_orders(monkeypatch, order)
    with torch.no_grad():
        ref, sizes = ref_generate_greedy(lm.model, cls, order, scales, steps)
    out = Generator(TorchEngine(lm)).generate(classes=cls.tolist(), method="randar", method_options={"steps": steps},
                                              images=False, sampling=SamplingParams(temperature=0.0, cfg_scale=scales[1],
                                                                                     cfg_schedule="linear"))
    assert np.array_equal(out.tokens, ref.numpy())
    assert out.stats["target_forwards"] == len(sizes) and max(sizes) > 1
    with torch.no_grad():  # negative control: a group of two one step early (its tokens do not see each other)
        late, _ = ref_generate_greedy(lm.model, cls, order, scales, steps,
                                      num_query=lambda s, t, nn, i, m: ref_num_query(s, t, nn, i, m) + (1 if s == 1 else 0))
    assert not np.array_equal(out.tokens, late.numpy())
    if scales[1] > 1.0:
        with torch.no_grad():  # negative control: a constant scale instead of the linear ramp
            const, _ = ref_generate_greedy(lm.model, cls, order, (scales[1], scales[1]), steps)
        assert not np.array_equal(out.tokens, const.numpy())


@pytest.mark.parametrize("scales,schedule", [((2.0, 4.0), "linear"), ((5.0, 1.5), "linear"), ((3.0, 3.0), "constant"),
                                             ((3.0, 3.0), "linear")])
def test_cfg_start_scale_equals_the_reference(monkeypatch, scales, schedule):
    """The reference's --cfg-scales START,END (sample_c2i.py l. 120-127, 168; randar_gpt.py l. 500-509, 536, 576-579:
    scale START + (END - START) f / N for the group starting at generation index f, guided only when END > 1):
    `--cfg-start START --cfg-scale END`, rising, falling, and START = END both as `constant` and as a flat ramp."""
    lm = tiny(4)
    cls = torch.tensor([2, 9, 5])
    order = random_orders(3, 16, 21)
    forced_orders(monkeypatch, order)
    with torch.no_grad():
        ref, sizes = ref_generate_greedy(lm.model, cls, order, scales, 6)
    opts = {"steps": 6} if schedule == "constant" else {"steps": 6, "cfg_start": scales[0]}
    out = Generator(TorchEngine(lm)).generate(classes=cls.tolist(), method="randar", method_options=opts, images=False,
                                              sampling=SamplingParams(temperature=0.0, cfg_scale=scales[1],
                                                                      cfg_schedule=schedule))
    assert np.array_equal(out.tokens, ref.numpy()) and max(sizes) > 1
    if scales[0] != scales[1]:
        with torch.no_grad():  # negative control: the start scale ignored (the ramp from 1, the default)
            from_one, _ = ref_generate_greedy(lm.model, cls, order, (1.0, scales[1]), 6)
        assert not np.array_equal(out.tokens, from_one.numpy())


def test_cfg_start_edges():
    """A start above 1 with END = 1 does not guide (the reference guides only when cfg_scales[-1] > 1); bad starts
    are refused with one line."""
    lm = tiny(4)
    gen = Generator(TorchEngine(lm))
    greedy = dict(classes=[3, 4], method="randar", images=False, seed=1)
    plain = gen.generate(**greedy, method_options={"steps": 6}, sampling=SamplingParams(temperature=0.0, cfg_scale=1.0))
    started = gen.generate(**greedy, method_options={"steps": 6, "cfg_start": 3.0},
                           sampling=SamplingParams(temperature=0.0, cfg_scale=1.0, cfg_schedule="linear"))
    assert np.array_equal(plain.tokens, started.tokens) and started.stats["target_forwards"] == plain.stats["target_forwards"]
    with pytest.raises(ArexportError, match=r"randar cfg-start must be in \[0, 100\], got -1"):
        gen.generate(**greedy, method_options={"cfg_start": -1.0})
    with pytest.raises(ArexportError, match="cfg-start 2 is the linear schedule's first scale; cfg-schedule constant"):
        gen.generate(**greedy, method_options={"cfg_start": 2.0}, sampling=SamplingParams(cfg_scale=3.0))
    with pytest.raises(ArexportError, match="the reference has no cfg-interval"):
        gen.generate(**greedy, sampling=SamplingParams(cfg_scale=3.0, cfg_schedule="linear", cfg_interval=4))


def test_ort_engine_greedy_equals_the_reference(tmp_path, monkeypatch):
    from arexport.exporter.build import BuildOptions, build_engine
    from arexport.format.manifest import read_manifest
    from arexport.runtime.loading import open_engine
    from arexport.verify import verify_engine

    lm = tiny(6, seed=11)
    build_engine(lm, tmp_path / "randar", BuildOptions(batch_sizes=[2, 6], images=False))
    m = read_manifest(tmp_path / "randar")
    assert m.spec.family == "randar" and m.graphs["step"].kinds == {"decode": 1, "verify": 16}
    eng = open_engine(str(tmp_path / "randar"), "ort")
    # against the in-memory model: a directory's torch backend re-draws the random init, not tiny()'s scaled weights
    rep = verify_engine(eng, TorchEngine(lm), "fp32", batch=2, verify_len=16, full_image=True, n_images=2)
    assert rep.passed and rep.token_agreement == 1.0
    cls = torch.tensor([4, 9, 1])
    order = random_orders(3, 36, 7)
    forced_orders(monkeypatch, order)
    with torch.no_grad():
        ref, _ = ref_generate_greedy(lm.model, cls, order, (1.0, 2.5), 10)
    out = Generator(eng).generate(classes=cls.tolist(), method="randar", method_options={"steps": 10}, images=False,
                                  sampling=SamplingParams(temperature=0.0, cfg_scale=2.5, cfg_schedule="linear"))
    assert np.array_equal(out.tokens, ref.numpy())
    with pytest.raises(ArexportError, match=r"feeds up to \d+ tokens per forward; the engine's maximum query length is 16"):
        Generator(eng).generate(classes=[1], method="randar", method_options={"steps": 2}, images=False)


def test_batch_invariance():
    lm = tiny(4)
    gen = Generator(TorchEngine(lm))
    p = SamplingParams(cfg_scale=2.0, top_k=8, cfg_schedule="linear")
    a = gen.generate(classes=[5, 6, 7], method="randar", method_options={"steps": 6}, sampling=p, seed=3, images=False,
                     batch_size=3)
    b = gen.generate(classes=[5, 6, 7], method="randar", method_options={"steps": 6}, sampling=p, seed=3, images=False,
                     batch_size=2)
    assert np.array_equal(a.tokens, b.tokens)  # continuous batching: rows join at different forwards
    c = gen.generate(classes=[5, 6, 7], method="randar", method_options={"steps": 6}, sampling=p, seed=4, images=False)
    assert not np.array_equal(a.tokens, c.tokens)


def test_released_layout_loads_with_the_weights_only_loader(tmp_path):
    from safetensors.torch import save_file

    over = dict(BASE, grid_size=4)
    dim, hidden, v, layers = 64, 192, 64, 2  # SwiGLU hidden: find_multiple(int(2 * 4 * 64 / 3), 32)
    g = torch.Generator().manual_seed(0)
    shapes = {"tok_embeddings.weight": (v, dim), "cls_embedding.embedding_table.weight": (11, dim),
              "norm.weight": (dim,), "output.weight": (v, dim), "pos_instruct_embeddings": (1, dim)}
    for i in range(layers):  # RandARTransformer's parameter names (randar_gpt.py l. 51-75, 142-168, 235-285)
        shapes.update({f"layers.{i}.attention.wqkv.weight": (3 * dim, dim), f"layers.{i}.attention.wo.weight": (dim, dim),
                       f"layers.{i}.feed_forward.w1.weight": (hidden, dim), f"layers.{i}.feed_forward.w3.weight": (hidden, dim),
                       f"layers.{i}.feed_forward.w2.weight": (dim, hidden), f"layers.{i}.attention_norm.weight": (dim,),
                       f"layers.{i}.ffn_norm.weight": (dim,)})
    sd = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    save_file(sd, str(tmp_path / "randar_0.3b_llamagen_360k_bs_1024_lr_0.0004.safetensors"))
    got = load_model("randar-L", checkpoint=str(tmp_path / "randar_0.3b_llamagen_360k_bs_1024_lr_0.0004.safetensors"),
                     overrides=over)
    assert set(got.model.state_dict()) == set(sd)
    for k, t in sd.items():
        assert torch.equal(got.model.state_dict()[k], t), k
    with pytest.raises(ArexportError, match="holds a randar model, not a llamagen one"):
        load_model("llamagen-c2i-L", checkpoint=str(tmp_path / "randar_0.3b_llamagen_360k_bs_1024_lr_0.0004.safetensors"),
                   overrides=over)
    bad = dict(sd, pos_instruct_embeddings=torch.zeros(2, dim))
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="pos_instruct_embeddings"):
        load_model("randar-L", checkpoint=str(tmp_path / "bad.safetensors"), overrides=over)


def test_catalog_and_bad_inputs():
    from arexport.models.registry import model_config

    for name, (layers, heads, dim, g) in {"randar-L": (24, 16, 1024, 3.4), "randar-XL": (36, 20, 1280, 4.0)}.items():
        c = model_config(name)
        assert (c.n_layer, c.n_head, c.dim, c.grid_size) == (layers, heads, dim, 16)
        assert c.spec(name).extra["sampling_defaults"]["cfg_scale"] == g
    lm = tiny(4)
    gen = Generator(TorchEngine(lm))
    with pytest.raises(ArexportError, match="method ar does not apply"):
        gen.generate(classes=[1], method="ar", images=False)
    with pytest.raises(ArexportError, match=r"randar steps must be -1 or in \[1, 1048576\], got 0"):
        gen.generate(classes=[1], method="randar", method_options={"steps": 0}, images=False)
    assert gen.generate(classes=[1], method="randar", images=False).stats["target_forwards"] == 16  # 88 steps, 16 tokens
    with pytest.raises(ArexportError, match="not cfg-schedule cosine"):
        gen.generate(classes=[1], method="randar", images=False, sampling=SamplingParams(cfg_scale=2.0, cfg_schedule="cosine"))
