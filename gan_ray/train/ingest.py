"""Ray Data ingest of a prepared dataset: the Dataset a TorchTrainer is given, each worker's batches, and the choice
between holding the data in memory and streaming it (`--data-mode`).

What a Ray Train user expects from Ray Data ingest, chosen here:
- the trainer gets `datasets={"train": read_parquet(shards)}`; Train's default DataConfig gives each worker its own
  `streaming_split(n, equal=True)` iterator, so every rank sees exactly as many rows, and with full batches only
  (`drop_last`) every rank runs the same number of steps, which DDP's collectives need;
- each epoch is a new execution of the read: the shard files come in a new seeded order every epoch
  (`FileShuffleConfig(seed, reseed_after_execution=True)`) and rows are mixed again in each worker by a local
  shuffle buffer of bounded size, not a global shuffle (that would move the whole dataset through the object store
  every epoch);
- the read tasks run as Ray tasks beside the workers (1 CPU each, so a run needs a CPU beyond its workers' for
  them); fetching, shuffling and slicing the next batches happens in the worker's prefetch threads
  (`iter_batches(prefetch_batches=...)`), overlapping the step, and the batch becomes float tensors in the
  training thread (`to_tensors`: why there).
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Iterator

import numpy as np
import torch

from gan_ray.core.config import TrainConfig
from gan_ray.core.errors import UserError
from gan_ray.core.prepared import Manifest, choose_mode, decode, human_bytes, is_prepared, read_manifest

DATA_CPUS = 1.0  # logical CPUs a streaming run keeps free beyond its workers' for Ray Data's read tasks
PREFETCH_BATCHES = 4  # batches fetched ahead of the step, per worker
SHUFFLE_BUFFER_BYTES = 64 * 2**20  # each worker's local shuffle buffer (rows, bounded by bytes)
SHUFFLE_BUFFER_MAX_ROWS = 20_000
LOOKAHEAD_BYTES = 64 * 2**20  # Arrow batches read ahead per worker, across the epoch boundary (see StreamedShard)


def train_dataset(cfg: TrainConfig):
    """The training split as a Ray Dataset of (image, label) rows, reshuffled by file every epoch."""
    import ray.data
    from ray.data import FileShuffleConfig

    manifest = read_manifest(cfg.dataset)
    ctx = ray.data.DataContext.get_current()
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its INFO lines (plans, timings) and notices
    ctx.enable_progress_bars = False  # the run prints one line per epoch; Ray Data's bars would interleave
    ctx.print_on_execution_start = False  # nor a plan per epoch from the split coordinator
    return ray.data.read_parquet(manifest.files("train"), partitioning=None,
                                 shuffle=FileShuffleConfig(seed=cfg.seed, reseed_after_execution=True)
                                 ).select_columns(["image", "label"])  # pushed down into the read (Ray 2.60)


def shuffle_buffer_rows(manifest_image_bytes: int, batch_size: int) -> int:
    return max(batch_size, min(SHUFFLE_BUFFER_MAX_ROWS, SHUFFLE_BUFFER_BYTES // max(1, manifest_image_bytes)))


def to_tensors(batch, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """An Arrow batch of (image, label) rows as (float images [B, C, H, W] in [0, 1], int64 labels [B]).

    Called in the training thread, not in the iterator's prefetch threads (a `collate_fn` would run there): the
    Arrow batch itself (fetched, shuffled and sliced ahead of the step) lives in Arrow's own allocator, and only
    these two tensors come from glibc's malloc, in the thread that allocates and frees the step's own tensors.
    Allocated in the prefetch threads, they came from those threads' heap arenas, where one buffer still in use
    near an arena's top keeps every freed one below it from going back to the OS (a worker's RssAnon climbed ~200
    MB per 10,000 64x64 RGB images). Forcing them into mmaps instead (a fixed M_MMAP_THRESHOLD, for the whole
    process) sent every large allocation of the step itself through mmap and page faults too: 0.60x the
    in-memory path's speed on MNIST. Measured, both ways: docs/datasets.md. The conversion is one pass over the
    batch, small beside a step.
    """
    images = torch.from_numpy(decode(batch.column("image"), shape).astype(np.float32)).div_(255.0)
    labels = torch.from_numpy(np.asarray(batch.column("label"), dtype=np.int64).copy())
    return images, labels


class Lookahead:
    """A queue bounded by bytes, not items: as many batches ahead as fit in the budget, so small images run far
    ahead (a whole epoch's share of MNIST) and large ones a few batches, for the same memory."""

    def __init__(self, budget_bytes: int):
        self.budget, self.bytes = budget_bytes, 0
        self.items: deque = deque()
        self.cond = threading.Condition()

    def put(self, item, nbytes: int) -> None:
        with self.cond:  # one item always fits, however large: a batch over the budget must still pass
            self.cond.wait_for(lambda: not self.items or self.bytes + nbytes <= self.budget)
            self.items.append((item, nbytes))
            self.bytes += nbytes
            self.cond.notify_all()

    def get(self):
        with self.cond:
            self.cond.wait_for(lambda: bool(self.items))
            item, nbytes = self.items.popleft()
            self.bytes -= nbytes
            self.cond.notify_all()
            return item


class StreamedShard:
    """This worker's share of a streamed prepared dataset: one iterator of batches per epoch, read ahead across the
    epoch boundary.

    Each epoch is a new execution of the read, and its first batch took 5 s to arrive on 2 loaded cores (the split
    coordinator's new execution, the read tasks' start, a whole file read before its first block): a sixth of an
    MNIST epoch spent waiting, the whole gap between streaming and the in-memory path. One thread here iterates
    the epochs back to back into a `Lookahead`, so the next epoch's execution starts while this one's last
    batches train (both ranks reach it together: their shares are equal). Only the epochs the run will train are
    started: an execution begun and abandoned would hold the coordinator's epoch barrier.
    """

    def __init__(self, shard, shape: tuple[int, int, int], image_bytes: int, batch_size: int, seed: int, *,
                 rank: int, last_epoch: int):
        self.shard, self.shape, self.batch_size, self.seed = shard, shape, batch_size, seed
        self.rank, self.last_epoch = rank, last_epoch
        self.buffer_rows = shuffle_buffer_rows(image_bytes, batch_size)
        self.ahead = Lookahead(LOOKAHEAD_BYTES)
        self.reader: threading.Thread | None = None

    def _batches(self, epoch: int):
        return self.shard.iter_batches(
            batch_size=self.batch_size, drop_last=True, batch_format="pyarrow", prefetch_batches=PREFETCH_BATCHES,
            local_shuffle_buffer_size=self.buffer_rows,
            local_shuffle_seed=(self.seed * 1_000_003 + epoch * 1_009 + self.rank) % (2**31 - 1))

    def _read(self, first: int) -> None:
        try:
            for epoch in range(first, self.last_epoch + 1):
                for batch in self._batches(epoch):
                    self.ahead.put((epoch, batch), batch.nbytes)
                self.ahead.put((epoch, None), 0)  # the epoch's end
        except BaseException as exc:  # raised again in the training thread, where it is handled
            self.ahead.put((None, exc), 0)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.reader is None:  # the first epoch this worker trains (1, or the one after a restored checkpoint)
            self.reader = threading.Thread(target=self._read, args=(epoch,), name="gan-ray-lookahead", daemon=True)
            self.reader.start()
        while True:
            tag, batch = self.ahead.get()
            if isinstance(batch, BaseException):
                raise batch
            if tag != epoch:
                raise RuntimeError(f"streamed epoch {tag} arrived while training epoch {epoch}")
            if batch is None:
                return
            yield to_tensors(batch, self.shape)


def stream_info(cfg: TrainConfig) -> dict:
    """What the workers need to know of a streamed dataset (passed in the loop config: no manifest read there)."""
    m = read_manifest(cfg.dataset)
    return {"shape": list(m.shape), "num_classes": m.num_classes, "image_bytes": m.image_bytes,
            "train_count": m.count["train"]}


# --------------------------------------------------------------------------------------------- choosing the mode
def worker_memory(cfg: TrainConfig) -> float | None:
    """The memory that goes with one worker's CPUs on the smallest node of the cluster (Ray's `memory` resource,
    shared out by CPU), or None when no node reports it."""
    from gan_ray.cluster.resources import node_resources

    shares = [n["memory"] * cfg.cpus_per_worker / n["CPU"] for n in node_resources()
              if n.get("memory") and n.get("CPU")]
    return min(shares) if shares else None


def resolve_data_mode(cfg: TrainConfig) -> tuple[TrainConfig, str | None]:
    """The config with --data-mode decided (memory or stream), and a line saying what was picked and why (None for
    datasets that are never streamed). Needs Ray (the nodes' memory) for `auto` on a prepared dataset."""
    if not is_prepared(cfg.dataset):
        return (cfg.replace(data_mode="memory") if cfg.data_mode == "auto" else cfg), None
    manifest: Manifest = read_manifest(cfg.dataset)
    size = human_bytes(manifest.decoded_bytes())
    what = f"{manifest.count['train']:,} training images, {size} decoded"
    if cfg.data_mode != "auto":
        return cfg, f"data: {cfg.data_mode} (--data-mode {cfg.data_mode}; {what})"
    mode, why = choose_mode(manifest.decoded_bytes(), worker_memory(cfg))
    if mode == "stream" and cfg.clusters:
        raise UserError(f"--clusters clusters the training images in each worker's memory, and {what} would be "
                        f"streamed ({why}); give the workers more memory, or drop --clusters")
    return cfg.replace(data_mode=mode), f"data: {mode}, picked by --data-mode auto: {why} ({what})"
