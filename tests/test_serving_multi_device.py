"""Several devices in one process (issue 34): the CFG row split and data-parallel replicas, on two CPU
"devices" (two engine instances), give every seed the tokens of the single-device path."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from arexport.errors import ArexportError
from arexport.runtime import Generator, RowSplitEngine, check_devices, open_row_split
from arexport.serving.http import create_app
from arexport.serving.replicas import ReplicaService
from arexport.serving.server import BackgroundServer
from arexport.serving.service import GenerationService

REQS = [([0, 1], 1), ([3], 2), ([5, 5, 6], 3), ([9], 4), ([2, 7], 5), ([4, 8], 6)]


@pytest.fixture(scope="module")
def single():
    return Generator.load("demo")


@pytest.fixture(scope="module")
def split():
    """demo split over two CPU engines, each part's rows counted per call."""
    engine = open_row_split("demo", ["cpu", "cpu"])
    engine.part_rows = [[], []]
    for i, e in enumerate(engine.engines):
        inner = e._forward

        def counted(kind, cache, feeds, inner=inner, i=i):
            engine.part_rows[i].append(next(iter(feeds.values())).shape[0])
            return inner(kind, cache, feeds)

        e._forward = counted
    return Generator(engine)


def _alone(gen, classes, seed, method="ar", options=None, **sampling):
    return gen.generate(classes=classes, seed=seed, method=method, method_options=options or {}, images=False,
                        sampling=gen.sampling_params(**sampling) if sampling else None)


@pytest.mark.parametrize("method,options", [("ar", {}), ("sjd", {}), ("gridar", {"candidates": 4})])
def test_cfg_split_gives_the_single_device_tokens(single, split, method, options):
    """Guided: conditional rows on part 0, unconditional on part 1, each call split in two equal halves;
    GridAR also moves rows between slots (copy_rows across the split cache)."""
    split.engine.part_rows = [[], []]
    a = _alone(single, [3, 7], 11, method, options)
    b = _alone(split, [3, 7], 11, method, options)
    assert np.array_equal(a.tokens, b.tokens)
    assert a.stats["target_forwards"] == b.stats["target_forwards"]
    rows0, rows1 = split.engine.part_rows
    assert rows0 and rows0 == rows1  # every guided call: as many cond rows on one device as uncond on the other


def test_split_unguided_odd_batch_alternates_images_between_devices(single, split):
    """Unguided, image i runs on device i % 2 (an odd batch: one more on the first), best-of-n's
    candidates included."""
    for method, opt in (("ar", {}), ("best-of-n", {"candidates": 3})):
        a = _alone(single, [2, 5, 8], 4, method, opt, cfg_scale=1.0)
        b = _alone(split, [2, 5, 8], 4, method, opt, cfg_scale=1.0)
        assert np.array_equal(a.tokens, b.tokens), method


def test_split_cache_views_map_rows_to_their_part():
    """A view starting on an odd row puts its even rows on part 1 (the rows are the logical ones)."""
    engine = open_row_split("demo", ["cpu", "cpu"])
    cache = engine.allocate(5)
    assert [p.batch for p in cache.parts] == [3, 2]
    v = cache.view(1, 4)  # logical rows 1, 2, 3 -> part 1 row 0, part 0 row 1, part 1 row 1
    assert v.rows_of(0, 3).tolist() == [1] and v.rows_of(1, 3).tolist() == [0, 2]
    assert [p.batch for p in v.parts] == [1, 2]
    cache.parts[1].keys[0][1].fill_(5.0)  # logical row 3
    v.copy_rows(__import__("torch").tensor([1]), __import__("torch").tensor([2]))  # logical 2 <- 3 (part 0 <- part 1)
    assert float(cache.parts[0].keys[0][1].max()) == 5.0


def test_split_refuses_eagle_with_a_named_error(split):
    """EAGLE edits the cache buffers itself (its tree commit): refused, never a wrong image."""
    with pytest.raises(ArexportError, match="tree_verify step cannot run on a CFG split"):
        split.generate(classes=[1, 2], method="eagle", method_options={"draft_head": "demo-eagle"}, seed=1, images=False)


def test_split_refuses_mismatched_engines_and_device_lists():
    a = Generator.load("demo").engine
    b = Generator.load("demo-draft").engine
    with pytest.raises(ArexportError, match="same model"):
        RowSplitEngine([a, b])
    with pytest.raises(ArexportError, match="exactly 2"):
        RowSplitEngine([a])
    with pytest.raises(ArexportError, match="unknown device|not available"):
        check_devices(["cpu", "tpu:0"])


def _replicas(n=2, **kw):
    return ReplicaService.open(lambda d, m: GenerationService(Generator.load("demo", device=d), max_batch=2, metrics=m, **kw),
                               ["cpu"] * n)


def test_replicas_under_concurrency_match_alone_and_share_the_load(single):
    svc = _replicas()
    try:  # submitted back to back (submit does not wait): all in flight at once, each placed by the load then
        futs = [svc.submit(c, seed=s, images=False) for c, s in REQS]
        placed = list(svc.placed)
        outs = [f.result(timeout=300) for f in futs]
    finally:
        svc.close()
    for (c, s), out in zip(REQS, outs):
        assert np.array_equal(out.tokens, _alone(single, c, s).tokens)
    assert sum(placed) == len(REQS) and min(placed) >= 1  # placed by load: both replicas got work


def test_cfg_split_service_under_concurrency_matches_alone(single, split):
    svc = GenerationService(split, max_batch=3)
    try:
        futs = [svc.submit(c, seed=s, images=False, method=m) for (c, s), m in zip(REQS, ["ar", "sjd"] * 3)]
        outs = [f.result(timeout=300) for f in futs]
    finally:
        svc.close()
    for ((c, s), m), out in zip(zip(REQS, ["ar", "sjd"] * 3), outs):
        assert np.array_equal(out.tokens, _alone(single, c, s, m).tokens)


def test_replicas_over_http_refuse_only_when_every_replica_is_full(single):
    svc = _replicas(max_outstanding=2)
    try:
        with BackgroundServer(create_app(svc)) as url, httpx.Client(base_url=url, timeout=120) as c:
            r = c.post("/generate", json={"classes": [3], "seed": 5, "format": "tokens"})
            assert r.status_code == 200 and r.json()["tokens"] == _alone(single, [3], 5).tokens.tolist()
            health = c.get("/healthz").json()
            assert [x["device"] for x in health["load"]["replicas"]] == ["cpu", "cpu"]
            assert health["load"]["max_outstanding_images"] == 4
            futs = [svc.submit([1, 2], seed=i, images=False) for i in range(2)]  # both replicas full
            r = c.post("/generate", json={"classes": [3], "seed": 5, "format": "tokens"})
            assert r.status_code == 429 and "Retry-After" in r.headers
            [f.result(timeout=120) for f in futs]
            assert svc.placed[0] >= 1 and svc.placed[1] >= 1
            metrics = c.get("/metrics").text
            assert 'arexport_rejected_total{reason="overloaded"} 2.0' in metrics  # tried on each replica
            assert "arexport_outstanding_images 0.0" in metrics
    finally:
        svc.close()
