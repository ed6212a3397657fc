"""Feature extractors for the quality metrics: one small network per dataset, trained on its own training split.

Inception-v3 features say little about 28x28 digits and need weights from the internet. The standard practice for
small-image domains is a domain classifier instead: a small CNN trained (seeded, on the CPU) on the dataset's
training split, whose penultimate layer is the feature space the metrics work in and whose softmax reads classes.

- Labelled datasets get a `classifier`; its held-out accuracy is measured once and stored with it, and scoring is
  refused below `min_accuracy(...)` (features of a network that cannot tell the classes apart prove nothing).
- Unlabelled datasets (a `folder:` without class sub-folders) get an `autoencoder` whose bottleneck is the feature
  space. Caveat: it is trained to reconstruct pixels, not to separate kinds of images, so distances in it follow
  pixel statistics more than meaning; only the Frechet distance and precision/recall are available with it.
  Its quality is the held-out explained variance of the reconstruction.
- Datasets whose channels are another dataset's images (`CHANNEL_READERS`: Stacked-MNIST, three MNIST digits as
  colours) get a `channels` extractor: that dataset's classifier reads each channel as a grey image, the features
  are the channels' features side by side, and each channel's digit and the reader's confidence in it are what
  mode coverage counts (`gan_ray.eval.modes`). Nothing of its own is trained: its quality is the reader's.

The feature dimension is chosen from the held-out set's size (at least 8 real images per dimension in each half
of it), because the Frechet distance needs covariances estimated from samples well above the dimension.

Trained extractors are cached under `$GAN_RAY_CACHE/extractors/` (default `~/.cache/gan-ray/extractors/`), keyed
by the fingerprints of both splits and the recipe version, written atomically as safetensors + JSON under a file
lock, so several Ray workers asking at once train it once. Pure PyTorch, no Ray.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from gan_ray.core.config import DEFAULT_DATA_DIR
from gan_ray.core.data import ImageDataset, load_dataset, to_float
from gan_ray.core.errors import UserError

RECIPE_VERSION = 1  # bump when the architecture or training recipe changes: old cache entries are then ignored
WEIGHTS_FILE = "extractor.safetensors"
META_FILE = "extractor.json"
MIN_HELDOUT = 64  # fewer held-out images than this cannot give a usable real reference
REAL_PER_DIM = 8  # real images per feature dimension in each half of the held-out set
MIN_FEATURE_DIM, MAX_FEATURE_DIM = 8, 64

# Held-out accuracy below which a classifier's features are not trusted (known datasets). Other labelled datasets
# must close at least half of the gap between chance and perfect accuracy.
MIN_ACCURACY = {"digits": 0.90, "mnist": 0.95, "fashion-mnist": 0.80, "cifar10": 0.55}
MIN_EXPLAINED_VARIANCE = 0.5  # the autoencoder fallback's bar
# Datasets read channel by channel with another dataset's classifier. A classifier trained on Stacked-MNIST's 1000
# triples directly reaches 21% held-out accuracy with this recipe; MNIST's reads each digit at 98.8%.
CHANNEL_READERS = {"stacked-mnist": "mnist"}


@dataclass(frozen=True)
class Recipe:
    """How an extractor is trained. Fixed per RECIPE_VERSION: changing it changes every score."""

    seed: int = 0
    batch_size: int = 64
    lr: float = 4e-3
    weight_decay: float = 1e-4
    epochs: int = 20  # passes over the training split, capped by max_steps for large datasets
    max_steps: int = 4000
    max_shift: float = 2.0  # random translation in pixels (augmentation: features not tied to exact positions)
    width: int = 16
    hidden: int = 128


RECIPE = Recipe()


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where extractors are cached: the argument, else $GAN_RAY_CACHE/extractors, else ~/.cache/gan-ray/extractors."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    base = os.environ.get("GAN_RAY_CACHE")
    return (Path(base).expanduser() if base else Path("~/.cache/gan-ray").expanduser()) / "extractors"


def feature_dim_for(heldout_size: int) -> int:
    """The largest power of two with REAL_PER_DIM real images per dimension in half the held-out set."""
    half = heldout_size // 2
    dim = 2 ** int(math.floor(math.log2(max(half // REAL_PER_DIM, 1))))
    return int(min(MAX_FEATURE_DIM, max(MIN_FEATURE_DIM, dim)))


def min_accuracy(dataset_name: str, num_classes: int) -> float:
    if dataset_name in MIN_ACCURACY:
        return MIN_ACCURACY[dataset_name]
    chance = 1.0 / max(num_classes, 1)
    return chance + 0.5 * (1.0 - chance)


# ------------------------------------------------------------------------------------------------ networks
class ConvEncoder(nn.Module):
    """Two strided conv layers, pooled to 4x4 (any input size), then a hidden layer and a linear bottleneck."""

    def __init__(self, channels: int, feature_dim: int, width: int, hidden: int):
        super().__init__()
        # Strided convolutions: a few hundred thousand multiply-adds per 28x28 image, so that training takes
        # seconds and scoring thousands of samples takes well under a second on a CPU.
        self.conv = nn.Sequential(
            nn.Conv2d(channels, width, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        )
        self.hidden = nn.Sequential(nn.Linear(2 * width * 16, hidden), nn.ReLU(), nn.Dropout(0.2))
        self.bottleneck = nn.Linear(hidden, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(self.hidden(self.conv(x)))


class ConvClassifier(nn.Module):
    """Encoder + a linear head: the features are the head's input (the penultimate layer)."""

    def __init__(self, channels: int, num_classes: int, feature_dim: int, width: int = 32, hidden: int = 128):
        super().__init__()
        self.encoder = ConvEncoder(channels, feature_dim, width, hidden)
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class ConvAutoencoder(nn.Module):
    """Encoder + an MLP decoder back to pixels: the fallback for unlabelled data (features = bottleneck)."""

    def __init__(self, shape: tuple[int, int, int], feature_dim: int, width: int = 32, hidden: int = 128):
        super().__init__()
        c, h, w = shape
        self.shape = shape
        self.encoder = ConvEncoder(c, feature_dim, width, hidden)
        self.decoder = nn.Sequential(nn.Linear(feature_dim, 4 * hidden), nn.ReLU(), nn.Linear(4 * hidden, c * h * w),
                                     nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x)).view(x.shape[0], *self.shape)


class ChannelReader(nn.Module):
    """One grey-image classifier applied to every channel: `encoder` gives the channels' features side by side,
    `read` those and each channel's class probabilities from one pass."""

    def __init__(self, classifier: ConvClassifier):
        super().__init__()
        self.classifier = classifier

    def encoder(self, x: torch.Tensor) -> torch.Tensor:
        return self.read(x)[0]

    def read(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, c, h, w = x.shape
        f = self.classifier.encoder(x.reshape(n * c, 1, h, w))
        probs = torch.softmax(self.classifier.head(f).double(), dim=1)
        return f.reshape(n, -1), probs.reshape(n, c, -1)


def build_net(meta: dict[str, Any]) -> nn.Module:
    """A fresh network for an extractor's meta; its random init leaves the global RNG as it was (the training
    hook builds one inside a training process whose RNG state is checkpointed)."""
    shape = tuple(meta["image_shape"])
    with torch.random.fork_rng(devices=[]):
        if meta["kind"] == "channels":
            reader = meta["reader"]
            return ChannelReader(ConvClassifier(1, reader["num_classes"], reader["feature_dim"],
                                                meta["recipe"]["width"], meta["recipe"]["hidden"]))
        if meta["kind"] == "classifier":
            return ConvClassifier(shape[0], meta["num_classes"], meta["feature_dim"], meta["recipe"]["width"],
                                  meta["recipe"]["hidden"])
        return ConvAutoencoder(shape, meta["feature_dim"], meta["recipe"]["width"], meta["recipe"]["hidden"])


# ----------------------------------------------------------------------------------------------- extractor
@dataclass
class Extractor:
    """A trained extractor: features (penultimate layer / bottleneck) and, for classifiers, class probabilities."""

    net: nn.Module
    meta: dict[str, Any]
    path: Path | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def feature_dim(self) -> int:
        return int(self.meta["feature_dim"])

    @property
    def quality(self) -> float:
        """Held-out accuracy (classifier) or explained variance (autoencoder)."""
        return float(self.meta["quality"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["image_shape"])  # type: ignore[return-value]

    @property
    def key(self) -> str:
        return self.meta["key"]

    def to(self, device: torch.device | str) -> "Extractor":
        device = torch.device(device)
        if device == self.device:
            return self
        return Extractor(_copy_net(self.net, self.meta, device), self.meta, self.path, device)

    def require_quality(self, threshold: float | None = None) -> "Extractor":
        """Raise a UserError when the extractor is too weak for its scores to mean anything."""
        bar = self.meta["min_quality"] if threshold is None else threshold
        if self.quality < bar:
            what = {"classifier": "held-out accuracy", "channels": "held-out accuracy (its channel reader's)"
                    }.get(self.kind, "held-out explained variance")
            raise UserError(f"the feature extractor for {self.meta['dataset']} reaches only {self.quality:.1%} "
                            f"{what} (< {bar:.0%} required), so scores in its feature space would not be "
                            f"meaningful; more (or cleaner) training data is needed")
        return self

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray | None]:
        """(features float64 [N, d], class probabilities float64 [N, K] or None) of float images in [0, 1]."""
        if tuple(images.shape[1:]) != self.image_shape:
            raise UserError(f"images of shape {tuple(images.shape[1:])} do not match the dataset's "
                            f"{self.image_shape}")
        feats, probs = [], []
        encoder = self.net.encoder
        with single_thread() if self.device.type == "cpu" else contextlib.nullcontext():
            for start in range(0, images.shape[0], batch_size):
                x = to_float(images[start:start + batch_size]).to(self.device)
                f = encoder(x)
                feats.append(f.double().cpu())
                if self.kind == "classifier":
                    probs.append(torch.softmax(self.net.head(f).double(), dim=1).cpu())
        features = torch.cat(feats).numpy() if feats else np.zeros((0, self.feature_dim))
        return features, (torch.cat(probs).numpy() if probs else None)

    @torch.no_grad()
    def read(self, images: torch.Tensor, batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A `channels` extractor's pass over images [N, C, H, W] (float in [0, 1] or uint8): (features float64
        [N, d], each channel's class [N, C], the reader's probability for it [N, C])."""
        if self.kind != "channels":
            raise ValueError(f"a {self.kind} extractor does not read channels")
        if tuple(images.shape[1:]) != self.image_shape:
            raise UserError(f"images of shape {tuple(images.shape[1:])} do not match the dataset's "
                            f"{self.image_shape}")
        feats, probs = [], []
        with single_thread() if self.device.type == "cpu" else contextlib.nullcontext():
            for start in range(0, images.shape[0], batch_size):
                f, p = self.net.read(to_float(images[start:start + batch_size]).to(self.device))
                feats.append(f.double().cpu())
                probs.append(p.cpu())
        if not feats:
            return np.zeros((0, self.feature_dim)), np.zeros((0, self.image_shape[0]), np.int64), np.zeros((0, 0))
        confidence, classes = torch.cat(probs).max(dim=2)
        return torch.cat(feats).numpy(), classes.numpy(), confidence.numpy()


def _copy_net(net: nn.Module, meta: dict[str, Any], device: torch.device) -> nn.Module:
    copy = build_net(meta)
    copy.load_state_dict(net.state_dict())
    return copy.to(device).eval().requires_grad_(False)


@contextlib.contextmanager
def single_thread():
    """Run tiny CPU kernels on one thread: deterministic whatever the machine's core count, and much faster than
    OpenMP teams spinning for work on a busy machine (measured: 25x on 2 loaded cores). Restores the setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------ training
def _shift(x: torch.Tensor, max_shift: float, gen: torch.Generator) -> torch.Tensor:
    """Random sub-pixel translations of up to `max_shift` pixels (bilinear, zero padding)."""
    n, _, h, w = x.shape
    t = (torch.rand(n, 2, generator=gen) * 2 - 1) * max_shift
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = t[:, 0] * 2 / w
    theta[:, 1, 2] = t[:, 1] * 2 / h
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _train(net: nn.Module, train: ImageDataset, recipe: Recipe, loss_fn, log) -> dict[str, Any]:
    """Seeded minibatch training on the CPU; touches neither the global RNG nor the caller's thread settings."""
    gen = torch.Generator().manual_seed(recipe.seed)
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    n = len(train)
    per_epoch = max(1, n // recipe.batch_size)
    steps = min(recipe.epochs * per_epoch, recipe.max_steps)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=steps, pct_start=0.15)
    net.train()
    t0, step, last = time.time(), 0, 0.0
    while step < steps:
        order = torch.randperm(n, generator=gen)
        for i in range(per_epoch):
            if step >= steps:
                break
            idx = order[i * recipe.batch_size:(i + 1) * recipe.batch_size]
            x, y = train.batch(idx)
            x = _shift(x, recipe.max_shift, gen)
            loss = loss_fn(net, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            last = float(loss.detach())
        if step >= steps or (step // per_epoch) % 5 == 0:
            log(f"extractor: step {step}/{steps}  loss {last:.4f}  {time.time() - t0:.1f}s")
    net.eval().requires_grad_(False)
    return {"steps": steps, "final_loss": last, "train_seconds": round(time.time() - t0, 2)}


def _classifier_loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(net(x), y)


def _autoencoder_loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(net(x), x)


@torch.no_grad()
def _quality(net: nn.Module, kind: str, heldout: ImageDataset) -> float:
    x = to_float(heldout.images)
    if kind == "classifier":
        pred = torch.cat([net(x[i:i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
        return float((pred == heldout.labels).float().mean())
    recon = torch.cat([net(x[i:i + 1000]) for i in range(0, len(x), 1000)])
    mse = float(((recon - x) ** 2).mean())
    var = float(((x - x.mean(0, keepdim=True)) ** 2).mean())
    return 1.0 - mse / max(var, 1e-12)


def train_extractor(train: ImageDataset, heldout: ImageDataset, *, recipe: Recipe = RECIPE,
                    log=lambda msg: None) -> tuple[nn.Module, dict[str, Any]]:
    """Train a fresh extractor (classifier when the data is labelled, autoencoder otherwise). Deterministic for
    a given PyTorch build and thread count; leaves the caller's RNG state untouched."""
    if len(heldout) < MIN_HELDOUT:
        raise UserError(f"{train.name} has only {len(heldout)} held-out images; at least {MIN_HELDOUT} are needed "
                        f"for a real reference set to score against (add images)")
    kind = "classifier" if train.num_classes > 0 else "autoencoder"
    meta: dict[str, Any] = {
        "format": f"gan-ray-extractor/{RECIPE_VERSION}", "kind": kind, "dataset": train.name,
        "image_shape": list(train.shape), "num_classes": int(train.num_classes),
        "feature_dim": feature_dim_for(len(heldout)), "recipe": recipe.__dict__.copy(),
        "train_size": len(train), "heldout_size": len(heldout),
        "train_fingerprint": train.fingerprint(), "heldout_fingerprint": heldout.fingerprint(),
    }
    meta["min_quality"] = (min_accuracy(train.name, train.num_classes) if kind == "classifier"
                           else MIN_EXPLAINED_VARIANCE)
    if kind == "classifier":
        counts = torch.bincount(train.labels, minlength=train.num_classes).double()
        meta["class_shares"] = (counts / counts.sum()).tolist()
    with torch.random.fork_rng(devices=[]), single_thread():
        torch.manual_seed(recipe.seed)
        net = build_net(meta)
        meta.update(_train(net, train, recipe, _classifier_loss if kind == "classifier" else _autoencoder_loss,
                           log))
    with single_thread():
        meta["quality"] = _quality(net, kind, heldout)
    meta["quality_name"] = "heldout_accuracy" if kind == "classifier" else "heldout_explained_variance"
    return net, meta


# -------------------------------------------------------------------------------------------------- cache
def cache_key(train: ImageDataset, heldout: ImageDataset) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "_", train.name).strip("_")[-40:] or "data"
    recipe = hashlib.sha256(json.dumps(RECIPE.__dict__, sort_keys=True).encode()).hexdigest()[:6]
    return f"{slug}-{train.fingerprint()}-{heldout.fingerprint()}-r{RECIPE_VERSION}{recipe}"


def _read_cached(path: Path) -> Extractor | None:
    """A cached extractor, or None when absent or unreadable (then it is trained again)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not (path / META_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        return None
    try:
        meta = json.loads((path / META_FILE).read_text())
        net = build_net(meta)
        net.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
    except (json.JSONDecodeError, KeyError, TypeError, SafetensorError, RuntimeError, OSError):
        return None
    return Extractor(net.eval().requires_grad_(False), meta, path)


def extractor_for(train: ImageDataset, heldout: ImageDataset, *, cache_dir: str | Path | None = None,
                  log=lambda msg: None) -> Extractor:
    """The cached extractor for these splits, training it (once, under a file lock) if needed."""
    from filelock import FileLock
    from safetensors.torch import save_file

    root = cache_root(cache_dir)
    key = cache_key(train, heldout)
    path = root / key
    cached = _read_cached(path)
    if cached is not None:
        return cached
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{key}.lock")):
        cached = _read_cached(path)  # another process may have trained it while we waited
        if cached is not None:
            return cached
        log(f"extractor: training a feature extractor for {train.name} (once; cached in {path})")
        net, meta = train_extractor(train, heldout, log=log)
        meta["key"] = key
        meta["created_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        tmp = root / f".{key}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp / WEIGHTS_FILE))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        shutil.rmtree(path, ignore_errors=True)
        tmp.replace(path)
    return Extractor(net, meta, path)


def channel_extractor(reader: Extractor, dataset: str, channels: int) -> Extractor:
    """`dataset`'s extractor: `reader` (a grey-image classifier) applied to each of its `channels` channels."""
    if reader.kind != "classifier" or reader.image_shape[0] != 1:
        raise ValueError(f"a channel reader must be a grey-image classifier, got {reader.kind} {reader.image_shape}")
    _, h, w = reader.image_shape
    meta = {
        "format": reader.meta["format"], "kind": "channels", "dataset": dataset,
        "image_shape": [channels, h, w], "num_classes": reader.num_classes ** channels,
        "feature_dim": channels * reader.feature_dim, "recipe": reader.meta["recipe"],
        "quality": reader.quality, "min_quality": reader.meta["min_quality"],
        "quality_name": "reader_heldout_accuracy", "key": f"{dataset}-channels-{reader.key}",
        "reader": {"dataset": reader.meta["dataset"], "key": reader.key, "num_classes": reader.num_classes,
                   "feature_dim": reader.feature_dim},
    }
    net = ChannelReader(reader.net).to(reader.device).eval().requires_grad_(False)
    return Extractor(net, meta, reader.path, reader.device)


def load_extractor(dataset: str, *, data_dir: str = DEFAULT_DATA_DIR, image_size: int = 28,
                   cache_dir: str | Path | None = None, log=lambda msg: None) -> Extractor:
    """The extractor for a dataset by name (digits, mnist, ..., folder:PATH, a prepared dataset: trained on a
    bounded sample of its training split)."""
    if dataset in CHANNEL_READERS:
        from gan_ray.core.data import KNOWN_SHAPES

        reader = load_extractor(CHANNEL_READERS[dataset], data_dir=data_dir, cache_dir=cache_dir, log=log)
        return channel_extractor(reader, dataset, KNOWN_SHAPES[dataset][0][0])
    train = load_dataset(dataset, "train", data_dir=data_dir, image_size=image_size, sample=True)
    heldout = load_dataset(dataset, "heldout", data_dir=data_dir, image_size=image_size)
    return extractor_for(train, heldout, cache_dir=cache_dir, log=log)


def to_bytes(ex: Extractor) -> dict[str, Any]:
    """A picklable, Ray-free payload of an extractor (shipped to training workers on other nodes)."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in ex.net.state_dict().items()}
    return {"meta": ex.meta, "weights": save(state)}


def from_bytes(payload: dict[str, Any], device: torch.device | str = "cpu") -> Extractor:
    from safetensors.torch import load

    net = build_net(payload["meta"])
    net.load_state_dict(load(payload["weights"]))
    device = torch.device(device)
    return Extractor(net.to(device).eval().requires_grad_(False), payload["meta"], None, device)
