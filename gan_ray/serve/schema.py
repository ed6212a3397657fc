"""What the service takes: the request body of `POST /v1/generate`, its responses' shapes, and `ServeArgs`, the
settings of a deployment (the same names for `gan-ray serve` flags, `serve run gan_ray.serve:app key=value` and a
config file's or the RayService's `args:`). Pydantic, no Ray.
"""

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

API_VERSION = "v1"
APP_NAME = "gan-ray"
MAX_N = 256  # images per request
MAX_BODY_BYTES = 64 * 1024  # 256 labels and a seed fit in ~2 KiB; anything near this is not a real request
MAX_SEED = 2**63 - 1


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


class ServeArgs(BaseModel):
    """Arguments of `serve run gan_ray.serve:app model=DIR key=value ...` (and of a config file's `args:`).

    Stable: the KubeRay RayService passes the same names."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="exported model directory (gan-ray export / a sweep's best model)")
    min_replicas: int = Field(1, ge=0, description="replicas the autoscaler keeps at least")
    max_replicas: int = Field(4, ge=1, description="replicas the autoscaler adds at most")
    initial_replicas: Optional[int] = Field(None, ge=0, description="replicas at start (default: min_replicas)")
    target_ongoing: float = Field(8.0, gt=0, description="ongoing requests per replica the autoscaler aims at")
    max_ongoing: Optional[int] = Field(None, ge=1, description="requests a replica accepts at once; must exceed "
                                                               "target_ongoing (default: max(32, 2 x target + 1))")
    max_batch_size: int = Field(32, ge=1, description="requests merged into one forward (capped at max_ongoing)")
    batch_wait_timeout_s: float = Field(0.0, ge=0, description="how long a batch waits for more requests "
                                                               "(0: take what is queued)")
    upscale_delay_s: float = Field(5.0, ge=0, description="load must stay high this long before scaling up")
    downscale_delay_s: float = Field(60.0, ge=0, description="load must stay low this long before scaling down")
    look_back_period_s: float = Field(10.0, gt=0, description="window the autoscaler averages load over")
    metrics_interval_s: float = Field(2.0, gt=0, description="how often load is reported to the autoscaler")
    cpus_per_replica: float = Field(1.0, ge=0, description="CPUs reserved per replica")
    gpus_per_replica: float = Field(0.0, ge=0, description="GPUs per replica (a fraction packs several on one)")
    torch_threads: int = Field(1, ge=1, description="intra-op threads per CPU replica (Serve scales by replicas)")
    health_check_period_s: float = Field(10.0, gt=0, description="how often the controller checks replicas")
    health_check_timeout_s: float = Field(30.0, gt=0, description="a replica silent this long is replaced")
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
