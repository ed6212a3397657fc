"""The Ray Train driver: `fit` launches (or resumes) a training run and shows its progress.

`fit` checks everything it can before Ray starts (the dataset, a re-used run directory, whether the run is
already finished), prepares the quality hooks (`gan_ray.eval.hook`), then runs a `TorchTrainer` over
`gan_ray.train.worker.train_loop_per_worker`, printing one line per epoch from the run's metrics.jsonl.
"""
from __future__ import annotations

import functools
import json
import os
import threading
from pathlib import Path
from typing import Callable

from gan_ray.cluster.connect import ensure_ray
from gan_ray.cluster.autoscaler import wait_for_resources, wait_seconds
from gan_ray.cluster.resources import Bundle
from gan_ray.core.config import TrainConfig
from gan_ray.core.data import describe_dataset, resolve_dataset
from gan_ray.core.errors import UserError
from gan_ray.core.locations import is_remote, join, read_bytes, uri
from gan_ray.core.run_dir import (METRICS_FILE, check_compatible, finished_epochs, format_progress,
                                  prepare_run_dir)
from gan_ray.train.ingest import DATA_CPUS, resolve_data_mode, stream_info, train_dataset
from gan_ray.train.worker import EpochHook, train_loop_per_worker


def worker_bundles(cfg: TrainConfig) -> list[Bundle]:
    """The run's placement group: one bundle per worker; streaming, a CPU for Ray Data's read tasks as well (not
    reserved: Ray Data schedules its tasks on what Train leaves free)."""
    bundle = {"CPU": float(cfg.cpus_per_worker)}
    if cfg.gpus_per_worker:
        bundle["GPU"] = float(cfg.gpus_per_worker)
    data = [{"CPU": DATA_CPUS}] if cfg.data_mode == "stream" else []
    return [bundle] * cfg.workers + data


def check_resources(cfg: TrainConfig, *, wait_s: float | None = None) -> None:
    """Start only what can run: on a fixed cluster, refuse at once (instead of hanging on a placement group) what
    its nodes cannot hold; on an autoscaling one, refuse what it can never hold and wait (`wait_s`, default
    $GAN_RAY_CLUSTER_WAIT_S or 600 s) for the nodes the autoscaler adds for the rest."""
    what = f"--workers {cfg.workers}" + (" and Ray Data's reads (--data-mode stream)" if cfg.data_mode == "stream"
                                         else "")
    wait_for_resources(worker_bundles(cfg), what, timeout_s=wait_seconds(wait_s))


class ProgressPrinter(threading.Thread):
    """Prints one line per epoch from metrics.jsonl while `trainer.fit()` blocks (driver side, no prefixes).

    A restore after a lost worker replaces the file (rows after the checkpoint dropped, then replayed), possibly
    between two polls; rows are therefore told apart by (epoch, time), not by file offset, and each is printed
    once: replayed epochs print again, because they are trained again. A run in object storage is read whole at
    each poll (every 2 s, not 0.5: each is a request), rank 0 writing it from wherever it runs."""

    def __init__(self, path: Path | str, total_epochs: int, print_fn: Callable[[str], None] = print):
        super().__init__(daemon=True)
        self.path, self.total, self.print_fn = path, total_epochs, print_fn
        self.interval_s = 2.0 if is_remote(path) else 0.5
        self.stop_event = threading.Event()
        self.inode: int | None = None
        self.offset = 0
        self.seen: set[tuple] = set()
        for row in self._new_rows():  # rows of an earlier run of this directory are not this run's progress
            self.seen.add(self._key(row))

    @staticmethod
    def _key(row: dict) -> tuple:
        return row.get("epoch"), row.get("time")

    def _new_rows(self) -> list[dict]:
        if is_remote(self.path):
            try:
                chunk = read_bytes(self.path) or b""
            except OSError:  # a failed request: the next poll reads it again
                return []
            complete = chunk[: chunk.rfind(b"\n") + 1]
        else:
            try:
                st = Path(self.path).stat()
            except FileNotFoundError:
                return []
            if st.st_ino != self.inode or st.st_size < self.offset:  # replaced or truncated: read from the start
                self.inode, self.offset = st.st_ino, 0
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
            complete = chunk[: chunk.rfind(b"\n") + 1]
            self.offset += len(complete)
        rows = []
        for line in complete.decode(errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # never let one odd line end the progress display
                continue
        return rows

    def poll(self) -> None:
        for row in self._new_rows():
            if self._key(row) not in self.seen and "epoch" in row:
                self.seen.add(self._key(row))
                self.print_fn(format_progress(row, self.total))
                if row.get("warning"):
                    self.print_fn(f"warning: {row['warning']}" + ("; stopping (--stop-on-collapse)"
                                                                   if row.get("stopped") else ""))

    def run(self) -> None:
        while not self.stop_event.wait(self.interval_s):
            self.poll()
        self.poll()

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=5)


# How often the Train controller polls its workers. Each poll takes at most one `ray.train.report` from a worker
# (its result queue holds one), so an epoch shorter than this waits for the next poll: at Ray's default (2 s) the
# demo's 0.75 s epochs took 2.0 s each. The driver's value is passed on to the controller it launches.
REPORT_POLL_S = "0.25"


@functools.cache
def _trainer_class():
    """Ray's TorchTrainer, less the Ray Data actor of a run that has no Ray Dataset (one class, made once).

    Train 2.60 gives every run a `DatasetManager` actor (its `DatasetsCallback`), datasets or not. That is one more
    Python process importing Ray Data on the launch's critical path: about 1.5 s of a 2-worker launch's 13.7 s on
    two cores (benchmarks/bench_launch.py measures it). An in-memory run reads its data itself and never asks for a dataset
    shard, so it drops that callback; a streamed run (`datasets=`) keeps every callback. `_create_default_callbacks`
    is Ray's own hook for its defaults (private; constraints.txt pins Ray, and tests/test_train_ray.py fails if the
    actor comes back or the name moves)."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks import DatasetsCallback

    class LeanTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            if self.datasets:
                return callbacks
            return [c for c in callbacks if not isinstance(c, DatasetsCallback)]

    return LeanTorchTrainer


def trainer_for(cfg: TrainConfig, *, hooks: list[EpochHook] | None = None, callbacks: list | None = None):
    """The TorchTrainer for a validated config (used by `fit` and by Tune trial drivers)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.api.config import LoggingConfig

    from gan_ray.train.refusals import StopOnUserError

    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.gpus_per_worker:
        resources["GPU"] = cfg.gpus_per_worker
    score = {"checkpoint_score_attribute": "fd", "checkpoint_score_order": "min"} if hooks else {}
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", REPORT_POLL_S)  # a user's own value wins
    if cfg.data_mode == "auto":
        cfg, _ = resolve_data_mode(cfg)
    loop_config = {"train": cfg.to_dict(), "hooks": hooks or []}
    datasets = None
    if cfg.data_mode == "stream":
        loop_config["stream"] = stream_info(cfg)
        datasets = {"train": train_dataset(cfg)}
    return _trainer_class()(
        train_loop_per_worker,
        train_loop_config=loop_config,
        datasets=datasets,
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=uri(cfg.storage),  # a local path resolved, or an object-store URI as given
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep, **score),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            callbacks=[*(callbacks or []), StopOnUserError()],  # a worker's UserError ends the run at once
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def fit(cfg: TrainConfig, *, address: str | None = None, quality: bool = True, progress: bool = True,
        cluster_wait_s: float | None = None):
    """Train (or resume) a run; returns Ray's Result, or None when the run had already reached `cfg.epochs`.

    `quality`: score the EMA generator at every checkpoint (fd and the rest, `gan_ray.eval.hook`), which also lets
    Train keep the best checkpoints by fd; off, checkpoints are kept by recency. `cluster_wait_s`: how long an
    autoscaling cluster may take to add the workers' nodes (`check_resources`)."""
    cfg = resolve_dataset(cfg)  # a prepared dataset's image size, its manifest read (or one line why not)
    describe_dataset(cfg)  # bad dataset / --conditional on unlabelled data: fail before anything else
    wait_s = wait_seconds(cluster_wait_s)  # a bad $GAN_RAY_CLUSTER_WAIT_S too
    check_compatible(cfg)  # also when there is nothing left to train: a mismatch is still the user's mistake
    done = finished_epochs(cfg.run_dir)
    if done >= cfg.epochs:
        print(f"run {cfg.run_dir} already has {done} of {cfg.epochs} epochs; nothing to do")
        return None
    ensure_ray(address)
    cfg, picked = resolve_data_mode(cfg)
    if picked and progress:
        print(picked, flush=True)
    check_resources(cfg, wait_s=wait_s)  # before the hooks: a run that cannot start should not first train an extractor
    hooks: list[EpochHook] = []
    if quality:
        from gan_ray.eval.hook import hooks_for

        hooks = hooks_for(cfg)  # may train the dataset's feature extractor once (cached)
    prepare_run_dir(cfg)
    printer = ProgressPrinter(join(cfg.run_dir, METRICS_FILE), cfg.epochs) if progress else None
    if printer:
        printer.start()
    from ray.train import TrainingFailedError

    try:
        return trainer_for(cfg, hooks=hooks).fit()
    except TrainingFailedError as exc:
        user_error = worker_user_error(exc)
        if user_error is None:
            raise  # a bug, or a failure Ray could not recover from: its traceback says where
        raise user_error from None
    finally:
        if printer:
            printer.stop()


def worker_user_error(exc: BaseException) -> UserError | None:
    """The bad input a worker refused (e.g. bf16 on a GPU without it, a node's old GPU driver), from Train's failure;
    None if there is none.

    Only the workers can check what depends on their device or their copy of the data; the driver then reports
    it as one line (exit 2) instead of Train's traceback."""
    from gan_ray.train.refusals import user_error_of

    return user_error_of(exc)
