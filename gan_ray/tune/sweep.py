"""`run_sweep`: a hyperparameter sweep on Ray Tune whose trials are Ray Train runs; the best generator exported.

The objective is `fd` (lower is better), evaluated on rank 0 every epoch by `gan_ray.eval.hook`. Resources: a
trial is its driver (`DRIVER_CPU`, mostly idle), the Train controller (0 CPU) and its workers (their own placement
group, made by Train). Tune only reserves the driver, so concurrency is capped explicitly at what the cluster can
hold; otherwise Tune starts drivers whose workers can never be placed and the sweep hangs. On an autoscaling
cluster that is what it can grow to (the autoscaler's verdict, `plan_concurrency`), and the sweep starts once the
nodes for its first trial are there.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gan_ray.cluster.autoscaler import Autoscaler, announce, never_fits, wait_for_resources, wait_seconds
from gan_ray.cluster.connect import ensure_ray
from gan_ray.cluster.resources import Bundle, cannot_hold, describe, fits_now, how_many, node_resources
from gan_ray.core.config import TrainConfig
from gan_ray.core.data import describe_dataset, resolve_dataset
from gan_ray.core.env import scoped_env
from gan_ray.core.errors import UserError
from gan_ray.core.locations import write_bytes
from gan_ray.tune.placement import SweepGroups
from gan_ray.tune.results import (PLOT_FILE, RESULTS_CSV, TrialRow, collect_rows, plot_sweep, progress_callback,
                                  write_results_csv)
from gan_ray.tune.schedulers import CONCURRENCY_ENV, make_scheduler, make_searcher, to_tune_space
from gan_ray.tune.space import DRIVER_CPU, METRIC, MODE, SearchSpace, SweepSettings, check_values, space_to_json
from gan_ray.tune.trial import TRIAL_DIR, fd_hooks, train_trial

SWEEP_FILE = "sweep.json"


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


def trial_bundles(settings: SweepSettings) -> list[Bundle]:
    """One trial's placement groups as bundles: its driver (Tune's) and its workers (Train's; the controller
    takes none)."""
    worker = {"CPU": float(settings.worker_cpus)}
    if settings.gpus_per_worker:
        worker["GPU"] = float(settings.gpus_per_worker)
    return [{"CPU": DRIVER_CPU}] + [worker] * settings.workers_per_trial


def resolve_concurrency(settings: SweepSettings, nodes: list[Bundle]) -> int:
    """On a cluster that cannot grow: --max-concurrent, checked against its nodes, or (default) as many trials
    as they hold at once (the same packing by node as `train`'s check: `gan_ray.cluster.resources`)."""
    trial = trial_bundles(settings)
    want = min(settings.max_concurrent or settings.trials, settings.trials)
    fit = how_many(trial, nodes, want)
    what = f"one trial (--workers-per-trial {settings.workers_per_trial})"
    if fit < 1:
        raise UserError(cannot_hold(trial, what, nodes))
    if settings.max_concurrent is not None and fit < want:
        raise UserError(cannot_hold(trial * want, f"--max-concurrent {settings.max_concurrent}", nodes)
                        + f"; they hold {fit} trial(s) at once")
    return fit


def plan_concurrency(settings: SweepSettings, *, wait_s: float | None = None) -> int:
    """Trials at once, and a cluster ready for the first: `resolve_concurrency` on a fixed cluster; on an
    autoscaling one, as many as it can grow to hold (each a verdict of its autoscaler: --max-concurrent, else the
    largest count up to --trials), refused at once if not even one trial ever fits, then waiting (`wait_s`) for
    the nodes of one trial while the autoscaler launches those of all of them."""
    trial = trial_bundles(settings)
    want = min(settings.max_concurrent or settings.trials, settings.trials)
    if fits_now(trial * want):
        return want
    scaler = Autoscaler.of_this_cluster()
    if scaler is None:
        return resolve_concurrency(settings, node_resources())
    described = describe(trial)
    what = f"one trial (--workers-per-trial {settings.workers_per_trial})"
    announce(trial, what)
    with scaler.requesting():
        # Each yes launches nodes for what was asked (used by the sweep), so the search only asks for more
        # trials after a smaller count was accepted, and a refused --max-concurrent asks nothing else.
        if scaler.can_hold(trial * want):
            concurrency = want
        elif settings.max_concurrent is not None:
            raise UserError(f"--max-concurrent {settings.max_concurrent} needs {settings.max_concurrent} x "
                            f"({described}) but the cluster, at the most its autoscaler can grow it to, cannot hold "
                            "that many trials at once")
        elif not scaler.can_hold(trial):
            raise UserError(never_fits(trial, what))
        else:
            low, high = 1, want  # low fits, high does not
            while high - low > 1:
                mid = (low + high) // 2
                low, high = (mid, high) if scaler.can_hold(trial * mid) else (low, mid)
            concurrency = low
        wait_for_resources(trial, what, timeout_s=wait_seconds(wait_s), hold=trial * concurrency, scaler=scaler,
                           checked=True)
    return concurrency


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


def prepare(space: SearchSpace, settings: SweepSettings) -> tuple[dict[str, Any], TrainConfig]:
    """Everything that can be checked without Ray: the space, the dataset, a sweep directory being resumed.
    Returns the fixed values of every trial and the config they make with the space's first values."""
    base = base_train_values(space, settings)
    check_values(SearchSpace({**space.fixed, **{k: v for k, v in base.items()}}, space.dims, space.tied))
    base_cfg = resolve_dataset(TrainConfig.from_mapping(base))
    base["image_size"] = base_cfg.image_size  # a prepared dataset's own
    describe_dataset(base_cfg)
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
    return base, base_cfg


def run_sweep(space: SearchSpace, settings: SweepSettings, *, export: str | Path | None = None,
              address: str | None = None, cluster_wait_s: float | None = None) -> SweepResult:
    """Run (or resume) a sweep; write results.csv and sweep.png; optionally export the best generator.
    `cluster_wait_s`: how long an autoscaling cluster may take to add the first trial's nodes."""
    base, base_cfg = prepare(space, settings)
    wait_s = wait_seconds(cluster_wait_s)
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")  # sweep state saved often: a killed driver loses little
    from ray import tune

    ensure_ray(address)
    pin_train_coordinator()
    concurrency = plan_concurrency(settings, wait_s=wait_s)
    fd_hooks(base_cfg)  # the dataset's extractor trained (and cached) once, before any trial starts
    dims = list(space.dims)
    exp = settings.path
    exp.mkdir(parents=True, exist_ok=True)
    write_bytes(exp / SWEEP_FILE, (json.dumps({"fingerprint": _fingerprint(space, settings), "base": base,
                                                "settings": settings.model_dump(), "concurrency": concurrency},
                                               indent=2, sort_keys=True) + "\n").encode())
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, base=base, scheduler=settings.scheduler, experiment=str(exp),
                             tied=space.tied),
        tune.PlacementGroupFactory([{"CPU": DRIVER_CPU}]))
    resuming = tune.Tuner.can_restore(str(exp))
    print(f"[tune] {'resuming' if resuming else 'starting'} sweep {exp}: {settings.trials} trials x "
          f"{settings.epochs} epochs, scheduler {settings.scheduler}, {concurrency} at a time, "
          f"{settings.workers_per_trial} worker(s)/trial; searching " + ("; ".join(space.describe()) or "nothing"),
          flush=True)
    if resuming:
        tuner = tune.Tuner.restore(str(exp), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        callback = progress_callback()(dims, settings.epochs, str(exp / RESULTS_CSV))
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
        result.best_config = TrainConfig.from_mapping(meta["config"])
    if export is not None and not interrupted:
        if best is None:
            raise UserError(f"no trial of {exp} produced a scored checkpoint; nothing to export")
        result.export_dir = export_best(result, settings, export)
    return result


def pin_train_coordinator() -> None:
    """Create Ray Train's cluster-wide autoscaling coordinator here, on the driver's node (the head), before any
    trial runs. Train creates it, detached, on the node of the first Train controller that needs it: in a sweep
    that is a trial's, which may sit on an autoscaled worker node, and a node holding a detached actor never goes
    idle, so the autoscaler never removes it (seen on Ray's fake-node provider). Ray 2.60's private API; a Ray
    without it leaves the choice to Train."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator)
    except ImportError:
        return
    get_or_create_autoscaling_coordinator()


def _trial_dirname(trial) -> str:
    return TRIAL_DIR.format(trial_id=trial.trial_id)


def export_best(result: SweepResult, settings: SweepSettings, out: str | Path) -> Path:
    """The best trial's best checkpoint as a model directory; model.json records the winner and its sweep."""
    from gan_ray.core.model_dir import export

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
