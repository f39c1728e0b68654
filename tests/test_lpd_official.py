"""LPD parity with the official code (mit-han-lab/lpd at commit f447b83).

The reference below is re-derived here, apart from the package, from:
* `models/block.py` l. 9-89 (qkv with bias split into heads, SDPA under the mask, proj; the inference path
  writes k/v at input_pos and attends keys [: input_pos[-1] + 1] under rows input_pos of the mask) and
  l. 106-156 (pre-norm block with timm's GELU Mlp);
* `models/lpd.py` l. 35-49 (parameters), l. 83-146 (teacher forcing: inputs LayerNorm(embedding + pos_embed)
  gathered in order [class, z...], the context without the last group followed by the queries of every
  token; logits of the last N), l. 160-230 (`sample_tokens`: forward i feeds group i - 1's tokens (the
  class for i = 0) and group i's queries at input_pos [c_i, c_{i+2}); linear CFG 1 + (s - 1) t / N per
  token; uncond rows on `fake_latent`; the last g_i outputs sampled; back to raster order), l. 233-250
  (sizes: norm eps 1e-6, mlp_ratio 4);
* `models/mask.py` l. 6-37 (training mask from group ids) and `engine.py` l. 22-32, 171-174 (inference
  block-causal mask over [1, g_0, g_1, ...]);
* `models/sampling.py` l. 53-80 (`sample`; sample_logits=False is the argmax);
* `orders/lpd_order.py` l. 9-125 (the locality-aware order: proximity scores over the 8-neighbourhood,
  shuffle then stable sort, repulsion inside a group, farthest-point sampling for the rest) with its
  random calls (random.choice, random.shuffle, np.random.randint) replaced by the keys the package
  documents (families.lpd.lpd_order): the smallest key is chosen, the shuffle sorts by key.
"""

from __future__ import annotations

import argparse
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from arexport.errors import ArexportError, CheckpointError
from arexport.models.registry import load_model
from arexport.runtime.backends.torch.runner import TorchEngine
from arexport.runtime.generator import Generator
from arexport.runtime.methods import lpd as lpd_method
from arexport.runtime.sampling import SamplingParams

BASE = {"n_layer": 2, "dim": 64, "n_head": 4, "vocab_size": 64, "num_classes": 10}
GROUPS = [1, 2, 3, 4, 6]  # 16 tokens in 5 forwards


@functools.lru_cache(maxsize=None)
def tiny(grid: int = 4, seed: int = 3):
    """A 2-layer random LPD; linear weights x8 so that tokens depend on their context (cached: no test
    changes the weights)."""
    lm = load_model("lpd-l-256", random_init=True, seed=seed, overrides=dict(BASE, grid_size=grid))
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if p.dim() == 2 and name.startswith("blocks."):
                p.mul_(8.0)
    return lm


# -- the re-derived reference --------------------------------------------------------------------------
def ln(x, sd, key):
    return F.layer_norm(x, x.shape[-1:], sd[key + ".weight"], sd[key + ".bias"], 1e-6)


def ref_blocks(sd, n_layer, n_head, x, mask, cache=None, input_pos=None):
    """block.py l. 9-89, 106-156 and lpd.py l. 117 + head: x [B, L, dim] -> logits [B, L, V]."""
    b, l, dim = x.shape
    for i in range(n_layer):
        p = f"blocks.{i}."
        h = ln(x, sd, p + "norm1")
        qkv = (h @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]).reshape(b, l, 3, n_head, dim // n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        m = mask
        if cache is not None:
            cache[i][0][:, :, input_pos] = k
            cache[i][1][:, :, input_pos] = v
            top = int(input_pos[-1]) + 1
            k, v, m = cache[i][0][:, :, :top], cache[i][1][:, :, :top], mask[input_pos, :top]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=m).transpose(1, 2).reshape(b, l, dim)
        x = x + o @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        h = ln(x, sd, p + "norm2")
        h = F.gelu(h @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"]) @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
        x = x + h
    return (ln(x, sd, "norm") @ sd["head.weight"].T).float()


def ref_train_mask(groups):
    """mask.py l. 6-37 as a dense [L, L] bool (its 128-padding left out)."""
    cum = np.concatenate([[0, 1], np.cumsum(groups) + 1])
    counts = cum[1:] - cum[:-1]
    context_len = counts[:-1].sum()
    blocks = 2 * (len(counts) - 2) + 2
    half = blocks // 2
    ids = []
    for i in range(blocks):
        ids += [i * 2] * counts[i] if i < half else [(i - half) * 2 + 1] * counts[i - half + 1]
    gid = torch.tensor(ids)
    kv = torch.arange(len(ids))
    return (gid[:, None] == gid[None, :]) | ((gid[None, :] < gid[:, None]) & (kv[None, :] < context_len))


def ref_teacher_forced(model, cls, z_raster, order, groups, mask_fn=ref_train_mask):
    """lpd.py l. 83-146 (eval: no label drop): logits [B, N, V], row i predicting z at order[:, i]."""
    cfg = model.cfg
    sd = model.state_dict()
    b, n = z_raster.shape
    x = torch.cat([sd["class_emb.weight"][cls][:, None], sd["token_emb.weight"][z_raster]], 1)
    x = ln(x + sd["pos_embed"], sd, "z_proj_ln")
    masked = ln(sd["mask_token"].expand(b, n + 1, -1) + sd["pos_embed"], sd, "z_proj_ln")
    o = torch.cat([torch.zeros(b, 1, dtype=torch.long), order + 1], 1)
    x = x.gather(1, o[..., None].expand(-1, -1, x.shape[2]))
    masked = masked.gather(1, o[..., None].expand(-1, -1, x.shape[2]))
    x = torch.cat([x[:, :-groups[-1]], masked[:, 1:]], 1)
    return ref_blocks(sd, cfg.n_layer, cfg.n_head, x, mask_fn(groups))[:, -n:]


def ref_block_causal(sizes):
    """engine.py l. 22-32 (as bool: True = attend)."""
    total = sum(sizes)
    m = torch.zeros(total, total, dtype=torch.bool)
    start = 0
    for s in sizes:
        m[start:start + s, :start + s] = True
        start += s
    return m


def ref_generate_greedy(model, cls, order, groups, cfg_scale, schedule="linear"):
    """lpd.py `sample_tokens` l. 160-230 with sample(sample_logits=False): raster tokens [B, N]."""
    cfg = model.cfg
    sd = model.state_dict()
    n, b = cfg.n_tokens, cls.shape[0]
    o = torch.cat([torch.zeros(b, 1, dtype=torch.long), order + 1], 1)
    pos_embed = sd["pos_embed"].repeat(b, 1, 1).gather(1, o[..., None].expand(-1, -1, cfg.dim))
    class_embedding = sd["class_emb.weight"][cls]
    guided = cfg_scale != 1.0
    if guided:
        class_embedding = torch.cat([class_embedding, sd["fake_latent"].repeat(b, 1)])
        pos_embed = torch.cat([pos_embed, pos_embed])
    rows = class_embedding.shape[0]
    cache = [[torch.zeros(rows, cfg.n_head, 1 + n, cfg.head_dim) for _ in range(2)] for _ in range(cfg.n_layer)]
    mask = ref_block_causal([1] + groups)
    cum = [0, 1] + [1 + int(c) for c in np.cumsum(groups)]
    tokens = torch.zeros(b, n, dtype=torch.long)
    for i, g in enumerate(groups):
        if i == 0:
            prev = class_embedding[:, None]
        else:
            prev = sd["token_emb.weight"][tokens[:, cum[i] - 1:cum[i + 1] - 1]]
            if guided:
                prev = torch.cat([prev, prev])
        x = torch.cat([prev, sd["mask_token"].repeat(rows, g, 1)], 1)
        x = ln(x + pos_embed[:, cum[i]:cum[i + 2]], sd, "z_proj_ln")
        logits = ref_blocks(sd, cfg.n_layer, cfg.n_head, x, mask, cache, torch.arange(cum[i], cum[i + 2]))[:, -g:]
        if schedule == "linear":
            scale = 1 + (cfg_scale - 1) * torch.linspace(cum[i + 1] - 1, cum[i + 1] + g - 2, g) / (cum[-1] - 1)
        else:
            scale = torch.tensor([cfg_scale])
        if guided:
            c, u = logits.chunk(2)
            logits = u + scale[None, :, None] * (c - u)
        tokens[:, cum[i + 1] - 1:cum[i + 2] - 1] = logits.argmax(-1)
    raster = torch.zeros_like(tokens)
    raster.scatter_(1, order, tokens)
    return raster


def forced_orders(monkeypatch, orders):
    it = iter(list(orders))
    monkeypatch.setattr(lpd_method, "generation_order", lambda keys: torch.stack([next(it) for _ in range(keys.shape[0])]))


def random_orders(b, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g) for _ in range(b)])


def gen_groups(groups):
    return ",".join(str(g) for g in groups)


def ref_lpd_order(groups, grid, keys, proximity=1.0, repulsion=1.0):
    """orders/lpd_order.py l. 9-81 and 84-125, random calls drawn from keys [G, N] (see module doc)."""
    k = keys.double().numpy()
    coords = [[i, j] for i in range(grid) for j in range(grid)]
    rid = lambda c: c[0] * grid + c[1]  # noqa: E731
    selected = []
    for step, size in enumerate(groups):
        if step == 0:
            selected.append(coords[int(np.argmin(k[0]))])  # random.choice
            continue
        cands = []
        for c in coords:
            if c in selected:
                continue
            score = 0
            for s_ in selected:
                if abs(c[0] - s_[0]) <= 1 and abs(c[1] - s_[1]) <= 1:
                    d = float(np.hypot(c[0] - s_[0], c[1] - s_[1]))
                    if d > 0:
                        score += 1.0 / d
            cands.append([score, c])
        cands.sort(key=lambda it: k[step][rid(it[1])])  # random.shuffle
        cands.sort(key=lambda it: it[0], reverse=True)
        c1 = [it[1] for it in cands if it[0] >= proximity]
        c2 = [it[1] for it in cands if it[0] < proximity]
        chosen, filtered = [], []
        while len(chosen) < size and c1:
            c = c1.pop(0)
            if any(abs(c[0] - t[0]) <= repulsion and abs(c[1] - t[1]) <= repulsion for t in chosen):
                filtered.append(c)
            else:
                chosen.append(c)
        filtered.extend(c1)
        c2.extend(filtered)
        left = size - len(chosen)
        if left > 0:
            if len(c2) <= left:
                chosen.extend(c2)
            else:
                cn = np.array(c2, dtype=np.float64)
                have = np.array(chosen, dtype=np.float64).reshape(-1, 2)
                idxs = []
                for _ in range(left):
                    if len(have) == 0:
                        i = int(np.argmin([k[step][rid(c)] for c in c2]))  # np.random.randint
                        have = cn[i][None]
                    else:
                        dist = np.sqrt(((cn[:, None] - have[None]) ** 2).sum(-1)).min(1)
                        dist[idxs] = 0
                        i = int(np.argmax(dist))
                        have = np.vstack([have, cn[i]])
                    idxs.append(i)
                chosen.extend(c2[i] for i in idxs)
        selected.extend(chosen)
    return torch.tensor([rid(c) for c in selected])


# -- tests ------------------------------------------------------------------------------------------
def test_teacher_forced_logits_equal_the_reference():
    lm = tiny()
    z = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(5))
    order = random_orders(3, 16, 1)
    cls = torch.tensor([1, 7, 9])
    with torch.no_grad():
        ours = lm.model(cls, z.gather(1, order), order, GROUPS)
        ref = ref_teacher_forced(lm.model, cls, z, order, GROUPS)
        assert (ours - ref).abs().max() < 1e-4
        # negative control: queries that do not see the other queries of their group
        def no_mutual(groups):
            m = ref_train_mask(groups).clone()
            nc = 1 + 16 - groups[-1]
            q = m[nc:, nc:]
            m[nc:, nc:] = q & torch.eye(q.shape[0], dtype=torch.bool)
            return m
        assert (ours - ref_teacher_forced(lm.model, cls, z, order, GROUPS, mask_fn=no_mutual)).abs().max() > 1e-3


@pytest.mark.parametrize("cfg_scale,schedule", [(3.0, "linear"), (2.0, "constant"), (1.0, "linear")])
def test_greedy_generation_equals_the_reference(monkeypatch, cfg_scale, schedule):
    lm = tiny()
    cls = torch.tensor([3, 8, 0])
    order = random_orders(3, 16, 4)
    forced_orders(monkeypatch, order)
    with torch.no_grad():
        ref = ref_generate_greedy(lm.model, cls, order, GROUPS, cfg_scale, schedule)
    out = Generator(TorchEngine(lm)).generate(classes=cls.tolist(), method="lpd", method_options={"group_sizes": gen_groups(GROUPS), "group_order": "random"},
                                              images=False, sampling=SamplingParams(temperature=0.0, cfg_scale=cfg_scale,
                                                                                     cfg_schedule=schedule))
    assert np.array_equal(out.tokens, ref.numpy())
    assert out.stats["target_forwards"] == len(GROUPS)
    with torch.no_grad():  # negative control: other group sizes over the same order
        other = ref_generate_greedy(lm.model, cls, order, [1, 3, 2, 4, 6], cfg_scale, schedule)
    assert not np.array_equal(out.tokens, other.numpy())


def test_ort_engine_greedy_equals_the_reference(tmp_path, monkeypatch):
    from arexport.exporter.build import BuildOptions, build_engine
    from arexport.format.manifest import read_manifest
    from arexport.runtime.loading import open_engine
    from arexport.verify import verify_engine

    lm = tiny()
    build_engine(lm, tmp_path / "lpd", BuildOptions(batch_sizes=[2, 6], images=False))
    m = read_manifest(tmp_path / "lpd")
    assert m.spec.family == "lpd" and m.graphs["step"].kinds == {"decode": 1, "verify": 16}
    eng = open_engine(str(tmp_path / "lpd"), "ort")
    rep = verify_engine(eng, TorchEngine(lm), "fp32", batch=2, verify_len=16, full_image=True, n_images=2)
    assert rep.passed and rep.token_agreement == 1.0
    cls = torch.tensor([4, 9, 1])
    order = random_orders(3, 16, 7)
    forced_orders(monkeypatch, order)
    with torch.no_grad():
        ref = ref_generate_greedy(lm.model, cls, order, GROUPS, 2.5)
    out = Generator(eng).generate(classes=cls.tolist(), method="lpd", method_options={"group_sizes": gen_groups(GROUPS),
                                                                                      "group_order": "random"},
                                  images=False, sampling=SamplingParams(temperature=0.0, cfg_scale=2.5, cfg_schedule="linear"))
    assert np.array_equal(out.tokens, ref.numpy())


@pytest.mark.parametrize("grid,groups,repulsion", [(16, "20", 2.0), (16, "20", 3.0), (16, "32", 2.0), (4, GROUPS, 1.0),
                                                   (6, [1, 2, 3, 5, 8, 8, 9], 2.0)])
def test_lpd_order_equals_the_reference(grid, groups, repulsion):
    from arexport.families.lpd import lpd_group_sizes, lpd_order

    sizes = lpd_group_sizes(256, int(groups)) if isinstance(groups, str) else groups
    for seed in range(3):
        keys = torch.rand(len(sizes), grid * grid, generator=torch.Generator().manual_seed(seed))
        ours = lpd_order(sizes, grid, keys, repulsion)
        assert torch.equal(ours, ref_lpd_order(sizes, grid, keys, repulsion=repulsion))
        assert torch.equal(ours.sort().values, torch.arange(grid * grid))
    # negative control: another repulsion distance gives another order
    assert not torch.equal(ours, ref_lpd_order(sizes, grid, keys, repulsion=repulsion + 1))


def test_lpd_order_generation_equals_the_reference(monkeypatch):
    """`--group-order lpd` (the default): the decoder's orders are lpd_order's, and the tokens the reference's."""
    from arexport.families import lpd as lpd_family

    seen = []

    def spy(*a, **k):
        seen.append(lpd_family.lpd_order(*a, **k))
        return seen[-1]

    monkeypatch.setattr(lpd_method, "lpd_order", spy)
    lm = tiny()
    cls = torch.tensor([2, 6])
    out = Generator(TorchEngine(lm)).generate(classes=cls.tolist(), method="lpd", method_options={"group_sizes": gen_groups(GROUPS)},
                                              images=False, sampling=SamplingParams(temperature=0.0, cfg_scale=3.0,
                                                                                     cfg_schedule="linear"))
    assert len(seen) == 2
    with torch.no_grad():
        ref = ref_generate_greedy(lm.model, cls, torch.stack(seen), GROUPS, 3.0)
    assert np.array_equal(out.tokens, ref.numpy())


def test_batch_invariance_and_bad_inputs():
    lm = tiny()
    gen = Generator(TorchEngine(lm))
    p = SamplingParams(cfg_scale=2.0, top_k=8, cfg_schedule="linear")
    opts = {"group_sizes": gen_groups(GROUPS)}
    a = gen.generate(classes=[5, 6, 7], method="lpd", method_options=opts, sampling=p, seed=3, images=False, batch_size=3)
    b = gen.generate(classes=[5, 6, 7], method="lpd", method_options=opts, sampling=p, seed=3, images=False, batch_size=2)
    assert np.array_equal(a.tokens, b.tokens)  # continuous batching: rows join at different forwards
    with pytest.raises(ArexportError, match="group-sizes must sum to the image's 16 tokens, got 15"):
        gen.generate(classes=[1], method="lpd", method_options={"group_sizes": "1,2,3,4,5"}, images=False)
    with pytest.raises(ArexportError, match="group-sizes must be comma-separated integers >= 1"):
        gen.generate(classes=[1], method="lpd", method_options={"group_sizes": "1,x"}, images=False)
    with pytest.raises(ArexportError, match="lpd has group sizes for 16 steps on 16 tokens"):
        gen.generate(classes=[1], method="lpd", method_options={"steps": 5}, images=False)
    assert gen.generate(classes=[1], method="lpd", images=False).stats["target_forwards"] == 16  # no table: one per token
    with pytest.raises(ArexportError, match="method ar does not apply"):
        gen.generate(classes=[1], method="ar", images=False)
    with pytest.raises(ArexportError, match="the lpd order starts with a group of one token; group-sizes start with 2"):
        gen.generate(classes=[1], method="lpd", method_options={"group_sizes": "2,2,3,3,6"}, images=False)
    c = gen.generate(classes=[5, 6, 7], method="lpd", method_options=dict(opts, group_order="random"), sampling=p, seed=3,
                     images=False)
    assert not np.array_equal(a.tokens, c.tokens)  # the default is the lpd order, not the random one


def test_tables_and_catalog():
    from arexport.families.lpd import lpd_feed_len, lpd_group_sizes
    from arexport.models.registry import model_config

    assert len(lpd_group_sizes(256, None)) == 20 and sum(lpd_group_sizes(256, None)) == 256
    assert len(lpd_group_sizes(256, 32)) == 32 and sum(lpd_group_sizes(256, 32)) == 256
    assert len(lpd_group_sizes(1024, None)) == 48 and sum(lpd_group_sizes(1024, None)) == 1024
    assert lpd_feed_len(lpd_group_sizes(256, None)) == 40 and lpd_feed_len(lpd_group_sizes(1024, None)) == 67
    for name, (layers, heads, dim, grid, g) in {"lpd-l-256": (24, 16, 1024, 16, 4.8), "lpd-xl-256": (36, 20, 1280, 16, 4.9),
                                                "lpd-xxl-256": (48, 24, 1536, 16, 5.9), "lpd-l-512": (24, 16, 1024, 32, 7.3),
                                                "lpd-xl-512": (36, 20, 1280, 32, 6.0)}.items():
        c = model_config(name)
        assert (c.n_layer, c.n_head, c.dim, c.grid_size) == (layers, heads, dim, grid)
        assert c.spec(name).extra["sampling_defaults"]["cfg_scale"] == g


def test_released_layout_loads_with_the_weights_only_loader(tmp_path):
    lm = tiny()
    sd = lm.model.state_dict()
    assert {"fake_latent", "mask_token", "pos_embed", "z_proj_ln.weight", "blocks.0.attn.qkv.bias", "blocks.0.mlp.fc1.weight",
            "head.weight"} <= set(sd)
    # main.py's checkpoint: model, optimizer, epoch, scaler, args (argparse.Namespace)
    args = argparse.Namespace(model="lpd_l", img_size=64)
    torch.save({"model": sd, "optimizer": {}, "epoch": 3, "args": args}, tmp_path / "lpd_l_256.pth")
    got = load_model("lpd_l_256", checkpoint=str(tmp_path / "lpd_l_256.pth"), overrides=dict(BASE, grid_size=4))
    for k, t in sd.items():
        assert torch.equal(got.model.state_dict()[k], t), k
    bad = dict(sd, pos_embed=torch.zeros(1, 10, 64))  # a table of another resolution
    torch.save({"model": bad}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="pos_embed"):
        load_model("lpd-l-256", checkpoint=str(tmp_path / "bad.pth"), overrides=dict(BASE, grid_size=4))


# -- precomputed orders (the official evaluation's --lpd_order_file) ----------------------------------------
def write_official_orders(path, orders):
    """orders/run_lpd_order.py l. 58-62: json.dump of the list of orders (each a list of raster indices)."""
    import json

    with open(path, "w") as f:
        json.dump([list(map(int, o)) for o in orders], f)


def test_orders_file_generation_equals_the_reference(tmp_path):
    """engine.py l. 34-44, 177, 186-205: image j of the evaluation uses orders[j] of the file; arexport's image with
    row seed s uses order s mod R, so seeds 0, 1, 2 walk the file in order."""
    lm = tiny()
    keys = [torch.rand(len(GROUPS), 16, generator=torch.Generator().manual_seed(40 + i)) for i in range(4)]
    orders = torch.stack([ref_lpd_order(GROUPS, 4, k, repulsion=1.0) for k in keys])  # what run_lpd_order.py writes
    write_official_orders(tmp_path / "res64_steps5.json", orders)
    cls = torch.tensor([3, 8, 0])
    opts = {"group_sizes": gen_groups(GROUPS), "orders": str(tmp_path / "res64_steps5.json")}
    greedy = SamplingParams(temperature=0.0, cfg_scale=3.0, cfg_schedule="linear")
    gen = Generator(TorchEngine(lm))
    out = gen.generate(classes=cls.tolist(), method="lpd", method_options=opts, images=False, sampling=greedy, seeds=[0, 1, 6])
    with torch.no_grad():
        ref = ref_generate_greedy(lm.model, cls, orders[[0, 1, 2]], GROUPS, 3.0)  # 6 mod 4 = 2
        shifted = ref_generate_greedy(lm.model, cls, orders[[1, 2, 3]], GROUPS, 3.0)
    assert np.array_equal(out.tokens, ref.numpy())
    assert not np.array_equal(out.tokens, shifted.numpy())  # negative control: the next order of the file
    again = gen.generate(classes=cls.tolist(), method="lpd", method_options=opts, images=False, sampling=greedy,
                         seeds=[0, 1, 6], batch_size=2)
    assert np.array_equal(out.tokens, again.tokens)  # batch-invariant (continuous batching)


def test_orders_file_errors(tmp_path, monkeypatch):
    from arexport.families import lpd as lpd_family
    from arexport.runtime.verifiers import request_safe_options

    gen = Generator(TorchEngine(tiny()))
    perm = list(range(16))

    def run(text, **opts):
        p = tmp_path / "orders.json"
        p.write_text(text)
        gen.generate(classes=[1], method="lpd", method_options={"group_sizes": gen_groups(GROUPS), "orders": str(p), **opts},
                     images=False)

    with pytest.raises(ArexportError, match="order 1 has 15 entries; this model's images have 16 tokens"):
        run(f"[{perm}, {perm[:15]}]")
    with pytest.raises(ArexportError, match=r"order 0 is not a permutation of the cells 0..15"):
        run(f"[{[0] + perm[:15]}]")
    with pytest.raises(ArexportError, match="order 0 is not a permutation"):
        run(f"[{perm[:15] + [16]}]")
    with pytest.raises(ArexportError, match="not a JSON array of arrays of non-negative integers"):
        run(f"[{perm[:15] + [-1]}]")
    with pytest.raises(ArexportError, match="nested or misplaced brackets"):
        run(f"[[{perm}]]")
    with pytest.raises(ArexportError, match="not a non-empty JSON array"):
        run("[]")
    with pytest.raises(ArexportError, match="--group-order random cannot apply"):
        run(f"[{perm}]", group_order="random")
    with pytest.raises(ArexportError, match="--repulsion .* cannot apply"):
        run(f"[{perm}]", repulsion=2.0)
    with pytest.raises(ArexportError, match="lpd orders file .*missing.json: No such file"):
        gen.generate(classes=[1], method="lpd", method_options={"orders": str(tmp_path / "missing.json")}, images=False)
    monkeypatch.setattr(lpd_family, "MAX_ORDERS_FILE_BYTES", 10)
    monkeypatch.setattr(lpd_family, "open", lambda *a, **k: pytest.fail("read an oversized orders file"), raising=False)
    with pytest.raises(ArexportError, match=r"orders.json is \d+ bytes; at most 10 are read"):
        gen.generate(classes=[1], method="lpd", method_options={"orders": str(tmp_path / "orders.json")}, images=False)
    monkeypatch.undo()
    with pytest.raises(ArexportError, match="orders names a file on the server"):
        request_safe_options({"orders": "/etc/passwd"})


def loop_lpd_order(group_sizes, grid, keys, repulsion, proximity=1.0, strict=False):
    """families.lpd.lpd_order as it was before vectorising (a cell-by-cell scan, scores recomputed per group,
    farthest points over the whole picked set), kept to pin that the vectorised one gives the same orders on
    grids where the official re-derivation above is too slow (32 x 32). strict: repulsion compared with <, a
    negative control."""
    n = grid * grid
    k = keys.double().numpy()
    rc = np.stack(np.divmod(np.arange(n), grid), 1)
    taken = np.zeros(n, dtype=bool)
    first = int(np.argmin(k[0]))
    out, taken[first] = [first], True
    near = np.abs(rc[:, None, :] - rc[None, :, :]).max(-1) <= 1
    dist = np.sqrt(((rc[:, None, :] - rc[None, :, :]) ** 2).sum(-1))
    inv = np.where(near & (dist > 0), 1.0 / np.where(dist > 0, dist, 1.0), 0.0)
    for g, size in enumerate(group_sizes[1:], start=1):
        free = np.flatnonzero(~taken)
        score = np.round(inv[free][:, taken].sum(1), 9)
        ranked = free[np.lexsort((k[g][free], -score))]
        high = set(free[score >= proximity].tolist())
        likely = [c for c in ranked if c in high]
        rest = [c for c in ranked if c not in high]
        chosen, skipped, at = [], [], 0
        while len(chosen) < size and at < len(likely):
            c = likely[at]
            at += 1
            d = [np.abs(rc[c] - rc[s]).max() for s in chosen]
            if any((x < repulsion) if strict else (x <= repulsion) for x in d):
                skipped.append(c)
            else:
                chosen.append(c)
        pool = rest + skipped + likely[at:]
        need = size - len(chosen)
        if need > 0:
            if len(pool) <= need:
                chosen += pool
            else:
                pts, have, picked = rc[pool].astype(np.float64), rc[chosen].astype(np.float64), []
                for _ in range(need):
                    if len(have) == 0:
                        i = int(np.argmin(k[g][pool]))
                    else:
                        dd = np.sqrt(((pts[:, None, :] - have[None, :, :]) ** 2).sum(-1)).min(1)
                        dd[picked] = 0
                        i = int(np.argmax(dd))
                    picked.append(i)
                    have = np.vstack([have, pts[i:i + 1]]) if len(have) else pts[i:i + 1]
                chosen += [pool[i] for i in picked]
        out += chosen
        taken[chosen] = True
    return torch.tensor(out)


def test_vectorised_lpd_order_equals_the_loop():
    """The vectorised lpd_order gives the loop's orders for the same keys: the 512 px schedule (repulsion 4 and 1),
    random schedules on odd grids (groups larger than the free high scorers, repulsion 0)."""
    from arexport.families.lpd import lpd_group_sizes, lpd_order

    cases = [(32, lpd_group_sizes(1024, 48), 4.0, 0), (32, lpd_group_sizes(1024, 48), 1.0, 1)]
    g = torch.Generator().manual_seed(7)
    for grid in (5, 7, 9):
        for rep in (0.0, 1.0, 2.0):
            cuts = sorted(torch.randperm(grid * grid - 2, generator=g)[:grid].add(2).tolist())
            sizes = [1] + [b - a for a, b in zip([1] + cuts, cuts + [grid * grid])]
            cases.append((grid, sizes, rep, grid))
    for grid, sizes, rep, seed in cases:
        keys = torch.rand(len(sizes), grid * grid, generator=torch.Generator().manual_seed(seed))
        ours = lpd_order(sizes, grid, keys, rep)
        assert torch.equal(ours, loop_lpd_order(sizes, grid, keys, rep)), (grid, sizes, rep)
    # negative control: a scan that lets cells exactly `repulsion` apart into one group
    assert not torch.equal(ours, loop_lpd_order(sizes, grid, keys, rep, strict=True))
