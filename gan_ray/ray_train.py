"""Ray Train wiring: the per-worker loop (on each worker) and `fit` (on the driver).

The worker loop is plain PyTorch around `gan_ray.loop.run_epoch`, with a handful of Ray calls: `prepare_model`
(DDP for G and D separately), `ray.train.get_checkpoint` (resume, and recovery after a worker dies) and
`ray.train.report` (metrics every epoch, a checkpoint from rank 0 every `checkpoint_every` epochs).
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from gan_ray import checkpoint as ckpt_io
from gan_ray.config import TrainConfig
from gan_ray.data import load_dataset
from gan_ray.errors import UserError
from gan_ray.fast_step import FastPath, make_step_fn, prepare_module
from gan_ray.fast_step import resolve_for as resolve_fast_path
from gan_ray.images import grid_png, write_atomic
from gan_ray.loop import run_epoch
from gan_ray.models import ModelSpec, build
from gan_ray.run_files import (METRICS_FILE, check_batch_fits, describe_dataset, format_progress,
                               truncate_metrics)
from gan_ray.step import GANState, eval_mode, make_state

# Hooks run on rank 0 after each epoch: (cfg, state, epoch, device, heldout) -> extra metrics. The metrics module
# registers its evaluator here so this file doesn't import it (and runs without it).
EpochHook = Callable[[TrainConfig, GANState, int, torch.device], dict[str, float]]


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Noise seed for one rank's epoch: distinct per rank, identical after a resume."""
    return (seed * 1_000_003 + epoch * 1_009 + rank) % (2**63 - 1)


def fixed_noise(spec: ModelSpec, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The noise behind the per-epoch sample grids: fixed, so the grids show one set of digits improving."""
    from gan_ray.registry import latent_for_seed

    n = 8 * spec.num_classes if spec.conditional else 64
    labels = torch.arange(n) % spec.num_classes if spec.conditional else None
    return latent_for_seed(n, spec.latent_dim, seed), labels


def build_state(cfg: TrainConfig, spec: ModelSpec, device: torch.device, world_size: int,
                wrap: Callable[[torch.nn.Module], torch.nn.Module], fast: FastPath | None = None) -> GANState:
    """Models initialised identically on every rank (seeded), laid out for the fast path (channels_last), moved and
    wrapped by `wrap`, plus optimisers (capturable Adam when the step is captured in a CUDA graph)."""
    fast = fast or FastPath()
    torch.manual_seed(cfg.seed)
    G, D = build(spec)
    G, D = (wrap(prepare_module(m.to(device), fast)) for m in (G, D))
    return make_state(spec, G, D, lr_g=cfg.lr_g, lr_d=cfg.lr_d, beta1=cfg.beta1, beta2=cfg.beta2, loss=cfg.loss,
                      d_steps=cfg.d_steps, ema=cfg.ema, ema_halflife_kimg=cfg.ema_halflife_kimg,
                      world_size=world_size, capturable=fast.cuda_graph)


def _all_reduce_epoch(res, world_size: int, device: torch.device) -> dict[str, float]:
    """Mean losses over ranks; throughput as all images over the slowest rank's time."""
    import torch.distributed as dist

    t = torch.tensor([res.loss_d, res.loss_g, res.d_real, res.d_fake, res.images, res.seconds], device=device,
                     dtype=torch.float64)
    if world_size > 1 and dist.is_initialized():
        sums = t.clone()
        dist.all_reduce(sums)
        slowest = t[5:6].clone()
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        t = torch.cat([sums[:4] / world_size, sums[4:5], slowest])
    loss_d, loss_g, d_real, d_fake, images, seconds = t.tolist()
    return {"loss_d": loss_d, "loss_g": loss_g, "d_real": d_real, "d_fake": d_fake,
            "images_per_s": images / max(seconds, 1e-9), "epoch_seconds": seconds}


def ddp_buffer_kwargs() -> dict[str, bool]:
    """Don't re-broadcast buffers (BatchNorm statistics) on every forward: G runs twice per step and the in-place
    broadcast breaks autograd. Newer PyTorch spells it `forward_sync_buffers`."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    params = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def _quiet_worker_logs() -> None:
    """Ray Train logs every report at INFO on a logger named after its file (outside LoggingConfig's reach)."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # layout changed in another Ray version: only the console gets noisier
        pass


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch

    _quiet_worker_logs()
    cfg = TrainConfig.from_dict(config["train"])
    hooks: list[EpochHook] = config.get("hooks", [])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    data = load_dataset(cfg.dataset, "train", data_dir=cfg.data_dir, image_size=cfg.image_size)
    check_batch_fits(len(data), world, cfg.batch_size)  # the driver checked the count it expects; this is the real one
    if device.type == "cuda":
        data = data.to(device)  # GPU-resident: batches are gathered on the device, no host copies per step
    spec = ModelSpec(cfg.arch, cfg.latent_dim, data.shape, data.num_classes if cfg.conditional else 0)
    ddp_kwargs = ddp_buffer_kwargs()
    fast = resolve_fast_path(cfg, device, world)  # `auto` -> the fastest correct path on this device
    state = build_state(cfg, spec, device, world,
                        lambda m: ray.train.torch.prepare_model(m, parallel_strategy_kwargs=ddp_kwargs), fast)

    run_dir = cfg.run_dir
    start_epoch = 1
    restored = ray.train.get_checkpoint()
    if restored is None and config.get("init_checkpoint"):
        # A new run seeded with another run's full state (a PBT exploit: the donor's G, D, EMA and optimisers).
        restored = ray.train.Checkpoint.from_directory(config["init_checkpoint"])
    if restored is not None:
        with restored.as_directory() as d:
            _, sd = ckpt_io.load(d)  # on the CPU: load_state_dict copies to the device (RNG states must stay)
            start_epoch = ckpt_io.load_state_dict(state, sd) + 1
        # The config's learning rates win over the ones saved with the optimiser state: a no-op on a plain resume,
        # and after an exploit the trial trains on with its own (mutated) rates and the donor's Adam moments.
        for opt, lr in ((state.opt_g, cfg.lr_g), (state.opt_d, cfg.lr_d)):
            for group in opt.param_groups:
                group["lr"] = lr
    if rank == 0:
        truncate_metrics(run_dir / METRICS_FILE, start_epoch - 1)  # rows after the checkpoint are replayed
    z_fixed, labels_fixed = fixed_noise(spec, cfg.seed)
    # Marks the first epoch after a restore (resume, or recovery from a lost worker) in metrics.jsonl.
    restored_from = start_epoch - 1 if restored is not None else None

    step_fn = make_step_fn(state, fast)  # after the restore: a CUDA graph captures the restored tensors
    for epoch in range(start_epoch, cfg.epochs + 1):
        t_epoch = time.time()
        torch.manual_seed(epoch_seed(cfg.seed, epoch, rank))
        res = run_epoch(state, data, epoch=epoch, rank=rank, world_size=world, batch_size=cfg.batch_size,
                        seed=cfg.seed, step_fn=step_fn)
        metrics: dict[str, Any] = {"epoch": epoch, "step": state.step, "images_seen": state.images_seen,
                                   **_all_reduce_epoch(res, world, device)}
        if restored_from is not None and epoch == start_epoch:
            metrics["restored_from"] = restored_from
        is_ckpt = epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs
        if rank == 0:
            for hook in hooks:
                if is_ckpt or (cfg.eval_every and epoch % cfg.eval_every == 0):
                    metrics.update(hook(cfg, state, epoch, device))
            if cfg.sample_every and epoch % cfg.sample_every == 0:
                with torch.no_grad(), eval_mode(state.sampler) as sampler:  # --no-ema: G itself, in train mode
                    imgs = sampler(z_fixed.to(device), labels_fixed.to(device) if labels_fixed is not None else None)
                write_atomic(run_dir / "samples" / f"epoch_{epoch:04d}.png",
                             grid_png(imgs, nrow=spec.num_classes or 8))
            metrics["wall_s"] = round(time.time() - t_epoch, 3)
            metrics["time"] = time.time()
            with open(run_dir / METRICS_FILE, "a") as f:
                f.write(json.dumps(metrics) + "\n")
        if is_ckpt:
            with tempfile.TemporaryDirectory() as tmp:
                checkpoint = None
                if rank == 0:
                    ckpt_io.save(Path(tmp), state, epoch=epoch, config=cfg.to_dict(), metrics=metrics)
                    checkpoint = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(metrics, checkpoint=checkpoint)
        else:
            ray.train.report(metrics)


# ------------------------------------------------------------------------------------------------------ driver
def ensure_ray(address: str | None, ingress: str | None = None) -> None:
    """Join `address` (or RAY_ADDRESS) if given, else start a local cluster, quietly, whose Serve uses the
    `ingress` front door (gan_ray.serve_ingress; it must be chosen before the cluster's processes start)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        from gan_ray.serve_ingress import apply_to_local_cluster

        apply_to_local_cluster(ingress)
    # A local cluster is ours: keep its start-up quiet (its token-auth notice included) so the console shows
    # the run's progress and errors, each on one line.
    kwargs: dict[str, Any] = {"configure_logging": True, "logging_level": "ERROR"} if not address else {}
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as exc:
        raise UserError(f"cannot reach the Ray cluster at {address}: {str(exc).splitlines()[0]}") from None


def check_resources(cfg: TrainConfig) -> None:
    """Fail fast (instead of hanging on a placement group) when the cluster can never hold the workers."""
    import ray

    total = ray.cluster_resources()
    need_cpu = cfg.workers * cfg.cpus_per_worker
    if need_cpu > total.get("CPU", 0):
        raise UserError(f"--workers {cfg.workers} x {cfg.cpus_per_worker:g} CPU needs {need_cpu:g} CPUs but the "
                        f"cluster has {total.get('CPU', 0):g}")
    need_gpu = cfg.workers * cfg.gpus_per_worker
    if need_gpu > total.get("GPU", 0):
        raise UserError(f"--workers {cfg.workers} x --gpus-per-worker {cfg.gpus_per_worker:g} needs {need_gpu:g} "
                        f"GPUs but the cluster has {total.get('GPU', 0):g}")


class ProgressPrinter(threading.Thread):
    """Prints one line per epoch from metrics.jsonl while `trainer.fit()` blocks (driver side, no prefixes).

    A restore after a lost worker replaces the file (rows after the checkpoint dropped, then replayed), possibly
    between two polls; rows are therefore told apart by (epoch, time), not by file offset, and each is printed
    once: replayed epochs print again, because they are trained again."""

    def __init__(self, path: Path, total_epochs: int, print_fn: Callable[[str], None] = print):
        super().__init__(daemon=True)
        self.path, self.total, self.print_fn = path, total_epochs, print_fn
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
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return []
        if st.st_ino != self.inode or st.st_size < self.offset:  # replaced or truncated: read it from the start
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

    def run(self) -> None:
        while not self.stop_event.wait(0.5):
            self.poll()
        self.poll()

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=5)


# How often the Train controller polls its workers. Each poll takes at most one `ray.train.report` from a worker
# (its result queue holds one), so an epoch shorter than this waits for the next poll: at Ray's default (2 s) the
# demo's 0.75 s epochs took 2.0 s each. The driver's value is passed on to the controller it launches.
REPORT_POLL_S = "0.25"


def trainer_for(cfg: TrainConfig, *, hooks: list[EpochHook] | None = None, callbacks: list | None = None):
    """The TorchTrainer for a validated config (used by `fit` and by Tune trial drivers)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.api.config import LoggingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.gpus_per_worker:
        resources["GPU"] = cfg.gpus_per_worker
    score = {"checkpoint_score_attribute": "fd", "checkpoint_score_order": "min"} if hooks else {}
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", REPORT_POLL_S)  # a user's own value wins
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": cfg.to_dict(), "hooks": hooks or []},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=str(Path(cfg.storage).expanduser().resolve()),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep, **score),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            callbacks=callbacks,
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def check_compatible(cfg: TrainConfig) -> None:
    """A re-used run directory must hold the same model and data: its checkpoints could not be resumed otherwise."""
    saved = cfg.run_dir / "config.json"
    if saved.exists():
        old = json.loads(saved.read_text())
        for key in ("dataset", "arch", "conditional", "latent_dim", "image_size"):
            if old.get(key) != getattr(cfg, key):
                raise UserError(f"run {cfg.run_dir} was trained with {key}={old.get(key)!r}; cannot resume it with "
                                f"{key}={getattr(cfg, key)!r} (use another --name)")


def prepare_run_dir(cfg: TrainConfig) -> None:
    """Check a re-used run is compatible, then save the resolved config (only after everything validated)."""
    from gan_ray.config import save_json

    check_compatible(cfg)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    save_json(cfg, cfg.run_dir / "config.json")


def fit(cfg: TrainConfig, *, address: str | None = None, hooks: list[EpochHook] | None = None,
        progress: bool = True):
    """Train (or resume) a run; returns Ray's Result, or None when the run had already reached `cfg.epochs`."""
    cfg.validate()
    describe_dataset(cfg)  # bad dataset / --conditional on unlabelled data: fail before Ray starts
    check_compatible(cfg)  # also when there is nothing left to train: a mismatch is still the user's mistake
    done = finished_epochs(cfg.run_dir)
    if done >= cfg.epochs:
        print(f"run {cfg.run_dir} already has {done} of {cfg.epochs} epochs; nothing to do")
        return None
    ensure_ray(address)
    check_resources(cfg)
    prepare_run_dir(cfg)
    printer = ProgressPrinter(cfg.run_dir / METRICS_FILE, cfg.epochs) if progress else None
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
    """The bad input a worker refused (e.g. bf16 on a GPU without it), from Train's failure; None if there is none.

    Only the workers can check what depends on their device or their copy of the data; the driver then reports
    it as one line (exit 2) instead of Train's traceback."""
    for error in (getattr(exc, "worker_failures", None) or {}).values():
        if isinstance(error, UserError):
            return UserError(str(error))
    return None


def finished_epochs(run_dir: Path) -> int:
    """Epochs covered by the run's newest checkpoint (0 when there is none)."""
    latest = latest_checkpoint(run_dir)
    return int(json.loads((latest / ckpt_io.CONFIG_FILE).read_text())["epoch"]) if latest else 0


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint directory of a run (by epoch), or None."""
    best, best_epoch = None, -1
    for meta_file in run_dir.glob("checkpoint_*/" + ckpt_io.CONFIG_FILE):
        try:
            epoch = int(json.loads(meta_file.read_text()).get("epoch", -1))
        except (ValueError, json.JSONDecodeError):
            continue
        if epoch > best_epoch:
            best, best_epoch = meta_file.parent, epoch
    return best
