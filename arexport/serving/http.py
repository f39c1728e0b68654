"""`arexport serve`: an HTTP front end (FastAPI) over a GenerationService.

POST /generate  JSON {classes | caption_embeddings, method, options, seed, sampling fields, format,
                timeout} -> image/png (one image), JSON with base64 PNGs, or JSON tokens
GET  /healthz   liveness + model summary
GET  /metrics   Prometheus text format (queue depth, batch occupancy, latencies, forward passes)
Errors are 4xx with {"error": "..."}: 400 bad values (class out of range, bad options), 401 missing
or wrong bearer token, 413 request body over the limit, 422 malformed JSON/fields; 503 while
shutting down or when the queue is full, 504 on timeout. A rejected request never reaches the
worker, so it cannot disturb requests in flight.
"""

# No `from __future__ import annotations` here: FastAPI must see the request model class itself.

import base64
import hmac
import io
from typing import Any, Literal, Optional

import numpy as np

from arexport.errors import ArexportError


def _deps():
    try:
        import fastapi  # noqa: F401
        import pydantic  # noqa: F401
    except ImportError as e:
        raise ArexportError(f"arexport serve needs fastapi and uvicorn (pip install 'arexport[serve]'): {e}") from None


def create_app(service, token: Optional[str] = None, max_body_bytes: int = 1 << 20, max_images: int = 64):
    """The FastAPI app. `token` enables bearer auth on /generate and /metrics."""
    _deps()
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from typing import Annotated

    from pydantic import BaseModel, Field, StrictInt

    from arexport.runtime.methods.base import METHODS
    from arexport.runtime.verifiers import request_safe_options
    from arexport.serving.service import RequestTimeout, ServiceClosed

    spec = service.engine.spec

    ClassId = Annotated[StrictInt, Field(ge=0, lt=2**31)]  # JSON integers only: no true, "3" or 1e23

    class GenerateBody(BaseModel):
        classes: Optional[list[ClassId]] = Field(None, description="Class ids (class-conditional models)")
        caption_embeddings: Optional[str] = Field(None, description="base64 .npy [N,T,C] float32 (text-conditional)")
        caption_mask: Optional[str] = Field(None, description="base64 .npy [N,T] bool, left-padded (optional)")
        prompt: Optional[str] = Field(None, max_length=MAX_PROMPT_CHARS, description="A prompt (text-conditional models with a text encoder)")
        prompts: Optional[list[Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]]] = Field(None, description="Prompts, one image each")
        method: Optional[str] = None
        options: dict[str, Any] = Field(default_factory=dict)
        seed: StrictInt = Field(0, ge=0, lt=2**63, description="Request seed, 0 <= seed < 2**63")
        cfg_scale: Optional[float] = None
        cfg_interval: int = -1
        cfg_schedule: Optional[Literal["constant", "linear", "cosine", "ramp"]] = None
        cfg_power: Optional[float] = None
        temperature: Optional[float] = None
        top_k: Optional[int] = None
        top_p: Optional[float] = None
        format: Literal["png", "tokens"] = "png"
        timeout: Optional[float] = Field(None, gt=0)

    app = FastAPI(title="arexport", version="1")

    def err(status: int, msg: str) -> JSONResponse:
        return JSONResponse({"error": msg}, status_code=status)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path in ("/generate", "/metrics") and token is not None:
            scheme, _, credential = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(credential.strip(), token):  # schemes are case-insensitive
                return err(401, "missing or wrong bearer token")
        if request.method == "POST":
            length = request.headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
                return err(413, f"request body of {length} bytes exceeds the limit of {max_body_bytes}")
            chunks, size = [], 0  # a chunked body is counted as it arrives, never buffered past the limit
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_body_bytes:
                    return err(413, f"request body exceeds the limit of {max_body_bytes} bytes")
                chunks.append(chunk)
            request._body = b"".join(chunks)  # what the endpoint reads
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", []) if x != "body")
        return err(422, f"invalid request: {where or 'body'}: {first.get('msg', 'malformed')}")

    @app.get("/healthz")
    async def healthz():
        status = "closing" if service.closed else "ok" if service.healthy else "unhealthy"
        body = {"status": status, "model": spec.name, "family": spec.family, "backend": service.engine.backend,
                "batching": service.batching}
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/generate")
    async def generate(body: GenerateBody):
        method = body.method or service.engine.family.default_method
        if method not in METHODS:
            return err(400, f"unknown method {method!r}; available: {', '.join(sorted(METHODS))}")
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
            request_safe_options(body.options)  # a request names built-in hooks only, never module:callable
            m = service.gen.method(method, body.options)
        except ArexportError as e:
            return err(400, str(e))
        rows = n_images * getattr(m.options, "candidates", 1)  # test-time scaling generates every candidate
        if rows > max_images:
            return err(400, f"{n_images} images x {rows // n_images} candidates requested; the limit per request is "
                            f"{max_images} images (candidates included)")
        sampling = service.gen.sampling_params(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                                               cfg_scale=body.cfg_scale, cfg_interval=body.cfg_interval,
                                               cfg_schedule=body.cfg_schedule, cfg_power=body.cfg_power)
        try:
            res = await service.agenerate(body.classes, method=method, options=body.options, sampling=sampling,
                                          seed=body.seed, images=body.format == "png", timeout=body.timeout,
                                          captions=captions, caption_mask=mask, prompts=prompts)
        except ServiceClosed as e:
            return err(503, str(e))
        except RequestTimeout as e:
            return err(504, str(e))
        except ArexportError as e:
            return err(400, str(e))
        headers = {"X-Arexport-Seconds": f"{res.seconds:.4f}"}
        if body.format == "tokens":
            return JSONResponse({"tokens": res.tokens.tolist(), "seconds": res.seconds}, headers=headers)
        pngs = [_png(img) for img in res.images]
        if len(pngs) == 1:
            return Response(pngs[0], media_type="image/png", headers=headers)
        return JSONResponse({"images": [base64.b64encode(p).decode() for p in pngs], "seconds": res.seconds}, headers=headers)

    @app.on_event("shutdown")
    def _shutdown():
        service.close(drain=True, timeout=60)

    return app


MAX_PROMPT_CHARS = 4096  # a prompt's characters (the text encoder truncates to its token limit anyway)


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
