"""Ray Serve application: an exported generator behind a batched, autoscaled, versioned HTTP API.

One deployment, `GeneratorServer`, is both the FastAPI ingress and the model: no second hop between an HTTP
front and a model deployment. Requests from many callers are merged by `@serve.batch` into one generator
forward, and the encoding (PNG, NPZ, base64) happens in that same batched call on a worker thread, so the
replica's event loop only parses requests and writes responses.

Ray's own tools use the module-level builder (keep the import path and arguments stable: the KubeRay RayService
reuses them):

    serve run gan_ray.serve:app model=/path/to/model [max_replicas=4 target_ongoing=8 ...]
    serve deploy gan_ray/serve_config.yaml        # or the file `gan-ray serve --build` writes

Determinism: the same (n, labels, seed) gives byte-identical bodies however requests are batched. A matmul's
bits can depend on how many rows it holds, so every forward is padded to whole blocks of `ROW_BLOCK` rows (a
batch packs requests back to back and pads the total), and a CPU replica runs its forward on one thread. A
start-up self-check confirms that packed forwards reproduce each request's own forward bit for bit on this
hardware; a replica where they do not (some GPUs) runs one forward per request inside each batch instead (still
batched for queueing and encoding).
"""
import base64
import io
import json
import logging
import math
import secrets
import struct
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator
from ray import serve

from gan_ray.errors import UserError, one_line
from gan_ray.registry import Generator, latent_for_seed, load_generator

log = logging.getLogger("ray.serve")

API_VERSION = "v1"
APP_NAME = "gan-ray"
MAX_N = 256  # images per request
MAX_BODY_BYTES = 64 * 1024  # 256 labels and a seed fit in ~2 KiB; anything near this is not a real request
MAX_SEED = 2**63 - 1
ROW_BLOCK = 16  # rows per padded block: the unit whose forward bits must not depend on the batch around it
GRID_SCALE = 2  # the PNG grid is upscaled like `gan-ray sample --out x.png`


# ---------------------------------------------------------------------------------------------------- API schema
Label = Annotated[StrictInt, Field(ge=0, le=1_000_000)]


class GenerateRequest(BaseModel):
    """Body of POST /v1/generate. Strict types: "3" is not a number, true is not a label."""

    model_config = ConfigDict(extra="forbid")

    n: StrictInt = Field(1, ge=1, le=MAX_N, description=f"number of images (1..{MAX_N})")
    labels: Optional[Union[Label, Annotated[list[Label], Field(min_length=1, max_length=MAX_N)]]] = Field(
        None, description="class labels (conditional models only): one int for all images or a list of n ints; "
                          "default cycles 0..K-1")
    seed: Optional[Annotated[StrictInt, Field(ge=0, le=MAX_SEED)]] = Field(
        None, description="same seed and parameters give byte-identical output; default: a random seed, "
                          "returned in the X-Seed header")
    format: Literal["png", "npz", "json"] = Field(
        "png", description="png: one grid image; npz: arrays images float32 [N,C,H,W] and labels int64 "
                           "(-1 = unconditional), as `gan-ray sample` writes; json: base64 PNG per image with labels")

    @model_validator(mode="after")
    def _labels_match_n(self) -> "GenerateRequest":
        if isinstance(self.labels, list) and len(self.labels) != self.n:
            raise ValueError(f"labels has {len(self.labels)} entries but n is {self.n} (give n labels or one int)")
        return self


class ErrorBody(BaseModel):
    detail: Union[str, list[dict[str, Any]]]


class GeneratedImages(BaseModel):
    """The `json` format."""

    n: int
    seed: int
    image_shape: list[int] = Field(description="C, H, W")
    labels: list[int] = Field(description="class of each image (-1 = unconditional model)")
    images: list[str] = Field(description="base64-encoded PNG per image")


ERRORS = {400: {"model": ErrorBody, "description": "malformed Content-Length header"},
          413: {"model": ErrorBody, "description": "body too large"},
          422: {"model": ErrorBody, "description": "invalid request: `detail` says what is wrong"}}
MEDIA = {"png": "image/png", "npz": "application/x-npz", "json": "application/json"}


# ------------------------------------------------------------------------------------------------------ encoders
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def png_encode(array: np.ndarray) -> bytes:
    """[H, W] or [H, W, C] uint8 (C = 1, 3, 4) to PNG. numpy + zlib only: ~5x faster than PIL for small images."""
    a = array if array.ndim == 3 else array[:, :, None]
    h, w, c = a.shape
    color = {1: 0, 3: 2, 4: 6}[c]
    raw = np.empty((h, 1 + w * c), dtype=np.uint8)
    raw[:, 0] = 0  # filter type "None" on every scanline
    raw[:, 1:] = a.reshape(h, w * c)
    header = struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0)
    return (_PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), 1))
            + _png_chunk(b"IEND", b""))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] float in [0, 1] -> [N, H, W, C] uint8 (same rounding as gan_ray.images)."""
    return images.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def grid_uint8(tiles: np.ndarray, *, pad: int = 2, scale: int = GRID_SCALE) -> np.ndarray:
    """Tile [N, H, W, C] uint8 into one image like gan_ray.images.grid (sqrt(N) columns, dark border)."""
    n, h, w, c = tiles.shape
    ncols = max(1, int(np.ceil(np.sqrt(n))))
    nrows = -(-n // ncols)
    full = np.zeros((nrows * ncols, h, w, c), dtype=np.uint8)
    full[:n] = tiles
    padded = np.zeros((nrows, ncols, h + pad, w + pad, c), dtype=np.uint8)
    padded[:, :, pad:, pad:] = full.reshape(nrows, ncols, h, w, c)
    out = np.zeros((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), dtype=np.uint8)
    out[:-pad, :-pad] = padded.transpose(0, 2, 1, 3, 4).reshape(nrows * (h + pad), ncols * (w + pad), c)
    if scale > 1:
        out = out.repeat(scale, axis=0).repeat(scale, axis=1)
    return out


_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def npz_encode(images: np.ndarray, labels: np.ndarray) -> bytes:
    """The `gan-ray sample` .npz (images float32 [N,C,H,W], labels int64), with fixed zip timestamps so the same
    arrays always give the same bytes (np.savez stamps the current time into the archive)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, arr in (("images", images.astype(np.float32, copy=False)), ("labels", labels.astype(np.int64))):
            body = io.BytesIO()
            np.lib.format.write_array(body, np.ascontiguousarray(arr), allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH), body.getvalue())
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------------ renderer
@dataclass
class Job:
    """One validated request, ready for the batched forward."""

    n: int
    labels: torch.Tensor  # int64 [n]; -1 for an unconditional model
    seed: int
    format: str


@dataclass
class Rendered:
    body: bytes
    media_type: str
    headers: dict[str, str]


class Renderer:
    """The model side of the service, free of HTTP and Ray: validate, run one forward for many jobs, encode.

    The Serve replica and the plain-uvicorn benchmark baseline both use it, so they serve identical bytes.
    """

    def __init__(self, gen: Generator, *, merge_forwards: bool | None = None):
        self.gen = gen
        self.spec = gen.spec
        self.merge_forwards = self.batch_invariant() if merge_forwards is None else merge_forwards

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "cpu", **kw: Any) -> "Renderer":
        return cls(load_generator(model_dir, device), **kw)

    # -- validation (client errors never reach the batch)
    def job(self, req: GenerateRequest) -> Job:
        k = self.spec.num_classes
        if req.labels is not None and not k:
            raise UserError("this model is unconditional: it takes no labels (drop `labels`)")
        if k and req.labels is not None:
            values = [req.labels] if isinstance(req.labels, int) else req.labels
            bad = sorted({v for v in values if not 0 <= v < k})
            if bad:
                raise UserError(f"labels must lie in 0..{k - 1} for this model, got {bad[:10]}")
        labels = self.gen.resolve_labels(req.n, req.labels)
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        return Job(req.n, labels, seed, req.format)

    # -- the forward
    def _inputs(self, job: Job) -> tuple[torch.Tensor, torch.Tensor]:
        z = latent_for_seed(job.n, self.spec.latent_dim, job.seed)
        return z, (job.labels if self.spec.conditional else torch.zeros(job.n, dtype=torch.int64))

    @torch.no_grad()
    def _run(self, z: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        """The generator on rows padded up to a whole number of ROW_BLOCKs (zeros: rows don't interact)."""
        n = z.shape[0]
        rows = -(-n // ROW_BLOCK) * ROW_BLOCK
        if rows != n:
            z = torch.cat([z, z.new_zeros(rows - n, z.shape[1])])
            lab = torch.cat([lab, lab.new_zeros(rows - n)])
        dev = self.gen.device
        out = self.gen.net(z.to(dev), lab.to(dev) if self.spec.conditional else None)
        return out[:n].float().cpu()

    def forward(self, jobs: list[Job]) -> list[torch.Tensor]:
        """Images [n, C, H, W] per job: the jobs' rows packed into one forward when that is bit-identical to
        running each job alone (see batch_invariant), else one forward per job."""
        inputs = [self._inputs(j) for j in jobs]
        if not self.merge_forwards or len(jobs) == 1:
            return [self._run(z, lab) for z, lab in inputs]
        out = self._run(torch.cat([z for z, _ in inputs]), torch.cat([lab for _, lab in inputs]))
        return list(out.split([j.n for j in jobs]))

    def batch_invariant(self) -> bool:
        """Do a job's rows come out of a packed forward (any offset, any batch size) bit-identical to the job's
        own forward? Probed at start-up with requests of awkward sizes: matmul kernels pick tiles by shape."""
        g = torch.Generator().manual_seed(0)
        for sizes in ([1, 3, 16, 17, 5, 1, 7, 33], [1] * 16, [64, 1, 100, 2, 256, 31, 9, 77, 250, 129, 3]):
            z = torch.randn(sum(sizes), self.spec.latent_dim, generator=g)
            lab = torch.randint(0, max(self.spec.num_classes, 1), (sum(sizes),), generator=g)
            packed = self._run(z, lab).split(sizes)
            start = 0
            for size, rows in zip(sizes, packed):
                if not torch.equal(self._run(z[start:start + size], lab[start:start + size]), rows):
                    return False
                start += size
        return True

    # -- encoding
    def encode(self, job: Job, images: torch.Tensor) -> Rendered:
        labels = job.labels if self.spec.conditional else torch.full((job.n,), -1, dtype=torch.int64)
        headers = {"X-Seed": str(job.seed), "X-Labels": ",".join(map(str, labels.tolist()))}
        if job.format == "npz":
            body = npz_encode(images.numpy(), labels.numpy())
        elif job.format == "json":
            pngs = [base64.b64encode(png_encode(tile)).decode("ascii") for tile in to_uint8(images)]
            body = json.dumps({"n": job.n, "seed": job.seed, "image_shape": list(images.shape[1:]),
                               "labels": labels.tolist(), "images": pngs}, separators=(",", ":")).encode()
        else:
            body = png_encode(grid_uint8(to_uint8(images)))
        return Rendered(body, MEDIA[job.format], headers)

    def render(self, jobs: list[Job]) -> list[Rendered]:
        return [self.encode(j, imgs) for j, imgs in zip(jobs, self.forward(jobs))]

    def model_info(self) -> dict[str, Any]:
        return self.gen.info


# ------------------------------------------------------------------------------------------------------ HTTP app
DESCRIPTION = """Generated samples on demand (e.g. sixteen handwritten 7s).

`POST /v1/generate` returns a PNG grid, the `.npz` arrays of `gan-ray sample`, or JSON with one base64 PNG per
image. Every image response carries `X-Seed` (send it back as `seed` to get the same bytes again) and
`X-Labels`. Client errors are 4xx with a JSON `detail`."""

GENERATE_ROUTE: dict[str, Any] = dict(
    summary="generate n images",
    response_class=Response,
    responses={200: {"description": "the images in the requested format (headers X-Seed, X-Labels)",
                     "content": {"image/png": {}, "application/x-npz": {},
                                 "application/json": {"schema": GeneratedImages.model_json_schema()}}},
               **ERRORS},
)


def _job_or_422(renderer: Renderer, req: GenerateRequest) -> Job:
    try:
        return renderer.job(req)
    except UserError as exc:
        raise HTTPException(status_code=422, detail=one_line(exc)) from None


def _response(r: Rendered) -> Response:
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


def deterministic_cudnn() -> None:
    """Pin cuDNN to deterministic kernels. Responses are promised byte-identical for the same (n, labels, seed),
    but cuDNN's autotuner (benchmark mode) may pick a different, possibly non-deterministic, convolution algorithm
    per process and shape. (A module-level function: Serve pickles the deployment class by value, and a method
    that touched torch.backends.cudnn itself would drag the unpicklable CudnnModule along.)"""
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def new_api() -> FastAPI:
    """The FastAPI app with gan-ray's error handling: every client error is a 4xx with a JSON `detail`."""
    from starlette.exceptions import HTTPException as StarletteHTTPException

    fastapi_app = FastAPI(title="gan-ray", version=API_VERSION, description=DESCRIPTION)
    fastapi_app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)
    fastapi_app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    fastapi_app.add_exception_handler(StarletteHTTPException, _http_error)
    return fastapi_app


api = new_api()


@serve.deployment(name="GeneratorServer")
@serve.ingress(api)
class GeneratorServer:
    """Ingress and model in one replica (no second deployment hop). Each request is validated by FastAPI, then
    joins a `@serve.batch` that renders many requests with one forward and encodes them in the same call."""

    def __init__(self, model_dir: str, device: str = "cpu", max_batch_size: int = 32,
                 batch_wait_timeout_s: float = 0.0, torch_threads: int = 1):
        if device == "cpu":
            torch.set_num_threads(torch_threads)
        else:
            deterministic_cudnn()
        t0 = time.perf_counter()
        self.renderer = Renderer.load(model_dir, device)
        self.render_batch.set_max_batch_size(max_batch_size)
        self.render_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        log.info("gan-ray: loaded %s on %s in %.2fs; one forward per batch: %s", model_dir, device,
                 time.perf_counter() - t0, "yes" if self.renderer.merge_forwards else
                 "no (a merged forward is not bit-identical on this device; one forward per request)")

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def render_batch(self, jobs: list[Job]) -> list[Rendered]:
        # Inline on the replica's user-code loop (Serve runs it on its own thread). Measured on 2 cores: a
        # worker-thread hop (asyncio.to_thread) cost 15-25% more CPU per request than it overlapped; requests
        # that arrive meanwhile simply form the next batch.
        return self.renderer.render(jobs)

    @api.post(f"/{API_VERSION}/generate", **GENERATE_ROUTE)
    async def generate(self, req: GenerateRequest) -> Response:
        return _response(await self.render_batch(_job_or_422(self.renderer, req)))

    @api.get(f"/{API_VERSION}/model", summary="the model.json of the model being served")
    async def model(self) -> dict[str, Any]:
        return self.renderer.model_info()

    @api.get("/healthz", summary="liveness")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}


def plain_app(model_dir: str | Path, device: str = "cpu") -> FastAPI:
    """The same API in one plain process (no Ray, no batching): the benchmark's baseline."""
    renderer = Renderer.load(model_dir, device, merge_forwards=False)
    plain = new_api()

    @plain.post(f"/{API_VERSION}/generate", **GENERATE_ROUTE)
    def generate(req: GenerateRequest) -> Response:  # sync: FastAPI runs it on its thread pool
        return _response(renderer.render([_job_or_422(renderer, req)])[0])

    @plain.get(f"/{API_VERSION}/model")
    def model() -> dict[str, Any]:
        return renderer.model_info()

    @plain.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return plain


# ------------------------------------------------------------------------------------------- application builder
class ServeArgs(BaseModel):
    """Arguments of `serve run gan_ray.serve:app model=DIR key=value ...` (and of a config file's `args:`).

    Stable: the KubeRay RayService passes the same names."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="exported model directory (gan-ray export / a sweep's best model)")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    initial_replicas: Optional[int] = Field(None, ge=0)
    target_ongoing: float = Field(8.0, gt=0, description="ongoing requests per replica the autoscaler aims at")
    max_ongoing: Optional[int] = Field(None, ge=1, description="per replica; must exceed target_ongoing "
                                                               "(default: max(32, 2 x target))")
    max_batch_size: int = Field(32, ge=1, description="requests per batch (capped at max_ongoing)")
    batch_wait_timeout_s: float = Field(0.0, ge=0, description="how long a batch waits to fill up")
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)
    look_back_period_s: float = Field(10.0, gt=0)
    metrics_interval_s: float = Field(2.0, gt=0, description="how often load is reported to the autoscaler")
    cpus_per_replica: float = Field(1.0, ge=0)
    gpus_per_replica: float = Field(0.0, ge=0)
    torch_threads: int = Field(1, ge=1, description="intra-op threads per CPU replica (Serve scales by replicas)")
    health_check_period_s: float = Field(10.0, gt=0, description="how often the controller checks replicas")
    health_check_timeout_s: float = Field(30.0, gt=0)
    access_log: bool = Field(False, description="log every request in the replica (costs CPU per request)")

    @model_validator(mode="after")
    def _consistent(self) -> "ServeArgs":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) < min_replicas ({self.min_replicas})")
        if self.max_ongoing is not None and self.max_ongoing <= self.target_ongoing:
            raise ValueError(f"max_ongoing ({self.max_ongoing}) must exceed target_ongoing ({self.target_ongoing:g}) "
                             "or the deployment never scales up")
        return self

    @property
    def ongoing_limit(self) -> int:
        return self.max_ongoing or max(32, int(2 * self.target_ongoing) + 1)

    def autoscaling_config(self) -> dict[str, Any]:
        return {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "initial_replicas": self.initial_replicas, "target_ongoing_requests": self.target_ongoing,
                "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s,
                "look_back_period_s": self.look_back_period_s, "metrics_interval_s": self.metrics_interval_s}


def check_model(model_dir: str | Path) -> Path:
    """Fail before anything is served: the directory must load (format, weights) where the app is built."""
    path = Path(model_dir).expanduser().resolve()
    load_generator(path)
    return path


def build_app(args: ServeArgs) -> serve.Application:
    """Serve's application builder (`serve run gan_ray.serve:app model=DIR`): checks the model, then binds the
    single ingress+model deployment with its autoscaling and batching settings."""
    if not isinstance(args, ServeArgs):
        args = ServeArgs.model_validate(args)
    model_dir = check_model(args.model)
    limit = args.ongoing_limit
    device = "cuda" if args.gpus_per_replica > 0 else "cpu"
    deployment = GeneratorServer.options(
        autoscaling_config=args.autoscaling_config(),
        max_ongoing_requests=limit,
        health_check_period_s=args.health_check_period_s,
        health_check_timeout_s=args.health_check_timeout_s,
        ray_actor_options={"num_cpus": args.cpus_per_replica, "num_gpus": args.gpus_per_replica},
        logging_config={"enable_access_log": args.access_log},
    )
    return deployment.bind(str(model_dir), device=device, max_batch_size=min(args.max_batch_size, limit),
                           batch_wait_timeout_s=args.batch_wait_timeout_s, torch_threads=args.torch_threads)


app = build_app  # the import path Ray's tools and the RayService use: gan_ray.serve:app


def deploy_config(args: ServeArgs, *, host: str = "0.0.0.0", port: int = 8000) -> dict[str, Any]:
    """A `serve deploy` config (ServeDeploySchema) for this app: what `gan-ray serve --build` writes."""
    given = args.model_dump(exclude_defaults=True)
    given["model"] = str(Path(args.model).expanduser().resolve()) if Path(args.model).expanduser().exists() \
        else args.model
    return {"proxy_location": "EveryNode", "http_options": {"host": host, "port": port},
            "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": "gan_ray.serve:app",
                              "args": given}]}


# ----------------------------------------------------------------------------------------- start / stop (Python)
_state: dict[str, Any] = {}


def http_url(host: str | None = None) -> str:
    """Base URL of the running Serve HTTP proxy (the port Serve actually bound, which a cluster may have fixed)."""
    from ray.serve.context import _get_global_client

    cfg = _get_global_client().http_config
    h = host or cfg.host
    return f"http://{'127.0.0.1' if h in ('0.0.0.0', '') else h}:{cfg.port}"


def start_serving(model_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
                  name: str = APP_NAME, route_prefix: str = "/", wait_s: float = 120.0, ingress: str | None = None,
                  **options: Any) -> str:
    """Deploy the app (starting or joining Ray and Serve) and return its base URL once /healthz answers.

    `options` are ServeArgs fields (min_replicas=..., target_ongoing=...). `ingress` (haproxy | proxy, see
    gan_ray.serve_ingress) applies when this call starts the Ray cluster. Model errors raise UserError before Ray
    is touched."""
    import ray

    from gan_ray.ray_train import ensure_ray

    args = ServeArgs(model=str(model_dir), **options)
    check_model(args.model)
    started_ray = not ray.is_initialized()
    ensure_ray(address, ingress=ingress)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(args), name=name, route_prefix=route_prefix)
    url = http_url() + route_prefix.rstrip("/")
    from gan_ray.serve_client import wait_ready

    wait_ready(url, timeout_s=wait_s)
    _state.update(name=name, started_ray=_state.get("started_ray", False) or started_ray)
    return url


def stop_serving(name: str | None = None, *, shutdown_serve: bool = True) -> None:
    """Delete the app; shut Serve down (and Ray, if start_serving started it)."""
    import ray

    if not ray.is_initialized():
        return
    try:
        serve.delete(name or _state.get("name", APP_NAME))
        if shutdown_serve:
            serve.shutdown()
    finally:
        if shutdown_serve and _state.pop("started_ray", False):
            ray.shutdown()
        _state.pop("name", None)
