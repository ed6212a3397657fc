"""Stacked-MNIST (gan_ray/core/stacked_mnist.py) and its mode-coverage metric (gan_ray/eval/modes.py, the
`mode_coverage` metric): the counting on triples whose modes are known, the dataset built from real MNIST, and
the project's MNIST reader on real triples (the floor a perfect generator reaches)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gan_ray.core.config import TrainConfig
from gan_ray.core.data import describe_dataset, load_dataset
from gan_ray.core.errors import UserError
from gan_ray.eval.metrics import Embedded, EvalContext, classes_seen, mode_coverage
from gan_ray.eval.modes import MODE_SAMPLES, mode_counts, modes_and_kl

EVERY_TRIPLE = np.array([[i // 100, i // 10 % 10, i % 10] for i in range(1000)])


def test_modes_and_kl_of_triples_with_known_modes():
    assert modes_and_kl(EVERY_TRIPLE) == (1000, pytest.approx(0.0, abs=1e-12))
    assert modes_and_kl(np.repeat(EVERY_TRIPLE, 26, axis=0)) == (1000, pytest.approx(0.0, abs=1e-12))
    same_digit = np.repeat(np.arange(10)[:, None], 3, axis=1).repeat(100, axis=0)  # (d, d, d): 10 modes, evenly
    modes, kl = modes_and_kl(same_digit)
    assert modes == 10 and kl == pytest.approx(math.log(100))
    half_on_one = np.concatenate([EVERY_TRIPLE, np.zeros((1000, 3), dtype=np.int64)])  # (0,0,0) holds 1001/2000
    p = np.array([1001 / 2000] + [1 / 2000] * 999)
    assert modes_and_kl(half_on_one) == (1000, pytest.approx(math.log(1000) + (p * np.log(p)).sum()))
    assert mode_counts(np.array([[1, 2, 3], [1, 2, 3], [9, 9, 9]]))[[123, 999, 0]].tolist() == [2, 1, 0]


def _reading(digits: np.ndarray, confidence: float) -> Embedded:
    n = len(digits)
    return Embedded(np.zeros((n, 4)), None, digits=digits, confidence=np.full(digits.shape, confidence))


def test_the_metric_reads_generated_and_real_triples_alike():
    """A generator that draws only triples of one repeated digit hits 10 modes; real triples, all 1000, read at
    the same sample size."""
    rng = np.random.default_rng(0)
    real = _reading(rng.integers(0, 10, size=(MODE_SAMPLES, 3)), 0.99)
    gen = _reading(np.repeat(rng.integers(0, 10, size=(5000, 1)), 3, axis=1), 0.6)
    out = mode_coverage(EvalContext(gen, real, [], None, None, seed=0))
    assert out["modes"] == 10 and out["mode_kl"] == pytest.approx(math.log(100), abs=0.01)
    assert out["modes_real"] >= 990 and out["mode_kl_real"] < 0.15  # 5000 real draws: the plug-in bias ~0.1
    assert out["reader_confidence"] == pytest.approx(0.6) and out["reader_confidence_real"] == pytest.approx(0.99)
    assert set(mode_coverage(EvalContext(Embedded(np.zeros((3, 4)), None), real, [], None, None, 0)).values()) \
        == {None}, "datasets without a channel reader get no mode coverage"


def test_a_class_counts_as_drawn_at_a_tenth_of_its_uniform_share():
    assert classes_seen(np.arange(5000) % 1000, 1000) == 1000  # 5 each: Stacked-MNIST's classes are all drawn
    assert classes_seen(np.array([0] * 990 + [1] * 10), 10) == 2  # 1% of 10 classes: as before
    assert classes_seen(np.array([0] * 995 + [1] * 5), 10) == 1


def test_stacked_mnist_without_mnist_files_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"stacked-mnist is built from MNIST's files, which are not in .*: put "
                                         r"MNIST/raw/\{train,t10k\}"):
        describe_dataset(TrainConfig(dataset="stacked-mnist", data_dir=str(tmp_path)))
    with pytest.raises(UserError, match="stacked-mnist is built from MNIST's files"):
        load_dataset("stacked-mnist", "heldout", data_dir=str(tmp_path))
    assert not (tmp_path / "StackedMNIST").exists()


# ------------------------------------------------------------------------------------------ real MNIST
def test_stacked_mnist_is_three_mnist_digits_drawn_once_and_cached(mnist_dir):
    train = load_dataset("stacked-mnist", "train", data_dir=str(mnist_dir))
    heldout = load_dataset("stacked-mnist", "heldout", data_dir=str(mnist_dir))
    assert (len(train), len(heldout)) == (60_000, 26_000)
    assert train.shape == heldout.shape == (3, 28, 28) and train.images.dtype == torch.uint8
    assert train.num_classes == 1000 and int(train.labels.min()) >= 0 and int(train.labels.max()) <= 999
    assert describe_dataset(TrainConfig(dataset="stacked-mnist", data_dir=str(mnist_dir), arch="resnet")) == \
        ((3, 28, 28), 1000)
    mnist_train = load_dataset("mnist", "train", data_dir=str(mnist_dir))
    mnist_test = load_dataset("mnist", "heldout", data_dir=str(mnist_dir))
    index = np.load(mnist_dir / "StackedMNIST" / "train-v1.npy")
    held_index = np.load(mnist_dir / "StackedMNIST" / "heldout-v1.npy")
    for i in (0, 1, 59_999):  # each channel is the MNIST training digit the cached index names, labelled by it
        digits = [int(mnist_train.labels[index[i, c]]) for c in range(3)]
        assert train.labels[i] == 100 * digits[0] + 10 * digits[1] + digits[2]
        assert all(torch.equal(train.images[i, c], mnist_train.images[index[i, c], 0]) for c in range(3))
    assert torch.equal(heldout.images[7, 2], mnist_test.images[held_index[7, 2], 0])  # held out: MNIST's test set
    counts = np.bincount(train.labels.numpy(), minlength=1000)
    assert counts.min() >= 25, "every triple is in the training set, about 60 times"
    again = load_dataset("stacked-mnist", "train", data_dir=str(mnist_dir))
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_the_mnist_reader_finds_every_mode_of_real_triples_at_the_floor(mnist_dir):
    """26,000 real held-out triples through `gan-ray evaluate`'s entry point: every mode, the sampling floor's KL,
    digits read with near certainty, fd at the floor (trains the MNIST reader once if it is not cached: minutes)."""
    from gan_ray.core.data import to_float
    from gan_ray.eval.metrics import evaluate_generator

    heldout = load_dataset("stacked-mnist", "heldout", data_dir=str(mnist_dir))
    r = evaluate_generator((to_float(heldout.images), None), "stacked-mnist", data_dir=str(mnist_dir))
    assert r["extractor"] == "channels" and r["extractor_quality"] >= 0.98 and r["feature_dim"] == 192
    assert r["modes"] == r["modes_real"] == 1000
    assert 0.015 < r["mode_kl"] < 0.035 and r["mode_kl"] == r["mode_kl_real"]  # measured: 0.025
    assert r["reader_confidence"] > 0.97 and r["fd_ratio"] < 1.1
