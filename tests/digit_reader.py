"""An independent reader of generated digits: an SVM trained on scikit-learn's original 8x8 digits.

It never sees the 28x28 upsampled training images nor any GAN output, so its opinion of a sample is independent of
the training pipeline; images are mapped back to 8x8 the way the dataset was built (drop the 2-pixel border,
average 3x3 blocks).
"""
from __future__ import annotations

import functools

import numpy as np
import torch


@functools.lru_cache(maxsize=1)
def _svm():
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    d = load_digits()
    return SVC(gamma=0.001, C=10.0).fit(d.data / 16.0, d.target)


def to_8x8(images: torch.Tensor) -> np.ndarray:
    inner = images[:, 0, 2:26, 2:26].float()
    return torch.nn.functional.avg_pool2d(inner.unsqueeze(1), 3).flatten(1).numpy()


def read_digits(images: torch.Tensor) -> np.ndarray:
    """Predicted class of each [N, 1, 28, 28] image in [0, 1]."""
    return _svm().predict(to_8x8(images))


def class_shares(images: torch.Tensor) -> np.ndarray:
    return np.bincount(read_digits(images), minlength=10) / len(images)
