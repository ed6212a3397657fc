"""Datasets as in-memory tensors, plus the per-rank, per-epoch shard order.

In memory mode a dataset is just an image tensor and a label tensor (MNIST is 47 MB as uint8); datasets too large
for that are prepared once (`gan-ray prepare`, gan_ray.core.prepared) and streamed by Ray Data
(gan_ray.train.ingest). Batches are gathered by index: no DataLoader, no worker processes, and the same code serves CPU and a
GPU-resident copy. Images are kept as uint8 where the source is 8-bit and turned into float [0, 1] per batch.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gan_ray.core import prepared
from gan_ray.core.config import BUILTIN_DATASETS, DEFAULT_DATA_DIR, TrainConfig, check_dataset_name
from gan_ray.core.errors import UserError
from gan_ray.core.models import check_image_size

TORCHVISION = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10"}
# Files each torchvision dataset needs, for the offline error message.
TORCHVISION_FILES = {
    "mnist": "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte(.gz)",
    "fashion-mnist": "FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte(.gz)",
    "cifar10": "cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}",
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
HELDOUT_FRACTION = 0.15
GRAYSCALE_MODES = ("L", "1", "I;16")  # PIL modes loaded as one channel
SPLIT_SEED = 1234  # fixed: the held-out split must not move when the training seed changes


@dataclass
class ImageDataset:
    """Images [N, C, H, W] (uint8 0..255 or float 0..1) and labels [N] (-1 when unlabelled)."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int  # 0 when unlabelled
    name: str

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def to(self, device: torch.device | str) -> "ImageDataset":
        return ImageDataset(self.images.to(device), self.labels.to(device), self.num_classes, self.name)

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images in [0, 1] and labels for the given indices."""
        return to_float(self.images[index]), self.labels[index]

    def fingerprint(self) -> str:
        """A short hash of the contents: caches keyed by it (e.g. metric extractors) follow data changes."""
        h = hashlib.sha256()
        h.update(str((self.name, tuple(self.images.shape), str(self.images.dtype))).encode())
        h.update(self.images.cpu().contiguous().numpy().tobytes())
        h.update(self.labels.cpu().numpy().tobytes())
        return h.hexdigest()[:16]


def to_float(images: torch.Tensor) -> torch.Tensor:
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


def load_dataset(name: str, split: str = "train", *, data_dir: str = DEFAULT_DATA_DIR,
                 image_size: int = 28, sample: bool = False) -> ImageDataset:
    """Load a dataset split: `train` for training, `heldout` for evaluation only (never trained on). A prepared
    dataset's held-out split, and its training split with `sample`, are bounded uniform samples
    (gan_ray.core.prepared); every other dataset is loaded whole."""
    check_dataset_name(name)
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be train or heldout, got {split!r}")
    if prepared.is_prepared(name):
        manifest, images, labels = prepared.load_split(name, split, sample=sample)
        return ImageDataset(torch.from_numpy(images), torch.from_numpy(labels), manifest.num_classes, name)
    if name == "digits":
        return _digits(split)
    if name.startswith("folder:"):
        return _folder(Path(name[len("folder:"):]).expanduser(), split, image_size)
    if name == "stacked-mnist":
        from gan_ray.core import stacked_mnist

        images, labels = stacked_mnist.load(split, data_dir)
        return ImageDataset(images, labels, stacked_mnist.NUM_CLASSES, name)
    return _torchvision(name, split, Path(data_dir).expanduser())


def _split_indices(n: int, split: str) -> np.ndarray:
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_held = int(round(n * HELDOUT_FRACTION))
    return np.sort(perm[:n_held] if split == "heldout" else perm[n_held:])


def _digits(split: str) -> ImageDataset:
    """scikit-learn's embedded 8x8 digits (values 0..16), bilinearly upsampled to 28x28 in [0, 1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    idx = _split_indices(len(bunch.images), split)
    small = torch.tensor(bunch.images[idx], dtype=torch.float32).unsqueeze(1) / 16.0
    # 8 -> 24 keeps each source pixel a 3x3 block centred; pad 2 to reach 28 like MNIST's border.
    big = torch.nn.functional.interpolate(small, size=(24, 24), mode="bilinear", align_corners=False)
    big = torch.nn.functional.pad(big, (2, 2, 2, 2)).clamp_(0, 1)
    return ImageDataset(big.contiguous(), torch.tensor(bunch.target[idx], dtype=torch.int64), 10, "digits")


def _torchvision(name: str, split: str, root: Path) -> ImageDataset:
    """MNIST / Fashion-MNIST / CIFAR-10, downloaded under a file lock (one download per node)."""
    import torchvision
    from filelock import FileLock

    root.mkdir(parents=True, exist_ok=True)
    cls = getattr(torchvision.datasets, TORCHVISION[name])
    train = split == "train"
    with FileLock(str(root / f".{name}.lock")):
        try:
            ds = cls(str(root), train=train, download=False)
        except RuntimeError:
            try:
                ds = cls(str(root), train=train, download=True)
            except Exception as exc:  # offline, DNS failure, HTTP error...
                raise UserError(
                    f"dataset {name} is not in {root} and could not be downloaded ({type(exc).__name__}); "
                    f"put {TORCHVISION_FILES[name]} under {root}"
                ) from None
    data = ds.data if isinstance(ds.data, np.ndarray) else ds.data.numpy()
    images = torch.from_numpy(np.ascontiguousarray(data))
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2).contiguous()
    labels = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
    return ImageDataset(images, labels, len(ds.classes), name)


def train_count(n_images: int) -> int:
    """Images a dataset of `n_images` keeps for training after the fixed held-out split."""
    return n_images - int(round(n_images * HELDOUT_FRACTION))


def folder_files(root: Path) -> tuple[list[tuple[Path, int]], int]:
    """(image files with their labels, number of classes) of a folder dataset: a flat folder is unlabelled (-1);
    class sub-folders (searched recursively) are labelled by their sorted names. The one listing that both the
    driver's checks and the loader use."""
    if not root.is_dir():
        raise UserError(f"--dataset folder:{root}: no such directory")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        return [(f, -1) for f in sorted(root.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES], 0
    files: list[tuple[Path, int]] = []
    for label, sub in enumerate(subdirs):
        files += [(f, label) for f in sorted(sub.rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]
    return files, len(subdirs)


def folder_mode(files: list[tuple[Path, int]]) -> str:
    """"L" (one channel) if every image is grayscale, "RGB" if any is not (headers only: no pixels decoded)."""
    from PIL import Image

    for f, _ in files:
        try:
            with Image.open(f) as im:
                if im.mode not in GRAYSCALE_MODES:
                    return "RGB"
        except OSError as exc:
            raise UserError(f"cannot read image {f}: {exc}") from None
    return "L"


def _folder(root: Path, split: str, image_size: int) -> ImageDataset:
    """Images in a flat folder (unlabelled) or in class sub-folders (labelled, classes sorted by name)."""
    from PIL import Image

    files, num_classes = folder_files(root)
    if len(files) < 2:
        raise UserError(f"--dataset folder:{root}: found {len(files)} images; need at least 2")
    mode = folder_mode(files)
    arrays = []
    for f, _ in files:
        try:
            with Image.open(f) as im:
                im = im.convert(mode).resize((image_size, image_size), Image.BILINEAR)
                arrays.append(np.asarray(im, dtype=np.uint8))
        except OSError as exc:
            raise UserError(f"cannot read image {f}: {exc}") from None
    stack = np.stack(arrays)
    images = torch.from_numpy(stack).unsqueeze(1) if mode == "L" else torch.from_numpy(stack).permute(0, 3, 1, 2)
    labels = torch.tensor([lab for _, lab in files], dtype=torch.int64)
    idx = torch.from_numpy(_split_indices(len(files), split))
    return ImageDataset(images[idx].contiguous(), labels[idx], num_classes, f"folder:{root}")


def shard_order(n: int, *, epoch: int, rank: int, world_size: int, seed: int,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """This rank's indices for an epoch: one permutation shared by all ranks, dealt out round-robin.

    Every rank gets the same number of indices (the tail that doesn't divide evenly is dropped for the epoch), so
    all ranks run the same number of steps and DDP's collectives never wait on a rank that ran out of data.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=gen)
    per_rank = n // world_size
    return perm[rank: per_rank * world_size: world_size].to(device)


# ----------------------------------------------------------------------------- what a config's dataset will be
# Shapes, class counts and sizes (train + held out) of the built-in datasets, known without downloading them.
KNOWN_SHAPES = {"digits": ((1, 28, 28), 10), "mnist": ((1, 28, 28), 10), "fashion-mnist": ((1, 28, 28), 10),
                "cifar10": ((3, 32, 32), 10), "stacked-mnist": ((3, 28, 28), 1000)}
KNOWN_TRAIN_IMAGES = {"mnist": 60_000, "fashion-mnist": 60_000, "cifar10": 50_000,  # their own test sets are held out
                      "stacked-mnist": 60_000}
DIGITS_IMAGES = 1797  # scikit-learn's digits, split here into train and held out
assert set(KNOWN_SHAPES) == set(BUILTIN_DATASETS)


def describe_dataset(cfg: TrainConfig) -> tuple[tuple[int, int, int], int]:
    """(image shape, number of classes) of the configured dataset, without loading it; checks it can be trained as
    configured (labels for --conditional, a size the architecture supports, a batch that fits each worker's
    share)."""
    check_dataset_name(cfg.dataset)
    if cfg.dataset == "stacked-mnist":  # built from MNIST's files, never downloaded: refuse now if they are missing
        from gan_ray.core.stacked_mnist import require_mnist

        require_mnist(cfg.data_dir)
    if cfg.dataset in KNOWN_SHAPES:
        shape, k = KNOWN_SHAPES[cfg.dataset]
        n_train = KNOWN_TRAIN_IMAGES.get(cfg.dataset) or train_count(DIGITS_IMAGES)
    elif prepared.is_prepared(cfg.dataset):
        manifest = prepared.read_manifest(cfg.dataset)
        prepared.check_image_size(manifest, cfg.image_size, given=True)
        shape, k, n_train = manifest.shape, manifest.num_classes, manifest.count["train"]
    else:
        files, k = folder_files(Path(cfg.dataset[len("folder:"):]).expanduser())
        if not files:
            raise UserError(f"--dataset {cfg.dataset}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
        shape = (1 if folder_mode(files) == "L" else 3, cfg.image_size, cfg.image_size)
        n_train = train_count(len(files))
    if cfg.conditional and k == 0:
        raise UserError(f"--conditional needs labelled data; {cfg.dataset} has no class sub-folders")
    check_image_size(cfg.arch, shape[1])
    check_batch_fits(n_train, cfg.workers, cfg.batch_size)
    return shape, k


def resolve_dataset(cfg: TrainConfig) -> TrainConfig:
    """The config a run trains with: a prepared dataset's image size adopted unless --image-size was given (then
    it must match). Other datasets: the config as it is."""
    if not prepared.is_prepared(cfg.dataset):
        return cfg
    manifest = prepared.read_manifest(cfg.dataset)
    side = prepared.check_image_size(manifest, cfg.image_size, given="image_size" in cfg.model_fields_set)
    return cfg if side == cfg.image_size else cfg.replace(image_size=side)


def check_batch_fits(n_train: int, workers: int, batch_size: int) -> None:
    """Refuse a run whose epochs would hold no step: each worker trains on full batches of its share only."""
    share = n_train // workers
    if share < batch_size:
        raise UserError(f"--batch-size {batch_size} is larger than each worker's share of the training images "
                        f"({n_train} / {workers} workers = {share}): no step could run; lower --batch-size or "
                        "--workers")
