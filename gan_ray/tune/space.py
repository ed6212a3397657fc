"""What a sweep searches and how it runs, parsed from flags and YAML: pure Python, no Ray (the Tune objects are
made in gan_ray.tune.schedulers).

Every TrainConfig field can be fixed or searched. On the command line a value is
  `2e-4`            fixed
  `1e-5:1e-2`       log-uniform range (floats and integers; both bounds positive, low < high)
  `0.3:0.7:lin`     uniform range (`:log` spells the default explicitly)
  `32,64,128`       a choice among values
In a `--space FILE.yaml` the same strings work, and also YAML lists (a choice) and mappings
`{loguniform: [lo, hi]}`, `{uniform: [lo, hi]}`, `{choice: [...]}`. Flags override the file; the default space
(`lr_g`, `lr_d` log-uniform in [2e-5, 2e-3], `latent_dim` in {16, 32, 64, 100, 128}) fills what neither gives.
A sweep of `--arch resnet` adds its own defaults (`ARCH_SPACES`): the widths, and R1's gamma with R2's tied to it
(R3GAN's regulariser is both penalties at one gamma: `SearchSpace.tied`, applied to every trial's config).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Union

from pydantic import Field, model_validator

from gan_ray.core.config import TrainConfig
from gan_ray.core.errors import UserError
from gan_ray.core.settings import RunName, Settings, field_kind, flag_name

# The objective: every trial reports `fd` (lower is better) each epoch; ASHA rungs and PBT intervals count epochs
# (robust to restarts, unlike Tune's training_iteration).
METRIC, MODE = "fd", "min"
TIME_ATTR = "epoch"


@dataclass(frozen=True)
class Range:
    """A continuous (float) or integer range; `log` samples the logarithm uniformly."""

    low: float
    high: float
    log: bool = True

    def describe(self) -> str:
        return f"{'log-uniform' if self.log else 'uniform'} [{self.low:g}, {self.high:g}]"


@dataclass(frozen=True)
class Choice:
    """One of a list of values, each equally likely."""

    values: tuple

    def describe(self) -> str:
        return "{" + ", ".join(str(v) for v in self.values) + "}"


Dimension = Union[Range, Choice]

DRIVER_CPU = 0.01  # a trial's driver only waits on Train; it must not take a worker's CPU slot
Scheduler = Literal["asha", "pbt", "none"]
Searcher = Literal["random", "optuna"]

DEFAULT_SPACE: dict[str, Dimension] = {
    "lr_g": Range(2e-5, 2e-3),
    "lr_d": Range(2e-5, 2e-3),
    "latent_dim": Choice((16, 32, 64, 100, 128)),
}

# What a sweep of an architecture searches besides DEFAULT_SPACE, unless the flags or the file give these fields.
# resnet: the widths (channels at full resolution; 16 trains about 3x faster than 32 on CPUs) and R1's gamma, on
# [0, 1] pixels, around what the recipes use (0.2-1); R2 follows R1 (ARCH_TIES) unless it is given.
ARCH_SPACES: dict[str, dict[str, Dimension]] = {
    "resnet": {"g_width": Choice((16, 32)), "d_width": Choice((16, 32)), "r1_gamma": Range(0.05, 5.0)},
}
ARCH_TIES: dict[str, dict[str, str]] = {"resnet": {"r2_gamma": "r1_gamma"}}  # field -> the field it copies

# Fields a sweep sets itself or that would make trials incomparable: they can be fixed, never searched.
NOT_SEARCHABLE = {
    "epochs": "it is the per-trial budget (--epochs)",
    "workers": "it is a resource (--workers-per-trial)",
    "gpus_per_worker": "it is a resource",
    "cpus_per_worker": "it is a resource",
    "storage": "it is where the sweep is written",
    "name": "it names the sweep",
    "data_dir": "it is a location",
    "dataset": "fd is not comparable across datasets",
    "eval_samples": "fd's bias depends on the sample count, so trials would not be comparable",
    "eval_every": "the sweep sets it",
    "checkpoint_every": "the sweep sets it",
    "max_failures": "it is a fault-tolerance setting",
    "eval_full": "the sweep's objective, fd, is in every evaluation anyway",
    "stop_on_collapse": "it is how a run ends, not how it trains",
}


@dataclass
class SearchSpace:
    """Fixed values (TrainConfig field -> value) and searched dimensions (field -> Range/Choice)."""

    fixed: dict[str, Any]
    dims: dict[str, Dimension]
    tied: dict[str, str] = field(default_factory=dict)  # field -> the searched field whose drawn value it takes

    def describe(self) -> list[str]:
        return ([f"{name}: {dim.describe()}" for name, dim in self.dims.items()]
                + [f"{name}: = {source}" for name, source in self.tied.items()])

    def values(self, draw: Mapping[str, Any]) -> dict[str, Any]:
        """A trial's TrainConfig values: the fixed ones, its draw (coerced to field types) and the tied fields."""
        values = {**self.fixed, **{k: TrainConfig.parse_value(k, v) for k, v in draw.items()}}
        values.update({name: values[source] for name, source in self.tied.items() if source in values})
        return values


def _number(name: str, text: str, where: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise UserError(f"{where}: {text!r} is not a number") from None
    if not math.isfinite(v):
        raise UserError(f"{where}: {text!r} is not a finite number")
    return v


def parse_range(name: str, low: Any, high: Any, log: bool, where: str) -> Range:
    """A validated range for a numeric field: low < high, both positive for a log range, integers for ints."""
    kind = field_kind(TrainConfig, name)
    if kind not in (int, float):
        raise UserError(f"{where}: a range needs a numeric flag; {flag_name(name)} is {kind.__name__} (use a,b,c)")
    lo, hi = _number(name, str(low), where), _number(name, str(high), where)
    if not lo < hi:
        raise UserError(f"{where}: range {low}:{high} is empty or reversed (write LOW:HIGH with LOW < HIGH)")
    if log and lo <= 0:
        raise UserError(f"{where}: a log range needs positive bounds, got {low}:{high} (add :lin for a uniform one)")
    if kind is int:
        if not (lo.is_integer() and hi.is_integer()):
            raise UserError(f"{where}: {flag_name(name)} is an integer; range bounds must be integers, got {low}:{high}")
        lo, hi = int(lo), int(hi)
    return Range(lo, hi, log)


def parse_choice(name: str, values: list, where: str) -> Choice:
    if not values:
        raise UserError(f"{where}: empty choice")
    out = []
    for v in values:
        v = v.strip() if isinstance(v, str) else v
        if v == "":
            raise UserError(f"{where}: empty value in choice")
        try:
            out.append(TrainConfig.parse_value(name, v))
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
    if len(set(out)) != len(out):
        raise UserError(f"{where}: repeated value in choice {values}")
    return Choice(tuple(out))


def parse_text(name: str, text: str, where: str | None = None) -> Any:
    """A flag's text -> a fixed value, a Range or a Choice."""
    where = where or f"{flag_name(name)} {text}"
    kind = field_kind(TrainConfig, name)
    text = text.strip()
    if kind in (int, float) and ":" in text:
        parts = text.split(":")
        if len(parts) == 3 and parts[2] in ("log", "lin"):
            return parse_range(name, parts[0], parts[1], parts[2] == "log", where)
        if len(parts) != 2:
            raise UserError(f"{where}: expected LOW:HIGH or LOW:HIGH:lin")
        return parse_range(name, parts[0], parts[1], True, where)
    if "," in text and not (kind is str and name == "dataset"):
        return parse_choice(name, text.split(","), where)
    try:
        return TrainConfig.parse_value(name, text)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None


def parse_file_value(name: str, value: Any, where: str) -> Any:
    """A YAML value -> fixed value, Range or Choice."""
    if isinstance(value, str):
        return parse_text(name, value, where)
    if isinstance(value, list):
        return parse_choice(name, value, where)
    if isinstance(value, dict):
        if len(value) != 1:
            raise UserError(f"{where}: expected one of loguniform: [lo, hi], uniform: [lo, hi], choice: [...]")
        (kind, arg), = value.items()
        if kind == "choice" and isinstance(arg, list):
            return parse_choice(name, arg, where)
        if kind in ("loguniform", "uniform") and isinstance(arg, list) and len(arg) == 2:
            return parse_range(name, arg[0], arg[1], kind == "loguniform", where)
        raise UserError(f"{where}: expected one of loguniform: [lo, hi], uniform: [lo, hi], choice: [...]")
    try:
        return TrainConfig.parse_value(name, value)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None


def _known(name: str, source: str) -> str:
    norm = name.replace("-", "_")
    if norm not in TrainConfig.model_fields:
        raise UserError(f"unknown key {name!r} in {source} (keys are training flags, e.g. lr_g, latent_dim)")
    return norm


def build_space(cli_values: Mapping[str, str], file_values: Mapping[str, Any] | None = None, *,
                file_name: str = "the space file", use_defaults: bool = True) -> SearchSpace:
    """Merge the default space < the space file < command-line flags into fixed values and dimensions.

    `cli_values` are the flag texts of `add_settings_flags` that were actually given.
    """
    given: dict[str, Any] = {}
    for key, value in (file_values or {}).items():
        name = _known(str(key), file_name)
        given[name] = parse_file_value(name, value, f"{file_name}: {key}")
    for key, text in cli_values.items():
        name = _known(key, "flags")
        given[name] = parse_text(name, str(text))
    parsed: dict[str, Any] = dict(DEFAULT_SPACE) if use_defaults else {}
    tied: dict[str, str] = {}
    arch = given.get("arch")
    if use_defaults and isinstance(arch, str):
        parsed.update(ARCH_SPACES.get(arch, {}))
        tied = {k: v for k, v in ARCH_TIES.get(arch, {}).items() if k not in given}
    parsed.update(given)
    fixed = {k: v for k, v in parsed.items() if not isinstance(v, (Range, Choice))}
    dims = {k: v for k, v in parsed.items() if isinstance(v, (Range, Choice))}
    for name in dims:
        if name in NOT_SEARCHABLE:
            raise UserError(f"{flag_name(name)} cannot be searched: {NOT_SEARCHABLE[name]}; give one value")
    space = SearchSpace(fixed, dims, {k: v for k, v in tied.items() if v in dims or v in fixed})
    check_values(space)
    return space


def corner_configs(space: SearchSpace) -> list[dict[str, Any]]:
    """Configs that put each dimension at each of its extremes/choices (others at their first value):
    validating these catches a bad value anywhere in the space before a single trial starts."""
    def first(dim: Dimension) -> Any:
        return dim.low if isinstance(dim, Range) else dim.values[0]

    base = {k: first(d) for k, d in space.dims.items()}
    out = [space.values(base)]
    for name, dim in space.dims.items():
        values = (dim.low, dim.high) if isinstance(dim, Range) else dim.values
        out.extend(space.values({**base, name: v}) for v in values)
    return out


def check_values(space: SearchSpace) -> None:
    """Every value the sweep can draw must make a valid TrainConfig (e.g. `--latent-dim 0,64` fails here)."""
    for values in corner_configs(space):
        TrainConfig.from_mapping(values)


def sample_config(space: SearchSpace, draw: Mapping[str, Any]) -> TrainConfig:
    """The TrainConfig of one trial: the fixed values plus the trial's drawn values (coerced to field types)."""
    return TrainConfig.from_mapping(space.values(draw))


def space_to_json(space: SearchSpace) -> dict[str, Any]:
    """A JSON-able description (saved with the sweep so a resume can check it is the same sweep)."""
    dims = {}
    for name, dim in space.dims.items():
        if isinstance(dim, Range):
            dims[name] = {"loguniform" if dim.log else "uniform": [dim.low, dim.high]}
        else:
            dims[name] = {"choice": list(dim.values)}
    out = {"fixed": dict(sorted(space.fixed.items())), "dims": dict(sorted(dims.items()))}
    if space.tied:  # only when there are ties: an older sweep's description stays the same
        out["tied"] = dict(sorted(space.tied.items()))
    return out


class SweepSettings(Settings):
    """How the sweep runs (the space and the fixed training values are in SearchSpace); validated on construction,
    bad values raise UserError naming the flag."""

    trials: int = Field(8, ge=1, description="number of trials")
    epochs: int = Field(10, ge=1, description="epochs per trial, at most")
    scheduler: Scheduler = Field("asha", description="asha (stop weak trials early) | pbt (evolve learning rates) "
                                                     "| none")
    grace_period: int = Field(1, ge=1, description="ASHA: epochs every trial runs before it can be stopped")
    reduction_factor: float = Field(3.0, gt=1, description="ASHA: at each rung only the best 1/N trials go on")
    perturbation_interval: Optional[int] = Field(None, ge=1, description="PBT: epochs between exploit/explore steps "
                                                                         "(default: about a quarter of --epochs)")
    search: Searcher = Field("random", description="random | optuna (needs the optuna package)")
    workers_per_trial: int = Field(1, ge=1, description="Ray Train workers per trial")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per worker; fractions pack several trials on one GPU")
    cpus_per_worker: Optional[float] = Field(None, gt=0, description="CPUs per worker (default: fill one CPU per "
                                                                     "worker together with the trial's driver)")
    max_concurrent: Optional[int] = Field(None, ge=1, description="trials running at once (default: as many as the "
                                                                  "cluster can hold)")
    storage: str = Field("./runs", description="root directory of sweeps")
    name: RunName = Field("sweep", description="sweep name; re-using it resumes the sweep")
    seed: int = Field(0, description="seeds the search and every trial's training")

    @model_validator(mode="after")
    def _check(self) -> "SweepSettings":
        if self.grace_period > self.epochs:
            raise ValueError(f"--grace-period must lie in 1..--epochs ({self.epochs}), got {self.grace_period}")
        if "://" in self.storage:
            raise ValueError(f"--storage {self.storage}: a sweep's trials share files (lineage, placement groups, "
                             "PBT's donor checkpoints) on a file system, a shared mount on a cluster; object storage "
                             "holds `gan-ray train` runs and datasets (docs/deploy.md)")
        if self.perturbation_interval is None:
            object.__setattr__(self, "perturbation_interval", max(1, self.epochs // 4))
        if self.search == "optuna":
            import importlib.util

            if importlib.util.find_spec("optuna") is None:
                raise ValueError("--search optuna needs the optuna package (pip install 'gan-ray[optuna]')")
        return self

    @property
    def worker_cpus(self) -> float:
        return self.cpus_per_worker if self.cpus_per_worker is not None else 1.0 - DRIVER_CPU / self.workers_per_trial

    @property
    def path(self) -> Path:
        return Path(self.storage).expanduser().resolve() / self.name
