"""The Ray Train worker loop: what runs on every worker of a training run.

Plain PyTorch around `gan_ray.core.epoch.run_epoch`, with a handful of Ray calls: `prepare_model` (DDP for G and
D separately), `ray.train.get_checkpoint` (resume, and recovery after a worker dies) and `ray.train.report`
(metrics every epoch, a checkpoint from rank 0 every `checkpoint_every` epochs). The driver side is
`gan_ray.train.driver`.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

from gan_ray.core import checkpoint as ckpt_io
from gan_ray.core.config import TrainConfig
from gan_ray.core.data import ImageDataset, check_batch_fits, load_dataset
from gan_ray.core.epoch import ProgressLine, run_batches, run_epoch, stdout_line, steps_per_epoch
from gan_ray.core.fast_step import make_step_fn
from gan_ray.core.health import CollapseWatch
from gan_ray.core.fast_step import resolve_for as resolve_fast_path
from gan_ray.core.images import grid_png
from gan_ray.core.locations import is_remote, join, upload_dir, write_bytes
from gan_ray.core.models import ModelSpec
from gan_ray.core.run_dir import METRICS_FILE, append_metrics, truncate_metrics
from gan_ray.core.step import (GANState, build_state, eval_mode, latent_for_seed, set_learning_rates, spec_for,
                               unwrap)
from gan_ray.train.gpu_check import check_gpu_worker

# Hooks run on rank 0 at checkpoint (and --eval-every) epochs: (cfg, state, epoch, device) -> extra metrics, merged
# into that epoch's report. The driver passes them in the loop config (gan_ray.eval.hook.QualityHook adds fd and
# the other quality metrics); this module imports no evaluation code.
EpochHook = Callable[[TrainConfig, GANState, int, torch.device], dict[str, float]]


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Noise seed for one rank's epoch: distinct per rank, identical after a resume."""
    return (seed * 1_000_003 + epoch * 1_009 + rank) % (2**63 - 1)


def fixed_noise(spec: ModelSpec, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The noise behind the per-epoch sample grids: fixed, so the grids show one set of digits improving."""
    n = 8 * spec.num_classes if spec.conditional else 64
    labels = torch.arange(n) % spec.num_classes if spec.conditional else None
    return latent_for_seed(n, spec.latent_dim, seed), labels


def _all_reduce_epoch(res, world_size: int, device: torch.device) -> dict[str, float]:
    """Mean losses (and penalties) over ranks; throughput as all images over the slowest rank's time. Every rank
    gets the same values, so decisions taken on them (stopping a collapsed run) agree."""
    import torch.distributed as dist

    t = torch.tensor([res.loss_d, res.loss_g, res.d_real, res.d_fake, res.r1 or 0.0, res.r2 or 0.0, res.images,
                      res.seconds], device=device, dtype=torch.float64)
    if world_size > 1 and dist.is_initialized():
        sums = t.clone()
        dist.all_reduce(sums)
        slowest = t[7:8].clone()
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        t = torch.cat([sums[:6] / world_size, sums[6:7], slowest])
    loss_d, loss_g, d_real, d_fake, r1, r2, images, seconds = t.tolist()
    out = {"loss_d": loss_d, "loss_g": loss_g, "d_real": d_real, "d_fake": d_fake,
           "images_per_s": images / max(seconds, 1e-9), "epoch_seconds": seconds}
    if res.r1 is not None:
        out["r1"] = r1
    if res.r2 is not None:
        out["r2"] = r2
    return out


def _networks(state: GANState) -> list[torch.nn.Module]:
    """G, D and the EMA generator as plain modules: everything a checkpoint, an evaluation or an export reads."""
    return [unwrap(state.G), unwrap(state.D)] + ([state.G_ema] if state.G_ema is not None else [])


def sync_buffers(state: GANState, world_size: int) -> None:
    """Average the floating-point buffers of G, D and the EMA generator (BatchNorm's running mean and variance)
    over ranks, in place, so that every rank holds the same ones.

    DDP keeps parameters equal (identical averaged gradients, identical optimisers), but its per-forward buffer
    broadcast is off (`ddp_buffer_kwargs`), so each rank's BatchNorm statistics follow its own shard and drift
    apart. Normalisation in training uses the batch's own statistics either way; the running ones matter only in
    eval mode: sample grids, evaluation, checkpoints and the exported model. So they are averaged once, at the end
    of every epoch, before anything reads them: the mean of the ranks' running means is the running mean over
    the global batch (equal shards), and the mean of their variances misses only the spread between shard means.
    SyncBatchNorm would normalise with global statistics instead, but it needs an all-gather per BatchNorm layer
    in each of G's three forwards per step, and PyTorch's implementation refuses CPU tensors (gloo workers)."""
    import torch.distributed as dist

    if world_size == 1 or not dist.is_initialized():
        return
    buffers = [b for net in _networks(state) for b in net.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.detach().reshape(-1).double() for b in buffers])
    dist.all_reduce(flat)  # every rank receives the same sum
    flat /= world_size
    offset = 0
    for b in buffers:
        b.copy_(flat[offset:offset + b.numel()].view_as(b))
        offset += b.numel()


def weights_digest(state: GANState, part: str = "parameters") -> str:
    """A short hash of this rank's G, D and EMA generator, bit for bit: their `parameters` (DDP keeps them equal on
    every rank) or their `buffers` (BatchNorm statistics: equal once `sync_buffers` has run)."""
    import hashlib

    h = hashlib.sha256()
    for net in _networks(state):
        tensors = net.named_parameters() if part == "parameters" else net.named_buffers()
        for name, t in sorted(tensors, key=lambda item: item[0]):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _gather(value: Any, world_size: int) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    import torch.distributed as dist

    if world_size == 1 or not dist.is_initialized():
        return [value]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, value)
    return out


def rank_disagreement(metrics: dict[str, Any]) -> str | None:
    """The warning for a checkpoint at which the ranks do not hold the same weights or statistics (None if they
    do): which rank's state a checkpoint, an evaluation or an export took would then be left to chance."""
    parts = [part for part in ("weights_digest", "buffers_digest") if len(set(metrics.get(part, ()))) > 1]
    if not parts:
        return None
    what = " and ".join({"weights_digest": "parameters", "buffers_digest": "BatchNorm statistics"}[p] for p in parts)
    return f"the ranks' {what} differ at epoch {metrics['epoch']} (digests {metrics[parts[0]]}): rank 0's are saved"


def _agree(stop: bool, world_size: int, device: torch.device) -> bool:
    """Rank 0's decision, on every rank (a stop must be taken by all ranks at the same epoch)."""
    import torch.distributed as dist

    if world_size == 1 or not dist.is_initialized():
        return stop
    flag = torch.tensor([1.0 if stop else 0.0], device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def self_condition(state: GANState, data: ImageDataset, cfg: TrainConfig, rank: int, world: int) -> ImageDataset:
    """--clusters (gan_ray.core.clusters): the dataset with each image's k-means cluster as its label, and G's
    sampling shares set. Rank 0 fits the centres and every rank takes rank 0's, so all assign with the same ones
    whatever scikit-learn's threads do; a restored run reuses its checkpoint's and never re-clusters."""
    from gan_ray.core import clusters

    centres = state.extra.get("cluster_centres")
    if centres is None:
        t0 = time.time()
        centres = clusters.fit_centres(data.images.cpu(), cfg.clusters, cfg.seed) if rank == 0 else None
        centres = _gather(centres, world)[0]  # rank 0's, on every rank
        state.extra["cluster_centres"] = centres
        fitted = f" fitted in {time.time() - t0:.1f} s"
    else:
        fitted = " from the checkpoint"
    assignments = clusters.assign(data.images, centres.to(data.images.device))
    shares = clusters.shares_of(assignments.cpu(), cfg.clusters)
    for net in (unwrap(state.G), state.G_ema):
        if net is not None:
            net.shares.copy_(shares)
    if rank == 0:
        stdout_line(f"clusters: {cfg.clusters} k-means clusters of {len(data):,} images{fitted}; shares "
                    f"{shares.min().item():.1%} to {shares.max().item():.1%}")
    return replace(data, labels=assignments.to(data.labels.device))


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
    cfg = TrainConfig.from_mapping(config["train"])
    if cfg.gpus_per_worker:
        check_gpu_worker()  # before any CUDA call: a node whose driver cannot run this torch is one line, at once
    hooks: list[EpochHook] = config.get("hooks", [])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    stream = None
    if cfg.data_mode == "stream":  # Ray Data feeds this rank its share of a prepared dataset (gan_ray.train.ingest)
        from gan_ray.train.ingest import StreamedShard

        info = config["stream"]
        stream = StreamedShard(ray.train.get_dataset_shard("train"), tuple(info["shape"]), info["image_bytes"],
                               cfg.batch_size, cfg.seed, rank=rank, last_epoch=cfg.epochs)
        spec = spec_for(cfg, tuple(info["shape"]), info["num_classes"])
    else:
        data = load_dataset(cfg.dataset, "train", data_dir=cfg.data_dir, image_size=cfg.image_size)
        check_batch_fits(len(data), world, cfg.batch_size)  # the driver checked the count it expects; this is real
        if device.type == "cuda":
            data = data.to(device)  # GPU-resident: batches are gathered on the device, no host copies per step
        spec = spec_for(cfg, data.shape, data.num_classes)
    ddp_kwargs = ddp_buffer_kwargs()
    fast = resolve_fast_path(cfg, device, world)  # `auto` -> the fastest correct path on this device
    state = build_state(cfg, spec, device, world,
                        lambda m: ray.train.torch.prepare_model(m, parallel_strategy_kwargs=ddp_kwargs),
                        channels_last=fast.channels_last, capturable=fast.cuda_graph)

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
    if cfg.clusters:  # every image's cluster becomes its label, before anything reads one
        data = self_condition(state, data, cfg, rank, world)
    if rank == 0:
        truncate_metrics(join(run_dir, METRICS_FILE), start_epoch - 1)  # rows after the checkpoint are replayed
    z_fixed, labels_fixed = fixed_noise(spec, cfg.seed)
    # Marks the first epoch after a restore (resume, or recovery from a lost worker) in metrics.jsonl.
    restored_from = start_epoch - 1 if restored is not None else None

    # The config's rates win over the ones saved with the optimiser state (a no-op on a plain resume): after an
    # exploit the trial trains on with its own (mutated) rates and the donor's Adam moments. Before a CUDA graph
    # captures them (a schedule, --lr-final, runs eagerly and sets them again every epoch).
    set_learning_rates(state, cfg, start_epoch)
    step_fn = make_step_fn(state, fast)  # after the restore: a CUDA graph captures the restored tensors
    board = TensorBoard(run_dir, start_epoch) if rank == 0 else None
    watch = CollapseWatch()
    for epoch in range(start_epoch, cfg.epochs + 1):
        t_epoch = time.time()
        set_learning_rates(state, cfg, epoch)  # --lr-final's schedule
        torch.manual_seed(epoch_seed(cfg.seed, epoch, rank))
        progress = ProgressLine(epoch, cfg.epochs, None if stream is not None else
                                steps_per_epoch(len(data), world, cfg.batch_size),
                                cfg.batch_size * world) if rank == 0 else None
        if stream is not None:
            res = run_batches(state, stream.epoch(epoch), batch_size=cfg.batch_size, step_fn=step_fn,
                              progress=progress)
        else:
            res = run_epoch(state, data, epoch=epoch, rank=rank, world_size=world, batch_size=cfg.batch_size,
                            seed=cfg.seed, step_fn=step_fn, progress=progress)
        metrics: dict[str, Any] = {"epoch": epoch, "step": state.step, "images_seen": state.images_seen,
                                   "lr_g": state.opt_g.param_groups[0]["lr"],
                                   "lr_d": state.opt_d.param_groups[0]["lr"],
                                   **_all_reduce_epoch(res, world, device)}
        if stream is not None:  # each rank's steps: equal by construction (streaming_split(equal=True), full batches)
            metrics["rank_steps"] = [int(s) for s in _gather(res.steps, world)]
        if restored_from is not None and epoch == start_epoch:
            metrics["restored_from"] = restored_from
        sync_buffers(state, world)  # before anything reads the running statistics (grids, hooks, checkpoints)
        is_ckpt = epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs
        if is_ckpt:  # each rank's state, bit for bit: equal on every rank (tests check this is so)
            metrics["weights_digest"] = _gather(weights_digest(state, "parameters"), world)
            metrics["buffers_digest"] = _gather(weights_digest(state, "buffers"), world)
        grid = None
        if rank == 0:
            for hook in hooks:
                if is_ckpt or (cfg.eval_every and epoch % cfg.eval_every == 0):
                    metrics.update(hook(cfg, state, epoch, device))
            if cfg.sample_every and epoch % cfg.sample_every == 0:
                with torch.no_grad(), eval_mode(state.sampler) as sampler:  # --no-ema: G itself, in train mode
                    imgs = sampler(z_fixed.to(device), labels_fixed.to(device) if labels_fixed is not None else None)
                grid = grid_png(imgs, nrow=spec.num_classes or 8)
                write_bytes(join(run_dir, "samples", f"epoch_{epoch:04d}.png"), grid)
            failed = watch.check(metrics)
            warnings = [w for w in (rank_disagreement(metrics), failed) if w]
            if warnings:
                metrics["warning"] = "; ".join(warnings)
            if failed and cfg.stop_on_collapse:
                metrics["stopped"] = failed
            metrics["wall_s"] = round(time.time() - t_epoch, 3)
            metrics["time"] = time.time()
            append_metrics(join(run_dir, METRICS_FILE), metrics)
            board.write(epoch, metrics, grid)
        stop = _agree("stopped" in metrics, world, device)
        if is_ckpt or stop:
            with tempfile.TemporaryDirectory() as tmp:
                checkpoint = None
                if rank == 0:
                    ckpt_io.save(Path(tmp), state, epoch=epoch, config=cfg.to_dict(), metrics=metrics)
                    checkpoint = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(metrics, checkpoint=checkpoint)
        else:
            ray.train.report(metrics)
        if stop:
            break
    if board is not None:
        board.close()


class TensorBoard:
    """Rank 0's TensorBoard event files in RUN_DIR/tensorboard: every numeric metric of an epoch as a scalar
    (losses, D's outputs, img/s, the quality metrics), and the epoch's sample grid as an image.
    `purge_step`: after a resume or a recovery the replayed epochs replace the ones logged before.

    In object storage (which cannot append) the writer writes a local directory, uploaded after every epoch: each
    start of the worker writes its own event file, so uploads never overwrite another run's events."""

    def __init__(self, run_dir: Path | str, start_epoch: int):
        from tensorboardX import SummaryWriter

        self.remote = join(run_dir, "tensorboard") if is_remote(run_dir) else None
        self.local = tempfile.mkdtemp(prefix="gan-ray-tensorboard-") if self.remote else str(join(run_dir,
                                                                                                  "tensorboard"))
        self.writer = SummaryWriter(self.local, purge_step=start_epoch)

    def write(self, epoch: int, metrics: dict[str, Any], grid_png: bytes | None) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("epoch", "time"):
                self.writer.add_scalar(f"train/{key}", value, epoch)
        if grid_png is not None:
            import io

            import numpy as np
            from PIL import Image

            image = np.asarray(Image.open(io.BytesIO(grid_png)).convert("RGB"))
            self.writer.add_image("samples", image, epoch, dataformats="HWC")
        self.writer.flush()
        if self.remote:
            upload_dir(self.local, self.remote)

    def close(self) -> None:
        self.writer.close()
        if self.remote:
            upload_dir(self.local, self.remote)
            shutil.rmtree(self.local, ignore_errors=True)
