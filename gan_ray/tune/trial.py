"""One sweep trial: a driver function that launches the trial's Ray Train run and forwards its reports to Tune.

Ray 2.60 pattern: the Tune trainable is a small driver that launches a `TorchTrainer` with its own storage inside
the trial directory (so Train's checkpoints live with the trial) and forwards Train's reports to Tune with
`TuneReportCallback`. PBT: `TuneReportCallback` hands Tune no checkpoint, so PBT trials report through
`CheckpointBridge`, which gives every Train checkpoint to Tune as well; an exploited trial starts a new Train run
seeded with the donor's full state (`init_checkpoint`), and the worker loop then applies the trial's own
(mutated) learning rates. Every Train run a trial starts is one line of its lineage.jsonl.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from ray.train.v2.api.callback import UserCallback

from gan_ray.core.config import TrainConfig
from gan_ray.core.errors import UserError
from gan_ray.core.locations import join
from gan_ray.core.run_dir import check_compatible, prepare_run_dir
from gan_ray.train.driver import trainer_for
from gan_ray.tune.placement import PG_FILE, PlacementGroupRecorder, run_index
from gan_ray.tune.space import SearchSpace

LINEAGE_FILE = "lineage.jsonl"  # per trial: each Train run it started, why, and whose state it was seeded from
TRIAL_DIR = "trial_{trial_id}"


def fd_hooks(cfg: TrainConfig) -> list:
    """The rank-0 evaluation hooks that add `fd` to Train's reports."""
    from gan_ray.eval.hook import hooks_for

    hooks = hooks_for(cfg)
    if not hooks:
        raise UserError(f"cannot score fd on {cfg.dataset} (see the warning above), so there is nothing to sweep on")
    return hooks


def trial_config(base: dict[str, Any], draw: dict[str, Any], trial_dir: Path, run_name: str,
                 tied: dict[str, str] | None = None) -> TrainConfig:
    values = SearchSpace(base, {}, dict(tied or {})).values(draw)
    return TrainConfig.from_mapping({**values, "storage": str(trial_dir), "name": run_name})


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


def train_trial(config: dict[str, Any], *, base: dict[str, Any], scheduler: str, experiment: str,
                tied: dict[str, str] | None = None) -> None:
    """One Tune trial: build its TrainConfig, launch its TorchTrainer, forward the reports to Tune."""
    from ray import tune

    # The trial's directory in the sweep's storage, where Train writes its checkpoints straight away (get_trial_dir()
    # itself is a local staging copy that is synced there later). Its name is Tune's: usually TRIAL_DIR, but Tune
    # adds a suffix when a sweep killed just after creating the trial left that directory behind, and the
    # placement-group accounting (SweepProgress._release) reads the trial's files under Tune's path.
    trial_dir = Path(experiment) / Path(tune.get_context().get_trial_dir()).name
    trial_dir.mkdir(parents=True, exist_ok=True)
    restored = tune.get_checkpoint() if scheduler == "pbt" else None
    run_name = _next_run_name(trial_dir, seeded=restored is not None)
    cfg = trial_config(base, config, trial_dir, run_name, tied)
    seed_dir = None
    if restored is not None:
        seed_dir = trial_dir / f"{run_name}-seed"
        restored.to_directory(str(seed_dir))  # our own copy: the donor may delete its checkpoint meanwhile
    record_start(trial_dir, run_name, cfg, seed_dir)
    check_compatible(cfg)
    prepare_run_dir(cfg)
    hooks = fd_hooks(cfg)
    recorder = PlacementGroupRecorder(str(join(cfg.run_dir, PG_FILE)))
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


def record_start(trial_dir: Path, run_name: str, cfg: TrainConfig, seed_dir: Path | None) -> dict[str, Any]:
    """One lineage.jsonl row per start of the trial's driver: a new Train run (`new`), this trial's own run again
    after the sweep or the trial was restarted (`resume`: Train continues from its latest checkpoint), or a run
    seeded from a checkpoint Tune handed over (PBT): another trial's (`exploit`) or this trial's own (`restore`)."""
    row: dict[str, Any] = {"run": run_name, "time": time.time(), "lr_g": cfg.lr_g, "lr_d": cfg.lr_d}
    if seed_dir is None:
        row["start"] = "resume" if (trial_dir / run_name).is_dir() else "new"
    else:
        meta = json.loads((seed_dir / "config.json").read_text())
        donor_dir = Path(meta.get("config", {}).get("storage", ""))
        exploit = donor_dir.resolve() != trial_dir.resolve()
        row.update(start="exploit" if exploit else "restore", from_trial_dir=str(donor_dir),
                   from_trial=donor_dir.name, exploit=exploit, from_epoch=meta.get("epoch"),
                   from_lr_g=meta.get("config", {}).get("lr_g"), from_lr_d=meta.get("config", {}).get("lr_d"))
        if exploit:
            print(f"[tune] {trial_dir.name}: exploit: took {donor_dir.name}'s state at epoch {row['from_epoch']}; "
                  f"lr_g {row['from_lr_g']:.3g} -> {cfg.lr_g:.3g}, lr_d {row['from_lr_d']:.3g} -> {cfg.lr_d:.3g}")
    with open(trial_dir / LINEAGE_FILE, "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def read_lineage(trial_dir: Path) -> list[dict[str, Any]]:
    """The rows `record_start` wrote for a trial, oldest first."""
    path = trial_dir / LINEAGE_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
