"""What the service takes: the request body of `POST /v1/generate`, its responses' shapes, and `ServeArgs`, the
settings of a deployment (the same names for `gan-ray serve` flags, `serve run gan_ray.serve:app key=value` and a
config file's or the RayService's `args:`). Pydantic, no Ray.
"""

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator, model_validator

from gan_ray.core.errors import UserError
from gan_ray.core.settings import Settings
from gan_ray.core.handwriting import MAX_TEXT, MAX_WRITERS, TEXT_PATTERN, text_line

API_VERSION = "v1"
APP_NAME = "gan-ray"
MAX_N = 256  # images per request
MAX_BODY_BYTES = 64 * 1024  # 256 labels and a seed fit in ~2 KiB; anything near this is not a real request
MAX_SEED = 2**63 - 1
# Cells (n x len(text)) of one text request, answered 413 past it: as many images as four full single-image
# requests (a 16 x 64 or 64 x 16 page), 70 ms (png) to 145 ms (json) on one core, so one request cannot hold a
# replica for long.
MAX_TEXT_CELLS = 1024


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
    # The pattern is documented in the schema (fuzzers and clients read it) and checked by _digits_and_spaces,
    # whose message says which characters are wrong rather than quoting a regex.
    text: Optional[Annotated[StrictStr, Field(min_length=1, max_length=MAX_TEXT,
                                              json_schema_extra={"pattern": TEXT_PATTERN})]] = Field(
        None,
        description=f"digits and spaces (1..{MAX_TEXT} characters) written by n writers (1..{MAX_WRITERS}), a line "
                    "each: one latent per writer for every character, spaces blank; conditional models only, not with "
                    f"labels; n x len(text) at most {MAX_TEXT_CELLS} (413 past it)")
    format: Literal["png", "npz", "json"] = Field(
        "png", description="png: one grid image (text: a row per writer); npz: arrays images float32 [N,C,H,W] "
                           "(text: [n,L,C,H,W]) and labels int64 (-1 = unconditional or a space), as `gan-ray sample` "
                           "writes; json: base64 PNG per image with labels (text: nested per writer)")

    @field_validator("text")
    @classmethod
    def _digits_and_spaces(cls, text: Optional[str]) -> Optional[str]:
        if text is not None:
            try:
                text_line(text)
            except UserError as exc:  # pydantic reports a ValueError under the field's name
                raise ValueError(str(exc)) from None
        return text

    @model_validator(mode="after")
    def _labels_match_n(self) -> "GenerateRequest":
        if self.text is not None:
            if self.labels is not None:
                raise ValueError("give either text (a line per writer) or labels (one class per image), not both")
            if self.n > MAX_WRITERS:
                raise ValueError(f"n is {self.n}, but text is written by 1..{MAX_WRITERS} writers (n)")
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


class WrittenText(BaseModel):
    """The `json` format of a text request: per writer, a line of images."""

    n: int = Field(description="writers (lines)")
    seed: int
    text: str
    image_shape: list[int] = Field(description="C, H, W")
    labels: list[list[int]] = Field(description="[n][len(text)]: the digit of each cell, -1 for a space")
    images: list[list[str]] = Field(description="[n][len(text)]: base64-encoded PNG per cell (a space is blank)")


ERRORS = {400: {"model": ErrorBody, "description": "malformed Content-Length header"},
          413: {"model": ErrorBody, "description": f"body too large, or a text request over {MAX_TEXT_CELLS} "
                                                   "characters in all (n x len(text))"},
          422: {"model": ErrorBody, "description": "invalid request: `detail` says what is wrong"}}


MEDIA = {"png": "image/png", "npz": "application/x-npz", "json": "application/json"}


class ServeArgs(Settings):
    """Arguments of `serve run gan_ray.serve:app model=DIR key=value ...` (and of a config file's `args:`).

    Stable: the KubeRay RayService passes the same names."""

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
