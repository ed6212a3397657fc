"""The packaged recipes (gan_ray/recipes/) and the defaults hold on real MNIST: their early steps neither collapse nor diverge.

The full runs (minutes each, figures in each config's header and docs/metrics.md#recipes-measured) are too long
for CI; what CI can afford is the first few hundred steps of each, in one process with the real step, read by an
independent reader (a nearest-neighbour classifier on real MNIST, nothing the project trained). Collapse shows
early: the seed's plain networks put most samples on one digit within a minute, and so does the default model
with R1 off, which this file checks too, so the bars below are known to catch what they are for.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gan_ray.core.config import RECIPES_DIR, TrainConfig, load_yaml, resolve
from gan_ray.core.data import load_dataset
from gan_ray.core.errors import UserError
from gan_ray.core.step import build_state, eval_mode, spec_for, train_step

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(RECIPES_DIR.glob("*.yaml"))


def test_every_recipe_is_a_valid_config_headed_by_its_measurements():
    assert {p.name for p in CONFIGS} >= {"mnist.yaml", "mnist-seed.yaml", "mnist-rpgan.yaml", "digits.yaml",
                                         "stacked-mnist.yaml"}
    for path in CONFIGS:
        cfg = resolve(load_yaml(path), {}, source=str(path))
        assert path.stem == cfg.dataset or path.stem.startswith(f"{cfg.dataset}-"), f"{path.name}: {cfg.dataset}"
        text = path.read_text()
        assert text.startswith("#") and "Measured" in text and "wall" in text, f"{path.name}: no measured result"


def test_a_recipe_is_found_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_yaml("digits") == load_yaml(RECIPES_DIR / "digits.yaml")
    with pytest.raises(UserError,
                       match="nor a recipe of that name: digits, mnist, mnist-rpgan, mnist-seed, stacked-mnist"):
        load_yaml("no-such-recipe")


# ------------------------------------------------------------------------------------------ real MNIST
# `mnist_dir` (tests/conftest.py): real MNIST as a --data-dir, or a skip when ../shared is not beside the checkout.
@pytest.fixture(scope="module")
def reader(mnist_dir):
    """3-nearest-neighbour reader on 10,000 real training images, 7x7 average-pooled (about 95% accurate on the
    held-out set, checked below): independent of every network the project trains."""
    train = load_dataset("mnist", "train", data_dir=str(mnist_dir))
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(train), generator=gen)[:10_000]
    ref = _pool(train.images[idx].float() / 255.0)
    ref_labels = train.labels[idx]

    def read(images: torch.Tensor) -> np.ndarray:
        d = torch.cdist(_pool(images.float()), ref)
        votes = ref_labels[d.topk(3, largest=False).indices]
        return torch.mode(votes, dim=1).values.numpy()

    heldout = load_dataset("mnist", "heldout", data_dir=str(mnist_dir))
    accuracy = (read(heldout.images[:1000].float() / 255.0) == heldout.labels[:1000].numpy()).mean()
    assert accuracy >= 0.9, f"the reader itself reads real digits at {accuracy:.2f}"
    return read


def _pool(images: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.avg_pool2d(images, 4).flatten(1)


def _train_in_process(cfg: TrainConfig, mnist_dir: Path, steps: int) -> tuple[object, dict[str, float]]:
    """`steps` real adversarial steps of `cfg` (one process, one worker's batch), and D's mean outputs over the
    last quarter of them."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(2)
    data = load_dataset("mnist", "train", data_dir=str(mnist_dir))
    state = build_state(cfg, spec_for(cfg, data.shape, data.num_classes), "cpu")
    gen = torch.Generator().manual_seed(cfg.seed)
    late = {"d_real": [], "d_fake": [], "loss_d": [], "loss_g": []}
    for step in range(steps):
        idx = torch.randint(0, len(data), (cfg.batch_size,), generator=gen)
        real, labels = data.batch(idx)
        out = train_step(state, real, labels if cfg.conditional else None)
        if step >= steps * 3 // 4:
            for k in late:
                late[k].append(float(out[k]))
    return state, {k: float(np.mean(v)) for k, v in late.items()}


def _generate(state, n: int, labels: torch.Tensor | None) -> torch.Tensor:
    with eval_mode(state.sampler) as G, torch.no_grad():
        z = torch.randn(n, state.spec.latent_dim, generator=torch.Generator().manual_seed(1))
        return G(z, labels)


def _shares(predicted: np.ndarray) -> np.ndarray:
    return np.bincount(predicted, minlength=10) / len(predicted)


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_mnist_recipe_early_steps_learn_every_class(mnist_dir, reader):
    """The recipe `mnist`, 250 steps (about half an epoch on 2 workers): D is not winning, every class is drawn,
    and images drawn for a label mostly read as that label."""
    cfg = resolve(load_yaml("mnist"), {})
    state, d = _train_in_process(cfg, mnist_dir, steps=250)
    assert all(np.isfinite(v) for v in d.values()), d
    assert d["d_real"] < 0.95 and d["d_fake"] > 0.05, f"D is winning: {d}"
    labels = torch.arange(1000) % 10
    predicted = reader(_generate(state, 1000, labels))
    shares, accuracy = _shares(predicted), (predicted == labels.numpy()).mean()
    print(f"D {d}; label accuracy {accuracy:.3f}; shares (%) {np.round(shares * 100, 1).tolist()}")
    assert accuracy >= 0.7 and shares.min() >= 0.03, (accuracy, shares)  # measured: 0.84, 5.0%


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("what", ["mnist-seed.yaml", "defaults", "defaults without R1"])
def test_unconditional_early_steps_do_not_collapse(mnist_dir, reader, what):
    """After 1500 steps (about 3 epochs' worth on 2 workers) the seed recipe and the defaults are healthy: D is not
    winning and most digits are drawn (measured: 7 and 9 of 10 at >= 2%, the commonest at 32% and 30%: early on
    1s dominate; at 1000 steps the seed recipe drew only 5, at 2000 steps 8). The same seeds on another CPU of
    this VM kind (2026-12-06) took the defaults elsewhere: 8 of 10, but 1s at 51%, so a single digit may hold up
    to 60%. The defaults with R1 off, the setting that collapsed before, fail the same bar: D wins (D(x) 0.94,
    D(G(z)) 0.06) and the samples crowd onto one to three digits (1 to 3 at >= 2%)."""
    if what == "mnist-seed.yaml":
        cfg = resolve(load_yaml("mnist-seed"), {})
    else:
        cfg = TrainConfig(dataset="mnist", r1_gamma=0.0 if "without" in what else TrainConfig().r1_gamma)
    state, d = _train_in_process(cfg, mnist_dir, steps=1500)
    shares = _shares(reader(_generate(state, 1000, None)))
    seen = int((shares >= 0.02).sum())
    print(f"{what}: D {d}; shares (%) {np.round(shares * 100, 1).tolist()}; classes at >= 2%: {seen}")
    assert all(np.isfinite(v) for v in d.values()), d
    healthy = d["d_real"] < 0.8 and d["d_fake"] > 0.2 and seen >= 6 and shares.max() <= 0.6
    if "without" in what:
        assert d["d_real"] > 0.9 and d["d_fake"] < 0.1 and not healthy, "expected the plain default to fail here"
    else:
        assert healthy, (d, shares)
