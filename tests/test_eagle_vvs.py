"""`vvs --drafter eagle` against the official VVS (HyattDD/VVS at commit 7790173, read line by line):

* candidate paths in `retrieve_indices` order (`models/drafters/cnets_llamagen.py` `topK_genrate_v2`,
  lines 1095-1126), the dynamic-skip similarity (`models/skip_utils_llamagen.py`
  `compute_similarity_pytorch_jit` lines 9-57, down-sampled by `skip_verify` line 83), the skipped path's
  truncation (`skip_evaluate` lines 119-151) and the feature reuse (`retrieve_features` lines 215-243),
  each re-derived here from the official text (not shared with the package) with a negative control;
* on the demo: a skipped round feeds the head the target hidden states of the newest committed tokens
  (`update_inference_inputs_skip` with `cur_skip`, lines 276-287; `cached_features` in `models/ea_llamagen.py`
  lines 512-539), checked against a teacher-forced target forward, with an off-by-one control;
* `--policy none` is lantern on the eagle drafter token for token; skipping saves target forwards.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from arexport.runtime.methods import vvs as V
from arexport.runtime.tree import Tree


# -- the official functions, re-derived ----------------------------------------------------------------
def _official_retrieve(parent: list[int], sampled: bool) -> list[list[int]]:
    """topK_genrate_v2 (1095-1126): mask_index[i] = the parent's node index of node i + 1 (0: the root);
    every node not in mask_index (the root is, as the parent of its children) is a leaf; its row is filled
    from depth down to 0 by following mask_index; rows padded with -1 to max_depth; sorted with a sampler,
    -1 counting as total_tokens + 5."""
    total = len(parent) - 1
    mask_index = [parent[i + 1] for i in range(total)]
    depth = [0] * (total + 1)
    for i in range(1, total + 1):
        depth[i] = depth[parent[i]] + 1
    max_depth = max(depth) + 1
    noleaf = set(mask_index)
    rows = []
    for i in range(total + 1):
        if i in noleaf:
            continue
        row = [-1] * max_depth
        cid = i
        for j in reversed(range(depth[i] + 1)):
            row[j] = cid
            cid = mask_index[cid - 1] if cid > 0 else -1
        rows.append(row)
    if sampled:
        rows = sorted(rows, key=lambda r: [x if x >= 0 else total + 5 for x in r])
    return rows


def _official_similarity(cands: torch.Tensor, latents: torch.Tensor, decay=0.9) -> float:
    """compute_similarity_pytorch_jit on candidates[::2] (rows of token ids, -1 = none)."""
    seqs = [r[r != -1][1:] for r in cands[::2]]
    embeds = [latents[s] for s in seqs]
    n = len(embeds)
    if n < 2:
        return 0.0
    L = max(e.shape[0] for e in embeds)
    pad = torch.zeros(n, L, latents.shape[1])
    valid = torch.zeros(n, L, dtype=torch.bool)
    for i, e in enumerate(embeds):
        pad[i, : e.shape[0]] = e
        valid[i, : e.shape[0]] = True
    unit = pad / pad.norm(dim=2, keepdim=True).clamp(min=1e-12)
    w = torch.tensor([decay**l for l in range(L)])
    w = w / w.sum()
    total, pairs = 0.0, 0
    for a in range(n):
        for b in range(a + 1, n):
            s = sum(float(w[l]) * float(unit[a, l] @ unit[b, l]) for l in range(L) if valid[a, l] and valid[b, l])
            total, pairs = total + s, pairs + 1
    return total / pairs


def _official_accept_length(cands: torch.Tensor, best: int) -> int:
    """skip_evaluate (126-143): avg_acp_len = valid entries // rows; the row's last valid index; min(that,
    avg - 1)."""
    avg = int((cands != -1).sum()) // cands.shape[0]
    row = cands[best]
    last = cands.shape[1] - 1 if not bool((row == -1).any()) else int((row == -1).nonzero()[0]) - 1
    return min(last, avg - 1)


def _official_retrieve_features(cached: torch.Tensor, m: int) -> torch.Tensor:
    """retrieve_features reuse_prev (225-243) on [L, dim]."""
    if m <= cached.shape[0]:
        return cached[cached.shape[0] - m:]
    return torch.cat([cached[:m], cached[-1:].repeat(m - cached.shape[0], 1)])


PARENTS = [[-1, 0, 0, 1, 2, 1, 3], [-1, 0, 1, 2, 0, 4, 0, 1, 5, 3], [-1, 0, 0, 0, 1, 1, 2]]


def _tree(parent):
    p = torch.tensor(parent)[None]
    return Tree(tokens=torch.zeros_like(p), parent=p, depth=torch.zeros_like(p), rank=torch.zeros_like(p))


@pytest.mark.parametrize("sampled", [False, True])
def test_candidate_paths_follow_retrieve_indices(sampled):
    for parent in PARENTS:
        ours = V.tree_paths(_tree(parent), 0, sampled)
        ref = [[x for x in r if x >= 0] for r in _official_retrieve(parent, sampled)]
        assert ours == ref
    # negative control: leaves in node order where the official sorts them (differs on the first tree)
    unsorted = [[x for x in r if x >= 0] for r in _official_retrieve(PARENTS[0], False)]
    assert (V.tree_paths(_tree(PARENTS[0]), 0, True) == unsorted) is False


def test_tree_similarity_matches_the_official_formula():
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(9, 5, generator=g)
    for parent in PARENTS:
        toks = torch.randint(0, 9, (len(parent),), generator=g)
        paths = V.tree_paths(_tree(parent), 0, True)
        rows = _official_retrieve(parent, True)
        cands = torch.tensor([[int(toks[x]) if x >= 0 else -1 for x in r] for r in rows])
        ours = V.tree_similarity([toks[q].tolist() for q in paths], latents)
        assert abs(ours - _official_similarity(cands, latents)) < 1e-5
    # negative control: without the official down-sampling to every second path the value moves
    every = [toks[q].tolist() for q in paths]
    doubled = [p for p in every for _ in range(2)]  # tree_similarity keeps every second: this one keeps them all
    assert abs(V.tree_similarity(doubled, latents) - _official_similarity(cands, latents)) > 1e-3


def test_skip_length_and_feature_reuse_match_the_official_ones():
    for parent in PARENTS:
        paths = V.tree_paths(_tree(parent), 0, True)
        rows = torch.tensor(_official_retrieve(parent, True))
        for best in range(len(paths)):
            assert V.skip_length(paths, paths[best]) == _official_accept_length(rows, best)
    # negative control: the truncation over the down-sampled paths is a different rule
    paths = V.tree_paths(_tree(PARENTS[1]), 0, True)
    rows = torch.tensor(_official_retrieve(PARENTS[1], True))
    assert any(V.skip_length(paths[::2], paths[b]) != _official_accept_length(rows, b) for b in range(len(paths)))
    hist = torch.randn(6, 4)
    for count in (1, 3, 6):
        for m in (1, 2, 3, 5):
            assert torch.equal(V.reuse_features(hist, count, m), _official_retrieve_features(hist[:count], m))
    assert not torch.equal(hist[:2], _official_retrieve_features(hist[:6], 2))  # control: oldest, not newest


# -- on the demo ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo():
    from arexport.models.registry import load_model
    from arexport.runtime.backends.torch.runner import TorchEngine
    from arexport.runtime.generator import Generator

    lm = load_model("demo")
    return lm, Generator(TorchEngine(lm))


def _teacher_hidden(lm, spec, cls: int, tokens: torch.Tensor) -> torch.Tensor:
    """The target's hidden state after each image token t (fed at cell t after the class token): [n, dim]."""
    m = lm.model
    n = tokens.shape[0]
    feed = torch.cat([torch.tensor([cls + spec.class_token_offset]), tokens[:-1]])[None]
    pos = torch.arange(-1, n - 1)[None]
    c = m.cfg
    kvh = c.n_kv_head or c.n_head
    keys = [torch.zeros(1, kvh, n, c.dim // c.n_head) for _ in range(c.n_layer)]
    values = [torch.zeros_like(k) for k in keys]
    mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    with torch.no_grad():
        _, h, _, _ = m.step_hidden(feed, pos, torch.zeros(1, dtype=torch.long), mask, keys, values)
    return h[0, 1:]  # row t + 1 is token t's


def test_skipped_rounds_feed_the_head_the_newest_target_features(demo, monkeypatch):
    from arexport.runtime.sampling import SamplingParams

    lm, gen = demo
    seen = []
    orig = V.VVSEagleDecoder.commit_unverified

    def spy(self, tree, skipping):
        before = {i: int(self.n[i]) for i in self._choice}
        orig(self, tree, skipping)
        for i, (_, m) in self._choice.items():
            seen.append((before[i], m, self.ph[i * self.cfg.per_image, :m].clone()))

    monkeypatch.setattr(V.VVSEagleDecoder, "commit_unverified", spy)
    res = gen.generate(classes=[3], method="vvs", method_options={"draft_head": "demo-eagle", "skip_interval": 2},
                       sampling=SamplingParams(cfg_scale=1.5), seed=4, images=False, timings=False)
    assert res.stats["skipped_rounds"] == len(seen) >= 3
    h = _teacher_hidden(lm, gen.engine.spec, 3, torch.as_tensor(np.asarray(res.tokens[0])).long())
    for n_before, m, fed in seen:
        # the root (token n - 1) has no target K/V yet: the newest cached features are tokens n-1-m .. n-2
        assert torch.allclose(fed, h[n_before - 1 - m:n_before - 1], atol=1e-4)
        assert not torch.allclose(fed, h[n_before - 2 - m:n_before - 2], atol=1e-4)  # control: one older


def test_vvs_eagle_without_skips_is_lantern_and_skips_save_forwards(demo):
    from arexport.runtime.methods.base import make_method
    from arexport.runtime.sampling import SamplingParams

    _, gen = demo
    assert make_method("vvs", draft_head="demo-eagle").options.drafter_name == "eagle"
    assert make_method("vvs").requires_draft() and not make_method("vvs", draft_head="demo-eagle").requires_draft()
    kw = dict(classes=[0, 5], sampling=SamplingParams(cfg_scale=1.5), seed=2, images=False, timings=False)
    opts = {"draft_head": "demo-eagle", "delta": 0.2}
    lan = gen.generate(method="lantern", method_options=opts, **kw)
    none = gen.generate(method="vvs", method_options=dict(opts, policy="none"), **kw)
    uni = gen.generate(method="vvs", method_options=opts, **kw)
    assert np.array_equal(lan.tokens, none.tokens)
    assert uni.stats["skipped_rounds"] > 0
    assert uni.stats["target_forwards_per_image"] < none.stats["target_forwards_per_image"]


def test_continuous_service_with_heads_matches_solo_runs(demo):
    """The service (continuous batching through the runtime's Session: images join and leave a batch of 2
    slots mid-run) with eagle and vvs-on-eagle requests: each image's tokens equal its solo run's."""
    from arexport.serving.service import GenerationService

    _, gen = demo
    reqs = [([1, 4], 3, "eagle", {"draft_head": "demo-eagle", "tree": "static"}), ([7], 5, "eagle", {"draft_head": "demo-eagle"}),
            ([2], 6, "vvs", {"draft_head": "demo-eagle", "skip_interval": 3})]
    svc = GenerationService(gen, batching="continuous", max_batch=2)
    params = svc.default_sampling()
    try:
        futs = [svc.submit(c, method=m, options=o, seed=s, images=False) for c, s, m, o in reqs]
        outs = [f.result(timeout=300) for f in futs]
    finally:
        svc.close()
    for (c, s, m, o), out in zip(reqs, outs):
        alone = gen.generate(classes=c, seed=s, sampling=params, method=m, method_options=o, images=False,
                             timings=False).tokens
        assert np.array_equal(out.tokens, alone), (m, o)


def test_profile_with_a_head(tmp_path):
    """`arexport profile --method eagle --option draft_head=demo-eagle`: the tree step is timed and counted."""
    import json

    from click.testing import CliRunner

    from arexport.cli import cli

    out = tmp_path / "p.json"
    r = CliRunner().invoke(cli, ["profile", "--model", "demo", "--method", "vvs", "--option", "draft_head=demo-eagle",
                                 "--classes", "2", "--warmup", "0", "--repeats", "1", "--no-bandwidth", "--json", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())["results"][0]
    assert res["steps"]["tree"]["count"] == res["target_forwards_per_image"] - 1 < 63  # the prefill is the other one
    assert res["mean_accepted_length"] > 1


def test_exported_head_runs_on_ort_beside_the_target(demo, tmp_path):
    """`arexport build-head` exports demo-eagle's draft_head step (checked against torch when written); eagle
    with `--draft-head DIR` runs it on ONNX Runtime (no PyTorch head) and gives the PyTorch head's greedy
    tokens; vvs takes it too; a head too short for the decoder, or for another target, is refused by name."""
    import json

    from click.testing import CliRunner

    from arexport.cli import cli
    from arexport.errors import ArexportError
    from arexport.runtime.backends.ort.head import OrtDraftHead
    from arexport.runtime.sampling import SamplingParams

    pytest.importorskip("onnxruntime")
    lm, gen = demo
    out = tmp_path / "head"
    r = CliRunner().invoke(cli, ["build-head", "demo-eagle", "--model", "demo", "--out", str(out), "--verify-len", "8",
                                 "--batch-sizes", "4", "--extra-slots", "24"])
    assert r.exit_code == 0, r.output
    info = json.loads((out / "head.json").read_text())
    assert max(info["check"]["max_abs_error"].values()) < 1e-4
    r = CliRunner().invoke(cli, ["build-head", "demo-eagle", "--model", "demo", "--out", str(out)])
    assert r.exit_code != 0 and (out / "head.json").exists()  # an existing directory is refused, not replaced
    calls = []
    orig = OrtDraftHead.step
    monkey = pytest.MonkeyPatch()
    monkey.setattr(OrtDraftHead, "step", lambda self, *a: calls.append(1) or orig(self, *a))
    try:
        kw = dict(classes=[2, 6], sampling=SamplingParams(temperature=0.0, cfg_scale=1.5), seed=0, images=False, timings=False)
        ref = gen.generate(method="eagle", method_options={"draft_head": "demo-eagle", "tree": "static"}, **kw)
        ort = gen.generate(method="eagle", method_options={"draft_head": str(out), "tree": "static"}, **kw)
        vv = gen.generate(method="vvs", method_options={"draft_head": str(out), "tree": "static", "choices": "0;1;0,0"},
                          classes=[4], seed=1, images=False, timings=False)
    finally:
        monkey.undo()
    assert np.array_equal(ref.tokens, ort.tokens) and len(calls) > 0 and vv.stats["skipped_rounds"] > 0
    with pytest.raises(ArexportError, match="draft-head cache slots"):
        gen.generate(method="eagle", method_options={"draft_head": str(out), "tree": "dynamic", "depth": 30, "top_k": 2},
                     classes=[1], seed=0, images=False, timings=False)
    with pytest.raises(ArexportError, match="width 96"):
        OrtDraftHead(str(out), target_dim=64, target_vocab=17)


def test_head_pairs_sit_at_the_cells_of_the_tokens_they_feed(demo, monkeypatch):
    """Every catch-up (the first head call after the prefill or a target call) feeds committed tokens at their
    own cells, starting with (h_cond, token 0) at cell 0 in the first round (the official position ids)."""
    from arexport.models.eagle import EagleHead
    from arexport.runtime.sampling import SamplingParams

    _, gen = demo
    log = []
    step, run = EagleHead.step, type(gen.engine).run
    monkeypatch.setattr(EagleHead, "step", lambda self, h, t, p, *a, **k: log.append(("head", t.clone(), p.clone()))
                        or step(self, h, t, p, *a, **k))
    monkeypatch.setattr(type(gen.engine), "run", lambda self, kind, *a, **k: log.append(("target",)) or run(self, kind, *a, **k))
    res = gen.generate(classes=[5], method="eagle", method_options={"draft_head": "demo-eagle"},
                       sampling=SamplingParams(cfg_scale=1.0), seed=3, images=False, timings=False)
    final = torch.as_tensor(np.asarray(res.tokens[0])).long()
    catch = [e for prev, e in zip(log, log[1:]) if prev[0] == "target" and e[0] == "head"]
    assert len(catch) == res.stats["target_forwards_per_image"] - 1 and int(catch[0][2][0, 0]) == 0
    ok = [bool((final[p[0]] == t[0]).all()) for _, t, p in catch]
    shifted = [bool((final[(p[0] + 1).clamp(max=63)] == t[0]).all()) for _, t, p in catch]  # control: the old cell t - 1
    assert all(ok) and not all(shifted)
