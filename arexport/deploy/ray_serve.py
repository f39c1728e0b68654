"""Ray Serve deployment: replicas each owning a GenerationService over one engine.

    import ray
    from ray import serve
    from arexport.deploy.ray_serve import app, RetryingClient

    ray.init()
    handle = serve.run(app("engines/demo", backend="ort", num_replicas=2), name="arexport")
    client = RetryingClient(handle)
    out = client.generate({"classes": [3, 7], "seed": 1})      # {"tokens", "images", "seconds", "replica"}

On GPUs: app(..., device="cuda", ray_actor_options={"num_gpus": 1}) gives each replica one GPU.
Each replica batches its concurrent requests in its own service (continuous batching); Ray Serve
spreads requests over replicas. Requests are the dicts of arexport/deploy/requests.py; over HTTP
(Serve's proxy), POST the same dict as JSON to the route prefix: the answer is JSON with base64 PNGs.

Failures: a replica process that dies (killed, out of memory, lost node) fails the requests it held
with Ray's actor errors. Generation is deterministic in the request (same seed, same tokens, whatever
the batch), so a retry elsewhere returns exactly what the lost replica would have: RetryingClient
retries such requests (up to `retries` times) on the replicas Serve still routes to, and raises
ReplicaFailed, naming the request and the errors, when they are spent. Errors of the request
itself (a bad field) are never retried and come back as ArexportError.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
from typing import Any, Optional

from arexport.errors import ArexportError


def _ray():
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise ArexportError(f"the Ray Serve deployment needs ray[serve] (pip install 'arexport[deploy]'): {e}") from None
    return ray, serve


class ReplicaFailed(ArexportError):
    """A request's replicas died on every try (each death is named)."""


class Replica:
    """One Serve replica: loads the engine once and owns a GenerationService over it."""

    def __init__(self, source: str, backend: str = "torch", device: str = "cpu", batching: str = "continuous",
                 max_batch: int = 8, max_images: int = 64, load_kwargs: Optional[dict] = None):
        from arexport.runtime import Generator
        from arexport.serving.service import GenerationService

        self.service = GenerationService(Generator.load(source, backend=backend, device=device, **(load_kwargs or {})),
                                         batching=batching, max_batch=max_batch)
        self.max_images = max_images
        self.inflight = 0

    async def generate(self, request: dict[str, Any]) -> dict[str, Any]:
        """One request (requests.py format) -> {"tokens", "images", "seconds", "replica" (its pid)}."""
        from arexport.deploy.requests import answer, submit

        future = submit(self.service, request, self.max_images)
        self.inflight += 1
        try:
            res = await asyncio.wrap_future(future)
        finally:
            self.inflight -= 1
        return {**answer(res), "replica": os.getpid()}

    def info(self) -> dict[str, Any]:
        """This replica's process id, model and requests in flight (for operators and tests)."""
        return {"pid": os.getpid(), "model": self.service.engine.spec.name, "inflight": self.inflight}

    async def __call__(self, http_request) -> dict[str, Any]:
        """HTTP through Serve's proxy: a JSON request dict in, JSON out (images as base64 PNGs)."""
        from PIL import Image

        try:
            out = await self.generate(await http_request.json())
        except ArexportError as e:
            from starlette.responses import JSONResponse

            return JSONResponse({"error": str(e)}, status_code=400)
        pngs = []
        for img in out.pop("images") if out.get("images") is not None else []:
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            pngs.append(base64.b64encode(buf.getvalue()).decode())
        return {**out, "images": pngs}

    def __del__(self):
        service = getattr(self, "service", None)
        if service is not None:
            service.close(drain=False, timeout=5)


def app(source: str, *, num_replicas: int = 2, backend: str = "torch", device: str = "cpu",
        batching: str = "continuous", max_batch: int = 8, max_images: int = 64,
        max_ongoing_requests: int = 64, ray_actor_options: Optional[dict] = None, **load_kwargs):
    """A bound Serve application of `num_replicas` replicas of `source` (a model name or engine
    directory), ready for serve.run. ray_actor_options: each replica's resources (default 1 CPU;
    {"num_gpus": 1} to give each a GPU)."""
    _, serve = _ray()
    if num_replicas < 1:
        raise ArexportError(f"num_replicas must be >= 1, got {num_replicas}")
    deployment = serve.deployment(Replica, name="arexport", num_replicas=num_replicas,
                                  max_ongoing_requests=max_ongoing_requests,
                                  ray_actor_options=ray_actor_options or {"num_cpus": 1})
    return deployment.bind(source, backend=backend, device=device, batching=batching, max_batch=max_batch,
                           max_images=max_images, load_kwargs=load_kwargs)


class RetryingClient:
    """Calls a Serve handle's `generate`, retrying a request whose replica died (see module docstring)."""

    def __init__(self, handle, retries: int = 2):
        if retries < 0:
            raise ArexportError(f"retries must be >= 0, got {retries}")
        self.handle, self.retries = handle, retries
        self.replica_deaths = 0  # requests' tries lost to a dead replica (each retried or reported)

    def _died(self, e: BaseException) -> bool:
        ray, _ = _ray()
        from ray import exceptions as rex

        kinds = tuple(k for k in (getattr(rex, n, None) for n in ("ActorDiedError", "ActorUnavailableError",
                                                                  "RayActorError", "WorkerCrashedError")) if k)
        return isinstance(e, kinds)

    def _unwrap(self, e: BaseException) -> BaseException:
        """The request's own ArexportError when the replica raised one (Ray wraps it)."""
        cause = getattr(e, "cause", None)
        return cause if isinstance(cause, ArexportError) else e

    def generate(self, request: dict[str, Any], timeout_s: Optional[float] = None) -> dict[str, Any]:
        """Blocking; the answer of the first replica that finishes the request."""
        deaths = []
        for _ in range(self.retries + 1):
            try:
                return self.handle.generate.remote(request).result(timeout_s=timeout_s)
            except Exception as e:  # noqa: BLE001 — sorted below: replica deaths retried, the rest raised
                if not self._died(e):
                    err = self._unwrap(e)
                    if isinstance(err, ArexportError):
                        raise err from None
                    raise
                self.replica_deaths += 1
                deaths.append(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        raise ReplicaFailed(f"request {_describe(request)} failed: its replica died on each of {len(deaths)} tries "
                            f"({'; '.join(deaths)})")


def _describe(request: dict) -> str:
    keys = {k: request[k] for k in ("classes", "prompts", "seed", "method") if k in request}
    return repr(keys)[:200]
