"""The `model.py` of a Triton Python-backend model that `arexport export-triton` writes (copied verbatim).

Runs in Triton's Python stub, not in arexport's process: it imports nothing of arexport until
initialize() has put the interpreter paths recorded at export (parameter ARX_SYS_PATH) on sys.path,
since the stub ignores PYTHONPATH. Each model instance loads the engine directory beside config.pbtxt
(parameter ENGINE_DIR) once, on its instance's device (KIND_GPU instance i: cuda:i; KIND_CPU: cpu).

execute() gets the requests Triton's dynamic batcher gathered (each request keeps its own image
count: ragged inputs). Requests with the same method, options and sampling share one runtime
Session (the public step-wise API): their images are decoded together, each with its own seed
stream, so every answer equals `arexport generate` for the same request. A bad request gets its own
error response; the others still run.

Inputs (batch dimension first, size 1 per request): CLASSES int64 [K] (one image per class id) or
PROMPTS (a JSON list of K strings), optional SEED int64 [1], METHOD (a method name), OPTIONS (a JSON
object of method options), SAMPLING (a JSON object: temperature, top_k, top_p, cfg_scale,
cfg_interval, cfg_schedule, cfg_power). Text inputs are uint8 tensors of UTF-8 bytes, not
TYPE_STRING: the nvidia-pytriton wheel's stub (built against numpy 1.x) crashes deserializing
TYPE_STRING inputs under numpy 2, and uint8 works with every stub. Outputs: TOKENS int64
[K, n_tokens]; IMAGES uint8 [K, H, W, 3] (only decoded when requested). Tensors cross by DLPack.
"""

import json
import os
import sys

import numpy as np

SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "cfg_scale", "cfg_interval", "cfg_schedule", "cfg_power")


def _tensor(pb_utils, name, array):
    """An output tensor handed over by DLPack, not as a numpy array: the Python stubs built against
    numpy 1.x headers (the nvidia-pytriton wheel's) misread numpy 2 arrays' sizes."""
    import torch
    from torch.utils.dlpack import to_dlpack

    return pb_utils.Tensor.from_dlpack(name, to_dlpack(torch.from_numpy(np.ascontiguousarray(array))))


def _array(tensor):
    """An input tensor as numpy, read by DLPack (see _tensor)."""
    import torch

    return torch.from_dlpack(tensor.to_dlpack()).numpy()


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        for path in reversed(json.loads(params.get("ARX_SYS_PATH", "[]"))):  # the exporting interpreter's paths
            if path in sys.path:
                sys.path.remove(path)
            sys.path.insert(0, path)
        import torch

        from arexport.runtime import Generator

        torch.set_num_threads(int(params.get("THREADS", "1")))
        device = "cpu"
        if args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args['model_instance_device_id']}"
        engine_dir = os.path.join(args["model_repository"], params.get("ENGINE_DIR", "engine"))
        self.gen = Generator.load(engine_dir, backend=params.get("BACKEND", "ort"), device=device)
        self.capacity = int(params.get("CAPACITY", "8"))
        self.max_images = int(params.get("MAX_IMAGES", "64"))

    def _parse(self, pb_utils, request):
        """One Triton request -> (batch key, session args, add kwargs, whether to decode images)."""
        from arexport.errors import ArexportError

        def read(name):
            t = pb_utils.get_input_tensor_by_name(request, name)
            return None if t is None else _array(t).reshape(-1)

        def text(name, default):
            v = read(name)
            return default if v is None else bytes(v.astype(np.uint8)).decode("utf-8")

        classes, prompts = read("CLASSES"), read("PROMPTS")
        if (classes is None) == (prompts is None):
            raise ArexportError("send CLASSES (class-conditional models) or PROMPTS (text-to-image models), one of them")
        if classes is not None:
            add = {"classes": [int(c) for c in classes]}
        else:
            add = {"prompts": json.loads(text("PROMPTS", "[]"))}
            if not isinstance(add["prompts"], list) or not all(isinstance(p, str) for p in add["prompts"]):
                raise ArexportError("PROMPTS is the UTF-8 bytes of a JSON list of strings")
        seed = read("SEED")
        if seed is not None and seed.size != 1:
            raise ArexportError(f"SEED takes one value per request, got {seed.size}")
        add["seed"] = 0 if seed is None else int(seed[0])
        method = text("METHOD", "") or None
        options = json.loads(text("OPTIONS", "{}"))
        sampling = json.loads(text("SAMPLING", "{}"))
        if not isinstance(options, dict) or not isinstance(sampling, dict):
            raise ArexportError("OPTIONS and SAMPLING are JSON objects")
        unknown = sorted(set(sampling) - set(SAMPLING_FIELDS))
        if unknown:
            raise ArexportError(f"unknown SAMPLING field(s) {', '.join(unknown)}; known: {', '.join(SAMPLING_FIELDS)}")
        m = self.gen.request_method(method, options)  # hooks: built-in names only, never module:callable
        n = len(next(iter(v for k, v in add.items() if k != "seed")))
        rows = n * getattr(m.options, "candidates", 1)
        if not 1 <= rows <= self.max_images:
            raise ArexportError(f"a request makes 1..{self.max_images} images (candidates included), this one {rows}")
        params = self.gen.sampling_params(**sampling)
        images = "IMAGES" in request.requested_output_names()
        key = (method, json.dumps(options, sort_keys=True), repr(params), images)
        return key, (method, options, params, images), add

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils

        from arexport.errors import ArexportError

        responses = [None] * len(requests)
        groups = {}
        for i, request in enumerate(requests):
            try:
                key, session_args, add = self._parse(pb_utils, request)
            except (ArexportError, ValueError, TypeError) as e:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e).splitlines()[0]))
                continue
            groups.setdefault(key, (session_args, []))[1].append((i, add))
        for (method, options, params, images), members in groups.values():
            try:
                self._run_group(pb_utils, method, options, params, images, members, responses)
            except Exception as e:  # noqa: BLE001 — an engine failure fails this group's requests, each told why
                for i, _ in members:
                    if responses[i] is None:
                        responses[i] = pb_utils.InferenceResponse(
                            error=pb_utils.TritonError(f"generation failed: {type(e).__name__}: {str(e)[:300]}"))
        return responses

    def _run_group(self, pb_utils, method, options, params, images, members, responses):
        """Requests sharing method, options and sampling: one Session, stepped until all finish."""
        from arexport.errors import ArexportError

        session = self.gen.session(method, options, params, capacity=self.capacity, images=images)
        handles = {}
        for i, add in members:
            try:
                handles[session.add(**add)] = (i, len(add.get("classes") or add.get("prompts")))
            except (ArexportError, ValueError, TypeError) as e:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e).splitlines()[0]))
        done = {h: {} for h in handles}
        while not session.is_done():
            session.step()
            for img in session.finished():
                done[img.request][img.index] = img
        for h, (i, n) in handles.items():
            imgs = [done[h][k] for k in range(n)]
            outputs = [_tensor(pb_utils, "TOKENS", np.stack([im.tokens for im in imgs]).astype(np.int64)[None])]
            if images:
                outputs.append(_tensor(pb_utils, "IMAGES", np.stack([im.image for im in imgs]).astype(np.uint8)[None]))
            responses[i] = pb_utils.InferenceResponse(output_tensors=outputs)

    def finalize(self):
        self.gen = None
