"""The Ray Train worker loop: what runs on every worker of a training run.

Plain PyTorch around `gan_ray.core.epoch.run_epoch`, with a handful of Ray calls: `prepare_model` (DDP for G and
D separately), `ray.train.get_checkpoint` (resume, and recovery after a worker dies) and `ray.train.report`
(metrics every epoch, a checkpoint from rank 0 every `checkpoint_every` epochs). The driver side is
`gan_ray.train.driver`.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from gan_ray.core import checkpoint as ckpt_io
from gan_ray.core.config import TrainConfig
from gan_ray.core.data import check_batch_fits, load_dataset
from gan_ray.core.epoch import run_epoch
from gan_ray.core.fast_step import FastPath, make_step_fn, prepare_module
from gan_ray.core.fast_step import resolve_for as resolve_fast_path
from gan_ray.core.images import grid_png, write_atomic
from gan_ray.core.models import ModelSpec, build
from gan_ray.core.run_dir import METRICS_FILE, truncate_metrics
from gan_ray.core.step import GANState, eval_mode, latent_for_seed, make_state

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
