"""The prepared-dataset format: images decoded once, resized, stored as uint8 in Parquet shards with a manifest.

`gan-ray prepare` (gan_ray.train.prepare) writes it; training reads it whole into each worker (`--data-mode
memory`) or streams it through Ray Data (`stream`, gan_ray.train.ingest). This module is the format itself and
stays Ray-free: pyarrow reads and writes it, on a local path, a shared mount or object storage alike.

    DEST/manifest.json              written last: a DEST without it is not (yet) a dataset
    DEST/train/part-00000.parquet   columns image (binary: C*H*W uint8, row-major CHW) and label (int64, -1: none)
    DEST/heldout/part-00000.parquet the fixed held-out split, never trained on

Rows are stored in a seeded random order (the split's own permutation), so every shard holds a mix of classes
(block-level shuffling in a stream then mixes well) and any prefix of the held-out split is a uniform sample of
it (the quality metrics read a bounded prefix, never the whole set). Credentials for object storage come from the
usual chains (environment, config files, IRSA / Workload Identity), never from flags: pyarrow's filesystems read
them.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gan_ray.core.config import BUILTIN_DATASETS
from gan_ray.core.errors import UserError, one_line
from gan_ray.core.locations import filesystem, read_bytes, storage_error, uri, write_bytes

FORMAT = "gan-ray-prepared/1"
MANIFEST = "manifest.json"
SPLITS = ("train", "heldout")
# What the quality metrics read of a prepared set: a bounded prefix (a uniform sample, rows are shuffled).
HELDOUT_SAMPLE_BYTES = 256 * 2**20
HELDOUT_SAMPLE_MAX = 10_000  # MNIST's whole test set
TRAIN_SAMPLE_BYTES = 512 * 2**20  # what the feature extractor trains on (it takes at most 4000 steps of 64)
TRAIN_SAMPLE_MAX = 60_000
# --data-mode auto keeps the decoded training split in each worker's memory when it takes at most this share of
# the memory that goes with a worker's CPUs on the smallest node (the rest: model, optimiser, Ray, the OS).
MEMORY_SHARE = 0.25


def is_prepared(name: str) -> bool:
    """Whether --dataset names a prepared dataset (a path or URI) rather than a built-in or folder: dataset."""
    return name not in BUILTIN_DATASETS and not name.startswith("folder:")


def looks_like_location(name: str) -> bool:
    """A path or URI, as opposed to a misspelt dataset name: `./mnist`, `/data/x`, `~/x`, `s3://b/x`."""
    return "/" in name or name.startswith(("~", "."))


# ------------------------------------------------------------------------------------------------- manifest
@dataclass
class Manifest:
    """What a prepared dataset holds; `location` is where it was read from (not stored)."""

    shape: tuple[int, int, int]
    classes: list[str]
    count: dict[str, int]
    shards: dict[str, list[dict[str, Any]]]  # split -> [{"file": "train/part-00000.parquet", "count", "sha256"}]
    source: dict[str, Any]
    split: dict[str, Any]
    content_hash: str
    created_at: str = ""
    format: str = FORMAT
    location: str = field(default="", compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_bytes(self) -> int:
        c, h, w = self.shape
        return c * h * w

    def decoded_bytes(self, split: str = "train") -> int:
        """Bytes of the split decoded to uint8 (what --data-mode memory holds in every worker)."""
        return self.count[split] * self.image_bytes

    def files(self, split: str) -> list[str]:
        """The split's shards as full paths or URIs (what Ray Data reads)."""
        return [uri(self.location, s["file"]) for s in self.shards[split]]

    def to_json(self) -> str:
        body = {k: v for k, v in self.__dict__.items() if k != "location"}
        body["shape"] = list(self.shape)
        return json.dumps(body, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, location: str) -> "Manifest":
        try:
            body = json.loads(text)
            if body.get("format") != FORMAT:
                raise UserError(f"{location}: {MANIFEST} is format {body.get('format')!r}; this gan-ray reads "
                                f"{FORMAT}")
            shape = tuple(int(x) for x in body["shape"])
            if len(shape) != 3 or shape[0] not in (1, 3) or min(shape) < 1:
                raise ValueError(f"bad shape {shape}")
            m = cls(shape=shape, classes=[str(c) for c in body["classes"]],  # type: ignore[arg-type]
                    count={k: int(v) for k, v in body["count"].items()}, shards=body["shards"],
                    source=body["source"], split=body["split"], content_hash=str(body["content_hash"]),
                    created_at=body.get("created_at", ""), location=location)
            for s in SPLITS:
                if sum(int(x["count"]) for x in m.shards[s]) != m.count[s]:
                    raise ValueError(f"the {s} shards' counts do not add up to {m.count[s]}")
            return m
        except UserError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"{location}: {MANIFEST} is not a gan-ray prepared-dataset manifest "
                            f"({one_line(str(exc))})") from None


def content_hash(shards: dict[str, list[dict[str, Any]]]) -> str:
    """One hash of the dataset's contents: of every shard's hash, by split and name (shards hash their pixels
    and labels as they are written, so no shard is read twice)."""
    h = hashlib.sha256()
    for split in SPLITS:
        for s in sorted(shards[split], key=lambda s: s["file"]):
            h.update(f"{s['file']}:{s['count']}:{s['sha256']}\n".encode())
    return h.hexdigest()


def read_manifest(location: str) -> Manifest:
    """The manifest of a prepared dataset, or one line saying why there is none."""
    fs, root = filesystem(location)
    import pyarrow.fs as pafs

    try:
        info = fs.get_file_info(f"{root}/{MANIFEST}")
    except OSError as exc:
        raise storage_error(location, exc, "read the prepared dataset at") from None
    if info.type != pafs.FileType.File:
        raise UserError(f"--dataset {location}: no {MANIFEST} there, so it is not a prepared dataset (or its "
                        "`gan-ray prepare` did not finish: the manifest is written last); prepare one with "
                        f"`gan-ray prepare SRC --out {location}`")
    try:
        text = (read_bytes(uri(location, MANIFEST)) or b"").decode()
    except (OSError, UnicodeDecodeError) as exc:
        raise storage_error(location, exc, "read") from None
    return Manifest.from_json(text, location)


def write_manifest(manifest: Manifest) -> None:
    manifest.created_at = manifest.created_at or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_bytes(uri(manifest.location, MANIFEST), manifest.to_json().encode())


# ---------------------------------------------------------------------------------------------------- shards
def encode(images: np.ndarray, labels: np.ndarray):
    """uint8 images [N, C, H, W] and int labels [N] as an Arrow table (one binary cell of C*H*W bytes each)."""
    import pyarrow as pa

    images = np.ascontiguousarray(images, dtype=np.uint8)
    n = images.shape[0]
    flat = images.reshape(n, -1)
    size = flat.shape[1]
    offsets = np.arange(0, (n + 1) * size, size, dtype=np.int64)
    column = pa.LargeBinaryArray.from_buffers(pa.large_binary(), n, [None, pa.py_buffer(offsets),
                                                                     pa.py_buffer(flat.reshape(-1))])
    return pa.table({"image": column.cast(pa.binary()), "label": pa.array(np.asarray(labels, dtype=np.int64))})


def decode(cells, shape: tuple[int, int, int]) -> np.ndarray:
    """The image cells of a batch (an Arrow binary column, or a numpy array of bytes) as uint8 [N, C, H, W]."""
    import pyarrow as pa

    n = len(cells)
    if isinstance(cells, (pa.ChunkedArray, pa.Array)):
        if isinstance(cells, pa.ChunkedArray):
            cells = cells.combine_chunks() if cells.num_chunks != 1 else cells.chunk(0)
        if n == 0:
            return np.zeros((0, *shape), dtype=np.uint8)
        offsets = np.frombuffer(cells.buffers()[1], dtype=np.int32, count=n + 1, offset=cells.offset * 4)
        data = np.frombuffer(cells.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]]
    else:
        data = np.frombuffer(b"".join(cells), dtype=np.uint8)
    expected = n * shape[0] * shape[1] * shape[2]
    if data.size != expected:
        raise UserError(f"prepared images hold {data.size} bytes for {n} images of shape {shape}; the shards do "
                        "not match their manifest")
    return data.reshape(n, *shape)


def shard_digest(images: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
    h.update(np.asarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()


def write_shard(location: str, file: str, images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Write one shard (zstd-compressed Parquet, row groups of ~8 MB so readers can stream it); its entry for
    the manifest."""
    import pyarrow.parquet as pq

    fs, root = filesystem(location)
    table = encode(images, labels)
    row_group = max(1, (8 * 2**20) // max(1, int(np.prod(images.shape[1:]))))
    path = f"{root}/{file}"
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path, filesystem=fs, compression="zstd", row_group_size=row_group)
    return {"file": file, "count": int(images.shape[0]), "sha256": shard_digest(images, labels)}


def read_split(manifest: Manifest, split: str, *, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, C, H, W] and labels [N] of a split (the first `limit` rows: a uniform sample), filled
    shard by shard into one array (peak memory: the split plus one shard)."""
    import pyarrow.parquet as pq

    fs, root = filesystem(manifest.location)
    n = manifest.count[split] if limit is None else min(limit, manifest.count[split])
    images = np.empty((n, *manifest.shape), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    filled = 0
    for s in manifest.shards[split]:
        if filled >= n:
            break
        try:
            table = pq.read_table(f"{root}/{s['file']}", filesystem=fs, columns=["image", "label"])
        except OSError as exc:
            raise storage_error(uri(manifest.location, s["file"]), exc, "read") from None
        take = min(table.num_rows, n - filled)
        table = table.slice(0, take)
        images[filled:filled + take] = decode(table.column("image"), manifest.shape)
        labels[filled:filled + take] = table.column("label").to_numpy()
        filled += take
    if filled != n:
        raise UserError(f"{manifest.location}: the {split} shards hold {filled} images, the manifest says {n}")
    return images, labels


def sample_size(manifest: Manifest, split: str) -> int:
    """How many images of a split the quality metrics read: a bounded prefix, never the whole of a large set."""
    budget, most = (HELDOUT_SAMPLE_BYTES, HELDOUT_SAMPLE_MAX) if split == "heldout" else \
        (TRAIN_SAMPLE_BYTES, TRAIN_SAMPLE_MAX)
    return max(1, min(manifest.count[split], most, budget // manifest.image_bytes))


def load_split(location: str, split: str, *, sample: bool = False) -> tuple[Manifest, np.ndarray, np.ndarray]:
    """(manifest, images, labels) of a split: whole (training in memory mode), or its bounded sample (`sample`:
    the feature extractor; the held-out split is always a sample)."""
    manifest = read_manifest(location)
    limit = sample_size(manifest, split) if sample or split == "heldout" else None
    images, labels = read_split(manifest, split, limit=limit)
    return manifest, images, labels


# --------------------------------------------------------------------------------------------- training fit
def check_image_size(manifest: Manifest, image_size: int, given: bool) -> int:
    """The image size a run trains at: the dataset's own, unless --image-size says otherwise (then refused)."""
    side = manifest.shape[1]
    if given and image_size != side:
        raise UserError(f"--image-size {image_size} does not fit the prepared dataset {manifest.location}, whose "
                        f"images are {side}x{side} (drop --image-size, or prepare it again with --image-size "
                        f"{image_size})")
    return side


def choose_mode(decoded_bytes: int, worker_memory: float | None) -> tuple[str, str]:
    """--data-mode auto: `memory` when the decoded training split takes at most MEMORY_SHARE of a worker's share
    of node memory, else `stream`; with the reason, in words."""
    size = human_bytes(decoded_bytes)
    if worker_memory is None:
        return "memory", f"{size} decoded per worker (the cluster reports no memory figure)"
    budget = MEMORY_SHARE * worker_memory
    if decoded_bytes <= budget:
        return "memory", f"{size} decoded per worker fits in {human_bytes(budget)} ({MEMORY_SHARE:.0%} of a " \
                         f"worker's ~{human_bytes(worker_memory)})"
    return "stream", f"{size} decoded would exceed {human_bytes(budget)} per worker ({MEMORY_SHARE:.0%} of a " \
                     f"worker's ~{human_bytes(worker_memory)})"


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
