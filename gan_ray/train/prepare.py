"""`gan-ray prepare`: an image folder or a built-in dataset decoded once into a prepared dataset
(gan_ray.core.prepared), as Ray Data work, so that on a cluster every node's CPUs decode in parallel.

Everything that can be known before Ray starts is checked first, each failure one line: a SRC with no images,
images of mixed channel counts, unreadable image headers (named; `--skip-corrupt` leaves them out, counted), a
DEST that holds another dataset or other files, a bucket that does not exist or refuses the write. Then a Ray
Dataset with one row per shard is mapped by tasks that decode, resize and write their shard and return its
manifest entry (a pixel-level corrupt file is found there: the task reports it instead of raising, so the command
can name it). The manifest is written last; a prepare that fails or is interrupted deletes the shards it wrote,
and one that finds its own leftovers (a marker, no manifest) starts over.
"""
from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
from pydantic import Field

from gan_ray.core import locations
from gan_ray.core import prepared as fmt
from gan_ray.core.config import BUILTIN_DATASETS, DEFAULT_DATA_DIR
from gan_ray.core.errors import UserError, one_line
from gan_ray.core.settings import Settings

MARKER = ".gan-ray-prepare"  # written first, deleted after the manifest: leftovers of an interrupted prepare
FOLDER_IMAGE_SIZE = 64  # a folder's images are resized to this unless --image-size says otherwise


class PrepareSettings(Settings):
    """`gan-ray prepare SRC --out DEST`: field names are the flags."""

    out: str = Field(description="where the prepared dataset goes: a path, a shared mount or an object-store "
                                     "URI (s3://bucket/x, gs://bucket/x); credentials from the environment's "
                                     "usual chain, never from flags (required, no default)")
    image_size: Optional[int] = Field(None, ge=1, description="side the images are resized to (default: a "
                                      f"built-in dataset's own, {FOLDER_IMAGE_SIZE} for a folder)")
    channels: Literal["auto", "1", "3"] = Field(
        "auto", description="1 (grayscale) or 3 (RGB); auto: the images' own, refusing a folder that mixes them")
    skip_corrupt: bool = Field(False, description="leave unreadable images out (counted and named in the "
                                                   "manifest) instead of stopping at the first")
    shard_mb: float = Field(32.0, gt=0, description="decoded megabytes per shard (more shards: finer streaming)")
    data_dir: str = Field(DEFAULT_DATA_DIR, description="where built-in datasets are downloaded / looked for")
    workers: Optional[int] = Field(None, ge=1, description="Ray tasks decoding at once (default: as many as the "
                                                           "cluster has CPUs)")



# -------------------------------------------------------------------------------------------------- sources
@dataclass
class Source:
    """What is being prepared, known before any Ray work: the shape, the classes, each split's items in the order
    they are written (a seeded permutation), and a key that says whether a DEST already holds this."""

    kind: str  # "folder" or "builtin"
    name: str
    shape: tuple[int, int, int]
    classes: list[str]
    items: dict[str, Any]  # folder: split -> [(path, label)]; builtin: split -> (images uint8, labels)
    key: str
    skipped: list[str] = field(default_factory=list)

    def count(self, split: str) -> int:
        return len(self.items[split]) if self.kind == "folder" else len(self.items[split][1])


def channels_of(mode: str) -> int:
    from gan_ray.core.data import GRAYSCALE_MODES

    return 1 if mode in GRAYSCALE_MODES or mode in ("LA", "I", "F") else 3


def read_source(src: str, settings: PrepareSettings) -> Source:
    if src in BUILTIN_DATASETS:
        return _builtin(src, settings)
    path = src[len("folder:"):] if src.startswith("folder:") else src
    return _folder(Path(path).expanduser().resolve(), settings)


def _split_order(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices in write order: the fixed split of gan_ray.core.data (same seed, same
    fraction, the same images held out as `folder:`), each in its permutation's order."""
    from gan_ray.core.data import HELDOUT_FRACTION, SPLIT_SEED

    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_held = int(round(n * HELDOUT_FRACTION))
    return perm[n_held:], perm[:n_held]


def _folder(root: Path, settings: PrepareSettings) -> Source:
    from PIL import Image

    from gan_ray.core.data import IMAGE_SUFFIXES, folder_files

    if not root.is_dir():
        raise UserError(f"prepare: {root}: no such directory (SRC is an image folder or one of "
                        f"{', '.join(BUILTIN_DATASETS)})")
    files, num_classes = folder_files(root)
    if not files:
        raise UserError(f"prepare: {root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if num_classes else []
    ok: list[tuple[Path, int]] = []
    by_channels: dict[int, list[Path]] = {1: [], 3: []}
    skipped: list[str] = []
    for f, label in files:  # headers only: no pixels decoded here
        try:
            with Image.open(f) as im:
                by_channels[channels_of(im.mode)].append(f)
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for a broken header
            if not settings.skip_corrupt:
                raise UserError(f"prepare: cannot read image {f}: {one_line(str(exc))} (--skip-corrupt leaves "
                                "unreadable images out, counted)") from None
            skipped.append(str(f.relative_to(root)))
            continue
        ok.append((f, label))
    if len(ok) < 2:
        raise UserError(f"prepare: {root}: found {len(ok)} readable images; need at least 2")
    if settings.channels == "auto":
        if by_channels[1] and by_channels[3]:
            raise UserError(f"prepare: {root} mixes channel counts: {len(by_channels[1])} grayscale images (e.g. "
                            f"{by_channels[1][0].name}) and {len(by_channels[3])} colour ones (e.g. "
                            f"{by_channels[3][0].name}); choose with --channels 1 or --channels 3")
        channels = 1 if by_channels[1] else 3
    else:
        channels = int(settings.channels)
    side = settings.image_size or FOLDER_IMAGE_SIZE
    train, held = _split_order(len(ok))
    h = hashlib.sha256(json.dumps(["folder", str(root), side, channels, classes]).encode())
    for f, label in ok:
        h.update(f"{f.relative_to(root)}:{f.stat().st_size}:{label}\n".encode())
    return Source("folder", str(root), (channels, side, side), classes,
                  {"train": [ok[i] for i in train], "heldout": [ok[i] for i in held]}, h.hexdigest(), skipped)


def _builtin(name: str, settings: PrepareSettings) -> Source:
    import torch

    from gan_ray.core.data import SPLIT_SEED, load_dataset

    splits = {}
    h = hashlib.sha256(json.dumps(["builtin", name, settings.image_size, settings.channels]).encode())
    for split in fmt.SPLITS:
        data = load_dataset(name, split, data_dir=settings.data_dir)
        images = data.images
        if images.dtype != torch.uint8:  # digits: float in [0, 1]
            images = images.mul(255).round().clamp(0, 255).to(torch.uint8)
        channels = images.shape[1] if settings.channels == "auto" else int(settings.channels)
        if settings.image_size and settings.image_size != images.shape[-1] or channels != images.shape[1]:
            images = _resize(images, settings.image_size or images.shape[-1], channels)
        order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
        splits[split] = (images.numpy()[order], data.labels.numpy()[order])
        h.update(data.fingerprint().encode())
    classes = [str(c) for c in range(10)] if name == "digits" else _class_names(name, settings.data_dir)
    shape = tuple(splits["train"][0].shape[1:])
    return Source("builtin", name, shape, classes, splits, h.hexdigest())  # type: ignore[arg-type]


def _class_names(name: str, data_dir: str) -> list[str]:
    import torchvision

    from gan_ray.core.data import TORCHVISION

    ds = getattr(torchvision.datasets, TORCHVISION[name])(str(Path(data_dir).expanduser()), train=False,
                                                           download=False)
    return [str(c) for c in ds.classes]


def _resize(images, side: int, channels: int):
    """uint8 [N, C, H, W] resized (bilinear, antialiased) and converted to `channels` (luma for grayscale)."""
    import torch
    import torch.nn.functional as F

    x = images.float()
    if channels == 1 and x.shape[1] == 3:
        x = (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    elif channels == 3 and x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    if x.shape[-1] != side:
        x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


# -------------------------------------------------------------------------------------------------- shards
def shard_plan(source: Source, shard_mb: float) -> list[dict[str, Any]]:
    """One row per shard: its file name and the items it holds (files and labels, or a range of an array)."""
    per = max(1, int(shard_mb * 2**20) // int(np.prod(source.shape)))
    rows = []
    for split in fmt.SPLITS:
        n = source.count(split)
        for k, start in enumerate(range(0, n, per)):
            row: dict[str, Any] = {"split": split, "file": f"{split}/part-{k:05d}.parquet", "start": start,
                                   "end": min(n, start + per)}
            if source.kind == "folder":
                chunk = source.items[split][start:start + per]
                row["paths"] = [str(p) for p, _ in chunk]
                row["labels"] = [int(lab) for _, lab in chunk]
            rows.append(row)
    return rows


def decode_file(path: str, shape: tuple[int, int, int]) -> np.ndarray:
    """One image file as uint8 [C, H, W]: converted like `folder:` datasets are (PIL convert, bilinear resize)."""
    from PIL import Image

    c, h, w = shape
    with Image.open(path) as im:
        im = im.convert("L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR)
        a = np.asarray(im, dtype=np.uint8)
    return a[None] if c == 1 else a.transpose(2, 0, 1)


class ShardWriter:
    """The Ray Data map function: decode one shard's images, write it, return its manifest entry (or the file
    that could not be read, when corrupt files are not skipped)."""

    def __init__(self, dest: str, shape: tuple[int, int, int], skip_corrupt: bool, arrays: dict | None):
        self.dest, self.shape, self.skip_corrupt, self.arrays = dest, shape, skip_corrupt, arrays

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        import ray

        skipped: list[str] = []
        if self.arrays is not None:  # a built-in dataset, decoded once on the driver and put in the object store
            images, labels = ray.get(self.arrays[row["split"]])
            images, labels = images[row["start"]:row["end"]], labels[row["start"]:row["end"]]
        else:
            kept, labels_kept = [], []
            for path, label in zip(row["paths"], row["labels"]):
                try:
                    kept.append(decode_file(path, self.shape))
                    labels_kept.append(label)
                except Exception as exc:  # a broken file: PIL raises OSError, SyntaxError, ValueError...
                    if not self.skip_corrupt:
                        return {"file": row["file"], "split": row["split"], "count": 0, "sha256": "",
                                "error": f"cannot read image {path}: {one_line(str(exc))}", "skipped": "[]"}
                    skipped.append(path)
            images = np.stack(kept) if kept else np.zeros((0, *self.shape), np.uint8)
            labels = np.asarray(labels_kept, dtype=np.int64)
        entry = fmt.write_shard(self.dest, row["file"], images, labels) if len(images) else \
            {"file": row["file"], "count": 0, "sha256": ""}
        return {**entry, "split": row["split"], "error": "", "skipped": json.dumps(skipped)}


# ---------------------------------------------------------------------------------------------- destination
def check_destination(dest: str, source: Source) -> fmt.Manifest | None:
    """The manifest already at DEST when it holds this very dataset (nothing to do); None when DEST is free (new,
    empty, or an interrupted prepare's leftovers, which are removed); one line when it holds anything else or
    cannot be written."""
    import pyarrow.fs as pafs

    locations.check_bucket(dest, "write")  # a write into a missing bucket fails only later, inside Ray
    fs, root = locations.filesystem(dest)
    try:
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.File:
            raise UserError(f"prepare: --out {dest} is a file")
        entries = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)) \
            if info.type == pafs.FileType.Directory else []
    except UserError:
        raise
    except OSError as exc:
        raise locations.storage_error(dest, exc, "write") from None
    names = {e.base_name for e in entries}
    if fmt.MANIFEST in names:
        existing = fmt.read_manifest(dest)
        if existing.source.get("key") == source.key:
            return existing
        raise UserError(f"prepare: --out {dest} already holds a different dataset (from {existing.source.get('name')}"
                        f", {existing.count['train'] + existing.count['heldout']} images "
                        f"{'x'.join(map(str, existing.shape))}); choose another --out or delete it first")
    if names and not names <= {MARKER, *fmt.SPLITS}:
        raise UserError(f"prepare: --out {dest} holds files that are not a prepared dataset "
                        f"({', '.join(sorted(names)[:3])}...); choose a new or empty location")
    if names:  # an interrupted prepare of ours: start over
        print(f"prepare: {dest} holds an unfinished prepare (no manifest); starting over", file=sys.stderr)
        _remove_shards(dest)
    try:  # the first write: a denied bucket or read-only mount is refused here, before any Ray work
        marker = json.dumps({"source": source.name, "key": source.key}).encode()
        locations.write_bytes(locations.uri(dest, MARKER), marker)
    except OSError as exc:
        raise locations.storage_error(dest, exc, "write") from None
    return None


def _remove_shards(dest: str) -> None:
    fs, root = locations.filesystem(dest)
    for split in fmt.SPLITS:
        try:
            fs.delete_dir(f"{root}/{split}")
        except (FileNotFoundError, OSError):
            pass


def _remove_marker(dest: str) -> None:
    fs, root = locations.filesystem(dest)
    try:
        fs.delete_file(f"{root}/{MARKER}")
    except (FileNotFoundError, OSError):
        pass


# ------------------------------------------------------------------------------------------------- prepare
@dataclass
class PrepareResult:
    manifest: fmt.Manifest
    seconds: float
    images_per_s: float
    already: bool = False


def prepare(src: str, settings: PrepareSettings, *, address: str | None = None,
            log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> PrepareResult:
    """Prepare SRC into settings.out (see the module's docstring); returns the manifest and the speed."""
    t0 = time.time()
    source = read_source(src, settings)
    dest = settings.out
    existing = check_destination(dest, source)
    if existing is not None:
        log(f"prepare: {dest} already holds this dataset (prepared {existing.created_at}); nothing to do")
        return PrepareResult(existing, 0.0, 0.0, already=True)
    try:
        manifest = _run(source, settings, address, log)
    except BaseException:
        _remove_shards(dest)  # nothing half-written left behind
        _remove_marker(dest)
        raise
    _remove_marker(dest)
    seconds = time.time() - t0
    total = manifest.count["train"] + manifest.count["heldout"]
    return PrepareResult(manifest, seconds, total / max(seconds, 1e-9))


def _run(source: Source, settings: PrepareSettings, address: str | None, log) -> fmt.Manifest:
    import ray
    import ray.data

    from gan_ray.cluster.connect import ensure_ray
    from gan_ray.core.data import HELDOUT_FRACTION, SPLIT_SEED

    ensure_ray(address)
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its INFO lines (plans, timings) and notices
    ray.data.DataContext.get_current().enable_progress_bars = False  # one line per shard instead
    plan = shard_plan(source, settings.shard_mb)
    arrays = None
    if source.kind == "builtin":
        arrays = {split: ray.put(source.items[split]) for split in fmt.SPLITS}
    writer = ShardWriter(settings.out, source.shape, settings.skip_corrupt, arrays)
    ds = ray.data.from_items(plan, override_num_blocks=len(plan))
    ds = ds.map(writer, num_cpus=1, concurrency=settings.workers)
    shards: dict[str, list[dict[str, Any]]] = {s: [] for s in fmt.SPLITS}
    skipped = list(source.skipped)
    total = sum(r["end"] - r["start"] for r in plan)
    done = 0
    t0 = time.time()
    for row in ds.iter_rows():
        if row["error"]:
            raise UserError(f"prepare: {row['error']} (--skip-corrupt leaves unreadable images out, counted)")
        newly_skipped = json.loads(row["skipped"])
        skipped += newly_skipped
        if row["count"]:
            shards[row["split"]].append({"file": row["file"], "count": int(row["count"]), "sha256": row["sha256"]})
        done += int(row["count"]) + len(newly_skipped)
        n_shards = sum(len(v) for v in shards.values())
        log(f"prepare: {n_shards}/{len(plan)} shards, {done:,}/{total:,} images, "
            f"{done / max(time.time() - t0, 1e-9):,.0f} img/s")
    for split in fmt.SPLITS:
        shards[split].sort(key=lambda s: s["file"])
    count = {s: sum(x["count"] for x in shards[s]) for s in fmt.SPLITS}
    if count["train"] < 1 or count["heldout"] < 1:
        raise UserError(f"prepare: {source.name}: {count['train']} training and {count['heldout']} held-out images "
                        "were readable; need at least one of each")
    split_rule = ({"rule": "seeded permutation; the first fraction held out", "seed": SPLIT_SEED,
                   "heldout_fraction": HELDOUT_FRACTION} if source.kind == "folder" or source.name == "digits" else
                  {"rule": "the source's own test set held out; each split in a seeded permutation",
                   "seed": SPLIT_SEED})
    manifest = fmt.Manifest(shape=source.shape, classes=source.classes, count=count, shards=shards,
                            source={"kind": source.kind, "name": source.name, "key": source.key,
                                    "skipped": sorted(skipped)},
                            split=split_rule, content_hash=fmt.content_hash(shards), location=settings.out)
    fmt.write_manifest(manifest)  # last: only now is DEST a dataset
    return manifest
