"""`arexport export-triton ENGINE --out REPO`: an NVIDIA Triton Inference Server model repository.

    REPO/NAME/config.pbtxt     Python backend; inputs CLASSES/PROMPTS/SEED/METHOD/OPTIONS/SAMPLING,
                               outputs TOKENS/IMAGES (see triton_model.py); the dynamic batcher with
                               ragged inputs gathers concurrent requests into one execute(), where
                               they share a runtime Session; instance groups of KIND_CPU or KIND_GPU
    REPO/NAME/1/model.py       arexport/deploy/triton_model.py, verbatim
    REPO/NAME/engine/          a copy of ENGINE (an engine directory), loaded by every instance

Triton's Python stub ignores PYTHONPATH, so the repository records where arexport and its packages
are: by default the exporting interpreter's sys.path (parameter ARX_SYS_PATH; model.py puts it first
on sys.path), which suits a server on this machine; for a server elsewhere (an NGC tritonserver
container), pass --execution-env with a conda-pack tarball of an environment that has arexport
installed (Triton's EXECUTION_ENV_PATH), or --no-sys-path when the server's Python already has it.
"""

from __future__ import annotations

import json
import shutil
import site
import sys
from pathlib import Path
from typing import Optional

from arexport.errors import ArexportError

KINDS = ("KIND_CPU", "KIND_GPU")
MAX_QUEUE_DELAY_US = 2000  # how long the batcher waits to gather more requests into one execute()


def _pbtxt_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid protobuf text-format string literal


def config_pbtxt(name: str, spec, backend: str, kind: str, count: int, gpus: Optional[list[int]], capacity: int,
                 max_images: int, threads: int, sys_path: Optional[list[str]], execution_env: Optional[str]) -> str:
    """The model's config.pbtxt text."""
    side, n_tokens = spec.image.image_size, spec.n_tokens
    params = {"ENGINE_DIR": "engine", "BACKEND": backend, "CAPACITY": str(capacity), "MAX_IMAGES": str(max_images),
              "THREADS": str(threads)}
    if sys_path is not None:
        params["ARX_SYS_PATH"] = json.dumps(sys_path)
    if execution_env is not None:
        params["EXECUTION_ENV_PATH"] = f"$$TRITON_MODEL_DIRECTORY/{execution_env}"
    group = f"    count: {count}\n    kind: {kind}\n" + (f"    gpus: [ {', '.join(map(str, gpus))} ]\n" if gpus else "")
    inputs = [("CLASSES", "TYPE_INT64", "[ -1 ]"), ("SEED", "TYPE_INT64", "[ 1 ]")] + [  # text: UTF-8 bytes (triton_model.py)
        (n, "TYPE_UINT8", "[ -1 ]") for n in ("PROMPTS", "METHOD", "OPTIONS", "SAMPLING")]
    outputs = [("TOKENS", "TYPE_INT64", f"[ -1, {n_tokens} ]"), ("IMAGES", "TYPE_UINT8", f"[ -1, {side}, {side}, 3 ]")]
    text = [f"name: {_pbtxt_str(name)}", 'backend: "python"', f"max_batch_size: {capacity}",
            f"dynamic_batching {{\n  max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US}\n}}"]
    for n, t, dims in inputs:
        text.append(f"input {{\n  name: \"{n}\"\n  data_type: {t}\n  dims: {dims}\n  optional: true\n"
                    f"  allow_ragged_batch: true\n}}")
    for n, t, dims in outputs:
        text.append(f"output {{\n  name: \"{n}\"\n  data_type: {t}\n  dims: {dims}\n}}")
    text.append(f"instance_group [\n  {{\n{group}  }}\n]")
    for k, v in params.items():
        text.append(f"parameters {{\n  key: \"{k}\"\n  value: {{ string_value: {_pbtxt_str(v)} }}\n}}")
    return "\n".join(text) + "\n"


def export_triton(engine: str | Path, out: str | Path, name: str = "arexport", backend: str = "ort",
                  kind: str = "KIND_CPU", count: int = 1, gpus: Optional[list[int]] = None, capacity: int = 8,
                  max_images: int = 64, threads: int = 1, record_sys_path: bool = True,
                  execution_env: Optional[str | Path] = None) -> Path:
    """Write the model repository `out` (see module docstring); returns the model's directory.
    Refuses (before writing anything) a source that is not an engine directory and an `out` that
    already has a model of this name."""
    from arexport.format.manifest import read_manifest

    engine, out = Path(engine), Path(out)
    if not (engine / "manifest.json").is_file():
        raise ArexportError(f"{engine} is not an engine directory (no manifest.json): build one with arexport build")
    spec = read_manifest(engine).spec
    if kind not in KINDS:
        raise ArexportError(f"instance kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if count < 1 or capacity < 1 or max_images < 1 or threads < 1:
        raise ArexportError("instance count, capacity, max images and threads must be >= 1")
    if gpus and kind != "KIND_GPU":
        raise ArexportError("--gpus needs --kind KIND_GPU")
    if backend == "trt" and kind != "KIND_GPU":
        raise ArexportError("backend trt runs on GPUs: use --kind KIND_GPU")
    if not name.replace("_", "").replace("-", "").isalnum():
        raise ArexportError(f"model name {name!r}: letters, digits, - and _ only")
    if execution_env is not None and not Path(execution_env).is_file():
        raise ArexportError(f"execution environment not found: {execution_env} (a conda-pack .tar.gz)")
    model_dir = out / name
    if model_dir.exists():
        raise ArexportError(f"{model_dir} already exists; choose another --out or --name (nothing was written)")
    sys_path = None
    if record_sys_path:
        here = str(Path(__file__).resolve().parents[2])  # the folder holding this arexport package
        sys_path = [here] + [p for p in sys.path if p and p != here and Path(p).is_dir()]
        sys_path += [p for p in site.getsitepackages() if p not in sys_path]
    tmp = out / f".{name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "1").mkdir(parents=True)
    try:
        shutil.copy2(Path(__file__).with_name("triton_model.py"), tmp / "1" / "model.py")
        shutil.copytree(engine, tmp / "engine")
        env_name = None
        if execution_env is not None:
            env_name = Path(execution_env).name
            shutil.copy2(execution_env, tmp / env_name)
        (tmp / "config.pbtxt").write_text(config_pbtxt(name, spec, backend, kind, count, gpus, capacity, max_images,
                                                       threads, sys_path, env_name))
        tmp.rename(model_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return model_dir


def client_inputs(request: dict):
    """A request dict (classes or prompts, seed, method, options, sampling fields; see
    arexport/deploy/requests.py) as tritonclient.http InferInputs of the exported model."""
    import numpy as np

    try:
        import tritonclient.http as th
    except ImportError as e:
        raise ArexportError(f"client_inputs needs tritonclient (pip install 'arexport[deploy]'): {e}") from None

    def tensor(name, array, dtype):
        t = th.InferInput(name, [1, *array.shape], dtype)
        t.set_data_from_numpy(array[None])
        return t

    def text(name, s: str):
        return tensor(name, np.frombuffer(s.encode("utf-8"), dtype=np.uint8).copy(), "UINT8")

    from arexport.deploy.requests import SAMPLING_FIELDS

    out = []
    if request.get("classes") is not None:
        out.append(tensor("CLASSES", np.asarray(request["classes"], dtype=np.int64), "INT64"))
    if request.get("prompts") is not None:
        out.append(text("PROMPTS", json.dumps(list(request["prompts"]))))
    out.append(tensor("SEED", np.asarray([request.get("seed", 0)], dtype=np.int64), "INT64"))
    if request.get("method"):
        out.append(text("METHOD", request["method"]))
    if request.get("options"):
        out.append(text("OPTIONS", json.dumps(request["options"])))
    sampling = {k: request[k] for k in SAMPLING_FIELDS if request.get(k) is not None}
    if sampling:
        out.append(text("SAMPLING", json.dumps(sampling)))
    return out
