"""Stacked-MNIST: three MNIST digits as the red, green and blue channels of one 28x28 image, so 1000 modes (digit
triples). The standard test of mode coverage (VEEGAN, PacGAN, R3GAN's Table 2): a generator that drops modes, or
draws them unevenly, shows it in how many of the 1000 triples an MNIST reader finds in its samples
(`gan_ray.eval.modes`).

Built offline from MNIST's own files in `DATA_DIR/MNIST/raw/` (never downloaded here: a missing MNIST is one line
saying where to put it), each channel's digit drawn independently and uniformly with a fixed seed:
- `train`: 60,000 triples of MNIST training digits;
- `heldout`: 26,000 triples of MNIST test digits (never trained on, by the generator or by the reader), the
  number of samples the mode-coverage protocol reads, so real data's own figures (the floor) come from the same
  sample size.
Labels are the triple read as a number, 100 * red + 10 * green + blue (1000 classes: `--conditional` works, and
tests know each image's true modes).

Which MNIST digits make each triple is drawn once and cached next to MNIST (`DATA_DIR/StackedMNIST/`, under a
file lock: every Ray worker of a node reads the same file) as indices into MNIST, 0.7 MB instead of the 200 MB
of images, which are gathered again at load (well under a second). The composition then never moves under a
trained model, whatever numpy version draws it next time.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gan_ray.core.errors import UserError

SEED = 20_240_513  # fixed: the dataset must not move when a run's --seed changes
SIZES = {"train": 60_000, "heldout": 26_000}
CHANNELS = 3
NUM_CLASSES = 10 ** CHANNELS
MNIST_FILES = "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte"
CACHE_DIR = "StackedMNIST"
FORMAT = 1  # bump when the drawing rule changes: older cached indices are then ignored


def _mnist(root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST's images [N, 28, 28] uint8 and labels [N], read from `root` (no download)."""
    import torchvision

    try:
        ds = torchvision.datasets.MNIST(str(root), train=train, download=False)
    except RuntimeError:
        raise UserError(f"--dataset stacked-mnist is built from MNIST's files, which are not in {root}: put "
                        f"{MNIST_FILES} there (gunzipped), or train once with --dataset mnist to download them"
                        ) from None
    return ds.data, ds.targets


def require_mnist(data_dir: str | Path) -> None:
    """Refuse, in one line, a stacked-mnist run whose MNIST files are missing (before Ray or training starts)."""
    _mnist(Path(data_dir).expanduser(), train=False)


def draw_indices(n: int, pool: int, split: str) -> np.ndarray:
    """[n, 3] indices into a pool of MNIST digits, one independent uniform draw per channel."""
    rng = np.random.default_rng([SEED, FORMAT, 0 if split == "train" else 1])
    return rng.integers(0, pool, size=(n, CHANNELS), dtype=np.int64)


def cached_indices(root: Path, split: str, pool: int) -> np.ndarray:
    """The split's triples, drawn on first use and cached (atomically, under a file lock) beside MNIST."""
    from filelock import FileLock

    folder = root / CACHE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{split}-v{FORMAT}.npy"
    with FileLock(str(folder / f".{split}.lock")):
        if path.is_file():
            try:
                index = np.load(path, allow_pickle=False)
                if index.shape == (SIZES[split], CHANNELS) and 0 <= index.min() and index.max() < pool:
                    return index
            except (OSError, ValueError):
                pass  # a damaged cache file is drawn again
        index = draw_indices(SIZES[split], pool, split)
        tmp = folder / f".{split}-v{FORMAT}.tmp.npy"
        np.save(tmp, index)
        tmp.replace(path)
    return index


def load(split: str, data_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The `train` or `heldout` split: images uint8 [N, 3, 28, 28] and labels 100 r + 10 g + b (int64 [N]).
    `gan_ray.core.data` wraps them as a dataset (this module stays below it: no import back)."""
    root = Path(data_dir).expanduser()
    images, labels = _mnist(root, train=split == "train")
    index = torch.from_numpy(cached_indices(root, split, len(images)))
    stacked = images[index]  # [N, 3, 28, 28]: channel c is MNIST digit index[:, c]
    digits = labels[index]  # [N, 3]
    label = (digits * torch.tensor([100, 10, 1])).sum(1)
    return stacked.contiguous(), label.to(torch.int64)


def triple_digits(labels: torch.Tensor | np.ndarray) -> np.ndarray:
    """[N, 3] digits (red, green, blue) of stacked-mnist labels."""
    lab = np.asarray(labels, dtype=np.int64)
    return np.stack([lab // 100, lab // 10 % 10, lab % 10], axis=1)
