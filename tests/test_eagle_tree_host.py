"""The tree bookkeeping eagle does on the host each round, done with array ops (issue 30, host work): the
ancestor mask by boolean squaring equals walking each node's parents, a static level's batched draws equal
drawing each parent's children on its own, a static tree grows no level past what any image can accept
(same tokens, fewer head calls), and a head is loaded once per source until its files change."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from arexport.runtime.generator import Generator
from arexport.runtime.methods import eagle as eagle_mod
from arexport.runtime.methods.eagle import EagleDecoder, EagleOptions, load_head
from arexport.runtime.sampling import SamplingParams
from arexport.runtime import tree as tree_mod
from arexport.runtime.sampling import sample_from_probs
from arexport.runtime.sampling import sample_from_probs_host as host_draw
from arexport.runtime.tree import SMALL_STATIC_TREE, ancestor_mask, sampled_children, sampled_level, static_plan

DEEP = ((0,), (1,), (0, 0), (0, 1), (0, 0, 0), (0, 0, 0, 0), (0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 1))


def _walk(parent: torch.Tensor) -> torch.Tensor:
    """Reference: node i sees j iff j is i or reached from i by following parents."""
    b, n = parent.shape
    m = torch.zeros(b, n, n, dtype=torch.bool)
    for r in range(b):
        for i in range(n):
            j = i
            while j >= 0:
                m[r, i, j] = True
                j = int(parent[r, j])
    return m


def _random_parents(b: int, n: int, g: torch.Generator, chain: bool = False) -> torch.Tensor:
    par = torch.full((b, n), -1, dtype=torch.long)
    for i in range(1, n):
        par[:, i] = i - 1 if chain else torch.randint(0, i, (b,), generator=g)
    return par


def _one_squaring_short(parent):
    """Negative control: the closure with one squaring fewer (misses ancestors more than 2^(t-1) levels up)."""
    b, n = parent.shape
    up = torch.nn.functional.one_hot(parent.clamp(min=0), n).bool() & (parent >= 0)[:, :, None]
    m = (torch.eye(n, dtype=torch.bool) | up).float()
    for _ in range(max(n - 1, 1).bit_length() - 1):
        m = (torch.bmm(m, m) > 0).float()
    return m > 0


def test_ancestor_mask_is_the_parent_walk():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 5, 9, 16, 17, 33):
        for chain in (False, True):
            par = _random_parents(3, n, g, chain)
            assert torch.equal(ancestor_mask(par), _walk(par)), (n, chain)
    deep = _random_parents(1, 18, g, chain=True)  # 17 levels: 4 squarings reach 16
    assert not torch.equal(_one_squaring_short(deep), _walk(deep))  # the comparison catches a short closure


@pytest.mark.parametrize("draw", ["small", "cpu", "torch"])
@pytest.mark.parametrize("paths", [SMALL_STATIC_TREE, DEEP], ids=["default", "deep"])
def test_a_static_level_draws_as_each_parent_alone(paths, draw, monkeypatch):
    """All parents of a level draw rank r together; each parent's children must be exactly sampled_children of its
    row with its children's uniforms, on rows with zeros and with fewer tokens than children (exhausted support).
    All three implementations: Python floats for a small level, numpy for a larger one on CPU tensors and the
    torch ops any other device takes."""
    assert 4 * 3 * 3 <= tree_mod.SMALL_LEVEL  # the rows below take the Python path unless told otherwise
    if draw == "cpu":
        monkeypatch.setattr(tree_mod, "SMALL_LEVEL", 0)
    if draw == "torch":
        monkeypatch.setattr(tree_mod, "_sampled_level_host", tree_mod._sampled_level_torch)
        monkeypatch.setattr(tree_mod, "SMALL_LEVEL", 0)
    plan = static_plan(paths)
    N, B, V = plan.n_nodes, 4, 3
    g = torch.Generator().manual_seed(1)
    dist = torch.rand(B, N + 1, V, generator=g)
    dist[dist < 0.3] = 0.0
    dist[:, :, 0] += 1e-3  # every row keeps some mass
    u = torch.rand(B, N, generator=g)
    got = torch.zeros(B, N + 1, dtype=torch.long)
    for lv in plan.levels:
        sampled_level(dist, lv, u, got)
    want = torch.zeros_like(got)
    par = plan.parent.tolist()
    for c in sorted(set(par[1:])):
        kids = [i for i in range(1, N + 1) if par[i] == c]  # ascending = rank order
        want[:, kids] = sampled_children(dist[:, c], len(kids), u[:, [i - 1 for i in kids]])
    assert torch.equal(got, want)
    shuffled = torch.zeros_like(got)
    for lv in plan.levels:
        sampled_level(dist, lv, u.flip(1), shuffled)
    assert not torch.equal(shuffled, want)  # the comparison sees which uniform each node reads


def test_host_draw_picks_what_sample_from_probs_picks():
    """sampling.sample_from_probs_host (numpy) is sampling.sample_from_probs on host arrays: the same ids on rows of 17 and 16384 tokens
    with zeros, tiny masses (1e-30), unnormalised rows, a one-token row, and uniforms at 0, just below 1 and on a cdf
    step's edge; so is tree._draw_small on the 17-token rows. Control: a left-sided search (cdf < target) picks other
    ids on the edge cases."""
    g = torch.Generator().manual_seed(5)
    rows = []
    for v in (17, 16384):
        p = torch.rand(64, v, generator=g)
        p[p < 0.4] = 0.0
        p[:8] *= 1e-30
        p[8:16] = p[8:16] / p[8:16].sum(-1, keepdim=True)
        p[16, :] = 0.0
        p[16, 3] = 1.0
        rows.append(p)
    for p in rows:
        u = torch.rand(p.shape[0], generator=g, dtype=torch.float64)
        u[:4], u[4:8] = 0.0, 1.0 - 2.0**-53
        cdf = torch.cumsum(p, -1, dtype=torch.float64)
        u[20:30] = (cdf[20:30, 5] / cdf[20:30, -1]).clamp(max=1 - 2.0**-53)  # exactly on a step's edge
        want = sample_from_probs(p, u)
        assert np.array_equal(host_draw(p.numpy(), u.numpy()), want.numpy())
        if p.shape[-1] <= tree_mod.SMALL_LEVEL:  # the walk's final draw on a small row, in Python floats
            small = [tree_mod._draw_small(row, ui) for row, ui in zip(p.tolist(), u.tolist())]
            assert small == want.tolist()
        target = np.minimum(u.numpy()[:, None] * cdf[:, -1:].numpy(), cdf[:, -1:].numpy() * (1.0 - 2.0**-53))
        left = np.minimum((cdf.numpy() < target).sum(-1), p.shape[-1] - 1)
        assert not np.array_equal(left, want.numpy())


def test_static_tree_grows_no_level_past_the_image(monkeypatch):
    gen = Generator.load("demo")
    kw = dict(classes=[3, 8], method="eagle", method_options={"draft_head": "demo-eagle", "tree": "static"},
              sampling=SamplingParams(cfg_scale=1.5), seed=4, batch_size=2, images=False, timings=False)
    trimmed = gen.generate(**kw)
    monkeypatch.setattr(EagleDecoder, "trim_levels", False)
    full = gen.generate(**kw)
    assert (trimmed.tokens == full.tokens).all()
    assert trimmed.stats["target_forwards_per_image"] == full.stats["target_forwards_per_image"]
    assert trimmed.stats["draft_forwards_per_image"] < full.stats["draft_forwards_per_image"]


def test_a_head_loads_once_until_its_file_changes(tmp_path):
    from arexport.models.eagle import resolve_head_path

    path = tmp_path / "head.safetensors"
    path.write_bytes(resolve_head_path("demo-eagle").read_bytes())
    spec = Generator.load("demo").spec
    opts = EagleOptions(draft_head=str(path))
    a = load_head(opts, spec, torch.device("cpu"))
    assert load_head(opts, spec, torch.device("cpu")) is a
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file was replaced
    b = load_head(opts, spec, torch.device("cpu"))
    assert b is not a and load_head(opts, spec, torch.device("cpu")) is b
    assert len(eagle_mod._heads) <= eagle_mod.HEAD_CACHE_SIZE


def test_the_tree_and_the_walk_drawn_in_one_hash_equal_two_draws(monkeypatch):
    """A static-tree round where every image verifies draws the tree's N uniforms and the walk's N + 1 in one
    `Slots.uniforms` call: the tokens equal the round drawing each with its own `uniform` call (one_hash off; batch 2
    over 3 images, so an image joins mid-run; CFG on). The fast path must have run. Control (checked by hand): the
    two draws swapped fails."""
    from arexport.runtime.methods.base import Slots

    gen = Generator.load("demo")
    kw = dict(classes=[3, 8, 1], method="eagle", method_options={"draft_head": "demo-eagle", "tree": "static"},
              sampling=SamplingParams(cfg_scale=1.5), seed=6, batch_size=2, images=False, timings=False)
    lanes_seen = []
    hashed = Slots.uniforms

    def counted(self, *lanes):
        lanes_seen.append(lanes)
        return hashed(self, *lanes)

    monkeypatch.setattr(Slots, "uniforms", counted)
    once = gen.generate(**kw)
    n = len(SMALL_STATIC_TREE)
    assert lanes_seen and set(lanes_seen) == {(n, n + 1)}
    monkeypatch.setattr(Slots, "uniforms", hashed)
    monkeypatch.setattr(EagleDecoder, "one_hash", False)  # the tree's and the walk's own `uniform` calls
    two = gen.generate(**kw)
    assert (once.tokens == two.tokens).all()


def test_the_walk_scalar_acceptance_equals_the_rule_on_tensors():
    """accept_tree takes the lossless rule's acceptance on fp32 CPU rows of a sampled tree as numpy fp32 scalars; the
    walk must equal the generic path (a StandardRule subclass, which takes the rule's tensor methods) on random
    static trees: the same path, next token, tests and final distribution, with zero-probability drafts, rows
    that do not sum to 1 and repeated sibling tokens. Control (checked by hand): q(x) not renormalised fails."""
    from arexport.runtime.speculative import StandardRule
    from arexport.runtime.tree import accept_tree

    class Generic(StandardRule):
        pass

    plan = static_plan(SMALL_STATIC_TREE)
    n1, V = plan.n_nodes + 1, 5
    g = torch.Generator().manual_seed(11)
    walks = 0
    for _ in range(300):
        P = torch.rand(n1, V, generator=g)
        P[P < 0.2] = 0.0
        P = P / P.sum(-1, keepdim=True).clamp(min=1e-6)
        q = torch.rand(n1, V, generator=g)
        q[q < 0.3] = 0.0
        q[:, 0] += 1e-3
        q = q * (0.5 + torch.rand(n1, 1, generator=g))  # rows that do not sum to 1
        tok = torch.randint(0, V, (n1,), generator=g)
        u = torch.rand(n1, generator=g, dtype=torch.float64)
        a = accept_tree(P, tok, plan.parent, plan.rank, q, StandardRule(), u)
        b = accept_tree(P, tok, plan.parent, plan.rank, q, Generic(), u)
        assert (a.path, a.token, a.tests) == (b.path, b.token, b.tests) and torch.equal(a.dist, b.dist)
        walks += len(a.path) > 1
    assert 30 < walks < 300  # both accepting and rejecting walks were compared
