"""Triton: `arexport export-triton` writes a model repository that the tritonserver binary bundled
in the nvidia-pytriton wheel loads on loopback; concurrent tritonclient requests (batched into one
runtime Session by Triton's dynamic batcher) each equal `arexport generate` on the same engine."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

th = pytest.importorskip("tritonclient.http", reason="the Triton tests need tritonclient (pip install 'arexport[deploy]')")

from arexport.cli import cli  # noqa: E402
from arexport.deploy.triton import client_inputs  # noqa: E402
from arexport.errors import ArexportError  # noqa: E402
from arexport.runtime.generator import Generator  # noqa: E402

pytestmark = pytest.mark.slow  # builds demo-t2i; a tritonserver starts and loads two models (60 s on 2 loaded cores)


def _pytriton_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the Triton test needs the tritonserver binary of the nvidia-pytriton wheel "
                    "(pip install --no-deps nvidia-pytriton: it pins numpy<2, only its binary is used)")
    return Path(list(spec.submodule_search_locations)[0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def triton(demo_engine, demo_t2i_engine, tmp_path_factory):
    """(url, repository's engine dir): a tritonserver on 127.0.0.1 serving `export-triton demo_engine`."""
    pt = _pytriton_dir()
    ts = pt / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = ts / "python_backend_stubs" / version / "triton_python_backend_stub"
    libdir = sysconfig.get_config_var("LIBDIR")
    if not stub.exists():
        pytest.skip(f"the nvidia-pytriton wheel has no Python backend stub for Python {version}")
    if not (Path(libdir) / f"libpython{version}.so.1.0").exists():
        pytest.skip(f"the Python backend stub needs libpython{version}.so.1.0 (a shared-library Python) in {libdir}")
    tmp = tmp_path_factory.mktemp("triton")
    for engine, name in ((demo_engine, "arexport"), (demo_t2i_engine, "t2i")):  # two models in one repository
        res = CliRunner().invoke(cli, ["export-triton", str(engine), "--out", str(tmp / "repo"), "--name", name,
                                       "--capacity", "8"], catch_exceptions=False)
        assert res.exit_code == 0, res.output
    # the backend directory the server loads: the wheel's Python backend plus the stub of this Python
    backend = tmp / "backends" / "python"
    backend.mkdir(parents=True)
    for f in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(ts / "backends" / "python" / f, backend / f)
    shutil.copy2(stub, backend / "triton_python_backend_stub")
    port = _free_port()
    env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(
        [libdir, str(pt.parent / "nvidia_pytriton.libs"), os.environ.get("LD_LIBRARY_PATH", "")]))
    log = open(tmp / "tritonserver.log", "wb")
    proc = subprocess.Popen([str(ts / "bin" / "tritonserver"), "--model-repository", str(tmp / "repo"),
                             "--backend-directory", str(tmp / "backends"), "--http-address", "127.0.0.1",
                             "--http-port", str(port), "--allow-grpc", "false", "--allow-metrics", "false",
                             "--exit-timeout-secs", "5"], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"127.0.0.1:{port}"
    client = th.InferenceServerClient(url)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("tritonserver did not get the model ready:\n" +
                                     (tmp / "tritonserver.log").read_text(errors="replace")[-3000:])
            try:
                if client.is_model_ready("arexport") and client.is_model_ready("t2i"):
                    break
            except Exception:  # noqa: BLE001 — not listening yet
                pass
            time.sleep(0.5)
        yield url, tmp / "repo" / "arexport" / "engine", tmp / "repo" / "t2i" / "engine"
    finally:
        client.close()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _ask(url, request, images=False, model="arexport"):
    client = th.InferenceServerClient(url)
    try:
        outs = [th.InferRequestedOutput("TOKENS")] + ([th.InferRequestedOutput("IMAGES")] if images else [])
        r = client.infer(model, client_inputs(request), outputs=outs)
        return r.as_numpy("TOKENS")[0], (r.as_numpy("IMAGES")[0] if images else None)
    finally:
        client.close()


REQS = [dict(classes=[1, 2], seed=3), dict(classes=[4], seed=5), dict(classes=[7, 7, 7], seed=6),
        dict(classes=[0], seed=1, method="sjd"), dict(classes=[9, 8], seed=2, temperature=0.5),
        dict(classes=[5, 6], seed=3, method="sjd")]


def test_concurrent_requests_equal_generate(triton, tmp_path):
    url, engine, _ = triton
    with ThreadPoolExecutor(len(REQS)) as pool:
        outs = list(pool.map(lambda r: _ask(url, r, images=r is REQS[0]), REQS))
    gen = Generator.load(str(engine), backend="ort")
    for r, (tokens, _) in zip(REQS, outs):
        alone = gen.generate(classes=r["classes"], seed=r["seed"], method=r.get("method"),
                             sampling=gen.sampling_params(temperature=r.get("temperature")), images=False).tokens
        assert tokens.shape == (len(r["classes"]), gen.spec.n_tokens)
        assert np.array_equal(tokens, alone), r
    # images and tokens of the first request equal `arexport generate` itself
    out = tmp_path / "cli"
    res = CliRunner().invoke(cli, ["generate", str(engine), "--backend", "ort", "--classes", "1,2", "--seed", "3",
                                   "--out", str(out), "--save-tokens", str(tmp_path / "t.npy"), "--no-progress"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    from PIL import Image

    cli_imgs = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(out.glob("*.png"))])
    assert np.array_equal(outs[0][1], cli_imgs)
    assert np.array_equal(outs[0][0], np.load(tmp_path / "t.npy"))


def test_bad_request_fails_alone(triton):
    url = triton[0]
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="class"):
        _ask(url, dict(classes=[99], seed=1))
    with pytest.raises(InferenceServerException, match="unknown SAMPLING"):
        _ask_raw(url, {"CLASSES": [1]}, sampling='{"tempratur": 1}')
    tokens, _ = _ask(url, dict(classes=[1], seed=1))  # the model still answers
    assert tokens.shape[0] == 1


def test_prompts_equal_generate(triton):
    url, _, engine = triton
    reqs = [dict(prompts=["a handwritten seven", "a two"], seed=4), dict(prompts=["an eight"], seed=9, method="sjd")]
    with ThreadPoolExecutor(len(reqs)) as pool:
        outs = list(pool.map(lambda r: _ask(url, r, images=True, model="t2i"), reqs))
    gen = Generator.load(str(engine), backend="ort")
    for r, (tokens, images) in zip(reqs, outs):
        alone = gen.generate(prompts=r["prompts"], seed=r["seed"], method=r.get("method"))
        assert np.array_equal(tokens, alone.tokens) and np.array_equal(images, alone.images), r


def _ask_raw(url, inputs, sampling):
    client = th.InferenceServerClient(url)
    try:
        ins = client_inputs({"classes": inputs["CLASSES"], "seed": 0})
        t = th.InferInput("SAMPLING", [1, len(sampling)], "UINT8")
        t.set_data_from_numpy(np.frombuffer(sampling.encode(), dtype=np.uint8)[None].copy())
        return client.infer("arexport", ins + [t])
    finally:
        client.close()


def test_export_refusals(demo_engine, tmp_path):
    from arexport.deploy.triton import export_triton

    with pytest.raises(ArexportError, match="not an engine directory"):
        export_triton(tmp_path, tmp_path / "repo")
    export_triton(demo_engine, tmp_path / "repo", record_sys_path=False)
    cfg = (tmp_path / "repo" / "arexport" / "config.pbtxt").read_text()
    assert "ARX_SYS_PATH" not in cfg and "kind: KIND_CPU" in cfg
    with pytest.raises(ArexportError, match="already exists"):
        export_triton(demo_engine, tmp_path / "repo")
    export_triton(demo_engine, tmp_path / "gpu", kind="KIND_GPU", count=2, gpus=[0, 1], backend="trt")
    cfg = (tmp_path / "gpu" / "arexport" / "config.pbtxt").read_text()
    assert "kind: KIND_GPU" in cfg and "count: 2" in cfg and "gpus: [ 0, 1 ]" in cfg
    with pytest.raises(ArexportError, match="KIND_GPU"):
        export_triton(demo_engine, tmp_path / "x", backend="trt")
