"""Per-image sampling and the step-wise Session API (issue 28): one batch serves images whose
sampling differs, each getting exactly the tokens it gets alone; generate runs on the session; the
README's Python API example runs."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from arexport.errors import ArexportError
from arexport.runtime.generator import Generator
from arexport.runtime.sampling import SamplingParams, RowParams, probs_from_logits, row_params

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def gen():
    return Generator.load("demo")


def guided(**kw):
    """Guided settings that differ in every per-image option (scale, schedule, interval, power,
    temperature, top-k, top-p, greedy)."""
    return SamplingParams(**{"cfg_scale": 1.5, **kw})


MIXED = [guided(temperature=0.7, top_k=20), guided(cfg_scale=3.0, top_p=0.8), guided(temperature=0.0),
         guided(cfg_schedule="cosine", cfg_power=2.0, temperature=1.3), guided(cfg_interval=10, top_k=5, top_p=0.9),
         guided(cfg_schedule="linear", cfg_scale=4.0)]


def run_mixed(gen, method, options, params, seeds, capacity):
    s = gen.session(method, options, sampling=params[0], capacity=capacity, images=False)
    handles = [s.add(classes=[i % 10], sampling=p, seeds=[seed]) for i, (p, seed) in enumerate(zip(params, seeds))]
    out = {}
    while not s.is_done():
        s.step()
        for im in s.finished():
            out[handles.index(im.request)] = im.tokens
    return [out[i] for i in range(len(params))]


@pytest.mark.parametrize("method,options", [("ar", {}), ("sjd", {"window": 8}), ("best-of-n", {"candidates": 2})])
def test_mixed_sampling_batch_gives_each_image_its_tokens_alone(gen, method, options):
    """Six images, six different settings, one batch of 4 slots (refilled as they finish): each
    image's tokens equal those of the same image generated alone with generate()."""
    seeds = [11 + 5 * i for i in range(len(MIXED))]
    mixed = run_mixed(gen, method, options, MIXED, seeds, capacity=4)
    for i, (p, seed) in enumerate(zip(MIXED, seeds)):
        alone = gen.generate(classes=[i % 10], method=method, method_options=options, sampling=p, seeds=[seed],
                             batch_size=1, images=False, timings=False).tokens[0]
        assert np.array_equal(mixed[i], alone), (method, i, p)
    # negative control: the settings matter (else the comparison above could not fail)
    same = run_mixed(gen, method, options, [MIXED[0]] * len(MIXED), seeds, capacity=4)
    assert any(not np.array_equal(a, b) for a, b in zip(mixed, same))


def test_mixed_unguided_batch_and_arpg_schedule(gen):
    """Unguided images differing in temperature/top-k share a batch exactly too."""
    ps = [SamplingParams(temperature=t, top_k=k) for t, k in ((1.0, 0), (0.5, 30), (0.0, 0), (2.0, 8))]
    seeds = [3, 4, 5, 6]
    mixed = run_mixed(gen, "ar", {}, ps, seeds, capacity=4)
    for i, (p, seed) in enumerate(zip(ps, seeds)):
        alone = gen.generate(classes=[i], sampling=p, seeds=[seed], batch_size=1, images=False, timings=False).tokens[0]
        assert np.array_equal(mixed[i], alone), i


def test_row_params_groups_rows_and_uniform_batches_take_the_shared_path():
    a, b = SamplingParams(temperature=0.5), SamplingParams(temperature=1.5, top_k=3)
    assert row_params([a, SamplingParams(temperature=0.5)], "cpu") == a  # equal settings: the batch-wide path
    rp = row_params([a, b, a], "cpu")
    assert isinstance(rp, RowParams) and [idx.tolist() for _, idx in rp.groups] == [[0, 2], [1]]
    import torch
    x = torch.randn(3, 50)
    got = probs_from_logits(x, rp)
    for i, p in enumerate((a, b, a)):
        assert torch.equal(got[i], probs_from_logits(x[i:i + 1], p)[0])
    with pytest.raises(ArexportError, match="differ in greedy"):
        row_params([a, SamplingParams(temperature=0.0)], "cpu").greedy


def test_batch_rejects_images_it_cannot_hold(gen):
    s = gen.session("ar", sampling=SamplingParams(cfg_scale=1.0), capacity=2, images=False)
    with pytest.raises(ArexportError, match="unguided"):
        s.add(classes=[1], sampling=SamplingParams(cfg_scale=2.0))
    with pytest.raises(ArexportError, match="temperature"):
        s.add(classes=[1], sampling=SamplingParams(temperature=-1.0))
    assert s.is_done()  # nothing was queued


def test_cancel_frees_the_slot_and_the_rest_is_unchanged(gen):
    s = gen.session("ar", capacity=2, images=False)
    h0 = s.add(classes=[1], seed=5)
    h1 = s.add(classes=[2, 3], seed=6)
    s.step()
    assert s.cancel(h0) and not s.cancel(h0)
    got = {}
    while not s.is_done():
        s.step()
        for im in s.finished():
            assert im.request == h1
            got[im.index] = im.tokens
    want = gen.generate(classes=[2, 3], seed=6, images=False, timings=False).tokens
    assert np.array_equal(np.stack([got[0], got[1]]), want)


def test_generate_defaults_to_the_models_sampler(gen):
    """No sampling given: the model's sampler (demo: cfg 1.5), as the CLI and HTTP apply it."""
    a = gen.generate(classes=[4], seed=2, images=False, timings=False).tokens
    b = gen.generate(classes=[4], seed=2, sampling=gen.sampling_params(), images=False, timings=False).tokens
    c = gen.generate(classes=[4], seed=2, sampling=SamplingParams(), images=False, timings=False).tokens
    assert gen.sampling_params().cfg_scale != SamplingParams().cfg_scale
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_readme_python_api_example_runs():
    """The README's step-wise example (the ```python block under 'Step by step') runs as written."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"### Step by step.*?```python\n(.*?)```", text, re.S)
    assert m, "README has no step-by-step Python example"
    env: dict = {}
    exec(compile(m.group(1), "README.md", "exec"), env)
    assert env["results"], "the example collected no images"


def test_arpg_honours_cfg_interval_through_the_shared_guidance():
    """Issue 28: ARPG guides through the one guidance rule, so cfg_interval now applies to it (it was
    ignored). An interval past the last token equals 'always'; interval 4 guides only the first of 8
    steps (arccos sizes 6, 5, ...: its last token index 5 <= 4 + 1) and must differ from 'always' (the
    old code, which ignored the interval, fails that)."""
    gen = Generator.load("demo-arpg")
    base = gen.sampling_params()
    assert base.cfg_interval == -1  # the golden ARPG cases run at -1: their tokens are unchanged

    def toks(**kw):
        return gen.generate(classes=[1, 2, 3], seed=4, method="arpg", method_options={"steps": 8},
                            sampling=gen.sampling_params(**kw), images=False, timings=False).tokens
    always = toks()
    assert np.array_equal(toks(cfg_interval=gen.spec.n_tokens), always)
    from arexport.runtime.methods.arpg import tokens_per_step
    assert tokens_per_step(gen.spec.n_tokens, 8, "arccos")[:2] == [6, 5]
    first_only = toks(cfg_interval=4)
    assert not np.array_equal(first_only, always)


def test_session_accessors_a_service_needs(gen):
    """What the service reads of a session (it uses nothing else): whether sampling fits the batch,
    the requests still live and those in a slot, waiting images, cache bytes, admission groups."""
    s = gen.session("ar", capacity=2, images=False)
    assert s.shares(gen.sampling_params(temperature=0.3, top_k=5)) and not s.shares(SamplingParams(cfg_scale=1.0))
    assert s.memory_bytes > 0 and s.requests() == [] and s.running() == set() and s.waiting == 0
    a = s.add(classes=[1, 2, 3], seed=1)
    b = s.add(classes=[4], seed=2)
    s.step()  # requests round robin: a's first image and b's take the two slots
    assert s.requests() == [a, b] and s.running() == {a, b} and s.waiting == 2 and s.live == 2
    fifo = gen.session("ar", capacity=2, images=False)
    a = fifo.add(classes=[1, 2, 3], seed=1, group="deadline")
    b = fifo.add(classes=[4], seed=2, group="deadline")
    fifo.step()  # one group: first come, first served
    assert fifo.running() == {a} and fifo.waiting == 2


def test_methods_contribute_their_own_statistics_through_one_hook(gen):
    """RowStats holds what every method fills; a method's own fields come from its RowStats subclass
    (run_fields), so a plain run has none of them and best-of-N has its own."""
    import dataclasses

    from arexport.runtime.methods.base import RowStats

    assert {f.name for f in dataclasses.fields(RowStats)} == {"forwards", "draft_forwards", "accepted"}
    ar = gen.generate(classes=[1], seed=3, images=False, timings=False)
    assert not {"skipped_rounds", "candidate_forwards_per_image", "gridar_replaced", "refiner_forwards_per_image"} & set(ar.stats)
    bon = gen.generate(classes=[1], seed=3, method="best-of-n", method_options={"candidates": 2}, images=False, timings=False)
    assert bon.rows[0].candidates == 2 and len(bon.stats["gridar_best_scores"]) == 1
    assert bon.stats["candidate_forwards_per_image"] == 2 * bon.stats["target_forwards_per_image"]
