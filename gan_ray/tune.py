"""Hyperparameter sweeps on Ray Tune over Ray Train trials: `run_sweep` (the driver) and `train_trial` (one trial).

Ray 2.60 pattern: the Tune trainable is a small driver function that launches a `TorchTrainer` for its trial, with
its own storage inside the trial directory (so Train's checkpoints live with the trial), and forwards Train's
reports to Tune with `TuneReportCallback`. The objective is `fd` (lower is better), evaluated on rank 0 every
epoch by `gan_ray.train_eval`.

Resources: a trial is its driver (`DRIVER_CPU`, mostly idle), the Train controller (0 CPU) and its workers (their
own placement group, made by Train). Tune only reserves the driver, so concurrency is capped explicitly at what
the cluster can hold; otherwise Tune starts drivers whose workers can never be placed and the sweep hangs.

PBT: `TuneReportCallback` hands Tune no checkpoint, so PBT trials report through `CheckpointBridge`, which gives
every Train checkpoint to Tune as well; an exploited trial starts a new Train run seeded with the donor's full
state (`init_checkpoint`), and the worker loop then applies the trial's own (mutated) learning rates.
"""
from __future__ import annotations

import csv
import json
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining, TrialScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.train.v2.api.callback import UserCallback

from gan_ray.config import TrainConfig
from gan_ray.env import scoped_env
from gan_ray.errors import UserError
from gan_ray.images import write_atomic
from gan_ray.tune_placement import (PG_FILE, PlacementGroupRecorder, SweepGroups, release_placement_groups,
                                    run_index)
from gan_ray.tune_space import DRIVER_CPU, Choice, Range, SearchSpace, SweepSettings, space_to_json

METRIC, MODE = "fd", "min"
TIME_ATTR = "epoch"  # ASHA rungs and PBT intervals count epochs (robust to restarts, unlike training_iteration)
PBT_MUTABLE = ("lr_g", "lr_d")  # what the worker loop re-applies to the optimisers after an exploit
SWEEP_FILE = "sweep.json"
RESULTS_CSV = "results.csv"
PLOT_FILE = "sweep.png"
LINEAGE_FILE = "lineage.jsonl"  # per trial: each Train run it started, and whose state it was seeded from
ASHA_STATE = "asha_rungs.json"  # ASHA's rung records, so a resumed sweep keeps comparing against them
TRIAL_DIR = "trial_{trial_id}"


@dataclass
class TrialRow:
    """One line of results.csv."""

    trial_id: str
    status: str  # completed | stopped early | running | pending | paused | error
    config: dict[str, Any]
    best_fd: float | None
    last_fd: float | None
    epochs: int
    best_checkpoint: str | None = None
    path: str | None = None


@dataclass
class SweepResult:
    """What a sweep produced; `best_checkpoint` feeds `gan_ray.registry.export` / serving."""

    path: Path
    rows: list[TrialRow]
    best: TrialRow | None
    best_checkpoint: Path | None
    best_config: TrainConfig | None
    results_csv: Path
    plot: Path | None
    export_dir: Path | None = None
    interrupted: bool = False
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ resources
def trial_need(settings: SweepSettings) -> dict[str, float]:
    """Resources one trial holds while it runs: driver + workers (the controller takes none)."""
    need = {"CPU": DRIVER_CPU + settings.workers_per_trial * settings.worker_cpus}
    if settings.gpus_per_worker:
        need["GPU"] = settings.workers_per_trial * settings.gpus_per_worker
    return need


def capacity(total: dict[str, float], need: dict[str, float]) -> int:
    """How many trials fit at once in `total` (Ray counts resources in units of 1e-4)."""
    fits = [math.floor(total.get(k, 0.0) / v + 1e-6) for k, v in need.items() if v > 0]
    return max(0, min(fits)) if fits else 0


def resolve_concurrency(settings: SweepSettings, total: dict[str, float]) -> int:
    """--max-concurrent, checked against the cluster, or (default) as many trials as it can hold."""
    need = trial_need(settings)
    fit = capacity(total, need)
    described = ", ".join(f"{v:g} {k}" for k, v in need.items())
    have = ", ".join(f"{total.get(k, 0):g} {k}" for k in need)
    if fit < 1:
        raise UserError(f"one trial needs {described} (--workers-per-trial {settings.workers_per_trial}) but the "
                        f"cluster has {have}")
    if settings.max_concurrent is not None and settings.max_concurrent > fit:
        raise UserError(f"--max-concurrent {settings.max_concurrent} needs {settings.max_concurrent} x ({described}) "
                        f"but the cluster ({have}) holds only {fit} trial(s) at once")
    return min(settings.max_concurrent or fit, settings.trials)


# ----------------------------------------------------------------------------------------------- the trial
def fd_hooks(cfg: TrainConfig) -> list:
    """The rank-0 evaluation hooks that add `fd` to Train's reports."""
    try:
        from gan_ray.train_eval import hooks_for
    except ImportError as exc:  # the metrics module is part of the package; this is a broken install
        raise UserError(f"sweeps optimise fd, which needs gan_ray.train_eval ({exc})") from None
    hooks = hooks_for(cfg)
    if not hooks:
        raise UserError(f"cannot score fd on {cfg.dataset} (see the warning above), so there is nothing to sweep on")
    return hooks


def trial_config(base: dict[str, Any], draw: dict[str, Any], trial_dir: Path, run_name: str) -> TrainConfig:
    from gan_ray.config import coerce

    values = {**base, **{k: coerce(k, v) for k, v in draw.items()}, "storage": str(trial_dir), "name": run_name}
    return TrainConfig.from_dict(values).validate()


class CheckpointBridge(UserCallback):
    """A Train `UserCallback` that hands every report, checkpoint included, to the trial driver (PBT needs Tune to
    hold checkpoints: it saves the strong trials' and restores the weak ones from them). The driver thread then
    calls `tune.report(metrics, checkpoint=...)`: only that thread may report to Tune."""

    ACK_TIMEOUT_S = 600.0  # a driver that stops taking reports (Tune stopped the trial) must not hold Train forever

    def __init__(self):
        from ray.util.queue import Queue

        self.queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
        self.acks = Queue(maxsize=1, actor_options={"num_cpus": 0})

    def after_report(self, run_context, metrics, checkpoint) -> None:
        """Blocks until the driver has reported this row to Tune (which copies the checkpoint). Train's controller
        prunes checkpoints (--keep) when it registers the next report, before calling this again: without the
        wait, a checkpoint still queued for the driver could be deleted before Tune copied it."""
        from ray.util.queue import Empty

        row = dict(metrics[0])
        if checkpoint is not None:
            row["checkpoint_path"] = checkpoint.path
        self.queue.put(row)
        try:
            self.acks.get(timeout=self.ACK_TIMEOUT_S)
        except Empty:
            pass

    def after_exception(self, run_context, worker_exceptions) -> None:
        pass


def _next_run_name(trial_dir: Path, seeded: bool) -> str:
    """`train` for a trial's first Train run; a fresh `train-N` each time it is seeded from a checkpoint (a Train
    run reusing a name would resume its own latest checkpoint instead of the seed)."""
    runs = sorted((p for p in trial_dir.glob("train*") if p.is_dir() and not p.name.endswith("-seed")),
                  key=lambda p: run_index(p.name))
    if not seeded:
        return runs[-1].name if runs else "train"  # a restarted trial resumes its latest Train run
    return f"train-{len(runs)}"


def train_trial(config: dict[str, Any], *, base: dict[str, Any], scheduler: str, experiment: str) -> None:
    """One Tune trial: build its TrainConfig, launch its TorchTrainer, forward the reports to Tune."""
    from ray import tune

    from gan_ray.ray_train import prepare_run_dir, trainer_for

    # The trial's directory in the sweep's storage, where Train writes its checkpoints straight away (get_trial_dir()
    # itself is a local staging copy that is synced there later). Its name is Tune's: usually TRIAL_DIR, but Tune
    # adds a suffix when a sweep killed just after creating the trial left that directory behind, and the
    # placement-group accounting (SweepProgress._release) reads the trial's files under Tune's path.
    trial_dir = Path(experiment) / Path(tune.get_context().get_trial_dir()).name
    trial_dir.mkdir(parents=True, exist_ok=True)
    with open(trial_dir / "driver_starts.log", "a") as f:  # one line per (re)start: resume tests count them
        f.write(f"{time.time():.3f}\n")
    restored = tune.get_checkpoint() if scheduler == "pbt" else None
    run_name = _next_run_name(trial_dir, seeded=restored is not None)
    cfg = trial_config(base, config, trial_dir, run_name)
    seed_dir = None
    if restored is not None:
        seed_dir = trial_dir / f"{run_name}-seed"
        restored.to_directory(str(seed_dir))  # our own copy: the donor may delete its checkpoint meanwhile
        _record_lineage(trial_dir, run_name, seed_dir, cfg)
    prepare_run_dir(cfg)
    hooks = fd_hooks(cfg)
    recorder = PlacementGroupRecorder(str(cfg.run_dir / PG_FILE))
    if scheduler != "pbt":
        from ray.tune.integration.ray_train import TuneReportCallback

        trainer_for(cfg, hooks=hooks, callbacks=[TuneReportCallback(), recorder]).fit()
        return
    bridge = CheckpointBridge()
    trainer = trainer_for(cfg, hooks=hooks, callbacks=[bridge, recorder])
    if seed_dir is not None:
        trainer.train_loop_config["init_checkpoint"] = str(seed_dir)
    _fit_and_forward(trainer, bridge)


def _fit_and_forward(trainer, bridge) -> None:
    """Run `trainer.fit()` in a thread; report each of its reports to Tune from this (the trial's) thread."""
    from queue import Empty

    from ray import tune
    from ray.util.queue import Full

    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # re-raised below, in the trial's thread
            outcome["error"] = exc

    runner = threading.Thread(target=fit, name="train-fit", daemon=True)
    runner.start()
    while True:
        try:
            row = bridge.queue.get(timeout=0.5)
        except Empty:
            if runner.is_alive():
                continue
            try:
                row = bridge.queue.get_nowait()  # a report that arrived just before fit() returned
            except Empty:
                break
        path = row.get("checkpoint_path")
        try:
            tune.report(row, checkpoint=tune.Checkpoint.from_directory(path) if path else None)
        finally:
            try:
                bridge.acks.put_nowait(True)  # Train may go on (and prune checkpoints): this one is Tune's now
            except Full:  # an ack after_report gave up waiting for is still there: Train is not waiting
                pass
    runner.join()
    if "error" in outcome:
        raise outcome["error"]


def _record_lineage(trial_dir: Path, run_name: str, seed_dir: Path, cfg: TrainConfig) -> None:
    """Which state this Train run starts from: a PBT exploit (another trial's) or this trial's own (a restart)."""
    meta = json.loads((seed_dir / "config.json").read_text())
    donor_dir = Path(meta.get("config", {}).get("storage", ""))
    row = {"run": run_name, "time": time.time(), "from_trial_dir": str(donor_dir), "from_trial": donor_dir.name,
           "exploit": donor_dir.resolve() != trial_dir.resolve(), "from_epoch": meta.get("epoch"),
           "from_lr_g": meta.get("config", {}).get("lr_g"), "from_lr_d": meta.get("config", {}).get("lr_d"),
           "lr_g": cfg.lr_g, "lr_d": cfg.lr_d}
    with open(trial_dir / LINEAGE_FILE, "a") as f:
        f.write(json.dumps(row) + "\n")
    if row["exploit"]:
        print(f"[tune] {trial_dir.name}: exploit: took {donor_dir.name}'s state at epoch {row['from_epoch']}; "
              f"lr_g {row['from_lr_g']:.3g} -> {cfg.lr_g:.3g}, lr_d {row['from_lr_d']:.3g} -> {cfg.lr_d:.3g}")


# -------------------------------------------------------------------------------------------- search space
def to_tune_space(space: SearchSpace) -> dict[str, Any]:
    from ray import tune

    out: dict[str, Any] = {}
    for name, dim in space.dims.items():
        if isinstance(dim, Choice):
            out[name] = tune.choice(list(dim.values))
        elif isinstance(dim.low, int) and isinstance(dim.high, int):
            out[name] = (tune.lograndint if dim.log else tune.randint)(dim.low, dim.high + 1)
        else:
            out[name] = (tune.loguniform if dim.log else tune.uniform)(dim.low, dim.high)
    return out


class ResumableASHA(ASHAScheduler):
    """ASHA whose rung records survive a resume. Tune does not save scheduler state with the experiment (a
    restored sweep gets the scheduler as it was built), so a resumed ASHA would compare new trials against
    nothing and stop none; this one mirrors its rungs (`_brackets[i]._rungs`, Ray internals) to a JSON file."""

    def __init__(self, state_file: str, **kwargs):
        super().__init__(**kwargs)
        self.state_file = state_file
        self._loaded = False

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        path = Path(self.state_file)
        if path.exists():
            for bracket, rungs in zip(self._brackets, json.loads(path.read_text())):
                for (_, recorded), saved in zip(bracket._rungs, rungs):
                    recorded.update(saved)

    def _save(self) -> None:
        path = Path(self.state_file)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps([[dict(recorded) for _, recorded in b._rungs] for b in self._brackets]))
        tmp.replace(path)

    def on_trial_add(self, tune_controller, trial):
        self._load()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        self._load()
        action = super().on_trial_result(tune_controller, trial, result)
        self._save()
        return action

    def on_trial_complete(self, tune_controller, trial, result):
        self._load()
        super().on_trial_complete(tune_controller, trial, result)
        self._save()


class WholePopulationPBT(PopulationBasedTraining):
    """PBT that does not pause a healthy trial just because another one is pending, when the whole population
    fits at once (async PBT yields its slot to pending trials; here the pending one already has a slot, and the
    pause would only cost a Train restart)."""

    def __init__(self, *, whole_population_fits: bool, **kwargs):
        super().__init__(**kwargs)
        self.whole_population_fits = whole_population_fits

    def on_trial_result(self, tune_controller, trial, result):
        decision = super().on_trial_result(tune_controller, trial, result)
        if self.whole_population_fits and decision == TrialScheduler.PAUSE and trial.status != Trial.PAUSED:
            return TrialScheduler.CONTINUE
        return decision


def make_scheduler(settings: SweepSettings, space: SearchSpace, concurrency: int):
    from ray.tune.schedulers import FIFOScheduler

    if settings.scheduler == "asha":
        # stop_last_trials=False: a trial reaching --epochs ends by itself (Train shuts down cleanly) instead of
        # being killed on its last report
        return ResumableASHA(str(settings.path / ASHA_STATE), time_attr=TIME_ATTR, max_t=settings.epochs,
                                       grace_period=settings.grace_period,
                                       reduction_factor=settings.reduction_factor, stop_last_trials=False)
    if settings.scheduler == "pbt":
        mutable = {k: v for k, v in to_tune_space(space).items() if k in PBT_MUTABLE}
        if not mutable:
            raise UserError("--scheduler pbt mutates learning rates: search --lr-g and/or --lr-d (e.g. 1e-5:1e-3)")
        return WholePopulationPBT(whole_population_fits=concurrency >= settings.trials, time_attr=TIME_ATTR,
                                  perturbation_interval=settings.perturbation_interval,
                                  hyperparam_mutations=mutable, quantile_fraction=0.5, resample_probability=0.25,
                                  synch=False)
    return FIFOScheduler()


# The cap on running trials for this run of the sweep, from run_sweep to the searcher Tune restores (in this same
# driver process). Tune restores a searcher, its cap included, from the sweep's saved state, after Tuner.restore
# and out of reach of any public API; a resume on a smaller cluster (or with more workers per trial) must use the
# cap computed now: a stale, larger one starts trials whose workers can never be placed, the hang the cap prevents.
CONCURRENCY_ENV = "GAN_RAY_SWEEP_MAX_CONCURRENT"


class _CapOfThisRun:
    """Mixin for a searcher with `max_concurrent`: after Tune restores its state, the cap is this run's. (Tune
    restores state through `set_state`, directly or from `restore_from_dir`, for both kinds used here.)"""

    def set_state(self, state: dict) -> None:
        super().set_state(state)  # type: ignore[misc]
        if os.environ.get(CONCURRENCY_ENV):
            self.max_concurrent = int(os.environ[CONCURRENCY_ENV])


class SweepVariantGenerator(_CapOfThisRun, BasicVariantGenerator):
    """Random search (seeded), capped; the cap is this run's after a resume."""


class SweepConcurrencyLimiter(_CapOfThisRun, ConcurrencyLimiter):
    """A capped searcher (Optuna); the cap is this run's after a resume."""


def make_searcher(settings: SweepSettings, concurrency: int):
    """The search algorithm, capped at `concurrency` running trials (Tune ignores `max_concurrent_trials` for a
    BasicVariantGenerator passed in explicitly)."""
    if settings.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per study on the sweep's own log
        return SweepConcurrencyLimiter(OptunaSearch(seed=settings.seed), max_concurrent=concurrency)
    return SweepVariantGenerator(random_state=settings.seed, max_concurrent=concurrency)  # same --seed, same trials


# ------------------------------------------------------------------------------------------------- results
def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _status(tune_status: str, epochs: int, max_epochs: int) -> str:
    if tune_status == "ERROR":
        return "error"
    if tune_status == "TERMINATED":
        return "completed" if epochs >= max_epochs else "stopped early"
    return tune_status.lower()


def row_from_trial(trial, dims: list[str], max_epochs: int, history: list[dict] | None = None) -> TrialRow:
    """A results row from a Tune Trial (live, from the callback) or from the finished experiment (with history:
    every report, so the best checkpoint can be found)."""
    last = trial.last_result or {}
    analysis = (trial.metric_analysis or {}).get(METRIC, {})
    best_fd, best_ckpt = _num(analysis.get("min")), None
    if history:
        scored = [(_num(r.get(METRIC)), r) for r in history]
        scored = [(fd, r) for fd, r in scored if fd is not None]
        if scored:
            best_fd = min(fd for fd, _ in scored)
        with_ckpt = [(fd, r["checkpoint_path"]) for fd, r in scored
                     if isinstance(r.get("checkpoint_path"), str) and Path(r["checkpoint_path"]).is_dir()]
        if with_ckpt:
            # The trial's best is its best checkpoint's fd: that is the model it can hand over. An epoch without
            # a checkpoint (--checkpoint-every N > 1) may have scored better, but nothing of it was kept, and the
            # sweep's winner, results.csv and the export's model.json must all speak of the same model.
            best_fd, best_ckpt = min(with_ckpt, key=lambda t: t[0])
    epochs = int(_num(last.get(TIME_ATTR)) or 0)
    return TrialRow(trial_id=trial.trial_id,
                    status=_status(trial.status, epochs, max_epochs),
                    config={k: trial.config.get(k) for k in dims}, best_fd=best_fd, last_fd=_num(last.get(METRIC)),
                    epochs=epochs, best_checkpoint=best_ckpt, path=trial.path)


def write_results_csv(rows: list[TrialRow], dims: list[str], path: Path) -> Path:
    """One row per trial (written to a temp file then renamed: a reader never sees half a table)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial_id", "status", *dims, "best_fd", "last_fd", "epochs", "best_checkpoint"])
        for r in sorted(rows, key=lambda r: r.trial_id):
            w.writerow([r.trial_id, r.status, *[r.config.get(d) for d in dims],
                        "" if r.best_fd is None else f"{r.best_fd:.6g}",
                        "" if r.last_fd is None else f"{r.last_fd:.6g}", r.epochs, r.best_checkpoint or ""])
    tmp.replace(path)
    return path


def read_results_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def format_table(rows: list[TrialRow], dims: list[str], max_epochs: int) -> str:
    """The compact trial table printed as trials change state."""
    def val(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    header = ["trial", "status", *dims, "epoch", "fd", "best fd"]
    lines = [header]
    for r in sorted(rows, key=lambda r: r.trial_id):
        lines.append([r.trial_id, r.status, *[val(r.config.get(d)) for d in dims], f"{r.epochs}/{max_epochs}",
                      "-" if r.last_fd is None else f"{r.last_fd:.4g}", "-" if r.best_fd is None else f"{r.best_fd:.4g}"])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  " + "  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def plot_sweep(rows: list[TrialRow], dims: list[str], space: SearchSpace, path: Path) -> Path | None:
    """fd against lr_g, lr_d, latent_dim (and any other searched dimension): one panel each, best trial starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rows if r.best_fd is not None]
    if not scored:
        return None
    panels = [d for d in ("lr_g", "lr_d", "latent_dim")] + [d for d in dims if d not in ("lr_g", "lr_d", "latent_dim")]
    best = min(scored, key=lambda r: r.best_fd)
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
    for ax, name in zip(axes[0], panels):
        def x_of(r: TrialRow) -> Any:
            return r.config.get(name, space.fixed.get(name, getattr(TrainConfig(), name)))

        categorical = any(isinstance(x_of(r), (str, bool)) for r in scored)
        for status, marker, face in (("completed", "o", "tab:blue"), ("stopped early", "o", "none"),
                                     ("error", "x", "tab:red")):
            group = [r for r in scored if r.status == status] if status != "completed" else \
                [r for r in scored if r.status not in ("stopped early", "error")]
            if group:
                xs = [str(x_of(r)) if categorical else x_of(r) for r in group]
                ax.scatter(xs, [r.best_fd for r in group], marker=marker, facecolors=face,
                           edgecolors="tab:blue" if marker == "o" else None, label=status)
        ax.scatter([str(x_of(best)) if categorical else x_of(best)], [best.best_fd], marker="*", s=220,
                   color="gold", edgecolors="black", zorder=3, label="best")
        dim = space.dims.get(name)
        if isinstance(dim, Range) and dim.log:
            ax.set_xscale("log")
        ax.set_xlabel(name + ("" if name in space.dims else " (fixed)"))
        ax.set_ylabel("best fd (lower is better)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"sweep: {len(rows)} trials, best fd {best.best_fd:.4g} ({best.trial_id})")
    fig.tight_layout()
    tmp = path.with_name(".tmp-" + path.name)
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


def _progress_callback_class():
    from ray.tune import Callback

    class SweepProgress(Callback):
        """Console table when a trial changes state, one line per reported epoch, a live results.csv; and the
        release of stopped trials' worker placement groups (see PlacementGroupRecorder)."""

        def __init__(self, dims: list[str], max_epochs: int, csv_path: str):
            self.dims, self.max_epochs, self.csv_path = dims, max_epochs, csv_path
            self._last_status: dict[str, str] = {}
            self._last_release = 0.0
            self._groups: SweepGroups | None = None

        def __getstate__(self) -> dict:  # pickled with the sweep's state: the groups belong to one driver job
            return {**self.__dict__, "_groups": None, "_last_status": {}}

        def setup(self, **info) -> None:  # each (re)start of the sweep, in the driver's job
            self._groups = SweepGroups([{"CPU": DRIVER_CPU}])

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if METRIC in result:
                best = (trial.metric_analysis or {}).get(METRIC, {}).get("min", result[METRIC])
                print(f"[tune] {trial.trial_id}  epoch {result.get(TIME_ATTR, '?')}/{self.max_epochs}  "
                      f"fd {result[METRIC]:.4g}  (best {min(best, result[METRIC]):.4g})", flush=True)

        def on_step_end(self, iteration, trials, **info):
            now = time.monotonic()
            if now - self._last_release >= 1.0:
                self._last_release = now
                self._release(trials)
            statuses = {t.trial_id: t.status for t in trials}
            if statuses == self._last_status:
                return
            self._last_status = statuses
            rows = [row_from_trial(t, self.dims, self.max_epochs) for t in trials]
            counts: dict[str, int] = {}
            for r in rows:
                counts[r.status] = counts.get(r.status, 0) + 1
            print(f"[tune] {time.strftime('%H:%M:%S')}  " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())),
                  flush=True)
            print(format_table(rows, self.dims, self.max_epochs), flush=True)
            write_results_csv(rows, self.dims, Path(self.csv_path))

        def _release(self, trials) -> None:
            accounted: set[str] = set()
            for t in trials:
                if t.path and t.status != "PENDING" and Path(t.path).is_dir():
                    accounted.update(release_placement_groups(Path(t.path), keep_latest_run=t.status == "RUNNING"))
            if self._groups is not None:
                self._groups.remove_orphans(accounted)

    return SweepProgress


def collect_rows(experiment: Path, dims: list[str], max_epochs: int) -> list[TrialRow]:
    """Final rows from the saved experiment (statuses, configs and every report of every trial)."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(experiment))
    frames = analysis.trial_dataframes
    rows = []
    for trial in analysis.trials:
        df = frames.get(trial.trial_id, frames.get(trial.path))  # keyed by trial id in Ray 2.60
        history = df.to_dict("records") if df is not None and len(df) else []
        rows.append(row_from_trial(trial, dims, max_epochs, history))
    return rows


# ---------------------------------------------------------------------------------------------- the sweep
def _fingerprint(space: SearchSpace, settings: SweepSettings) -> dict[str, Any]:
    """What makes two runs the same sweep (resources and concurrency may change between a run and its resume)."""
    return {"space": space_to_json(space), "trials": settings.trials, "epochs": settings.epochs,
            "scheduler": settings.scheduler, "grace_period": settings.grace_period,
            "reduction_factor": settings.reduction_factor, "perturbation_interval": settings.perturbation_interval,
            "search": settings.search, "seed": settings.seed}


def base_train_values(space: SearchSpace, settings: SweepSettings) -> dict[str, Any]:
    """The fixed TrainConfig values of every trial: the user's, plus what a sweep needs."""
    fixed = dict(space.fixed)
    if fixed.get("eval_every", 1) != 1 and settings.scheduler != "none":
        raise UserError(f"--scheduler {settings.scheduler} decides on fd every epoch: drop --eval-every "
                        f"(or use --scheduler none)")
    every = fixed.get("checkpoint_every", 1)
    if settings.scheduler == "pbt" and settings.perturbation_interval % every:
        raise UserError(f"--perturbation-interval {settings.perturbation_interval} must be a multiple of "
                        f"--checkpoint-every {every} (an exploit copies the donor's checkpoint)")
    return {**fixed, "epochs": settings.epochs, "workers": settings.workers_per_trial,
            "cpus_per_worker": settings.worker_cpus, "gpus_per_worker": settings.gpus_per_worker,
            "eval_every": fixed.get("eval_every", 1), "checkpoint_every": every, "seed": settings.seed}


def prepare(space: SearchSpace, settings: SweepSettings) -> dict[str, Any]:
    """Everything that can be checked without Ray: settings, the space, the dataset. Returns the base values."""
    from gan_ray.run_files import describe_dataset
    from gan_ray.tune_space import check_values

    settings.validate()
    base = base_train_values(space, settings)
    check_values(SearchSpace({**space.fixed, **{k: v for k, v in base.items()}}, space.dims))
    describe_dataset(TrainConfig.from_dict(base))
    if settings.path.exists() and not settings.path.is_dir():
        raise UserError(f"{settings.path} exists and is not a directory")
    saved = settings.path / SWEEP_FILE
    if saved.exists():
        try:
            old = json.loads(saved.read_text()).get("fingerprint")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise UserError(f"{saved} is not a sweep description this gan-ray wrote; use another --name") from None
        new = json.loads(json.dumps(_fingerprint(space, settings)))
        if old != new:
            changed = sorted(k for k in set(old or {}) | set(new) if (old or {}).get(k) != new.get(k))
            raise UserError(f"sweep {settings.path} was started with different settings ({', '.join(changed)}); "
                            f"re-run it with the same flags to resume, or use another --name")
    return base


def run_sweep(space: SearchSpace, settings: SweepSettings, *, export: str | Path | None = None,
              address: str | None = None) -> SweepResult:
    """Run (or resume) a sweep; write results.csv and sweep.png; optionally export the best generator."""
    base = prepare(space, settings)
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")  # sweep state saved often: a killed driver loses little
    from ray import tune

    from gan_ray.ray_train import ensure_ray

    ensure_ray(address)
    import ray

    concurrency = resolve_concurrency(settings, ray.cluster_resources())
    fd_hooks(TrainConfig.from_dict(base))  # the metric is importable before any trial starts
    dims = list(space.dims)
    exp = settings.path
    exp.mkdir(parents=True, exist_ok=True)
    write_atomic(exp / SWEEP_FILE, (json.dumps({"fingerprint": _fingerprint(space, settings), "base": base,
                                                "settings": asdict(settings), "concurrency": concurrency},
                                               indent=2, sort_keys=True) + "\n").encode())
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, base=base, scheduler=settings.scheduler, experiment=str(exp)),
        tune.PlacementGroupFactory([{"CPU": DRIVER_CPU}]))
    resuming = tune.Tuner.can_restore(str(exp))
    print(f"[tune] {'resuming' if resuming else 'starting'} sweep {exp}: {settings.trials} trials x "
          f"{settings.epochs} epochs, scheduler {settings.scheduler}, {concurrency} at a time, "
          f"{settings.workers_per_trial} worker(s)/trial; searching " + ("; ".join(space.describe()) or "nothing"),
          flush=True)
    if resuming:
        tuner = tune.Tuner.restore(str(exp), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        callback = _progress_callback_class()(dims, settings.epochs, str(exp / RESULTS_CSV))
        tuner = tune.Tuner(
            trainable,
            param_space=to_tune_space(space),
            tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, num_samples=settings.trials,
                                        scheduler=make_scheduler(settings, space, concurrency), search_alg=make_searcher(settings, concurrency),
                                        trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(
                name=settings.name, storage_path=str(exp.parent), verbose=0, callbacks=[callback],
                # Tune keeps every checkpoint PBT handed it: each is registered twice (at the report, and when PBT
                # saves a strong trial), and pruning by count deleted ones a pending exploit still pointed to.
                checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
                failure_config=tune.FailureConfig(max_failures=1)),
        )
    t0 = time.time()
    groups = SweepGroups([{"CPU": DRIVER_CPU}])
    with scoped_env(CONCURRENCY_ENV, str(concurrency)):  # read by a restored searcher (_CapOfThisRun)
        grid = tuner.fit()
    # Groups of trials stopped in the sweep's last second (the callback runs about once a second), or never recorded
    # (tune_placement): without this the CPUs stay reserved, and the demo's training waited for them forever.
    groups.remove_all()
    rows = collect_rows(exp, dims, settings.epochs)
    interrupted = grid.num_terminated + grid.num_errors < settings.trials
    write_results_csv(rows, dims, exp / RESULTS_CSV)
    plot = plot_sweep(rows, dims, space, exp / PLOT_FILE)
    scored = [r for r in rows if r.best_fd is not None and r.best_checkpoint]
    best = min(scored, key=lambda r: r.best_fd) if scored else None
    result = SweepResult(path=exp, rows=rows, best=best, best_checkpoint=Path(best.best_checkpoint) if best else None,
                         best_config=None, results_csv=exp / RESULTS_CSV, plot=plot, interrupted=interrupted,
                         extra={"seconds": time.time() - t0, "concurrency": concurrency})
    if best is not None:
        meta = json.loads((Path(best.best_checkpoint) / "config.json").read_text())
        result.best_config = TrainConfig.from_dict(meta["config"])
    if export is not None and not interrupted:
        if best is None:
            raise UserError(f"no trial of {exp} produced a scored checkpoint; nothing to export")
        result.export_dir = export_best(result, settings, export)
    return result


def _trial_dirname(trial) -> str:
    return TRIAL_DIR.format(trial_id=trial.trial_id)


def export_best(result: SweepResult, settings: SweepSettings, out: str | Path) -> Path:
    """The best trial's best checkpoint as a model directory; model.json records the winner and its sweep."""
    from gan_ray.registry import export

    best = result.best
    assert best is not None and result.best_checkpoint is not None
    # The searched values the exported checkpoint was trained with: under PBT a trial's config is its latest
    # mutation, which may postdate its best checkpoint.
    trained = result.best_config.to_dict() if result.best_config is not None else {}
    winning = {k: trained.get(k, v) for k, v in best.config.items()}
    sweep_info = {"path": str(result.path), "name": settings.name, "trial_id": best.trial_id,
                  "scheduler": settings.scheduler, "search": settings.search, "trials": len(result.rows),
                  "metric": METRIC, "mode": MODE, "best_fd": best.best_fd, "winning_config": winning,
                  "epochs": best.epochs, "results_csv": str(result.results_csv)}
    return export(result.best_checkpoint, out, extra={"sweep": sweep_info})
