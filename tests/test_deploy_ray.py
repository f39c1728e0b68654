"""Ray Serve: a local Ray cluster (2 CPUs), 2 replicas each owning a GenerationService: concurrent
requests equal the generator alone; a replica SIGKILLed mid-load loses nothing silently (its
requests are retried elsewhere with equal answers, or fail with ReplicaFailed naming them)."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the Ray Serve tests need ray[serve] (pip install 'arexport[deploy]')")
serve = pytest.importorskip("ray.serve", reason="the Ray Serve tests need ray[serve] (pip install 'arexport[deploy]')")

from arexport.deploy.ray_serve import ReplicaFailed, RetryingClient, app  # noqa: E402
from arexport.errors import ArexportError  # noqa: E402
from arexport.runtime.generator import Generator  # noqa: E402

pytestmark = pytest.mark.slow  # a Ray cluster and two replica processes start (40 s on 2 loaded cores)

REQS = [dict(classes=[c, (c + 3) % 10], seed=100 + c, images=False) for c in range(6)]


@pytest.fixture(scope="module")
def handle():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        serve.start(http_options={"location": "NoServer"})
        yield serve.run(app("demo", num_replicas=2, max_batch=4, ray_actor_options={"num_cpus": 0.5}),
                        name="arexport", route_prefix=None)
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def alone():
    gen = Generator.load("demo")
    return lambda r: gen.generate(classes=r["classes"], seed=r["seed"], method=r.get("method"), images=False).tokens


def _replica_pids(handle, want=2, tries=10):
    """The replicas' pids, asked in concurrent rounds of 8 calls: Serve's router spreads calls that are in
    flight together, while back-to-back calls to an idle deployment may all land on one replica."""
    pids = {}
    for _ in range(tries):
        for info in [r.result(timeout_s=60) for r in [handle.info.remote() for _ in range(8)]]:
            pids[info["pid"]] = info
        if len(pids) >= want:
            break
    return pids


def test_concurrent_requests_on_two_replicas_equal_alone(handle, alone):
    client = RetryingClient(handle, retries=0)
    with ThreadPoolExecutor(len(REQS)) as pool:
        outs = list(pool.map(lambda r: client.generate(r, timeout_s=300), REQS))
    for r, out in zip(REQS, outs):
        assert np.array_equal(np.asarray(out["tokens"]), alone(r))
    assert len({o["replica"] for o in outs}) == 2, "both replicas should have served requests"
    assert len(_replica_pids(handle)) == 2
    # a bad request comes back as the request's own error, not retried
    with pytest.raises(ArexportError, match="unknown request field"):
        client.generate({"classes": [1], "sede": 3})
    assert client.replica_deaths == 0


def test_replica_killed_mid_load_loses_nothing(handle, alone):
    pids = _replica_pids(handle)
    assert len(pids) == 2
    retrying, once = RetryingClient(handle, retries=3), RetryingClient(handle, retries=0)
    reqs = [dict(r, classes=r["classes"] * 2) for r in REQS]  # 4 images each: the replicas stay busy
    with ThreadPoolExecutor(len(reqs)) as pool:
        futs = [pool.submit((retrying if i % 2 == 0 else once).generate, r, 300) for i, r in enumerate(reqs)]
        victim = None
        deadline = time.monotonic() + 60
        while victim is None and time.monotonic() < deadline:  # kill a replica while it holds requests
            info = handle.info.remote().result(timeout_s=60)
            if info["inflight"] > 0:
                victim = info["pid"]
            else:
                time.sleep(0.05)
        assert victim is not None, "no replica was seen holding a request"
        os.kill(victim, signal.SIGKILL)
        outcomes = []
        for f in futs:
            try:
                outcomes.append(f.result(timeout=600))
            except ReplicaFailed as e:
                outcomes.append(e)
    answered = failed = 0
    for i, (r, out) in enumerate(zip(reqs, outcomes)):
        if isinstance(out, ReplicaFailed):  # only requests without retries may fail, and they say why
            assert i % 2 == 1 and "replica died" in str(out) and str(r["seed"]) in str(out)
            failed += 1
        else:
            assert np.array_equal(np.asarray(out["tokens"]), alone(r))  # (a request the victim finished first counts too)
            answered += 1
    assert answered + failed == len(reqs)  # nothing lost silently
    assert retrying.replica_deaths + once.replica_deaths >= 1, "the kill hit no request in flight"
    assert failed == once.replica_deaths

