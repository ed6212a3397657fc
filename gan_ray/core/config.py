"""Typed training configuration: defaults < YAML file < command-line flags, validated once, on construction.

One settings model (`gan_ray.core.settings.Settings`: a misspelt key is an error, not a silent default) holds
every knob of a run. The CLI builds its flags from the fields (so a new field is a new flag), Tune turns fields
into search dimensions, and the resolved config is saved into every checkpoint and export so a model can be
rebuilt without the command that made it. Bad values raise `UserError` naming the flag, whatever the source (flag,
YAML, Tune).
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import AfterValidator, BeforeValidator, Field, model_validator

from gan_ray.core.errors import UserError
from gan_ray.core.settings import RunName, Settings

Arch = Literal["mlp", "seed", "dcgan", "resnet"]
ARCHS: tuple[str, ...] = Arch.__args__  # type: ignore[attr-defined]
PRECISIONS = ("auto", "fp32", "tf32", "bf16")
CUDA_GRAPH_MODES = ("auto", "on", "off")
BUILTIN_DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "stacked-mnist")
# Where torchvision datasets are downloaded to / looked for, unless --data-dir says otherwise.
DEFAULT_DATA_DIR = "~/.cache/gan-ray/data"


def _opt(default: Any, help: str, **extra: Any) -> Any:
    """A field with its CLI help (`extra`: its range, ge/gt/lt, and json_schema_extra={"const": ...} for a flag
    that may be given without a value)."""
    return Field(default, description=help, **extra)


def check_dataset_name(name: str) -> str:
    if name in BUILTIN_DATASETS:
        return name
    if name.startswith("folder:"):
        if not name[len("folder:"):]:
            raise UserError("--dataset folder: needs a path, e.g. folder:/data/my-images")
        return name
    if "/" in name or name.startswith(("~", ".")):  # a prepared dataset's path or URI (gan_ray.core.prepared)
        return name
    raise UserError(f"unknown --dataset {name!r}; choose digits, mnist, fashion-mnist, cifar10, stacked-mnist, "
                    "folder:PATH or a prepared dataset's path or URI (./prepared/mnist, s3://bucket/mnist)")


def graph_mode(value: object) -> str:
    """--cuda-graph as auto/on/off; true/false spellings (YAML booleans, older configs) are accepted."""
    text = str(value).lower()
    mode = {"true": "on", "1": "on", "yes": "on", "false": "off", "0": "off", "no": "off"}.get(text, text)
    if mode not in CUDA_GRAPH_MODES:
        raise UserError(f"unknown --cuda-graph {value!r}; choose one of {', '.join(CUDA_GRAPH_MODES)}")
    return mode


def _augment_policy(text: str) -> str:
    from gan_ray.core.augment import parse_policy  # the ops' names live with the ops

    parse_policy(text)
    return text


Beta = Annotated[float, Field(ge=0, lt=1)]


class TrainConfig(Settings):
    """Everything that defines a training run. Field names are the CLI flags (underscores become dashes)."""

    # data
    dataset: Annotated[str, AfterValidator(check_dataset_name)] = _opt(
        "digits", "digits | mnist | fashion-mnist | cifar10 | stacked-mnist | folder:PATH | a prepared dataset's "
        "path or URI (`gan-ray prepare`: ./prepared/x, s3://bucket/x)")
    data_dir: str = _opt(DEFAULT_DATA_DIR, "where torchvision datasets are downloaded / looked for")
    image_size: int = _opt(28, "side length images are resized to (folder datasets; 28/32/64 for dcgan, 28 or "
                           "32..256 powers of two for resnet; a prepared dataset's own unless given)", ge=1)
    data_mode: Literal["auto", "memory", "stream"] = _opt(
        "auto", "memory: every worker holds the decoded training split (the GPU fast path); stream: Ray Data "
        "streams a prepared dataset's shards to the workers; auto: memory when it fits comfortably in a worker "
        "(always, for built-in and folder: datasets)")
    # model
    arch: Arch = _opt("mlp", "generator/discriminator architecture: mlp (LeakyReLU), seed (the article's ReLU "
                      "MLPs, exactly), dcgan or resnet (R3GAN's modern ResNet)")
    conditional: bool = _opt(False, "class-conditional G and D (labelled datasets only)")
    latent_dim: int = _opt(100, "size of the noise vector z", ge=1)
    clusters: int = _opt(0, "unconditional models: train G and D conditioned on this many k-means clusters of the "
                         "training images (no labels used; z's last coordinate picks the cluster when sampling): "
                         "samples jump between modes instead of blending them (0 = off)", ge=0, le=1000)
    g_width: int = _opt(0, "dcgan, resnet: G's channels at full resolution, doubled per halving (0 = 64 for dcgan, "
                        "32 for resnet; resnet: a multiple of 8)", ge=0, le=1024)
    d_width: int = _opt(0, "dcgan, resnet: D's channels at full resolution, doubled per halving (0 = 64 for dcgan, "
                        "32 for resnet; resnet: a multiple of 8)", ge=0, le=1024)
    spectral_norm: bool = _opt(False, "spectral normalisation on every layer of D")
    aux_weight: float = _opt(0.0, "conditional: weight of an auxiliary class head on D (AC-GAN): D learns to "
                             "classify reals, G to make its images read as the asked class (0 = off)", ge=0)
    ema: bool = _opt(True, "keep an exponential moving average of G for sampling/export")
    ema_halflife_kimg: float = _opt(5.0, "EMA half-life in thousands of images seen", gt=0)
    # optimisation
    loss: Literal["bce", "hinge", "mse", "lsgan", "rpgan"] = _opt(
        "bce", "adversarial loss: bce (non-saturating), hinge, mse (the seed article's, on D's probability), lsgan "
        "(least squares on D's raw output), rpgan (relativistic pairing)")
    optimizer: Literal["adam", "rmsprop"] = _opt("adam", "optimiser of both networks")
    lr_g: float = _opt(2e-4, "generator learning rate", gt=0)
    lr_d: float = _opt(2e-4, "discriminator learning rate", gt=0)
    lr_final: float = _opt(1.0, "learning rates in the last epoch as a fraction of --lr-g and --lr-d, reached "
                           "along a cosine over the run's epochs or its last --lr-decay-epochs (1 = constant)",
                           gt=0, le=1)
    lr_decay_epochs: int = _opt(0, "--lr-final's cosine spans the run's last N epochs, the rates constant before "
                                "(0 = the whole run)", ge=0)
    beta1: Beta = _opt(0.5, "Adam beta1 (RMSprop: momentum) of G, and of D unless --beta1-d")
    beta2: Beta = _opt(0.999, "Adam beta2 (RMSprop: squared-gradient decay) of G, and of D unless --beta2-d")
    beta1_d: Optional[Beta] = _opt(None, "D's own beta1 / momentum (default: --beta1)")
    beta2_d: Optional[Beta] = _opt(None, "D's own beta2 / decay (default: --beta2)")
    d_steps: int = _opt(1, "discriminator updates per generator update", ge=1)
    # R1 on by default: without it the default MLP collapses onto one digit within an epoch of real MNIST; gamma
    # 10 every 4 D steps keeps all ten classes (measured, docs/metrics.md#recipes-measured). Recipes pin their own.
    r1_gamma: float = _opt(10.0, "R1 penalty weight: gamma/2 * E||grad D(real)||^2 (0 = off)", ge=0)
    r1_every: int = _opt(4, "apply R1 (and R2) every N discriminator steps, scaled by N (lazy regularisation)",
                         ge=1)
    r2_gamma: float = _opt(0.0, "R2 penalty weight, the same on generated images (0 = off)", ge=0)
    augment: Annotated[str, AfterValidator(_augment_policy)] = _opt(
        "none", "differentiable augmentation of every image D sees, real and fake: a comma list of translation, "
        "cutout, color (or none)")
    batch_size: int = _opt(64, "images per worker per step", ge=1)
    epochs: int = _opt(20, "total epochs (a resumed run stops at this total)", ge=1)
    seed: int = _opt(0, "seed for weights, data order and noise")
    # speed (GPU fast paths; CPU runs the same math eagerly). `auto` = the fastest path that stays correct on the
    # worker's device (see gan_ray/core/fast_step.py): on CPU exactly the fp32 eager step.
    precision: Literal["auto", "fp32", "tf32", "bf16"] = _opt(
        "auto", "fp32 | tf32 (CUDA matmul/conv) | bf16 (autocast, fp32 weights) | auto (CPU: fp32; GPU: bf16 for "
        "dcgan and resnet, tf32 for mlp)")
    cuda_graph: Annotated[Literal["auto", "on", "off"], BeforeValidator(graph_mode)] = _opt(
        "auto", "capture the whole adversarial step in one CUDA graph: on | off | auto (on with one GPU worker)",
        json_schema_extra={"const": "on"})
    compile: bool = _opt(False, "torch.compile G and D (start-up cost of a minute or more)")
    # Ray Train
    workers: int = _opt(2, "data-parallel workers (Ray Train)", ge=1)
    gpus_per_worker: float = _opt(0.0, "GPUs per worker (0 = CPU training)", ge=0)
    cpus_per_worker: float = _opt(1.0, "CPUs reserved per worker", gt=0)
    max_failures: int = _opt(2, "worker failures tolerated; each restarts from the last checkpoint", ge=0)
    # outputs
    storage: str = _opt("./runs", "root directory of runs: a path (a shared mount on a cluster) or an object-store "
                                  "URI (s3://bucket/runs)")
    name: RunName = _opt("gan", "run name; re-using it resumes the run")
    checkpoint_every: int = _opt(5, "epochs between checkpoints (one is always written at the end)", ge=1)
    keep: int = _opt(3, "checkpoints kept", ge=1)
    sample_every: int = _opt(1, "epochs between sample grids (0 = never)", ge=0)
    eval_every: int = _opt(0, "epochs between quality evaluations (0 = only at checkpoints)", ge=0)
    eval_samples: int = _opt(1000, "generated images scored per evaluation", ge=1)
    eval_full: bool = _opt(False, "every metric at each evaluation, precision/recall included (slow on large "
                           "held-out sets: tens of seconds on MNIST)")
    stop_on_collapse: bool = _opt(False, "end the run (exit 1) when training has failed and is not recovering")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        """What no single field can say: settings that cannot work together, with a message naming the flags."""
        if self.cuda_graph == "on" and not self.gpus_per_worker:
            raise ValueError("--cuda-graph on needs GPU workers (--gpus-per-worker 1); CPU training runs eagerly")
        if self.cuda_graph == "on" and self.workers > 1:
            raise ValueError("--cuda-graph on supports one worker only (DDP's all-reduce is not captured); use "
                             "--workers 1 or --cuda-graph auto")
        if self.cuda_graph == "on" and self.eager_only_settings():
            raise ValueError(f"--cuda-graph on captures the plain step only; "
                             f"{', '.join(self.eager_only_settings())} run(s) eagerly (use --cuda-graph auto, or turn "
                             "them off: R1 is on by default, --r1-gamma 0)")
        if self.clusters == 1:
            raise ValueError("--clusters 1 is one cluster: plain unconditional training; use 0, or 2 and more")
        if self.clusters and self.conditional:
            raise ValueError("--clusters conditions an unconditional model on clusters of its images; with "
                             "--conditional it has the dataset's labels already (drop one of them)")
        if self.clusters and self.latent_dim < 2:
            raise ValueError("--clusters uses z's last coordinate to pick the cluster: --latent-dim must be 2 or more")
        if self.clusters and self.data_mode == "stream":
            raise ValueError("--clusters clusters the training images in each worker's memory; --data-mode stream "
                             "never holds them all (use --data-mode memory)")
        if self.aux_weight and not self.conditional:
            raise ValueError("--aux-weight trains a class head on D: it needs --conditional")
        if self.data_mode == "stream" and (self.dataset in BUILTIN_DATASETS or self.dataset.startswith("folder:")):
            raise ValueError(f"--data-mode stream reads a prepared dataset's shards; prepare {self.dataset} once "
                             "with `gan-ray prepare` and train with --dataset set to its path or URI")
        if (self.g_width or self.d_width) and self.arch not in ("dcgan", "resnet"):
            raise ValueError(f"--g-width and --d-width set the channels of a dcgan or resnet; --arch {self.arch} has "
                             "fixed sizes")
        if self.arch == "resnet" and (self.g_width or self.d_width):
            from gan_ray.core.resnet import check_width  # the architecture's own rule (imports torch: only here)

            check_width(self.g_width, "--g-width")
            check_width(self.d_width, "--d-width")
        return self

    def eager_only_settings(self) -> tuple[str, ...]:
        """The flags in use that the whole-step CUDA graph does not capture (the stabilisers, RMSprop): with any of
        them `--cuda-graph auto` runs eagerly and `on` is refused (gan_ray.core.fast_step)."""
        out = [flag for flag, on in (("--r1-gamma", self.r1_gamma), ("--r2-gamma", self.r2_gamma),
                                     ("--augment", self.augment not in ("", "none")),
                                     ("--spectral-norm", self.spectral_norm),
                                     ("--aux-weight", self.aux_weight),
                                     ("--lr-final", self.lr_final < 1)) if on]
        if self.optimizer != "adam":
            out.append(f"--optimizer {self.optimizer}")
        return tuple(out)

    @property
    def run_dir(self) -> Path | str:
        """Where this run's checkpoints, metrics and samples live: a Path on a local or shared file system, a URI
        string in object storage (`--storage s3://bucket/runs`; gan_ray.core.locations reads and writes both)."""
        if "://" in self.storage:
            return self.storage.rstrip("/") + "/" + self.name
        return Path(self.storage).expanduser().resolve() / self.name

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def replace(self, **changes: Any) -> "TrainConfig":
        """A validated copy with some values changed."""
        return TrainConfig(**{**self.to_dict(), **changes})


# The measured recipes (gan_ray/recipes/NAME.yaml), shipped with the package: `--config NAME` wherever it runs.
RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping of config values: a file, or a packaged recipe by name (`digits`, `mnist`, ...)."""
    import yaml

    p = Path(path).expanduser()
    if not p.is_file() and (RECIPES_DIR / f"{path}.yaml").is_file():
        p = RECIPES_DIR / f"{path}.yaml"
    if not p.is_file():
        raise UserError(f"config file not found: {p} (nor a recipe of that name: {', '.join(recipe_names())})")
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
    return TrainConfig.from_mapping(merged, source=source)  # type: ignore[return-value]


