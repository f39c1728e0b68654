"""Issue 38, item 0: the same seed gives the same tokens under every speculative method's DEFAULT
options (latency-aware draft lengths and windows), whatever the timing, the load, the batch or the
machine.

Each "machine" replaces the engine's measured latency curve by another shape and the process clock
by one whose steps take random times; every method's defaults must give token for token what they
give on every other machine and batch size. (Before issue 38 the choices read those clocks: sd,
lantern and vvs agreed on about half their tokens from run to run.)
"""

from __future__ import annotations

import json
import random
import time

import numpy as np
import pytest
import torch

from arexport.errors import ArexportError
from arexport.models.registry import load_model
from arexport.runtime.backends.torch.runner import TorchEngine
from arexport.runtime.engine import StepEngine
from arexport.runtime.generator import Generator, load_latency_profile
from arexport.runtime.sampling import SamplingParams

DEFAULTS = [("sd", {}), ("lantern", {}), ("lantern", {"drafter": "sjd"}), ("vvs", {}), ("vvs", {"policy": "dynamic"}),
            ("sjd", {})]
CLASSES = [0, 3, 7, 9]
PARAMS = SamplingParams(cfg_scale=1.5)  # the demo's default guidance: two rows per image


def _curve(kind: str, max_q: int) -> torch.Tensor:
    """A latency curve [max_q] (seconds per step of q = 1..max_q queries) as some machine would time it."""
    q = torch.arange(1, max_q + 1, dtype=torch.float64)
    if kind == "flat":  # a GPU: more queries are nearly free
        return 1e-3 + 1e-6 * q
    if kind == "steep":  # a busy CPU: each query costs a decode step
        return 1e-3 * q
    return 1e-3 * (1 + torch.rand(max_q, generator=torch.Generator().manual_seed(max_q), dtype=torch.float64) * 8)


class _Clock:
    """time.perf_counter for a machine whose every timed interval takes a random 0 .. `scale` seconds."""

    def __init__(self, seed: int, scale: float):
        self.rng, self.scale, self.now = random.Random(seed), scale, 1000.0

    def __call__(self) -> float:
        self.now += self.rng.random() * self.scale
        return self.now


MACHINES = [("flat", 0, 1e-4, 1), ("steep", 1, 5e-2, 4), ("noisy", 2, 1e-2, 1)]  # curve, clock seed and scale, batch


@pytest.fixture(scope="module")
def demo_pair():
    return Generator(TorchEngine(load_model("demo")), TorchEngine(load_model("demo-draft")))


def _run(gen, method, opts, batch):
    out = gen.generate(classes=CLASSES, method=method, method_options=opts, sampling=PARAMS, seed=7, batch_size=batch,
                       images=False)
    return out.tokens, out.stats


@pytest.mark.parametrize("method,opts", DEFAULTS, ids=[f"{m}{'-' + '-'.join(o.values()) if o else ''}" for m, o in DEFAULTS])
def test_defaults_give_the_same_tokens_on_any_machine_and_batch(demo_pair, method, opts, monkeypatch):
    runs = {}
    for kind, seed, scale, batch in MACHINES:
        # a fresh measurement per machine: nothing cached from the one before
        for e in (demo_pair.engine, demo_pair.draft):
            e._latency.clear()
        monkeypatch.setattr(StepEngine, "latency_curve", lambda self, rows, max_q, kind=kind: _curve(kind, max_q))
        monkeypatch.setattr(time, "perf_counter", _Clock(seed, scale))
        runs[kind, batch] = _run(demo_pair, method, opts, batch)
    monkeypatch.undo()
    ref, ref_stats = runs["flat", 1]
    for key, (tokens, stats) in runs.items():
        assert np.array_equal(tokens, ref), (method, opts, key, float((tokens == ref).mean()))
        assert stats["target_forwards_per_image"] == ref_stats["target_forwards_per_image"], key
    # the default still speculates, and still adapts: more than one length is verified
    assert ref_stats["mean_accepted_length"] > 1.2, ref_stats
    assert len(ref_stats["accepted_length_histogram"]) > 2, ref_stats


def _profile(tmp_path, gen, target_curves, draft_curves=None):
    doc = {"schema": "arexport-profile", "context": {"model": gen.spec.name},
           "results": [{"backend": gen.engine.backend, "device": str(gen.engine.device),
                        "latency_curves": {"target": target_curves, **({"draft": draft_curves} if draft_curves else {})}}]}
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(doc))
    return str(path)


def test_a_latency_profile_prices_steps_and_its_tokens_do_not_depend_on_the_clock(tmp_path, monkeypatch):
    """The opt-in: a user's profile replaces the model. Its numbers decide the tokens (a curve where a
    16-query step costs 16 decode steps turns SJD's window off), the clock and the batch still do not."""
    steep = {"2,16": [1e-3 * q for q in range(1, 17)]}
    flat = {"2,16": [1e-3] * 16}
    out = {}
    for name, curves in (("steep", steep), ("flat", flat)):
        for batch, (seed, scale) in ((1, (3, 1e-4)), (4, (4, 5e-2))):
            gen = Generator(TorchEngine(load_model("demo")))
            load_latency_profile(_profile(tmp_path, gen, curves), gen.engine)
            monkeypatch.setattr(time, "perf_counter", _Clock(seed, scale))
            out[name, batch] = _run(gen, "sjd", {}, batch)
            monkeypatch.undo()
    assert np.array_equal(out["steep", 1][0], out["steep", 4][0])
    assert np.array_equal(out["flat", 1][0], out["flat", 4][0])
    # steep: after its first window steps each image decodes one token per step (re-measuring now and then)
    assert out["steep", 1][1]["target_forwards_per_image"] > 1.5 * out["flat", 1][1]["target_forwards_per_image"]


def test_a_latency_profile_without_a_needed_curve_is_an_error(tmp_path):
    gen = Generator(TorchEngine(load_model("demo")), TorchEngine(load_model("demo-draft")))
    load_latency_profile(_profile(tmp_path, gen, {"2,16": [1e-3] * 16}), gen.engine, gen.draft)  # no draft curves
    with pytest.raises(ArexportError, match="no draft-engine curve over 2 rows up to 2 queries"):
        _run(gen, "sd", {}, 1)
    with pytest.raises(ArexportError, match="no target-engine curve over 1 rows"):  # no guidance: one row per image
        gen.generate(classes=[1], method="sjd", sampling=SamplingParams(cfg_scale=1.0), images=False)
