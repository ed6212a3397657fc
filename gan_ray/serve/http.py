"""The HTTP face of the service, free of Ray: FastAPI with gan-ray's error handling (every client error a 4xx
with a JSON `detail`, whatever the body held), the page at `/` (page.html beside this file), and `plain_app`, the
same API in one plain process (no Ray, no batching) that the serving benchmark measures Ray Serve against.
"""

import math
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response

from gan_ray.core.errors import UserError, one_line
from gan_ray.serve.render import Job, Rendered, Renderer, RequestTooLarge
from gan_ray.serve.schema import (API_VERSION, ERRORS, MAX_BODY_BYTES, GeneratedImages, GenerateRequest,
                                  WrittenText)


DESCRIPTION = """Generated samples on demand (e.g. sixteen handwritten 7s).

`POST /v1/generate` returns a PNG grid, the `.npz` arrays of `gan-ray sample`, or JSON with one base64 PNG per
image. With `text` (digits and spaces), `n` writers each write the whole line in one hand: the PNG has a row per
writer, the arrays and JSON are nested per writer. Every image response carries `X-Seed` (send it back as `seed`
to get the same bytes again) and `X-Labels`. Client errors are 4xx with a JSON `detail`. `/` is a page to try
the model in a browser."""


GENERATE_ROUTE: dict[str, Any] = dict(
    summary="generate n images",
    response_class=Response,
    responses={200: {"description": "the images in the requested format (headers X-Seed, X-Labels)",
                     "content": {"image/png": {}, "application/x-npz": {},
                                 "application/json": {"schema": {"oneOf": [
                                     GeneratedImages.model_json_schema(), WrittenText.model_json_schema()]}}}},
               **ERRORS},
)


def job_or_4xx(renderer: Renderer, req: GenerateRequest) -> Job:
    """The request as a job, or the client's error: 413 for one over the size cap, else 422."""
    try:
        return renderer.job(req)
    except RequestTooLarge as exc:
        raise HTTPException(status_code=413, detail=one_line(exc)) from None
    except UserError as exc:
        raise HTTPException(status_code=422, detail=one_line(exc)) from None


@lru_cache(maxsize=1)
def page_html() -> str:
    """The try-it page: plain HTML and a little JavaScript that use only the public API (GET /v1/model, POST
    /v1/generate), shipped in the package as page.html so it is one file to read and no build step."""
    return (resources.files("gan_ray.serve") / "page.html").read_text(encoding="utf-8")


def page() -> HTMLResponse:
    return HTMLResponse(page_html())


def response(r: Rendered) -> Response:
    return Response(content=r.body, media_type=r.media_type, headers=r.headers)


class BodyLimit:
    """ASGI middleware: a body over `max_bytes` gets 413 with a JSON `detail`, whether announced by
    Content-Length or streamed (chunked); the handler never buffers more than the limit."""

    def __init__(self, app: Any, max_bytes: int = MAX_BODY_BYTES):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = f"request body exceeds {self.max_bytes} bytes"
        for key, value in scope.get("headers", ()):
            if key != b"content-length":
                continue
            if not value.isdigit():  # a header the client got wrong, not a body too large
                detail = f"malformed Content-Length header {value[:40].decode('latin-1')!r}: expected a byte count"
                return await JSONResponse({"detail": detail}, status_code=400)(scope, receive, send)
            if int(value) > self.max_bytes:
                return await JSONResponse({"detail": too_large}, status_code=413)(scope, receive, send)
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(status_code=413, detail=too_large)
            return message

        await self.app(scope, limited_receive, send)


def _json_safe(value: Any) -> Any:
    """`value` with every NaN/Infinity replaced by its JSON5 spelling as a string. Python's json reads `NaN`,
    `Infinity` and overflowing numbers (`1e400`) into floats that FastAPI's 422 body would echo back, and a
    response holding them cannot be serialised (Starlette refuses them: the client got a 500)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 (its list of {type, loc, msg, input}), made safe to serialise whatever the body held."""
    return JSONResponse({"detail": _json_safe(jsonable_encoder(exc.errors()))}, status_code=422)


def _json_invalid(cause: BaseException) -> dict[str, Any]:
    """The `json_invalid` error FastAPI gives a syntax error, for the bodies its parser fails on otherwise."""
    if isinstance(cause, UnicodeDecodeError):
        return {"type": "json_invalid", "loc": ["body", cause.start], "msg": "JSON decode error",
                "input": {}, "ctx": {"error": f"invalid {cause.encoding} byte 0x{cause.object[cause.start]:02x}"}}
    return {"type": "json_invalid", "loc": ["body"], "msg": "JSON decode error", "input": {},
            "ctx": {"error": "JSON nested too deeply"}}


async def _http_error(request: Request, exc: Any) -> Response:
    """FastAPI's HTTPException handler, except that a body its JSON parser choked on without a JSONDecodeError
    (invalid UTF-8, nesting past the recursion limit: FastAPI's bare 400 "error parsing the body") is the same
    422 `json_invalid` as any other malformed JSON, as the API documents."""
    if exc.status_code == 400 and isinstance(exc.__cause__, (UnicodeDecodeError, RecursionError)):
        return JSONResponse({"detail": [_json_invalid(exc.__cause__)]}, status_code=422)
    return await http_exception_handler(request, exc)


def new_api() -> FastAPI:
    """The FastAPI app with gan-ray's error handling: every client error is a 4xx with a JSON `detail`."""
    from starlette.exceptions import HTTPException as StarletteHTTPException

    fastapi_app = FastAPI(title="gan-ray", version=API_VERSION, description=DESCRIPTION)
    fastapi_app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)
    fastapi_app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    fastapi_app.add_exception_handler(StarletteHTTPException, _http_error)
    return fastapi_app


def plain_app(model_dir: str | Path, device: str = "cpu", torch_threads: int | None = None) -> FastAPI:
    """The same API in one plain process (no Ray, no batching): the benchmark's baseline. `torch_threads`: the
    forward's intra-op threads, as a Serve replica's (`ServeArgs.torch_threads`), so both compute alike."""
    if torch_threads is not None:
        import torch

        torch.set_num_threads(torch_threads)
    renderer = Renderer.load(model_dir, device, merge_forwards=False)
    plain = new_api()

    @plain.post(f"/{API_VERSION}/generate", **GENERATE_ROUTE)
    def generate(req: GenerateRequest) -> Response:  # sync: FastAPI runs it on its thread pool
        return response(renderer.render([job_or_4xx(renderer, req)])[0])

    @plain.get(f"/{API_VERSION}/model")
    def model() -> dict[str, Any]:
        return renderer.model_info()

    @plain.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    plain.get("/", include_in_schema=False)(page)

    return plain
