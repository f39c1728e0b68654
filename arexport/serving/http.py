"""`arexport serve`: an HTTP front end (FastAPI) over a GenerationService.

POST /generate  JSON {classes | caption_embeddings, method, options, seed, sampling fields, format,
                timeout} -> image/png (one image), JSON with base64 PNGs, or JSON tokens
GET  /healthz   liveness + model summary + load ("ok", "degraded" near a bound, 503 "closing")
POST /v1/images/generations  OpenAI's images API (arexport/serving/openai_api.py: fields, extensions)
GET  /metrics   Prometheus text format (queue depth, outstanding images, lanes, latencies, HTTP statuses)
With a token, every path but /healthz needs it (/docs and /openapi.json included).
Errors are {"error": "..."} (on /v1 paths OpenAI's {"error": {"message", "type", "param", "code"}}): 400 bad values (class out of range, bad options), 401 missing or wrong
bearer token, 404/405 unknown path or method, 408 a body not sent within BODY_TIMEOUT_S, 413 body
over the limit, 422 malformed JSON/fields, 429 + Retry-After when the bound on outstanding images
is reached, 503 + Retry-After when the request cannot finish before its timeout or the server is
shutting down, 504 on timeout. A rejected request never reaches the worker, so it cannot disturb
requests in flight; a refusal known from the headers or a peek at the body's timeout and size comes
before validation (serving/early.py), each 429/503 with `Server-Timing: decision;dur=MS`; a client
that disconnects cancels its request (its rows leave their batch).
"""

# No `from __future__ import annotations` here: FastAPI must see the request model class itself.

import asyncio
import base64
import hmac
import io
import json
import logging
import math
import time
from typing import Literal, Optional

import numpy as np

from arexport.errors import ArexportError
from arexport.serving import early
from arexport.serving.early import GENERATION_PATHS


def _deps():
    try:
        import fastapi  # noqa: F401
        import pydantic  # noqa: F401
    except ImportError as e:
        raise ArexportError(f"arexport serve needs fastapi and uvicorn (pip install 'arexport[serve]'): {e}") from None


def _request_fields():
    """(ClassId, RunFields): the JSON class id type and the pydantic base that /generate and
    /v1/images/generations share: seed, method, options, the sampling fields and timeout."""
    from typing import Annotated, Any

    from pydantic import BaseModel, Field, StrictBool, StrictInt

    ClassId = Annotated[StrictInt, Field(ge=0, lt=2**31)]  # JSON integers only: no true, "3" or 1e23

    class RunFields(BaseModel):
        method: Optional[str] = None
        options: dict[str, Any] = Field(default_factory=dict)
        seed: StrictInt = Field(0, ge=0, lt=2**63, description="Request seed, 0 <= seed < 2**63")
        cfg_scale: Optional[float] = None
        cfg_interval: StrictInt = Field(-1, ge=-1, lt=2**31)
        cfg_schedule: Optional[Literal["constant", "linear", "cosine", "ramp"]] = None
        cfg_power: Optional[float] = None
        temperature: Optional[float] = None
        top_k: Optional[StrictInt] = Field(None, ge=0, lt=2**31)
        top_p: Optional[float] = None
        entropy_temperature: Optional[StrictBool] = Field(
            None, description="Entropy-aware per-token temperature (ARsample); null: the model's default")
        timeout: Optional[float] = Field(None, gt=0, le=86400)

    return ClassId, RunFields


BODY_TIMEOUT_S = 10.0  # a client must send its whole body within this (slow clients hold no slot for long)
OPEN_PATHS = ("/healthz",)  # the only path served without the token
log = logging.getLogger("arexport.serve")


def create_app(service, token: Optional[str] = None, max_body_bytes: int = 1 << 20, max_images: int = 64,
               body_timeout_s: float = BODY_TIMEOUT_S):
    """The FastAPI app. `token` enables bearer auth on every path but /healthz."""
    _deps()
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from typing import Annotated

    from pydantic import Field

    from arexport.runtime import method_names
    from arexport.serving.service import DeadlineUnreachable, Overloaded, ServiceClosed

    spec = service.engine.spec

    ClassId, RunFields = _request_fields()

    class GenerateBody(RunFields):
        classes: Optional[list[ClassId]] = Field(None, description="Class ids (class-conditional models)")
        caption_embeddings: Optional[str] = Field(None, description="base64 .npy [N,T,C] float32 (text-conditional)")
        caption_mask: Optional[str] = Field(None, description="base64 .npy [N,T] bool, left-padded (optional)")
        prompt: Optional[str] = Field(None, max_length=MAX_PROMPT_CHARS, description="A prompt (text-conditional models with a text encoder)")
        prompts: Optional[list[Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]]] = Field(None, description="Prompts, one image each")
        format: Literal["png", "tokens"] = "png"

    app = FastAPI(title="arexport", version="1")
    app.add_middleware(_Guard, token=token, max_body_bytes=max_body_bytes, metrics=service.metrics,
                       body_timeout_s=body_timeout_s, service=service)

    def err(status: int, msg: str, headers: Optional[dict] = None, path: str = "") -> JSONResponse:
        return JSONResponse(_error_body(status, msg, path), status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", []) if x != "body")
        return err(422, f"invalid request: {where or 'body'}: {_first_line(first.get('msg', 'malformed'))}",
                   path=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):  # 404, 405, ...: the documented {"error"} body
        return err(exc.status_code, str(exc.detail), getattr(exc, "headers", None), request.url.path)

    @app.exception_handler(Exception)
    async def internal(request, exc):  # a bug: logged here, never its text to the client
        log.exception("internal error on %s", request.url.path)
        return err(500, "internal error", path=request.url.path)

    @app.get("/healthz")
    async def healthz():
        status = "closing" if service.closed else "ok" if service.healthy else "unhealthy"
        reasons = service.degraded() if status == "ok" else []
        if reasons:
            status = "degraded"
        body = {"status": status, "model": spec.name, "family": spec.family, "backend": service.engine.backend,
                "batching": service.batching, "load": service.load, **({"degraded": reasons} if reasons else {})}
        return JSONResponse(body, status_code=200 if status in ("ok", "degraded") else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/generate")
    async def generate(body: GenerateBody, request: Request):
        method = body.method or service.engine.family.default_method
        if method not in method_names():
            return err(400, f"unknown method {method!r}; available: {', '.join(method_names())}")
        captions = mask = prompts = None
        if body.prompt is not None or body.prompts is not None:
            if spec.model_type != "t2i":
                return err(400, f"model {spec.name} is class-conditional: send classes, not prompts")
            if body.prompt is not None and body.prompts is not None:
                return err(400, "send prompt or prompts, not both")
            if body.caption_embeddings is not None:
                return err(400, "send prompts or caption_embeddings, not both")
            prompts = [body.prompt] if body.prompt is not None else body.prompts
            n_images = len(prompts)
            if n_images == 0:
                return err(400, "prompts must be a non-empty list of strings")
        elif spec.model_type == "t2i":
            if body.caption_embeddings is None:
                return err(400, f"model {spec.name} is text-conditional: send prompt(s) or caption_embeddings (base64 .npy "
                                f"[N,{spec.cond_len},{spec.caption_dim}])")
            try:
                captions = _npy(body.caption_embeddings)
                mask = _npy(body.caption_mask) if body.caption_mask else None
            except ValueError as e:
                return err(400, str(e))
            n_images = len(captions)
        else:
            if body.caption_embeddings is not None:
                return err(400, f"model {spec.name} is class-conditional: send classes, not caption_embeddings")
            if not body.classes:
                return err(400, "classes must be a non-empty list of class ids")
            n_images = len(body.classes)
        try:
            m = service.gen.request_method(method, body.options)  # hooks: built-in names only, never module:callable
        except ArexportError as e:
            return err(400, str(e))
        except (TypeError, ValueError, AttributeError, KeyError, OverflowError):  # a value of the wrong type or size
            return err(400, f"invalid options for method {method}: a value of the wrong type or out of range among "
                            f"{', '.join(sorted(map(str, body.options))) or '(none)'}")
        rows = n_images * getattr(m.options, "candidates", 1)  # test-time scaling generates every candidate
        if rows > max_images:
            return err(400, f"{n_images} images x {rows // n_images} candidates requested; the limit per request is "
                            f"{max_images} images (candidates included)")
        for name in ("cfg_scale", "cfg_power", "temperature", "top_p"):
            v = getattr(body, name)
            if v is not None and not math.isfinite(v):
                return err(400, f"{name} must be a finite number")
        try:
            sampling = service.gen.sampling_params(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                                                   cfg_scale=body.cfg_scale, cfg_interval=body.cfg_interval,
                                                   cfg_schedule=body.cfg_schedule, cfg_power=body.cfg_power,
                                                   entropy_temperature=body.entropy_temperature)
            future = service.submit(body.classes, method=method, options=body.options, sampling=sampling,
                                    seed=body.seed, images=body.format == "png", timeout=body.timeout,
                                    captions=captions, caption_mask=mask, prompts=prompts)
        except DeadlineUnreachable as e:
            return err(503, str(e), {"Retry-After": str(math.ceil(e.retry_after))})
        except Overloaded as e:
            return err(429, str(e), {"Retry-After": str(math.ceil(e.retry_after))})
        except ServiceClosed as e:
            return err(503, str(e))
        except ArexportError as e:
            return err(400, str(e))
        res, refusal = await _answer(request, future, err)
        if refusal is not None:
            return refusal
        headers = {"X-Arexport-Seconds": f"{res.seconds:.4f}"}
        if body.format == "tokens":
            return JSONResponse({"tokens": res.tokens.tolist(), "seconds": res.seconds}, headers=headers)
        pngs = [_png(img) for img in res.images]
        if len(pngs) == 1:
            return Response(pngs[0], media_type="image/png", headers=headers)
        return JSONResponse({"images": [base64.b64encode(p).decode() for p in pngs], "seconds": res.seconds}, headers=headers)

    from arexport.serving.openai_api import register as register_openai

    register_openai(app, service, max_images)  # POST /v1/images/generations (OpenAI's images API)

    @app.on_event("shutdown")
    def _shutdown():
        service.close(drain=True, timeout=60)

    return app


MAX_PROMPT_CHARS = 4096  # a prompt's characters (the text encoder truncates to its token limit anyway)


async def _answer(request, future, fail):
    """(the service's Response for `future`, None), or (None, fail(status, message)): 499 when the
    client went away first (its rows leave their batch), 504 past its deadline, 503 when the service
    closed, 400 for a request the runtime refused."""
    from arexport.serving.service import RequestTimeout, ServiceClosed

    result = asyncio.wrap_future(future)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not result.done():  # the client went away (or this task was cancelled): drop its rows
            future.cancel()
            result.cancel()
        gone.cancel()
    if not result.done() or result.cancelled():
        return None, fail(499, "client closed the request")
    try:
        return result.result(), None
    except RequestTimeout as e:
        return None, fail(504, str(e))
    except ServiceClosed as e:
        return None, fail(503, str(e))
    except ArexportError as e:
        return None, fail(400, str(e))


async def _disconnected(request) -> None:
    """Return when the client disconnects (the body was already read, so receive() waits for that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _first_line(text) -> str:
    return str(text).splitlines()[0][:300] if str(text) else ""


class _Guard:
    """Pure ASGI middleware in front of every route: bearer auth (all paths but OPEN_PATHS), the body
    limit and read timeout, and a count of every response status in /metrics (refusals included).
    Pure ASGI (not BaseHTTPMiddleware) so the endpoint still sees the client's disconnect."""

    def __init__(self, app, token: Optional[str], max_body_bytes: int, metrics, body_timeout_s: float, service=None):
        self.app = app
        self.service = service  # for refusals known before the body is parsed (serving/early.py)
        self.token = token.encode("utf-8") if token is not None else None  # compared as bytes: any token works
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status_seen = []
        t0 = time.perf_counter()

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status_seen.append(message["status"])
                self.metrics.http.labels(str(message["status"])).inc()
                if message["status"] in (429, 503):  # a refusal: the server's own time to decide it
                    ms = 1e3 * (time.perf_counter() - t0)
                    message = dict(message, headers=[*message.get("headers", []), (b"server-timing", f"decision;dur={ms:.2f}".encode())])
            await send(message)

        refusal = self._refuse_headers(scope)
        path = scope.get("path", "")
        if refusal is not None:
            return await _send_error(counting_send, *refusal, path)
        if scope["method"] == "POST":
            generation = self.service is not None and path in GENERATION_PATHS
            refusal = early.before_body(self.service) if generation else None
            if refusal is not None:  # known from the headers: the body is not read (the connection closes)
                return await _send_error(counting_send, *refusal, path, close=True)
            body, refusal = await self._read_body(receive)
            if refusal is None and generation:
                refusal = early.before_parse(self.service, body, path)
            if refusal is not None:
                return await _send_error(counting_send, *refusal, path)
            replayed = [False]

            async def replay():
                if not replayed[0]:
                    replayed[0] = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # after the body: waits for the client's disconnect

            return await self.app(scope, replay, counting_send)
        return await self.app(scope, receive, counting_send)

    def _refuse_headers(self, scope):
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        if self.token is not None and scope.get("path") not in OPEN_PATHS:
            scheme, _, credential = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(credential.strip(), self.token):
                return 401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"}
        if scope["method"] == "POST":
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
                shown = length[:20].decode("latin-1")
                return 413, f"request body of {shown} bytes exceeds the limit of {self.max_body_bytes}", None
        return None

    async def _read_body(self, receive):
        """The whole body, counted as it arrives (never buffered past the limit), within the timeout."""
        chunks, size = [], 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout_s
        while True:
            try:
                message = await _receive_within(receive, max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return None, (408, f"request body not received within {self.body_timeout_s:g} s", None)
            if message["type"] == "http.disconnect":
                return None, (400, "client disconnected while sending the body", None)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None, (413, f"request body exceeds the limit of {self.max_body_bytes} bytes", None)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None


async def _receive_within(receive, seconds: float):
    """receive() or asyncio.TimeoutError after `seconds`. On 3.11+ without wait_for's task: a body that
    has already arrived is then read without a trip through the event loop's queue, where under a
    burst every other new connection is waiting (the refusal would wait behind all of them)."""
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(seconds):
            return await receive()
    return await asyncio.wait_for(receive(), seconds)


def _error_body(status: int, msg: str, path: str) -> dict:
    """{"error": msg}, or OpenAI's error shape on the OpenAI-compatible /v1 paths."""
    if path.startswith("/v1/"):
        from arexport.serving.openai_api import openai_error

        return openai_error(status, msg, code={401: "invalid_api_key", 429: "rate_limit_exceeded"}.get(status))
    return {"error": msg}


async def _send_error(send, status: int, msg: str, headers: Optional[dict], path: str = "", close: bool = False) -> None:
    raw = [(b"content-type", b"application/json")] + [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    body = json.dumps(_error_body(status, msg, path)).encode()
    raw.append((b"content-length", str(len(body)).encode()))
    if status in (408, 413) or close:
        raw.append((b"connection", b"close"))  # the rest of the body is not read
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _npy(text: str) -> np.ndarray:
    """base64-encoded .npy bytes -> array (no pickles)."""
    try:
        return np.load(io.BytesIO(base64.b64decode(text, validate=True)), allow_pickle=False)
    except Exception as e:  # binascii.Error, ValueError, OSError
        raise ValueError(f"caption data is not a base64-encoded .npy array ({e})") from None


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()
