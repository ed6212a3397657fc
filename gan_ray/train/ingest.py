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
  them); turning a batch's cells into a uint8 tensor, then floats, happens in the worker's prefetch threads
  (`iter_torch_batches(prefetch_batches=...)`), overlapping the step.
"""
from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import torch

from gan_ray.core.config import TrainConfig
from gan_ray.core.prepared import Manifest, choose_mode, human_bytes, is_prepared, read_manifest

DATA_CPUS = 1.0  # logical CPUs a streaming run keeps free beyond its workers' for Ray Data's read tasks
PREFETCH_BATCHES = 4  # batches decoded ahead of the step, per worker
SHUFFLE_BUFFER_BYTES = 64 * 2**20  # each worker's local shuffle buffer (rows, bounded by bytes)
SHUFFLE_BUFFER_MAX_ROWS = 20_000
MMAP_THRESHOLD_BYTES = 256 * 2**10  # batch buffers above this get their own mappings (see bound_heap)
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def bound_heap() -> bool:
    """Keep a streaming worker's private memory flat through an epoch; True where it applied (glibc).

    Each batch allocates a few MB (the decoded uint8 images, then floats) in the iterator's prefetch threads and
    frees them a step later. glibc raises its mmap threshold to the size of the largest block freed (up to 32 MB),
    so after the first batch these buffers come from the threads' heap arenas instead, where a buffer still in use
    near an arena's top keeps every freed one below it from going back to the OS. Measured on this machine: one
    streamed epoch of 64x64 RGB batches of 256 grew a worker's RssAnon by ~200 MB per 10,000 images and let go
    only when the iterator ended; with the threshold fixed it stays flat. A fixed threshold also turns off the
    dynamic adjustment (mallopt(3)); the cost is a mmap/munmap pair per batch buffer, small beside a step.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return bool(libc and libc.gnu_get_libc_version and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # not glibc (musl, macOS): its allocator, its behaviour
        return False


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


def _collate_class():
    from ray.data.collate_fn import ArrowBatchCollateFn

    from gan_ray.core.prepared import decode

    class ImageBatch(ArrowBatchCollateFn):
        """An Arrow batch of (image, label) rows to (float images [B, C, H, W] in [0, 1], int64 labels [B]);
        runs in the iterator's prefetch threads, so it overlaps the step."""

        def __init__(self, shape: tuple[int, int, int]):
            self.shape = shape

        def __call__(self, batch):
            images = torch.from_numpy(decode(batch.column("image"), self.shape).copy())
            labels = torch.from_numpy(np.asarray(batch.column("label"), dtype=np.int64).copy())
            return images.float().div_(255.0), labels

    return ImageBatch


class StreamedShard:
    """This worker's share of a streamed prepared dataset: one iterator of batches per epoch."""

    def __init__(self, shard, shape: tuple[int, int, int], image_bytes: int, batch_size: int, seed: int):
        self.shard, self.shape, self.batch_size, self.seed = shard, shape, batch_size, seed
        bound_heap()
        self.buffer_rows = shuffle_buffer_rows(image_bytes, batch_size)
        self.collate = _collate_class()(shape)

    def epoch(self, epoch: int, rank: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.shard.iter_torch_batches(
            batch_size=self.batch_size, drop_last=True, collate_fn=self.collate, device="cpu",
            prefetch_batches=PREFETCH_BATCHES, local_shuffle_buffer_size=self.buffer_rows,
            local_shuffle_seed=(self.seed * 1_000_003 + epoch * 1_009 + rank) % (2**31 - 1)))


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
    return cfg.replace(data_mode=mode), f"data: {mode}, picked by --data-mode auto: {why} ({what})"
