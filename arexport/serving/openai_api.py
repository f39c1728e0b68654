"""OpenAI-compatible images endpoint of `arexport serve`: POST /v1/images/generations.

Standard fields (OpenAI's images API):
  prompt           str, required by OpenAI's clients. Text-to-image models: the prompt of every image.
                   Class-conditional models take no prompt: send "" and the `classes` extension.
  n                images (1 .. the server's --max-images); default 1, or len(classes).
  size             "WxH" equal to the model's resolution (e.g. "256x256"), or "auto"; any other size is
                   a 400 naming it (the engines have one static resolution).
  response_format  "b64_json" (default). "url" is refused: the server keeps no images to link to.
  model            optional; when given it must be the served model's name (else 404 model_not_found).
  output_format    "png" only; quality/style/background "auto" only; stream false only; user,
                   safety_identifier and moderation are accepted and have no effect.
arexport extensions (top-level JSON fields; with the openai client pass them in `extra_body`):
  classes          class ids, class-conditional models: one image each, or one id repeated n times
  seed             request seed, 0 <= seed < 2**63 (image i uses the runtime's image_seed(seed, i));
                   default 0, so the same request gives the same images
  method, options  decoding method and its options, as POST /generate
  cfg_scale, cfg_interval, cfg_schedule, cfg_power, temperature, top_k, top_p,
  entropy_temperature   sampling, as /generate
  timeout          seconds, as /generate
The answer is OpenAI's {"created", "data": [{"b64_json": PNG}]} plus "arexport": {"model", "method",
"seed", "seconds"}. Images equal those of POST /generate, the Python service and `arexport generate`
for the same conditions, method, sampling and seed. Errors use OpenAI's shape
{"error": {"message", "type", "param", "code"}} (the HTTP layer's 401/408/413 on /v1 paths too);
unknown fields are a 400 naming them (a misspelt extension never falls back silently).
"""

# No `from __future__ import annotations`: pydantic must see the annotations themselves.

import base64
import math
import time
from typing import Optional

from arexport.errors import ArexportError

PATH = "/v1/images/generations"
V1_PREFIX = "/v1/"


def openai_error(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    """The JSON body of an error in OpenAI's shape, typed by status."""
    kind = ("server_error" if status >= 500 else "rate_limit_error" if status == 429
            else "authentication_error" if status == 401 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def register(app, service, max_images: int) -> None:
    """Add POST /v1/images/generations to the FastAPI `app` serving `service`."""
    from fastapi import Request
    from fastapi.responses import JSONResponse
    from pydantic import ConfigDict, Field, StrictInt, ValidationError

    from arexport.runtime import method_names
    from arexport.serving.http import MAX_PROMPT_CHARS, _answer, _first_line, _png, _request_fields
    from arexport.serving.service import DeadlineUnreachable, Overloaded, ServiceClosed

    spec = service.engine.spec
    ClassId, RunFields = _request_fields()

    class ImagesBody(RunFields):
        model_config = ConfigDict(extra="forbid")
        prompt: str = Field(..., max_length=MAX_PROMPT_CHARS)
        n: Optional[StrictInt] = Field(None, ge=1, lt=2**31)
        size: Optional[str] = None
        response_format: Optional[str] = None
        model: Optional[str] = None
        output_format: Optional[str] = None
        quality: Optional[str] = None
        style: Optional[str] = None
        background: Optional[str] = None
        stream: Optional[bool] = None
        partial_images: Optional[StrictInt] = None
        user: Optional[str] = None
        safety_identifier: Optional[str] = None
        moderation: Optional[str] = None
        # arexport extensions
        classes: Optional[list[ClassId]] = None  # with the run fields of RunFields (seed, method, sampling, timeout)

    def fail(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
             headers: Optional[dict] = None) -> JSONResponse:
        return JSONResponse(openai_error(status, message, param, code), status_code=status, headers=headers)

    def side() -> int:  # the engines make square images of one static size (read per request: a stand-in
        return spec.image.image_size  # service without an image spec can still register the route)

    def refuse_unsupported(body: ImagesBody) -> Optional[JSONResponse]:
        if body.model is not None and body.model != spec.name:
            return fail(404, f"model {body.model!r} is not served here; this server serves {spec.name!r}", "model",
                        "model_not_found")
        if body.response_format not in (None, "b64_json"):
            return fail(400, f"response_format {body.response_format!r} is not supported: this server keeps no "
                             "images to link to; use b64_json", "response_format")
        if body.size not in (None, "auto", f"{side()}x{side()}"):
            return fail(400, f"size {body.size!r} is not available: model {spec.name} makes {side()}x{side()} images "
                             f"(send size {side()}x{side()} or auto)", "size")
        if body.output_format not in (None, "png"):
            return fail(400, f"output_format {body.output_format!r} is not supported; this server returns png",
                        "output_format")
        for name in ("quality", "style", "background"):
            if getattr(body, name) not in (None, "auto"):
                return fail(400, f"{name} {getattr(body, name)!r} is not supported (only auto)", name)
        if body.stream:
            return fail(400, "streaming is not supported; send stream false", "stream")
        if body.partial_images:
            return fail(400, "partial images are not supported; send partial_images 0", "partial_images")
        return None

    def conditions(body: ImagesBody):
        """(classes, prompts, n) for the model's kind, or an error response."""
        if spec.model_type == "t2i":
            if body.classes is not None:
                return fail(400, f"model {spec.name} is text-conditional: send a prompt, not classes", "classes")
            if not body.prompt.strip():
                return fail(400, f"model {spec.name} is text-conditional: the prompt must not be empty", "prompt")
            n = body.n or 1
            return None, [body.prompt] * n, n
        if body.prompt:
            return fail(400, f"model {spec.name} is class-conditional: send an empty prompt and the classes "
                             "extension (class ids)", "prompt")
        if not body.classes:
            return fail(400, f"model {spec.name} is class-conditional: send the classes extension (a non-empty "
                             "list of class ids)", "classes")
        n = body.n or len(body.classes)
        if len(body.classes) == 1:
            classes = body.classes * n
        elif len(body.classes) == n:
            classes = body.classes
        else:
            return fail(400, f"n is {n} but {len(body.classes)} classes were sent: send one class per image, or "
                             "one class for all n", "n")
        return classes, None, n

    @app.post(PATH)
    async def images_generations(request: Request):
        try:
            raw = await request.json()
        except ValueError:
            return fail(400, "the request body is not valid JSON")
        try:
            body = ImagesBody.model_validate(raw)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first.get("loc", ())) or None
            msg = ("unknown field (not an OpenAI images field nor an arexport extension)"
                   if first.get("type") == "extra_forbidden" else _first_line(first.get("msg", "malformed")))
            return fail(400, f"invalid request: {where or 'body'}: {msg}", where)
        refusal = refuse_unsupported(body)
        if refusal is not None:
            return refusal
        conds = conditions(body)
        if isinstance(conds, JSONResponse):
            return conds
        classes, prompts, n = conds
        method = body.method or service.engine.family.default_method
        if method not in method_names():
            return fail(400, f"unknown method {method!r}; available: {', '.join(method_names())}", "method")
        try:
            m = service.gen.request_method(method, body.options)  # hooks: built-in names only, never module:callable
        except ArexportError as e:
            return fail(400, str(e), "options")
        except (TypeError, ValueError, AttributeError, KeyError, OverflowError):
            return fail(400, f"invalid options for method {method}: a value of the wrong type or out of range among "
                             f"{', '.join(sorted(map(str, body.options))) or '(none)'}", "options")
        rows = n * getattr(m.options, "candidates", 1)
        if rows > max_images:
            return fail(400, f"{n} images x {rows // n} candidates requested; the limit per request is {max_images} "
                             "images (candidates included)", "n")
        for name in ("cfg_scale", "cfg_power", "temperature", "top_p"):
            v = getattr(body, name)
            if v is not None and not math.isfinite(v):
                return fail(400, f"{name} must be a finite number", name)
        try:
            sampling = service.gen.sampling_params(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                                                   cfg_scale=body.cfg_scale, cfg_interval=body.cfg_interval,
                                                   cfg_schedule=body.cfg_schedule, cfg_power=body.cfg_power,
                                                   entropy_temperature=body.entropy_temperature)
            future = service.submit(classes, method=method, options=body.options, sampling=sampling, seed=body.seed,
                                    images=True, timeout=body.timeout, prompts=prompts)
        except DeadlineUnreachable as e:
            return fail(503, str(e), headers={"Retry-After": str(math.ceil(e.retry_after))})
        except Overloaded as e:
            return fail(429, str(e), code="rate_limit_exceeded", headers={"Retry-After": str(math.ceil(e.retry_after))})
        except ServiceClosed as e:
            return fail(503, str(e))
        except ArexportError as e:
            return fail(400, str(e))
        res, refusal = await _answer(request, future, fail)
        if refusal is not None:
            return refusal
        data = [{"b64_json": base64.b64encode(_png(img)).decode(), "revised_prompt": None} for img in res.images]
        return JSONResponse({"created": int(time.time()), "data": data, "output_format": "png",
                             "size": f"{side()}x{side()}",
                             "arexport": {"model": spec.name, "method": method, "seed": body.seed,
                                          "seconds": res.seconds}},
                            headers={"X-Arexport-Seconds": f"{res.seconds:.4f}"})
