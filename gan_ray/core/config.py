"""Typed training configuration: defaults < YAML file < command-line flags, validated once, on construction.

One pydantic model holds every knob of a run (`extra="forbid"`: a misspelt key is an error, not a silent
default). The CLI builds its flags from the fields (so a new field is a new flag), Tune turns fields into search
dimensions, and the resolved config is saved into every checkpoint and export so a model can be rebuilt without
the command that made it. Bad values raise `UserError` naming the flag, whatever the source (flag, YAML, Tune).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gan_ray.core.errors import UserError

ARCHS = ("mlp", "seed", "dcgan")
LOSSES = ("bce", "hinge", "mse", "lsgan", "rpgan")
OPTIMIZERS = ("adam", "rmsprop")
PRECISIONS = ("auto", "fp32", "tf32", "bf16")
CUDA_GRAPH_MODES = ("auto", "on", "off")
BUILTIN_DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10")
# Where torchvision datasets are downloaded to / looked for, unless --data-dir says otherwise.
DEFAULT_DATA_DIR = "~/.cache/gan-ray/data"


def _opt(default: Any, help: str, **cli: Any) -> Any:
    """A field with its CLI help; `cli` holds argparse extras (choices, const) for the flag built from it."""
    return Field(default, description=help, json_schema_extra=cli or None)


def flag_name(name: str) -> str:
    """The command-line flag of a field: `lr_g` -> `--lr-g`."""
    return "--" + name.replace("_", "-")


class TrainConfig(BaseModel):
    """Everything that defines a training run. Field names are the CLI flags (underscores become dashes)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # data
    dataset: str = _opt("digits", "digits | mnist | fashion-mnist | cifar10 | folder:PATH")
    data_dir: str = _opt(DEFAULT_DATA_DIR, "where torchvision datasets are downloaded / looked for")
    image_size: int = _opt(28, "side length images are resized to (folder datasets; 28/32/64 for dcgan)")
    # model
    arch: str = _opt("mlp", "generator/discriminator architecture: mlp (LeakyReLU), seed (the article's ReLU "
                     "MLPs, exactly) or dcgan", choices=ARCHS)
    conditional: bool = _opt(False, "class-conditional G and D (labelled datasets only)")
    latent_dim: int = _opt(100, "size of the noise vector z")
    g_width: int = _opt(0, "dcgan: G's base channels, doubled per resolution step (0 = 64)")
    d_width: int = _opt(0, "dcgan: D's base channels, doubled per resolution step (0 = 64)")
    spectral_norm: bool = _opt(False, "spectral normalisation on every layer of D")
    aux_weight: float = _opt(0.0, "conditional: weight of an auxiliary class head on D (AC-GAN): D learns to "
                             "classify reals, G to make its images read as the asked class (0 = off)")
    ema: bool = _opt(True, "keep an exponential moving average of G for sampling/export")
    ema_halflife_kimg: float = _opt(5.0, "EMA half-life in thousands of images seen")
    # optimisation
    loss: str = _opt("bce", "adversarial loss: bce (non-saturating), hinge, mse (the seed article's, on D's "
                     "probability), lsgan (least squares on D's raw output), rpgan (relativistic pairing)",
                     choices=LOSSES)
    optimizer: str = _opt("adam", "optimiser of both networks", choices=OPTIMIZERS)
    lr_g: float = _opt(2e-4, "generator learning rate")
    lr_d: float = _opt(2e-4, "discriminator learning rate")
    beta1: float = _opt(0.5, "Adam beta1 (RMSprop: momentum) of G, and of D unless --beta1-d")
    beta2: float = _opt(0.999, "Adam beta2 (RMSprop: squared-gradient decay) of G, and of D unless --beta2-d")
    beta1_d: Optional[float] = _opt(None, "D's own beta1 / momentum (default: --beta1)")
    beta2_d: Optional[float] = _opt(None, "D's own beta2 / decay (default: --beta2)")
    d_steps: int = _opt(1, "discriminator updates per generator update")
    # R1 on by default: without it the default MLP collapses onto one digit within an epoch of real MNIST; gamma
    # 10 every 4 D steps keeps all ten classes (measured, docs/metrics.md#recipes-measured). Recipes pin their own.
    r1_gamma: float = _opt(10.0, "R1 penalty weight: gamma/2 * E||grad D(real)||^2 (0 = off)")
    r1_every: int = _opt(4, "apply R1 (and R2) every N discriminator steps, scaled by N (lazy regularisation)")
    r2_gamma: float = _opt(0.0, "R2 penalty weight, the same on generated images (0 = off)")
    augment: str = _opt("none", "differentiable augmentation of every image D sees, real and fake: a comma list "
                        "of translation, cutout, color (or none)")
    batch_size: int = _opt(64, "images per worker per step")
    epochs: int = _opt(20, "total epochs (a resumed run stops at this total)")
    seed: int = _opt(0, "seed for weights, data order and noise")
    # speed (GPU fast paths; CPU runs the same math eagerly). `auto` = the fastest path that stays correct on the
    # worker's device (see gan_ray/core/fast_step.py): on CPU exactly the fp32 eager step.
    precision: str = _opt("auto", "fp32 | tf32 (CUDA matmul/conv) | bf16 (autocast, fp32 weights) | auto (CPU: "
                          "fp32; GPU: bf16 for dcgan, tf32 for mlp)", choices=PRECISIONS)
    cuda_graph: str = _opt("auto", "capture the whole adversarial step in one CUDA graph: on | off | auto (on with "
                           "one GPU worker)", choices=CUDA_GRAPH_MODES, const="on")
    compile: bool = _opt(False, "torch.compile G and D (start-up cost of a minute or more)")
    # Ray Train
    workers: int = _opt(2, "data-parallel workers (Ray Train)")
    gpus_per_worker: float = _opt(0.0, "GPUs per worker (0 = CPU training)")
    cpus_per_worker: float = _opt(1.0, "CPUs reserved per worker")
    max_failures: int = _opt(2, "worker failures tolerated; each restarts from the last checkpoint")
    # outputs
    storage: str = _opt("./runs", "root directory of runs")
    name: str = _opt("gan", "run name; re-using it resumes the run")
    checkpoint_every: int = _opt(5, "epochs between checkpoints (one is always written at the end)")
    keep: int = _opt(3, "checkpoints kept")
    sample_every: int = _opt(1, "epochs between sample grids (0 = never)")
    eval_every: int = _opt(0, "epochs between quality evaluations (0 = only at checkpoints)")
    eval_samples: int = _opt(1000, "generated images scored per evaluation")
    eval_full: bool = _opt(False, "every metric at each evaluation, precision/recall included (slow on large "
                           "held-out sets: tens of seconds on MNIST)")
    stop_on_collapse: bool = _opt(False, "end the run (exit 1) when training has failed and is not recovering")

    def __init__(self, **values: Any) -> None:
        """Coerce each value to its field's type (YAML, flags and Tune give text or loose numbers), then validate;
        any failure is one UserError naming the flag."""
        unknown = sorted(set(values) - set(type(self).model_fields))
        if unknown:
            raise UserError(f"unknown key(s) in config: {', '.join(unknown)}")
        try:
            super().__init__(**{k: coerce(k, v) for k, v in values.items()})
        except ValidationError as exc:
            raise UserError(validation_message(exc)) from None

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        """Reject values that cannot work, with a message naming the flag."""
        check_dataset_name(self.dataset)
        if self.arch not in ARCHS:
            raise ValueError(f"unknown --arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown --loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown --optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        from gan_ray.core.augment import parse_policy  # the ops' names live with the ops

        parse_policy(self.augment)
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown --precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        mode = graph_mode(self.cuda_graph)
        if mode != self.cuda_graph:
            object.__setattr__(self, "cuda_graph", mode)  # normalised in place (no re-validation loop)
        if mode == "on" and not self.gpus_per_worker:
            raise ValueError("--cuda-graph on needs GPU workers (--gpus-per-worker 1); CPU training runs eagerly")
        if mode == "on" and self.workers > 1:
            raise ValueError("--cuda-graph on supports one worker only (DDP's all-reduce is not captured); use "
                             "--workers 1 or --cuda-graph auto")
        if mode == "on" and self.eager_only_settings():
            raise ValueError(f"--cuda-graph on captures the plain step only; "
                             f"{', '.join(self.eager_only_settings())} run(s) eagerly (use --cuda-graph auto, or turn "
                             "them off: R1 is on by default, --r1-gamma 0)")
        for name in ("lr_g", "lr_d", "ema_halflife_kimg", "cpus_per_worker", "r1_every"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{flag_name(name)} must be positive, got {getattr(self, name)}")
        for name in ("batch_size", "epochs", "latent_dim", "d_steps", "workers", "checkpoint_every", "keep",
                     "image_size", "eval_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{flag_name(name)} must be a positive integer, got {getattr(self, name)}")
        for name in ("max_failures", "sample_every", "eval_every", "gpus_per_worker", "r1_gamma", "r2_gamma",
                     "g_width", "d_width", "aux_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{flag_name(name)} must not be negative, got {getattr(self, name)}")
        betas = [b for b in (self.beta1, self.beta2, self.beta1_d, self.beta2_d) if b is not None]
        if not all(0 <= b < 1 for b in betas):
            raise ValueError("--beta1, --beta2, --beta1-d and --beta2-d must lie in [0, 1)")
        if self.aux_weight and not self.conditional:
            raise ValueError("--aux-weight trains a class head on D: it needs --conditional")
        if (self.g_width or self.d_width) and self.arch != "dcgan":
            raise ValueError(f"--g-width and --d-width set a dcgan's channels; --arch {self.arch} has fixed sizes")
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise ValueError(f"--name must be a plain directory name, got {self.name!r}")
        return self

    def eager_only_settings(self) -> tuple[str, ...]:
        """The flags in use that the whole-step CUDA graph does not capture (the stabilisers, RMSprop): with any of
        them `--cuda-graph auto` runs eagerly and `on` is refused (gan_ray.core.fast_step)."""
        out = [flag for flag, on in (("--r1-gamma", self.r1_gamma), ("--r2-gamma", self.r2_gamma),
                                     ("--augment", self.augment not in ("", "none")),
                                     ("--spectral-norm", self.spectral_norm),
                                     ("--aux-weight", self.aux_weight)) if on]
        if self.optimizer != "adam":
            out.append(f"--optimizer {self.optimizer}")
        return tuple(out)

    @property
    def run_dir(self) -> Path:
        """Where this run's checkpoints, metrics and samples live."""
        return Path(self.storage).expanduser().resolve() / self.name

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def replace(self, **changes: Any) -> "TrainConfig":
        """A validated copy with some values changed."""
        return TrainConfig(**{**self.to_dict(), **changes})

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> "TrainConfig":
        """Build from a mapping whose keys may use dashes, rejecting unknown keys (a typo must not silently fall
        back to a default); `source` names the mapping in that error."""
        norm = {str(k).replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(norm) - set(cls.model_fields))
        if unknown:
            raise UserError(f"unknown key(s) in {source}: {', '.join(unknown)}")
        return cls(**norm)


def validation_message(exc: ValidationError) -> str:
    """pydantic's first error as our one line: our own checks' text as is, a type error naming the flag."""
    err = exc.errors()[0]
    if err["type"] == "value_error":
        return str(err["msg"]).removeprefix("Value error, ")
    where = ".".join(str(p) for p in err.get("loc", ()))
    return f"{flag_name(where)}: {err['msg']}" if where else str(err["msg"])


def check_dataset_name(name: str) -> None:
    if name in BUILTIN_DATASETS:
        return
    if name.startswith("folder:"):
        if not name[len("folder:"):]:
            raise UserError("--dataset folder: needs a path, e.g. folder:/data/my-images")
        return
    raise UserError(f"unknown --dataset {name!r}; choose digits, mnist, fashion-mnist, cifar10 or folder:PATH")


def graph_mode(value: object) -> str:
    """--cuda-graph as auto/on/off; true/false spellings (YAML booleans, older configs) are accepted."""
    text = str(value).lower()
    mode = {"true": "on", "1": "on", "yes": "on", "false": "off", "0": "off", "no": "off"}.get(text, text)
    if mode not in CUDA_GRAPH_MODES:
        raise UserError(f"unknown --cuda-graph {value!r}; choose one of {', '.join(CUDA_GRAPH_MODES)}")
    return mode


def field_types() -> dict[str, type]:
    """Each field's Python type (bool, int, float or str; an Optional field's inner type), for CLI parsing and
    coercion."""
    import typing

    out = {}
    for name, f in TrainConfig.model_fields.items():
        kind = f.annotation
        if typing.get_origin(kind) is typing.Union:
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        out[name] = kind
    return out  # type: ignore[return-value]


def field_cli(name: str) -> dict[str, Any]:
    """A field's default, help text and argparse extras (choices, const), for the flag built from it."""
    f = TrainConfig.model_fields[name]
    return {"default": f.default, "help": f.description or "", **(f.json_schema_extra or {})}  # type: ignore[dict-item]


def coerce(name: str, value: Any) -> Any:
    """Convert a value from YAML/CLI/Tune to the field's type, with a clear error."""
    kind = field_types()[name]
    if value is None and TrainConfig.model_fields[name].default is None:
        return None
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise UserError(f"{flag_name(name)} expects true/false, got {value!r}")
    try:
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        if kind is int and isinstance(value, bool):
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise UserError(f"{flag_name(name)} expects {kind.__name__}, got {value!r}") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping of config values."""
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"config file {p} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must hold a mapping of flag: value")
    return data


def resolve(file_values: dict[str, Any] | None, cli_values: dict[str, Any], *, source: str = "config") -> TrainConfig:
    """Defaults, then the config file, then flags given on the command line; validated."""
    merged: dict[str, Any] = {}
    if file_values:
        merged.update({str(k).replace("-", "_"): v for k, v in file_values.items()})
    merged.update(cli_values)
    return TrainConfig.from_dict(merged, source=source)


def save_json(cfg: TrainConfig, path: Path) -> None:
    path.write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
