"""TensorRT profiles of the parallel families (PAR, RandAR, LPD, ARPG) cover every step their default schedules feed.

The builder (exporter/trt_build.py) writes one optimization profile per range the step kind declares
(format/stepkinds.py), with the query length K that `build` picks (exporter/build.step_query_len). Here each
released model's shapes (its grid, its schedule; 1 layer, tiny width) run the family's default method on the torch
backend with K as the engine would have it, and every engine call's (rows, q[, m]) must select one of those
profiles (format/profiles.select_profile, what the TensorRT runner calls). TensorRT itself is not installable on
this project's machines: the plan build at the end skips with that reason.
"""

from __future__ import annotations

import pytest
import torch

from arexport.errors import ArexportError
from arexport.exporter.build import step_query_len
from arexport.families import get_family
from arexport.format.profiles import select_profile, step_profiles
from arexport.format.stepkinds import get_step_kind
from arexport.models.catalog import LoadedModel
from arexport.models.registry import load_model, model_config
from arexport.runtime.backends.torch.runner import TorchEngine
from arexport.runtime.generator import Generator

ROWS = 8  # the default --batch-sizes' largest (1,2,4,8): 4 guided images
TINY = {"n_layer": 1, "dim": 32, "n_head": 2, "vocab_size": 64, "num_classes": 10}


def recorded_calls(name: str, verify_len=None):
    """(kind, rows, q, m) of every engine call of the default method on `name`'s released grid, the profiles a
    build with `verify_len` would give the step graph, and its K."""
    over = dict(TINY, multiple_of=16) if not name.startswith("lpd") else dict(TINY)
    over["n_layer"] = 2 if name.startswith("arpg") else 1  # ARPG: self- and cross-decoder halves
    cfg = model_config(name, over)
    lm = LoadedModel(name, cfg.build().init_random(0).eval(), cfg.spec(name), None, {})  # no image decoder: tokens only
    spec, family = lm.spec, get_family(lm.spec.family)
    kinds = [get_step_kind(k) for k in family.steps(spec)]
    max_q = step_query_len(family, spec, verify_len, kinds)
    kind = next(k for k in kinds if k.graph == "step")
    profiles = step_profiles([1, 2, 4, ROWS], max_q, kind, family.exact_query_sizes(spec))
    eng = TorchEngine(lm)
    eng.max_q = max_q
    calls = []
    step, multi = eng.step, eng.multi_query_step

    def rec_step(cache, tokens, *a, **k):
        calls.append((kind, tokens.shape[0], tokens.shape[1], 1))
        return step(cache, tokens, *a, **k)

    def rec_multi(cache, tokens, positions, write_index, attn_mask, query_positions, *a, **k):
        calls.append((kind, tokens.shape[0], tokens.shape[1], query_positions.shape[1]))
        return multi(cache, tokens, positions, write_index, attn_mask, query_positions, *a, **k)

    eng.step, eng.multi_query_step = rec_step, rec_multi
    Generator(eng).generate(classes=[1, 2, 3, 4, 5], images=False, batch_size=ROWS // 2)  # default method, sampling, CFG
    return calls, profiles, max_q


def covered(calls, profiles) -> None:
    for kind, rows, q, m in calls:
        i = select_profile(profiles, kind.labels, rows, q)
        if "m" in profiles[i]:
            lo, _, hi = profiles[i]["m"]
            assert lo <= m <= hi, (rows, q, m, profiles[i])


@pytest.mark.parametrize("name,longest", [("par-XL-4x", 4), ("par-3B-16x", 16), ("randar-L", 13), ("lpd-l-256", 40),
                                          ("lpd-l-512", 67), ("arpg-L", 28)])
def test_profiles_cover_every_feed_of_the_default_schedule(name, longest):
    calls, profiles, max_q = recorded_calls(name)
    assert max(q for _, _, q, _ in calls) == longest or max(m for *_, m in calls) == longest  # the schedule's largest group ran
    assert max(r for _, r, _, _ in calls) == ROWS
    covered(calls, profiles)


def test_lpd_512_needs_its_own_default_query_len():
    """Negative control: a 512 px LPD engine built with the family's 256 px K (40, the default before
    default_query_len) has no profile for the 48-step schedule's feed of 67; the method refuses it."""
    with pytest.raises(ArexportError, match=r"feeds up to 67 tokens per forward; the engine's maximum query length is 40"):
        recorded_calls("lpd-l-512", verify_len=40)
    profiles = step_profiles([1, 2, 4, ROWS], 40, get_step_kind("token"))
    with pytest.raises(ArexportError, match="no TensorRT profile for decode/verify with batch 8, q 67"):
        select_profile(profiles, get_step_kind("token").labels, ROWS, 67)


def test_trt_plan_builds_for_a_parallel_family(tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installable on this project's machines (no GPU, no wheel)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT plans need a CUDA GPU")
    from arexport.exporter.build import BuildOptions, build_engine

    lm = load_model("lpd-l-256", random_init=True, overrides=dict(TINY, grid_size=4))
    build_engine(lm, tmp_path / "lpd", BuildOptions(batch_sizes=[2, 8], images=False, precision="fp16", backend="trt"))
    out = Generator.load(str(tmp_path / "lpd"), backend="trt", device="cuda").generate(classes=[1, 2], images=False)
    assert out.stats["target_forwards"] == 16
