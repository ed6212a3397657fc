"""Typed training configuration: defaults < YAML file < command-line flags.

One dataclass holds every knob of a run. The CLI builds its flags from the fields (so a new field is a new flag),
Tune turns fields into search dimensions, and the resolved config is saved into every checkpoint and export so a
model can be rebuilt without the command that made it.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from gan_ray.errors import UserError

ARCHS = ("mlp", "dcgan")
LOSSES = ("bce", "hinge")
PRECISIONS = ("auto", "fp32", "tf32", "bf16")
CUDA_GRAPH_MODES = ("auto", "on", "off")
BUILTIN_DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10")


def _opt(help: str, **kw: Any) -> Any:
    """A dataclass field whose metadata carries its CLI help (and optional choices)."""
    default = kw.pop("default")
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Everything that defines a training run. Field names are the CLI flags (underscores become dashes)."""

    # data
    dataset: str = _opt("digits | mnist | fashion-mnist | cifar10 | folder:PATH", default="digits")
    data_dir: str = _opt("where torchvision datasets are downloaded / looked for", default="~/.cache/gan-ray/data")
    image_size: int = _opt("side length images are resized to (folder datasets; 28/32/64 for dcgan)", default=28)
    # model
    arch: str = _opt("generator/discriminator architecture", default="mlp", choices=ARCHS)
    conditional: bool = _opt("class-conditional G and D (labelled datasets only)", default=False)
    latent_dim: int = _opt("size of the noise vector z", default=100)
    ema: bool = _opt("keep an exponential moving average of G for sampling/export", default=True)
    ema_halflife_kimg: float = _opt("EMA half-life in thousands of images seen", default=5.0)
    # optimisation
    loss: str = _opt("adversarial loss", default="bce", choices=LOSSES)
    lr_g: float = _opt("generator Adam learning rate", default=2e-4)
    lr_d: float = _opt("discriminator Adam learning rate", default=2e-4)
    beta1: float = _opt("Adam beta1 for both optimisers", default=0.5)
    beta2: float = _opt("Adam beta2 for both optimisers", default=0.999)
    d_steps: int = _opt("discriminator updates per generator update", default=1)
    batch_size: int = _opt("images per worker per step", default=64)
    epochs: int = _opt("total epochs (a resumed run stops at this total)", default=20)
    seed: int = _opt("seed for weights, data order and noise", default=0)
    # speed (GPU fast paths; CPU runs the same math eagerly). `auto` = the fastest path that stays correct on the
    # worker's device (see gan_ray/fast_step.py): on CPU exactly the fp32 eager step.
    precision: str = _opt("fp32 | tf32 (CUDA matmul/conv) | bf16 (autocast, fp32 weights) | auto (CPU: fp32; "
                          "GPU: bf16 for dcgan, tf32 for mlp)", default="auto", choices=PRECISIONS)
    cuda_graph: str = _opt("capture the whole adversarial step in one CUDA graph: on | off | auto (on with one GPU "
                           "worker)", default="auto", choices=CUDA_GRAPH_MODES, const="on")
    compile: bool = _opt("torch.compile G and D (start-up cost of a minute or more)", default=False)
    # Ray Train
    workers: int = _opt("data-parallel workers (Ray Train)", default=2)
    gpus_per_worker: float = _opt("GPUs per worker (0 = CPU training)", default=0.0)
    cpus_per_worker: float = _opt("CPUs reserved per worker", default=1.0)
    max_failures: int = _opt("worker failures tolerated; each restarts from the last checkpoint", default=2)
    # outputs
    storage: str = _opt("root directory of runs", default="./runs")
    name: str = _opt("run name; re-using it resumes the run", default="gan")
    checkpoint_every: int = _opt("epochs between checkpoints (one is always written at the end)", default=5)
    keep: int = _opt("checkpoints kept", default=3)
    sample_every: int = _opt("epochs between sample grids (0 = never)", default=1)
    eval_every: int = _opt("epochs between quality evaluations (0 = only at checkpoints)", default=0)
    eval_samples: int = _opt("generated images scored per evaluation", default=1000)

    # ----------------------------------------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        """Reject values that cannot work, with a message naming the flag. Returns self for chaining."""
        from gan_ray.data import validate_dataset_name  # local: keeps config importable on its own

        validate_dataset_name(self.dataset)
        if self.arch not in ARCHS:
            raise UserError(f"unknown --arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.loss not in LOSSES:
            raise UserError(f"unknown --loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown --precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        self.cuda_graph = _graph_mode(self.cuda_graph)
        if self.cuda_graph == "on" and not self.gpus_per_worker:
            raise UserError("--cuda-graph on needs GPU workers (--gpus-per-worker 1); CPU training runs eagerly")
        if self.cuda_graph == "on" and self.workers > 1:
            raise UserError("--cuda-graph on supports one worker only (DDP's all-reduce is not captured); use "
                            "--workers 1 or --cuda-graph auto")
        for name in ("lr_g", "lr_d", "ema_halflife_kimg", "cpus_per_worker"):
            if not getattr(self, name) > 0:
                raise UserError(f"--{_flag(name)} must be positive, got {getattr(self, name)}")
        for name in ("batch_size", "epochs", "latent_dim", "d_steps", "workers", "checkpoint_every", "keep",
                     "image_size", "eval_samples"):
            if getattr(self, name) < 1:
                raise UserError(f"--{_flag(name)} must be a positive integer, got {getattr(self, name)}")
        for name in ("max_failures", "sample_every", "eval_every", "gpus_per_worker"):
            if getattr(self, name) < 0:
                raise UserError(f"--{_flag(name)} must not be negative, got {getattr(self, name)}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise UserError("--beta1 and --beta2 must lie in [0, 1)")
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise UserError(f"--name must be a plain directory name, got {self.name!r}")
        return self

    @property
    def run_dir(self) -> Path:
        """Where this run's checkpoints, metrics and samples live."""
        return Path(self.storage).expanduser().resolve() / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> "TrainConfig":
        """Build from a mapping, rejecting unknown keys (a typo must not silently fall back to a default)."""
        known = {f.name for f in fields(cls)}
        norm = {k.replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(norm) - known)
        if unknown:
            raise UserError(f"unknown key(s) in {source}: {', '.join(unknown)}")
        return cls(**{k: coerce(k, v) for k, v in norm.items()})


def _graph_mode(value: object) -> str:
    """--cuda-graph as auto/on/off; true/false spellings (YAML booleans, older configs) are accepted."""
    text = str(value).lower()
    mode = {"true": "on", "1": "on", "yes": "on", "false": "off", "0": "off", "no": "off"}.get(text, text)
    if mode not in CUDA_GRAPH_MODES:
        raise UserError(f"unknown --cuda-graph {value!r}; choose one of {', '.join(CUDA_GRAPH_MODES)}")
    return mode


def _flag(name: str) -> str:
    return name.replace("_", "-")


def field_types() -> dict[str, type]:
    """Each field's Python type (bool, int, float or str), for CLI parsing and coercion."""
    out = {}
    for f in fields(TrainConfig):
        out[f.name] = {"bool": bool, "int": int, "float": float, "str": str}[str(f.type)]
    return out


def coerce(name: str, value: Any) -> Any:
    """Convert a value from YAML/CLI/Tune to the field's type, with a clear error."""
    kind = field_types()[name]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise UserError(f"--{_flag(name)} expects true/false, got {value!r}")
    try:
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise UserError(f"--{_flag(name)} expects {kind.__name__}, got {value!r}") from None


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


def resolve(file_values: dict[str, Any] | None, cli_values: dict[str, Any]) -> TrainConfig:
    """Defaults, then the config file, then flags given on the command line; validated."""
    merged: dict[str, Any] = {}
    if file_values:
        merged.update({k.replace("-", "_"): v for k, v in file_values.items()})
    merged.update(cli_values)
    return TrainConfig.from_dict(merged).validate()


def save_json(cfg: TrainConfig, path: Path) -> None:
    path.write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
