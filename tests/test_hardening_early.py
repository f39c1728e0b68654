"""Refusals before parsing (issue 38, burst refusals within 100 ms): the HTTP guard answers 429/503 from
the headers or a json peek, before FastAPI validates the body, with the status admission would give."""

from __future__ import annotations

import json

import httpx
import pytest

from arexport.runtime import Generator
from arexport.serving.early import peek
from arexport.serving.http import create_app
from arexport.serving.server import BackgroundServer
from arexport.serving.service import GenerationService


def test_peek_reads_a_lower_bound_on_images_and_the_timeout():
    assert peek(b'{"classes": [1, 2, 3], "timeout": 2}') == (3, 2)
    assert peek(b'{"prompts": ["a", "b"]}') == (2, None)
    assert peek(b'{"prompt": "a", "n": 4}', "/v1/images/generations") == (4, None)
    assert peek(b'{"classes": [1], "n": 4}', "/generate") == (1, None)  # /generate has no n
    for bad in (b"not json", b"[1, 2]", b'{"timeout": true}', b'{"timeout": "3"}', b'{"timeout": -1}',
                b'{"timeout": NaN}', b"[" * 100000, b"[" * 5000, b'{"classes": [' + b"1," * 40000 + b"1]}"):
        assert peek(bad) is None, bad[:40]


@pytest.fixture(scope="module")
def served():
    svc = GenerationService(Generator.load("demo"), max_batch=2, max_outstanding=4)
    with BackgroundServer(create_app(svc)) as url, httpx.Client(base_url=url, timeout=120) as client:
        yield svc, client
    svc.close()


def _slow_estimate(svc, seconds_per_image: float):
    """Admission's throughput estimate as after turns where an image took this long."""
    svc.admission._w = svc.admission._seconds = svc.admission._live = svc.admission._live2 = 0.0
    svc.admission._live_s = svc.admission._images = 0.0
    for _ in range(4):
        svc.admission.observe(seconds_per_image, 1, 1)


def _rejected(client, reason: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f'arexport_rejected_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_unreachable_deadline_is_refused_before_the_body_is_validated(served):
    """An unknown method would be a 400 after validation; with a deadline the estimate cannot meet,
    the guard's peek answers 503 + Retry-After first, saying so in Server-Timing."""
    svc, client = served
    _slow_estimate(svc, 20.0)
    try:
        before = _rejected(client, "deadline")
        r = client.post("/generate", json={"classes": [3], "timeout": 1, "method": "no-such-method"})
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1, r.text
        assert "cannot finish within its 1 s timeout" in r.json()["error"]
        assert r.headers["Server-Timing"].startswith("decision;dur=")
        assert _rejected(client, "deadline") == before + 1
        r = client.post("/v1/images/generations", json={"prompt": "", "classes": [3], "timeout": 1, "bogus": 1})
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
        r = client.post("/generate", json={"classes": [3], "method": "no-such-method"})  # no deadline: validated
        assert r.status_code == 400 and "unknown method" in r.json()["error"]
    finally:
        _slow_estimate(svc, 0.01)
    r = client.post("/generate", json={"classes": [3], "timeout": 30, "format": "tokens"})  # reachable: runs
    assert r.status_code == 200


def test_full_bound_is_refused_from_the_headers_without_reading_the_body(served):
    """With no room for one more image even a body that is not JSON gets 429 (not 422): the body is
    never read, and the connection is closed after the answer."""
    svc, client = served
    with svc._lock:
        svc._outstanding += svc.max_outstanding  # as if 4 images were queued
    try:
        r = client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert r.headers["connection"] == "close" and "Server-Timing" in r.headers
        assert "limit is 4" in r.json()["error"]
        r = client.post("/v1/images/generations", content=b"{}")
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
        assert client.get("/healthz").status_code == 200  # other paths are not refused
    finally:
        with svc._lock:
            svc._outstanding -= svc.max_outstanding
    r = client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422  # room again: validated as before


def test_closing_service_refuses_before_the_body():
    svc = GenerationService(Generator.load("demo"), max_batch=2)
    with BackgroundServer(create_app(svc)) as url, httpx.Client(base_url=url, timeout=60) as client:
        svc.close(drain=True, timeout=30)
        r = client.post("/generate", content=json.dumps({"classes": [1]}))
        assert r.status_code == 503 and "shutting down" in r.json()["error"]
