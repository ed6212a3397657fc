"""One epoch of adversarial training over a rank's shard: the part of the per-worker loop that has no Ray in it.

Used by the Ray Train worker loop, by the single-process reference in the benchmark and by tests, so all three run
the same code. Metrics are accumulated on the device and synchronised once per epoch. The step function is
`train_step` or a fast path from `gan_ray.core.fast_step` (same math, fewer launches): the caller picks it.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from gan_ray.core.data import ImageDataset, shard_order
from gan_ray.core.step import GANState, train_step


@dataclass
class EpochResult:
    """Means over the epoch's steps on this rank, images this rank consumed, and seconds it took."""

    loss_d: float
    loss_g: float
    d_real: float
    d_fake: float
    images: int
    seconds: float
    steps: int
    r1: float | None = None  # mean R1 penalty over the epoch's regularisation steps (None: R1 off)
    r2: float | None = None


def steps_per_epoch(n_images: int, world_size: int, batch_size: int) -> int:
    """Full batches per rank per epoch (identical on every rank, so DDP collectives line up)."""
    return (n_images // world_size) // batch_size


StepFn = Callable[..., dict]  # (state, real, labels) -> detached scalar tensors, like train_step
Progress = Callable[[int], None]  # called after every step with the steps done so far in the epoch


def stdout_line(line: str) -> None:
    """One line on stdout, written to the stream rather than print()ed: Ray Train's workers patch print() to log
    through Train's logger as well as to the stream, and a printed line reached the console twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class ProgressLine:
    """A line at most every `interval_s` while an epoch runs, so that a long epoch (minutes for a ResNet on CPUs)
    shows it is moving: "epoch 2/4: step 300/937 (32%), 177 img/s, about 3 min left in the epoch". Short epochs
    print nothing (the first line waits `interval_s`). Host-side counts only: it never syncs the device."""

    def __init__(self, epoch: int, epochs: int, steps: int | None, images_per_step: int, interval_s: float = 30.0,
                 write: Callable[[str], None] | None = None):
        self.epoch, self.epochs, self.steps, self.images_per_step = epoch, epochs, steps, images_per_step
        self.interval_s, self.write = interval_s, write or stdout_line
        self.t0 = self.last = time.perf_counter()

    def __call__(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last < self.interval_s or done == 0:
            return
        self.last = now
        rate = done / (now - self.t0)  # steps per second, all ranks in step
        line = f"epoch {self.epoch}/{self.epochs}: step {done}"
        if self.steps:
            left_min = (self.steps - done) / rate / 60
            line += f"/{self.steps} ({100 * done / self.steps:.0f}%)"
        line += f", {rate * self.images_per_step:.0f} img/s"
        if self.steps:
            line += f", about {left_min:.0f} min left in the epoch" if left_min >= 1 else ", under a minute left"
        self.write(line)


def run_epoch(state: GANState, data: ImageDataset, *, epoch: int, rank: int, world_size: int, batch_size: int,
              seed: int, step_fn: StepFn = train_step, progress: Progress | None = None) -> EpochResult:
    """Train over this rank's shard of one epoch. `data` may live on CPU or on the training device (then no host
    copy happens per step: batches are gathered on the device)."""
    order = shard_order(len(data), epoch=epoch, rank=rank, world_size=world_size, seed=seed, device=data.images.device)
    n_steps = len(order) // batch_size
    batches = (data.batch(order[i * batch_size:(i + 1) * batch_size]) for i in range(n_steps))
    return run_batches(state, batches, batch_size=batch_size, step_fn=step_fn, progress=progress)


def run_batches(state: GANState, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, batch_size: int,
                step_fn: StepFn = train_step, progress: Progress | None = None) -> EpochResult:
    """Train on every (float images, labels) batch of an epoch: gathered from memory (`run_epoch`) or streamed by
    Ray Data (gan_ray.train.ingest, which guarantees every rank the same number of batches)."""
    device = next(state.D.parameters()).device
    sums = torch.zeros(6, device=device)  # loss_d, loss_g, d_real, d_fake, r1, r2
    n_steps = g_updates = reg_steps = 0
    t0 = time.perf_counter()
    for real, labels in batches:
        real = real.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True) if state.spec.condition_count else None
        out = step_fn(state, real, labels)
        n_steps += 1
        sums[0] += out["loss_d"]
        sums[2] += out["d_real"]
        sums[3] += out["d_fake"]
        if "loss_g" in out:
            sums[1] += out["loss_g"]
            g_updates += 1
        if "r1" in out or "r2" in out:
            reg_steps += 1
            sums[4] += out.get("r1", 0.0)
            sums[5] += out.get("r2", 0.0)
        if progress is not None:
            progress(n_steps)
    vals = sums.tolist()  # the one host sync of the epoch
    seconds = time.perf_counter() - t0
    d = max(n_steps, 1)
    r = max(reg_steps, 1)
    return EpochResult(loss_d=vals[0] / d, loss_g=vals[1] / max(g_updates, 1), d_real=vals[2] / d,
                       d_fake=vals[3] / d, images=n_steps * batch_size, seconds=seconds, steps=n_steps,
                       r1=vals[4] / r if state.r1_gamma else None, r2=vals[5] / r if state.r2_gamma else None)
