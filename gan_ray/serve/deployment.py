"""The Ray Serve deployment: an exported generator behind a batched, autoscaled, versioned HTTP API.

One deployment, `GeneratorServer`, is both the FastAPI ingress and the model: no second hop between an HTTP
front and a model deployment. Requests from many callers are merged by `@serve.batch` into one generator
forward (`gan_ray.serve.render`), encoded in that same batched call, so the replica's event loop only parses
requests and writes responses.

The app starts without its model, and is ready only once it has one. A replica whose model directory is missing or
malformed (a RayService deployed before the sweep that exports its model has finished) neither fails nor pretends:
its constructor waits, looking at the directory every 2 s and logging why it cannot load, and returns once the
model loads. Meanwhile the replica is STARTING, so the deployment is not HEALTHY and the app not RUNNING: that is
what KubeRay reads as "ready" (a new cluster is switched to, or a first one marked ready, only when every app is
RUNNING), so a `NewCluster` upgrade whose model is missing keeps the old cluster serving instead of switching
traffic to replicas that cannot answer. Serve never gives up on a slow constructor (it only warns), whereas a
constructor that raises, or a first health check that fails, counts as a failed start, and a few of those end in
DEPLOY_FAILED, after which Serve starts no replica again and KubeRay resubmits only when serveConfigV2 changes.
`gan-ray serve` still refuses a missing model up front, unless told to wait (--wait-for-model).

Ray's own tools use the module-level builder (keep the import path and arguments stable: the KubeRay RayService
reuses them):

    serve run gan_ray.serve:app model=/path/to/model [max_replicas=4 target_ongoing=8 ...]
    serve deploy gan_ray/serve/serve_config.yaml     # or the file `gan-ray serve --build` writes
"""
import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import torch
from fastapi.responses import HTMLResponse, Response
from ray import serve

from gan_ray.cluster.connect import ensure_ray
from gan_ray.cluster.connect import shutdown as shutdown_cluster
from gan_ray.core.errors import UserError, one_line
from gan_ray.core.model_dir import MODEL_JSON, WEIGHTS, load_generator
from gan_ray.serve.http import GENERATE_ROUTE, job_or_4xx, new_api, page, response
from gan_ray.serve.render import Job, Rendered, Renderer
from gan_ray.serve.schema import API_VERSION, APP_NAME, GenerateRequest, ServeArgs

log = logging.getLogger("ray.serve")


def deterministic_cudnn() -> None:
    """Pin cuDNN to deterministic kernels. Responses are promised byte-identical for the same (n, labels, seed),
    but cuDNN's autotuner (benchmark mode) may pick a different, possibly non-deterministic, convolution algorithm
    per process and shape. (A module-level function: Serve pickles the deployment class by value, and a method
    that touched torch.backends.cudnn itself would drag the unpicklable CudnnModule along.)"""
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def model_signature(model_dir: str) -> tuple:
    """What changes when a model appears or is replaced (the directory swapped in by `export`, files written or
    grown): a replica that waits retries a load only then, not every poll."""
    out = []
    for path in (Path(model_dir), Path(model_dir) / MODEL_JSON, Path(model_dir) / WEIGHTS):
        try:
            st = path.stat()
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append(None)
    return tuple(out)


class BatchStats:
    """How many requests each `@serve.batch` call of this replica merged: counted per replica, reported in
    GET /v1/model, and exported as the Serve metric `gan_ray_batch_size` (Prometheus, via Ray's metrics agent)."""

    def __init__(self) -> None:
        from ray.serve.metrics import Histogram

        self.batches = self.requests = self.largest = 0
        self.alone = 0  # of the batches, requests rendered alone (they skipped Serve's batch queue)
        self.histogram = Histogram("gan_ray_batch_size", description="requests merged into one generator forward",
                                   boundaries=[1, 2, 4, 8, 16, 32, 64, 128])

    def add(self, size: int, alone: bool = False) -> None:
        self.batches += 1
        self.alone += alone
        self.requests += size
        self.largest = max(self.largest, size)
        self.histogram.observe(size)

    def summary(self) -> dict[str, Any]:
        return {"replica": serve.get_replica_context().replica_tag,
                "batches": self.batches, "requests": self.requests, "largest_batch": self.largest,
                "alone": self.alone,
                "mean_batch": round(self.requests / self.batches, 3) if self.batches else None}


# Serve flags read in each replica's process (a runtime_env of the deployment, so every cluster gets them, not
# only those gan-ray starts). User code on the replica's own event loop, not on a second loop in a thread of its
# own: each request otherwise crosses between the two loops several times (the ASGI messages, the receive
# proxy). 2 cores, concurrency 1, Serve/plain req/s: 0.65-0.71 -> 0.80-0.83. What it gives up: the HTTP loop is
# busy while a batch renders, which is how this deployment batches anyway (render_batch runs inline). It is one
# of the flags of Ray's RAY_SERVE_THROUGHPUT_OPTIMIZED mode, set alone: that mode also moves replica logs off
# stderr, where `gan-ray serve` shows why a model is not loaded.
REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
MODEL_POLL_S = 2.0  # how often a replica without its model looks again (a stat of three paths)

api = new_api()


@serve.deployment(name="GeneratorServer")
@serve.ingress(api)
class GeneratorServer:
    """Ingress and model in one replica (no second deployment hop). Each request is validated by FastAPI, then
    joins a `@serve.batch` that renders many requests with one forward and encodes them in the same call."""

    async def __init__(self, model_dir: str, device: str = "cpu", max_batch_size: int = 32,
                       batch_wait_timeout_s: float = 0.0, torch_threads: int = 1):
        if device == "cpu":
            torch.set_num_threads(torch_threads)
        else:
            deterministic_cudnn()
        self.model_dir, self.device = model_dir, device
        self.render_batch.set_max_batch_size(max_batch_size)
        self.render_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batching = BatchStats()
        self.in_generate = 0  # requests inside generate(): one alone skips the batch queue
        self.renderer: Renderer = await self._wait_for_model()

    async def _wait_for_model(self) -> Renderer:
        """The loaded model: at once if the directory holds one, else once one appears (a try whenever the
        directory or its files change; every change of reason logged). An async wait: the replica's event loop
        stays free for Serve's own calls meanwhile."""
        reason, seen = "", None
        while True:
            now = model_signature(self.model_dir)  # taken before the attempt: a model landing during it is noticed
            if now != seen:
                seen = now
                t0 = time.perf_counter()
                try:
                    renderer = Renderer.load(self.model_dir, self.device)
                except UserError as exc:  # missing or malformed: the deployer's to fix, so keep looking
                    why = str(exc)
                except Exception as exc:  # anything else: a bug, with its traceback in the replica log
                    log.exception("gan-ray: loading %s failed", self.model_dir)
                    why = f"cannot load {self.model_dir}: {one_line(exc, 300)}"
                else:
                    log.info("gan-ray: loaded %s on %s in %.2fs; one forward per batch: %s", self.model_dir,
                             self.device, time.perf_counter() - t0, "yes" if renderer.merge_forwards else
                             "no (a merged forward is not bit-identical on this device; one forward per request)")
                    return renderer
                if why != reason:
                    log.warning("gan-ray: not ready: %s (looking again every %gs; the app stays DEPLOYING until "
                                "a model loads)", why, MODEL_POLL_S)
                    reason = why
            await asyncio.sleep(MODEL_POLL_S)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def render_batch(self, jobs: list[Job]) -> list[Rendered]:
        # Inline on the replica's event loop (REPLICA_ENV keeps user code there). Measured on 2 cores: a
        # worker-thread hop (asyncio.to_thread) cost 15-25% more CPU per request than it overlapped; requests
        # that arrive meanwhile simply form the next batch.
        return self._render(jobs)

    def _render(self, jobs: list[Job], alone: bool = False) -> list[Rendered]:
        """Render jobs together, counted as one batch (a request that skipped the queue is a batch of one)."""
        self.batching.add(len(jobs), alone)
        return self.renderer.render(jobs)

    @api.post(f"/{API_VERSION}/generate", **GENERATE_ROUTE)
    async def generate(self, req: GenerateRequest) -> Response:
        """A request that is alone on the replica renders at once; requests that overlap join a batch. The batch
        queue costs several event-loop turns per request (queue, batch task, futures: 7% of the replica's time at
        concurrency 1 in a profile), which buys nothing when there is nobody to merge with.
        One loop turn first lets requests read in the same turn as this one register, so a burst still batches."""
        job = job_or_4xx(self.renderer, req)
        self.in_generate += 1
        try:
            await asyncio.sleep(0)
            if self.in_generate == 1:
                return response(self._render([job], alone=True)[0])
            return response(await self.render_batch(job))
        finally:
            self.in_generate -= 1

    @api.get(f"/{API_VERSION}/model", summary="the model.json of the model being served")
    async def model(self) -> dict[str, Any]:
        """model.json, plus `serving`: what this replica has batched so far (batching is a promise: it is shown)."""
        return {**self.renderer.model_info(), "serving": self.batching.summary()}

    @api.get("/healthz", summary="200: this replica serves (a replica answers only once its model is loaded)")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/", include_in_schema=False)
    async def index(self) -> HTMLResponse:
        """The try-it page (the model card, a form, the image): a browser's way in, on the public API only."""
        return page()


def check_model(model_dir: str | Path) -> Path:
    """Fail before anything is served: the directory must load (format, weights) where the app is built. Returns
    its absolute path (what the replicas are given)."""
    path = model_path(model_dir)
    load_generator(path)
    return path


def model_path(model_dir: str | Path) -> Path:
    """The absolute path the replicas are given; the model need not exist yet (they wait for it)."""
    return Path(model_dir).expanduser().resolve()


def build_app(args: ServeArgs | dict[str, Any]) -> serve.Application:
    """Serve's application builder (`serve run gan_ray.serve:app model=DIR`): validates the arguments, then binds
    the deployment. The model is not required here: each replica waits for it (503s until it loads), so an app
    deployed before its model exists becomes ready when it appears instead of failing for good."""
    if not isinstance(args, ServeArgs):
        args = ServeArgs.from_mapping(args, source="the app's arguments")
    return bind(args, model_path(args.model))


def bind(args: ServeArgs, model_dir: Path) -> serve.Application:
    """The single ingress+model deployment with its autoscaling and batching settings, for a checked model."""
    limit = args.ongoing_limit
    device = "cuda" if args.gpus_per_replica > 0 else "cpu"
    deployment = GeneratorServer.options(
        autoscaling_config=args.autoscaling_config(),
        max_ongoing_requests=limit,
        health_check_period_s=args.health_check_period_s,
        health_check_timeout_s=args.health_check_timeout_s,
        ray_actor_options={"num_cpus": args.cpus_per_replica, "num_gpus": args.gpus_per_replica,
                           "runtime_env": {"env_vars": REPLICA_ENV}},
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


_state: dict[str, Any] = {}


def http_url(host: str | None = None) -> str:
    """Base URL of the running Serve HTTP proxy (the port Serve actually bound, which a cluster may have fixed)."""
    from ray.serve.context import _get_global_client

    cfg = _get_global_client().http_config
    h = host or cfg.host
    return f"http://{'127.0.0.1' if h in ('0.0.0.0', '') else h}:{cfg.port}"


def start_serving(model: ServeArgs | str | Path, *, host: str = "127.0.0.1", port: int = 8000,
                  address: str | None = None, name: str = APP_NAME, route_prefix: str = "/", wait_s: float = 120.0,
                  ingress: str | None = None, wait_for_model: bool = False, **options: Any) -> str:
    """Deploy the app (starting or joining Ray and Serve) and return its base URL once /healthz answers.

    `model`: the settings (ServeArgs), or a model directory with ServeArgs fields as `options` (min_replicas=...,
    target_ongoing=...). `ingress` (haproxy | proxy, see gan_ray.cluster) applies when this call starts the Ray
    cluster. Model errors raise UserError before Ray is touched, unless `wait_for_model`: then the app is deployed
    and returned while it is still DEPLOYING (its replicas wait for the model, see GeneratorServer), and serves
    once the model appears."""
    import ray

    args = model if isinstance(model, ServeArgs) else ServeArgs(model=str(model), **options)
    model_dir = model_path(args.model) if wait_for_model else check_model(args.model)
    started_ray = not ray.is_initialized()
    ensure_ray(address, ingress=ingress)
    serve.start(http_options={"host": host, "port": port})
    serve.run_many([serve.RunTarget(bind(args, model_dir), name=name, route_prefix=route_prefix)],
                   wait_for_applications_running=not wait_for_model)
    url = http_url() + route_prefix.rstrip("/")
    if not wait_for_model:
        from gan_ray.serve.client import wait_ready

        wait_ready(url, timeout_s=wait_s)
    _state.update(name=name, started_ray=_state.get("started_ray", False) or started_ray)
    return url


def stop_serving(name: str | None = None, *, shutdown_serve: bool = True) -> None:
    """Delete the app; if start_serving started the Ray cluster (and `shutdown_serve`), end the whole cluster
    (every process of it: nothing left behind, the ports free)."""
    import ray

    if not ray.is_initialized():
        return
    ours = shutdown_serve and _state.pop("started_ray", False)
    try:
        serve.delete(name or _state.get("name", APP_NAME))
        # Serve itself is shut down only with the cluster start_serving started: on a joined cluster it may serve
        # other applications than ours.
    finally:
        if ours:
            shutdown_cluster()
        _state.pop("name", None)
