"""Hardening (issue 38): no data loss from build, refused absurd sizes and thresholds, one-line errors.

HTTP hardening (admission, cancellation, fuzz) is in tests/test_serving_hardening.py."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner

from arexport.cli import cli
from arexport.errors import ArexportError
from arexport.fileio import atomic_directory, remove_stale_builds

DEAD_PID = 4_000_000  # above Linux's pid_max (4194304 max is 2**22; default 32768 or 4194304): check it below


def _dead_pid() -> int:
    for pid in (DEAD_PID, 3_999_999, 3_999_998):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
    pytest.skip("no dead pid found")


# -- item 1: build data loss ------------------------------------------------------------------------

def test_stale_cleanup_deletes_only_marked_temp_directories(tmp_path):
    pid = _dead_pid()
    user = {  # names the old cleanup matched, each holding a user's file
        ".mydata.old.99999999.keep": "precious",
        f".photos.building.{pid}.bak": "photos",
        f".forged.building.{pid}." + "a" * 32: "no marker inside",  # our exact name pattern, no marker
        f".wrongmark.old.{pid}." + "b" * 32: "marker with another token",
    }
    for name, text in user.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "file.txt").write_text(text)
    (tmp_path / f".wrongmark.old.{pid}." / "x").parent  # noqa: B018 (path only)
    (tmp_path / (f".wrongmark.old.{pid}." + "b" * 32) / ".arexport-temp").write_text("arexport temp " + "c" * 32 + "\n")
    ours = tmp_path / (f".demo.building.{pid}." + "d" * 32)  # what a kill -9'd build leaves
    ours.mkdir()
    (ours / ".arexport-temp").write_text("arexport temp " + "d" * 32 + "\n")
    (ours / "step.onnx").write_bytes(b"partial")
    removed = remove_stale_builds(tmp_path)
    assert removed == [ours] and not ours.exists()
    for name, text in user.items():
        assert (tmp_path / name / "file.txt").read_text() == text, name


def test_overwrite_refuses_a_directory_that_is_not_an_engine(tmp_path):
    target = tmp_path / "photos"
    target.mkdir()
    (target / "cat.jpg").write_bytes(b"jpeg")
    with pytest.raises(ArexportError, match="not an arexport engine.*--overwrite-any-directory"):
        with atomic_directory(target, overwrite=True) as tmp:
            (tmp / "manifest.json").write_text("{}")
    assert (target / "cat.jpg").read_bytes() == b"jpeg"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # no temp dir, no lock file left
    (target / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(ArexportError, match="not an arexport engine"):
        with atomic_directory(target, overwrite=True):
            pass
    (target / "manifest.json").write_text('{"format": "arexport-engine"}')  # an engine directory: replaced
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "new").write_text("1")
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "a").write_text("a")
    with atomic_directory(other, overwrite=True, replace_any=True) as tmp:  # the explicit flag
        (tmp / "b").write_text("b")
    assert sorted(p.name for p in other.iterdir()) == ["b"]


def test_second_concurrent_writer_fails_instead_of_replacing(tmp_path):
    target = tmp_path / "engine"
    inside, release, errors = threading.Event(), threading.Event(), []

    def first():
        with atomic_directory(target) as tmp:
            (tmp / "first").write_text("1")
            inside.set()
            release.wait(30)

    t = threading.Thread(target=first)
    t.start()
    assert inside.wait(30)
    try:
        with pytest.raises(ArexportError, match="another arexport process is writing"):
            with atomic_directory(target, overwrite=True) as tmp:
                (tmp / "second").write_text("2")
    finally:
        release.set()
        t.join(30)
    assert not errors and sorted(p.name for p in target.iterdir()) == ["first"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]  # the lock file is gone
    with pytest.raises(FileExistsError):  # after the first finished, a plain second build refuses
        with atomic_directory(target):
            pass


@pytest.mark.parametrize("out", [".", "..", "/"])
def test_build_out_dot_is_a_one_line_error(tmp_path, monkeypatch, out):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("k")
    res = CliRunner().invoke(cli, ["build", "demo", "--out", out, "--overwrite", "--no-images"])
    assert res.exit_code == 1 and "current directory" in res.output and "Traceback" not in res.output, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_build_cli_keeps_user_directories_and_refuses_non_engine_overwrite(tmp_path):
    (tmp_path / ".mydata.old.99999999.keep").mkdir()
    (tmp_path / ".mydata.old.99999999.keep" / "f").write_text("x")
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_text("a")
    res = CliRunner().invoke(cli, ["build", "demo", "--out", str(photos), "--overwrite", "--no-images"])
    assert res.exit_code == 1 and "not an arexport engine" in res.output, res.output
    res = CliRunner().invoke(cli, ["build", "demo", "--out", str(tmp_path / "e"), "--no-images"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / ".mydata.old.99999999.keep" / "f").read_text() == "x"
    assert (photos / "a.jpg").exists() and (tmp_path / "e" / "manifest.json").exists()
    res = CliRunner().invoke(cli, ["build", "demo", "--out", str(tmp_path / "e"), "--overwrite", "--no-images"])
    assert res.exit_code == 0, res.output  # an engine directory is replaced as before


# -- items 6-8 on the CLI ----------------------------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["generate", "--model", "demo", "--classes", "99999999999999999999999", "--save-tokens", "{t}/a.npy"], "out of range"),
    (["generate", "--model", "demo", "--image-size", "0", "--classes", "1", "--save-tokens", "{t}/a.npy"], "--image-size"),
    (["generate", "--model", "demo", "--image-size", "-16", "--classes", "1", "--save-tokens", "{t}/a.npy"], "--image-size"),
    (["generate", "--model", "demo", "--classes", "1", "--save-tokens", "{t}/a.npy", "--stats-json", "{t}/a.npy"],
     "name the same path"),
    (["generate", "--model", "demo", "--classes", "1", "--cfg-scale", "1e308", "--save-tokens", "{t}/a.npy"], "cfg-scale must be in"),
    (["generate", "--model", "demo", "--classes", "1", "--temperature", "1e-300", "--save-tokens", "{t}/a.npy"], "temperature"),
    (["generate", "--model", "demo", "--method", "gridar", "--candidates", "100000000", "--classes", "1",
      "--save-tokens", "{t}/a.npy"], "memory budget"),
    (["decode", "demo", "--tokens", "{t}/t.npz", "--out", "{t}/d"], "not a .npy array"),
    (["calibrate", "{t}/nowhere", "--mode", "int8", "--out", "{t}/q", "--min-agreement", "nan"], "--min-agreement"),
    (["serve", "--model", "demo", "--max-batch", "100000"], "max batch must be in"),
])
def test_cli_refuses_absurd_values_in_one_line(tmp_path, args, message):
    import numpy as np

    np.savez(tmp_path / "t.npz", a=np.zeros((2, 64), dtype=np.int64))
    res = CliRunner().invoke(cli, [a.format(t=tmp_path) for a in args])
    assert res.exit_code == 1 and message in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "a.npy").exists()


def test_verify_refuses_nan_tolerance_and_a_batch_over_budget(demo_engine, monkeypatch):
    res = CliRunner().invoke(cli, ["verify", str(demo_engine), "--atol", "nan"])
    assert res.exit_code == 1 and "--atol must be a finite number" in res.output
    monkeypatch.setenv("AREXPORT_MEMORY_BUDGET_GB", "0.5")
    res = CliRunner().invoke(cli, ["verify", str(demo_engine), "--batch", "100000"])
    assert res.exit_code == 1 and "verify --batch 100000 needs an estimated" in res.output and "0.50 GiB" in res.output, res.output


def test_memory_budget_error_names_estimate_and_budget(monkeypatch):
    from arexport.budget import MemoryBudgetError, check

    monkeypatch.setenv("AREXPORT_MEMORY_BUDGET_GB", "1")
    check("small", 2**29)
    with pytest.raises(MemoryBudgetError, match=r"big needs an estimated 2.00 GiB; the memory budget is 1.00 GiB"):
        check("big", 2**31)
    monkeypatch.setenv("AREXPORT_MEMORY_BUDGET_GB", "nan")
    with pytest.raises(ArexportError, match="positive number"):
        check("x", 1)


def test_manifest_paths_stay_inside_the_engine_directory(demo_engine, tmp_path):
    import json
    import shutil

    from arexport.errors import ManifestError
    from arexport.format.manifest import read_manifest

    for field_edit, message in [
        (lambda m: m["files"].__setitem__("../../../../etc/hostname", {"bytes": 1, "sha256": "0" * 64}), "plain file name"),
        (lambda m: m["spec"].__setitem__("s_max", 10**9), "implausible"),
    ]:
        d = tmp_path / "e"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(demo_engine, d)
        m = json.loads((d / "manifest.json").read_text())
        field_edit(m)
        (d / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(ManifestError, match=message):
            read_manifest(d)
        res = CliRunner().invoke(cli, ["inspect", str(d)])
        assert res.exit_code == 1 and message in res.output


def test_interrupted_image_writing_leaves_a_partial_marker(tmp_path, monkeypatch):
    from arexport import fileio

    calls = []

    def failing_png(path, img):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what SIGINT/SIGTERM-as-exit does mid-set
        real(path, img)

    real = fileio.atomic_save_png
    monkeypatch.setattr(fileio, "atomic_save_png", failing_png)
    out = tmp_path / "imgs"
    res = CliRunner().invoke(cli, ["generate", "--model", "demo", "--classes", "1,2,3", "--out", str(out)])
    assert res.exit_code == 130
    assert (out / "PARTIAL.txt").exists() and "3 images" in (out / "PARTIAL.txt").read_text()
    monkeypatch.setattr(fileio, "atomic_save_png", real)
    res = CliRunner().invoke(cli, ["generate", "--model", "demo", "--classes", "1,2,3", "--out", str(out)])
    assert res.exit_code == 0 and not (out / "PARTIAL.txt").exists() and len(list(out.glob("*.png"))) == 3


# -- the service (items 2-5, 8): a real server on loopback -------------------------------------------

TOKEN = "s3cret-clé"  # non-ASCII on purpose: a configured token like this made every request a 500
AUTH = {"Authorization": b"Bearer " + TOKEN.encode()}


@pytest.fixture(scope="module")
def demo_gen():
    from arexport.runtime.generator import Generator

    return Generator.load("demo")


@pytest.fixture(scope="module")
def server(demo_gen):
    from arexport.serving.http import create_app
    from arexport.serving.server import BackgroundServer
    from arexport.serving.service import GenerationService

    svc = GenerationService(demo_gen, batching="continuous", max_batch=4, max_outstanding=64, max_lanes=2)
    app = create_app(svc, token=TOKEN, max_body_bytes=4096, max_images=16, body_timeout_s=0.5)
    with BackgroundServer(app) as url:
        yield url, svc


def _post(url, body, headers=AUTH, **kw):
    import httpx

    return httpx.post(f"{url}/generate", json=body, headers=headers, timeout=kw.pop("timeout", 60), **kw)


@pytest.mark.parametrize("options", [
    {"verifier": ["digits"]}, {"verifier": {"a": 1}}, {"scorer": {"x": "y"}}, {"scorer": [1]},
    {"checkpoints": 3}, {"checkpoints": {"a": 0.5}}, {"candidates": "four"}, {"candidates": 1e30},
])
def test_ill_typed_method_options_get_400(server, options):
    url, _ = server
    r = _post(url, {"classes": [1], "method": "gridar", "options": options, "format": "tokens"})
    assert r.status_code == 400 and "error" in r.json() and "Traceback" not in r.text, r.text


@pytest.mark.parametrize("body,message", [
    ({"classes": [1], "cfg_scale": 1e308}, "cfg-scale must be in"),
    ({"classes": [1], "temperature": 1e-300}, "temperature"),
    ({"classes": [1], "top_k": 2**40}, "top_k"),
    ({"classes": [1], "timeout": 1e308}, "timeout"),
])
def test_absurd_sampling_values_are_refused(server, body, message):
    url, _ = server
    r = _post(url, dict(body, format="tokens"))
    assert r.status_code in (400, 422) and message in r.json()["error"], r.text


def test_nan_guidance_in_json_is_refused(server):
    import httpx

    url, _ = server
    r = httpx.post(f"{url}/generate", content=b'{"classes": [1], "cfg_scale": NaN, "format": "tokens"}',
                   headers={**AUTH, "content-type": "application/json"}, timeout=60)
    assert r.status_code in (400, 422) and "error" in r.json(), r.text


def test_auth_covers_docs_and_non_ascii_headers(server):
    import httpx

    url, _ = server
    for path in ("/docs", "/openapi.json", "/redoc", "/metrics", "/nowhere"):
        r = httpx.get(f"{url}{path}")
        assert r.status_code == 401 and r.json() == {"error": "missing or wrong bearer token"}, path
    r = httpx.post(f"{url}/generate", json={"classes": [1]}, headers={"Authorization": "Bearer ümlaut".encode("latin-1")})
    assert r.status_code == 401
    r = httpx.post(f"{url}/generate", json={"classes": [1]}, headers={"Authorization": "Bearer \u00e9t\u00e9".encode()})
    assert r.status_code == 401
    assert _post(url, {"classes": [1], "format": "tokens"}).status_code == 200  # the UTF-8 token itself works
    r = httpx.get(f"{url}/nowhere", headers=AUTH)
    assert r.status_code == 404 and set(r.json()) == {"error"}
    r = httpx.get(f"{url}/generate", headers=AUTH)
    assert r.status_code == 405 and set(r.json()) == {"error"}


def test_metrics_count_http_refusals(server):
    import httpx

    url, _ = server
    httpx.get(f"{url}/metrics")  # 401
    _post(url, {"classes": [1], "pad": "x" * 5000})  # 413
    text = httpx.get(f"{url}/metrics", headers=AUTH).text
    assert 'arexport_http_responses_total{status="401"}' in text
    assert 'arexport_http_responses_total{status="413"}' in text


def test_query_string_is_not_logged():
    import logging

    import httpx

    from arexport.serving.server import BackgroundServer
    from arexport.serving.http import create_app

    class Svc:  # /healthz only needs these
        closed, healthy, batching = False, True, "none"
        metrics = __import__("arexport.serving.metrics", fromlist=["Metrics"]).Metrics()
        load = {}

        def degraded(self):
            return []

        def close(self, **kw):
            pass

        class engine:
            backend = "torch"

            class spec:
                name, family = "demo", "demo"

    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep()
    background = BackgroundServer(create_app(Svc()), log_level="info")  # configures uvicorn's loggers
    logging.getLogger("uvicorn.access").addHandler(handler)
    try:
        with background as url:
            httpx.get(f"{url}/healthz?token=hunter2")
    finally:
        logging.getLogger("uvicorn.access").removeHandler(handler)
    assert any("/healthz?<redacted>" in m for m in seen), seen
    assert not any("hunter2" in m for m in seen)


def test_slow_body_is_timed_out(server):
    import socket
    import time
    from urllib.parse import urlparse

    url, _ = server
    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() +
                  b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"classes\"")
        t0 = time.monotonic()
        reply = s.recv(4096)
        assert b" 408 " in reply.split(b"\r\n")[0] and time.monotonic() - t0 < 5, reply


def test_admission_bound_and_deadline_refusals(demo_gen):
    import time

    from arexport.serving.service import DeadlineUnreachable, GenerationService, Overloaded

    svc = GenerationService(demo_gen, batching="continuous", max_batch=2, max_outstanding=6)
    try:
        with pytest.raises(ArexportError, match="runs at most 6"):
            svc.submit(list(range(7)), images=False)
        svc.submit([1, 2, 3, 4], images=False).result(timeout=60)  # measures the throughput
        assert svc.load["images_per_second"] > 0
        running = svc.submit([1, 2, 3, 4], images=False)
        t0 = time.monotonic()
        with pytest.raises(DeadlineUnreachable, match="cannot finish within its 0.001 s timeout") as e:
            svc.submit([5], images=False, timeout=0.001)
        assert time.monotonic() - t0 < 0.1 and e.value.retry_after >= 1
        svc.submit([5, 6], images=False)
        with pytest.raises(Overloaded, match="6 images queued or running, the limit is 6"):
            svc.submit([7], images=False)
        running.result(timeout=60)
    finally:
        svc.close()
    text = svc.metrics.render().decode()
    assert 'arexport_rejected_total{reason="overloaded"} 1.0' in text and 'arexport_rejected_total{reason="deadline"} 1.0' in text
    assert svc.load["outstanding_images"] == 0


def test_http_overload_gets_429_with_retry_after(demo_gen):
    import httpx

    from arexport.serving.http import create_app
    from arexport.serving.server import BackgroundServer
    from arexport.serving.service import GenerationService

    svc = GenerationService(demo_gen, batching="continuous", max_batch=2, max_outstanding=4)
    with BackgroundServer(create_app(svc)) as url:
        busy = svc.submit([1, 2, 3, 4], images=False)
        r = httpx.post(f"{url}/generate", json={"classes": [1], "format": "tokens"}, timeout=60)
        health = httpx.get(f"{url}/healthz").json()
        busy.result(timeout=60)
    svc.close()
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1 and "server busy" in r.json()["error"]
    assert health["status"] == "degraded" and "outstanding images" in health["degraded"][0]


def test_disconnected_client_cancels_its_rows(demo_gen):
    import socket
    import time
    from urllib.parse import urlparse

    from arexport.serving.http import create_app
    from arexport.serving.server import BackgroundServer
    from arexport.serving.service import GenerationService

    svc = GenerationService(demo_gen, batching="continuous", max_batch=2)
    body = b'{"classes": [0,1,2,3,4,5,6,7,8,9,0,1,2,3,4,5], "format": "tokens"}'
    with BackgroundServer(create_app(svc, max_images=16)) as url:
        u = urlparse(url)
        s = socket.create_connection((u.hostname, u.port))
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
                  + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 30
        while svc.load["outstanding_images"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.2)
        s.close()  # the client goes away
        while svc.load["outstanding_images"]:
            assert time.monotonic() < deadline, "the abandoned request kept running"
            time.sleep(0.01)
        # the request settles at once; the step already running when it did may still finish (at most
        # one more forward), then the scheduler drops the rows before its next step
        forwards = last = svc.engine.forward_count()
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < 0.5:  # until no forward has run for 0.5 s
            assert time.monotonic() < deadline, "rows of the cancelled request still step"
            time.sleep(0.02)
            now = svc.engine.forward_count()
            if now != last:
                last, quiet_since = now, time.monotonic()
        assert last - forwards <= 1, f"{last - forwards} forwards ran after the request was cancelled"
        text = svc.metrics.render().decode()
    svc.close()
    assert 'arexport_requests_total{method="ar",outcome="cancelled"} 1.0' in text, text
    images = [line for line in text.splitlines() if line.startswith("arexport_images_total")]
    assert float(images[0].split()[-1]) < 16


def test_lanes_are_bounded_and_results_unchanged(demo_gen):
    import numpy as np

    from arexport.runtime.sampling import SamplingParams
    from arexport.serving.service import GenerationService

    svc = GenerationService(demo_gen, batching="continuous", max_batch=2, max_lanes=2, lane_idle_s=0.0)
    temps = [0.5, 0.7, 0.9, 1.1, 1.3]
    seen = []
    try:
        futs = [svc.submit([t_i % 10, 3], seed=t_i, images=False, sampling=SamplingParams(temperature=t))
                for t_i, t in enumerate(temps)]
        while not all(f.done() for f in futs):
            seen.append(len(svc._lanes))
            time.sleep(0.002)  # a spinning probe would hold the GIL the service's worker thread needs
        outs = [f.result(timeout=60) for f in futs]
    finally:
        svc.close()
    assert max(seen) <= 2
    for t_i, (t, out) in enumerate(zip(temps, outs)):
        alone = demo_gen.generate(classes=[t_i % 10, 3], seed=t_i, sampling=SamplingParams(temperature=t), images=False).tokens
        assert np.array_equal(out.tokens, alone), t
    assert "arexport_lane_bytes" in svc.metrics.render().decode()


def test_serve_refuses_a_batch_over_the_memory_budget(demo_gen, monkeypatch):
    from arexport.budget import MemoryBudgetError
    from arexport.serving.service import GenerationService

    monkeypatch.setenv("AREXPORT_MEMORY_BUDGET_GB", "0.01")
    with pytest.raises(MemoryBudgetError, match="serving with max batch 4000 in up to 8 lanes needs an estimated"):
        GenerationService(demo_gen, max_batch=4000)


FUZZ_BODIES = int(os.environ.get("AREXPORT_FUZZ_BODIES", "300"))  # docs/benchmarks.md: a 2,000-body run
FUZZ_RSS_GROWTH = 0.20  # RSS after all bodies within 20% of RSS after the first 100 (the target)


def _fuzz_body(rng):
    """A random request body: mostly the schema's fields with values of any type or size, some junk."""
    import json

    values = [0, 1, -1, 3, 2**31, 2**63, -2**70, 10**30, 1.5, -0.0, 1e308, -1e308, 1e-300, True, False, None, "", "3",
              "é" * 50, "x" * 3000, [], [1], [1, 2], [0] * 50, ["a"], [[1]], [1e23], {}, {"a": 1}, {"candidates": 8},
              {"verifier": ["digits"]}, {"checkpoints": 7}, {"window": 1}, {"steps": 10**12}, {"start": -5}]
    fields = ["classes", "method", "options", "seed", "cfg_scale", "cfg_interval", "cfg_schedule", "cfg_power", "temperature",
              "top_k", "top_p", "format", "timeout", "prompt", "prompts", "caption_embeddings", "caption_mask", "junk"]
    kind = rng.random()
    if kind < 0.05:
        return bytes(rng.integers(0, 256, int(rng.integers(0, 200)), dtype=np.uint8).tolist())
    if kind < 0.1:
        return b'{"classes": [1], "cfg_scale": ' + rng.choice([b"NaN", b"Infinity", b"-Infinity", b"1e999"]) + b"}"
    body = {}
    if rng.random() < 0.7:
        body["classes"] = [int(c) for c in rng.integers(0, 12, int(rng.integers(1, 3)))]
    for _ in range(int(rng.integers(0, 5))):
        f = fields[int(rng.integers(len(fields)))]
        if f == "method":
            body[f] = str(rng.choice(["ar", "sjd", "gridar", "best-of-n", "sd", "var", "magic", "arpg"]))
        elif f == "format" and rng.random() < 0.5:
            body[f] = "tokens"
        else:
            body[f] = values[int(rng.integers(len(values)))]
    body.setdefault("format", "tokens")
    return json.dumps(body).encode()


def test_fuzzed_bodies_get_no_5xx_no_traceback_and_bounded_memory(demo_gen):
    """No 5xx except the answers to a body's own timeout (503 + Retry-After, 504), no traceback, {"error"} bodies."""
    import httpx

    from arexport.budget import rss_bytes
    from arexport.serving.http import create_app
    from arexport.serving.server import BackgroundServer
    from arexport.serving.service import GenerationService

    rng = np.random.default_rng(38)
    svc = GenerationService(demo_gen, batching="continuous", max_batch=2, max_lanes=2, max_outstanding=8)
    statuses, rss = {}, {}
    with BackgroundServer(create_app(svc, token="t", max_body_bytes=4096, max_images=2)) as url, httpx.Client() as client:
        for i in range(FUZZ_BODIES):
            body = _fuzz_body(rng)
            r = client.post(f"{url}/generate", content=body, timeout=60,
                            headers={"Authorization": "Bearer t", "content-type": "application/json"})
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            # a body's own "timeout" may be answered 503 + Retry-After (cannot finish in time) or 504 (did not)
            own_deadline = b'"timeout"' in body and (r.status_code == 504 or "Retry-After" in r.headers)
            assert r.status_code < 500 or (r.status_code in (503, 504) and own_deadline), (body[:300], r.status_code, r.text[:300])
            assert "Traceback" not in r.text and "File \"" not in r.text, body[:300]
            if r.status_code != 200:
                assert set(r.json()) == {"error"}, r.text[:300]
            if i + 1 == 100:
                rss["100"] = rss_bytes()
        rss["end"] = rss_bytes()
    svc.close()
    assert statuses.get(200, 0) >= 10, statuses  # the fuzz also ran real work
    assert rss["end"] <= rss["100"] * (1 + FUZZ_RSS_GROWTH), (rss, statuses)
    if os.environ.get("AREXPORT_FUZZ_REPORT"):  # the figures docs/benchmarks.md quotes
        print(f"\nfuzz: {FUZZ_BODIES} bodies, statuses {dict(sorted(statuses.items()))}, RSS after 100 "
              f"{rss['100'] / 2**20:.0f} MiB, after all {rss['end'] / 2**20:.0f} MiB")


def test_slow_headers_are_timed_out(server, monkeypatch):
    import socket
    import time
    from urllib.parse import urlparse

    from arexport.serving import server as server_mod

    monkeypatch.setattr(server_mod, "HEADER_TIMEOUT_S", 0.5)  # read when each connection opens
    url, _ = server
    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\n")  # and never the rest of the head
        t0 = time.monotonic()
        assert s.recv(4096) == b"" and time.monotonic() - t0 < 5  # closed by the server
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:  # a prompt client is unaffected
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b" 200 " in s.recv(4096).split(b"\r\n")[0]


def test_full_disk_while_writing_is_one_line(tmp_path, monkeypatch):
    import errno

    from arexport import fileio

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(fileio, "atomic_write_bytes", full)
    res = CliRunner().invoke(cli, ["generate", "--model", "demo", "--classes", "1", "--save-tokens", str(tmp_path / "t.npy")])
    assert res.exit_code == 1 and "No space left on device" in res.output and "t.npy" in res.output, res.output
    assert "Traceback" not in res.output


def _admission_after(turns, slots=8, max_outstanding=64):
    """An Admission fed `turns` (seconds, images finished, images live) with a real Metrics."""
    from arexport.serving.admission import Admission
    from arexport.serving.metrics import Metrics

    adm = Admission(max_outstanding, slots, Metrics())
    for t in turns:
        adm.observe(*t)
    return adm


def _turns(step_s, k=20, occupancies=(8, 4)):
    """Worker turns of a machine whose turn with b live images takes step_s(b) seconds, an image
    staying k turns: (seconds, images finished, live) alternating over the occupancies."""
    return [(step_s(b), b / k, b) for _ in range(100) for b in occupancies]


def test_admission_estimates_a_requests_finish_from_the_measured_step_time_line():
    """A GPU-like machine (a turn takes 0.1 s at any batch) and a CPU-like one (0.0125 s per live image),
    both 2 s per image in a full batch of 8 (4 images/s). On the GPU a 4-image request on an idle
    server still takes 2 s, so a 2.2 s deadline (margin 0.8: 1.76 s) is refused; the old queue-drain
    estimate ((ahead + cost) / rate = 1 s) admitted it, and it missed. On the CPU the same request runs
    in a half batch at twice the speed (1 s) and is admitted. Behind 12 images both drain at the full
    batch's rate: (16 - 8) / 4 + 2 = 4 s."""
    from arexport.serving.admission import DeadlineUnreachable

    gpu = _admission_after(_turns(lambda b: 0.1))
    cpu = _admission_after(_turns(lambda b: 0.0125 * b))
    for adm in (gpu, cpu):
        assert adm.rate == pytest.approx(4.0) and adm.image_seconds(8) == pytest.approx(2.0)
        assert adm.finish_s(12, 4) == pytest.approx(4.0)
        adm.check(4, None, 60)  # no deadline: only the bound
    assert gpu.finish_s(0, 4) == pytest.approx(2.0) and cpu.finish_s(0, 4) == pytest.approx(1.0)
    with pytest.raises(DeadlineUnreachable, match="about 2.00 s in its batch"):
        gpu.check(4, 2.2, 0)
    cpu.check(4, 2.2, 0)
    gpu.check(4, 2.6, 0)  # 2 s <= 0.8 x 2.6
    # negative control: the old estimate ((outstanding + cost) / rate) admits the GPU's 2.2 s request
    assert (0 + 4) / gpu.rate <= 0.8 * 2.2


def test_admission_without_varied_occupancy_assumes_throughput_is_kept():
    """A batch that was always full gives no line: a smaller batch is then assumed to keep the
    throughput (the proportional line; what the throughput-only estimate assumed)."""
    adm = _admission_after(_turns(lambda b: 0.1, occupancies=(8,)))
    assert adm.finish_s(0, 4) == pytest.approx(1.0) and adm.finish_s(12, 4) == pytest.approx(4.0)


def test_admission_admits_before_measuring_and_refuses_over_the_bound_at_once():
    from arexport.serving.admission import Overloaded

    adm = _admission_after([])
    assert adm.rate is None and adm.finish_s(100, 4) is None
    adm.check(4, 0.001, 60)  # nothing measured yet: no basis for a deadline refusal
    with pytest.raises(Overloaded, match="60 images queued or running, the limit is 64") as e:
        adm.check(5, None, 60)
    assert e.value.retry_after == 1.0
    with pytest.raises(ArexportError, match="asks for 65 images"):
        adm.check(65, None, 0)


def _vvs_blocks(monkeypatch, gamma, skip=None, blocks=None):
    """Run vvs (uniform, a skip every second round) on 6 demo images with gamma pinned; return the
    lookahead the target cache was allocated with and, per verify step, (largest pending, the
    block length L, the furthest slot a row of the step writes + 1, the cache's slots)."""
    import torch

    from arexport.models.registry import load_model
    from arexport.runtime.backends.torch.runner import TorchEngine
    from arexport.runtime.generator import Generator
    from arexport.runtime.methods.sd import SDDecoder
    from arexport.runtime.methods.vvs import VVSDecoder
    from arexport.runtime.sampling import SamplingParams

    gen = Generator(TorchEngine(load_model("demo")), TorchEngine(load_model("demo-draft")))
    asked, blocks = [], ([] if blocks is None else blocks)
    allocate = type(gen.engine).allocate

    def spy_allocate(self, batch, lookahead=0):
        if self is gen.engine:
            asked.append(lookahead)
        return allocate(self, batch, lookahead)

    verify = SDDecoder._verify

    def spy_verify(self, drafts, q, g, verifying, remaining):
        b = self.slots.n
        p = self.pending[:b]
        length = int((p + torch.where(verifying, g, 0))[verifying].max())
        view = self.tcache.view(0, self.slots.rows)
        blocks.append((int(p.max()), length, int(view.length.max()) + length, view.s_max))
        return verify(self, drafts, q, g, verifying, remaining)

    monkeypatch.setattr(type(gen.engine), "allocate", spy_allocate)
    monkeypatch.setattr(SDDecoder, "_verify", spy_verify)
    if skip is not None:
        monkeypatch.setattr(VVSDecoder, "skip", skip)
    gen.generate(classes=[0, 1, 2, 3, 4, 5], method="vvs", method_options={"gamma": gamma, "skip_interval": 2},
                 sampling=SamplingParams(cfg_scale=1.5), seed=3, batch_size=3, images=False)
    return asked[-1], blocks


def test_vvs_pending_is_at_most_gamma_plus_one_and_verify_blocks_fit_the_lookahead(monkeypatch):
    """sd sizes its target lookahead for verify blocks of pending + g <= 2g + 1 tokens: VVS never skips
    two rounds in a row, so at most one skipped round's g drafts wait on top of the root (pending
    <= g + 1). Every row of a step writes the step's block from its own length, so the furthest write
    must stay inside the cache. (It was sized for pending <= g + 2: one slot too many, no overflow.)"""
    g = 3
    lookahead, blocks = _vvs_blocks(monkeypatch, g)
    assert lookahead == 2 * g
    assert max(b[0] for b in blocks) == g + 1  # a skipped round's drafts on top of the root: reached
    assert all(b[1] <= 2 * g + 1 and b[2] <= b[3] for b in blocks), blocks


def test_vvs_pending_bound_negative_control_consecutive_skips(monkeypatch):
    """Negative control: a skip rule that may skip twice in a row lets pending exceed g + 1; the bound
    above rejects it, and the block then overflows the cache (the engine raises)."""
    import torch

    from arexport.runtime.methods.vvs import MIN_TOKENS

    def skip_always(self, g, drafts, q):
        n = self.n[: self.slots.n]
        return torch.where((n - 1 > MIN_TOKENS) & (self.pending[: self.slots.n] < 2 * g.clamp(min=1)), g, 0)

    blocks = []
    with pytest.raises(RuntimeError, match="out of bounds"):  # the lookahead no longer holds the block
        _vvs_blocks(monkeypatch, 3, skip=skip_always, blocks=blocks)
    assert max(b[0] for b in blocks) > 3 + 1 and max(b[2] - b[3] for b in blocks) > 0
