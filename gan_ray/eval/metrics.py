"""How good is a generator? Honest offline metrics in a dataset-specific feature space. Pure PyTorch/numpy, no Ray.

Every metric works in the penultimate layer of the dataset's own classifier (`gan_ray.eval.features`), against the
dataset's held-out split, which neither the generator nor the extractor ever trained on.

The protocol, and why (held-out sets can be small: digits has 270 images):
- A Frechet distance estimated from samples is biased upwards by an amount that depends on both sample sizes, so
  a number means something only next to the value a perfect generator gets under the same sizes. Each *split*
  draws, from the held-out set, a reference part and a disjoint real sample of size m = min(n, held-out // 2);
  the generated sample of the split has the same size m. `fd` is the mean over splits of FD(generated, reference)
  and `fd_floor` the mean of FD(real sample, reference): identical sizes, identical references. A perfect
  generator scores `fd_ratio` ~ 1. There are 64 splits, each a fresh random halving of the held-out set, and
  they cycle through disjoint generated chunks, so every generated image counts and both values are steady.
- Precision and recall (Kynkaanniemi et al. 2019, k=3) use the first splits (one per generated chunk, 4 to 16),
  each set subsampled to at most PR_MAX_POINTS, with the real sample's values (`precision_real`, `recall_real`)
  beside them: what real data scores at these sizes.
- The classifier score, class coverage and label accuracy use all n generated images; their real counterparts
  are computed on held-out images resampled to the same n.
- Stacked-MNIST also gets mode coverage (`gan_ray.eval.modes`): every channel read by the MNIST reader, modes hit
  and the reverse KL to uniform over the 1000 digit triples, beside a real sample of the same size.

Metrics live in a small registry (`@register_metric`, as in stylegan2-ada): each takes an `EvalContext` and
returns named values; names are validated before any work starts.
"""
from __future__ import annotations

import math
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from gan_ray.core.config import DEFAULT_DATA_DIR
from gan_ray.core.errors import UserError, one_line
from gan_ray.eval.features import single_thread

K_NEIGHBOURS = 3
FD_SPLITS = 64  # FD needs only means and covariances: many splits are cheap and steady the floor
MIN_PR_SPLITS, MAX_PR_SPLITS = 4, 16
# Precision/recall's k-NN radii cost the square of the points: each set of a split is subsampled to at most this
# many (MNIST's default 2000 samples are untouched; Stacked-MNIST's 26,000 would take an hour on one core).
PR_MAX_POINTS = 2000
REAL_RESAMPLES = 8  # bootstrap draws behind classifier_score_real / class_coverage_real
GENERATED_PER_DIM = 8  # generated images per feature dimension, at least (FD needs covariances above the dimension)

# Every key a full evaluation returns (None where it does not apply), in display order.
METRIC_KEYS = ("fd", "fd_floor", "fd_ratio", "classifier_score", "classifier_score_real", "precision",
               "precision_real", "recall", "recall_real", "class_coverage", "class_coverage_real",
               "classes_seen", "label_accuracy", "modes", "modes_real", "mode_kl", "mode_kl_real",
               "reader_confidence", "reader_confidence_real")
# What training evaluates at its checkpoints unless --eval-full: everything but precision/recall, whose k-NN
# radii over the held-out set cost ~30 s per evaluation on MNIST (the rest: well under a second).
TRAINING_METRICS = ("fd", "classifier_scores", "class_coverages", "label_accuracies", "mode_coverage")
# A class counts as drawn when at least this fraction of its share under a uniform draw reads as it: 1% of the
# samples with 10 classes; with Stacked-MNIST's 1000, a thousandth of that.
SEEN_SHARE_OF_UNIFORM = 0.1


# ------------------------------------------------------------------------------------------- building blocks
def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of features [N, d], in float64."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need features [N >= 2, d], got shape {x.shape}")
    return x.mean(0), np.atleast_2d(np.cov(x, rowvar=False))


def psd_sqrt(cov: np.ndarray) -> np.ndarray:
    """The symmetric square root of a covariance (negative round-off eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh((cov + cov.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray, *,
                     sqrt_cov2: np.ndarray | None = None) -> float:
    """||mu1 - mu2||^2 + tr(C1) + tr(C2) - 2 tr((C1 C2)^1/2), never NaN, complex or negative.

    tr((C1 C2)^1/2) is computed as the sum of square roots of the eigenvalues of S C1 S with S = C2^1/2: that
    matrix is symmetric positive semi-definite, so a symmetric eigensolver gives real eigenvalues (round-off
    negatives are clipped to 0). This avoids scipy.linalg.sqrtm's complex results and failures on singular
    covariances (e.g. a generator that always draws the same image). `sqrt_cov2` (= `psd_sqrt(cov2)`) may be
    passed when many sets are compared with one reference.
    """
    for a in (mu1, cov1, mu2, cov2):
        if not np.all(np.isfinite(a)):
            raise ValueError("Frechet distance of non-finite statistics")
    s2 = psd_sqrt(np.asarray(cov2, dtype=np.float64)) if sqrt_cov2 is None else sqrt_cov2
    m = s2 @ np.asarray(cov1, dtype=np.float64) @ s2
    eig = np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)
    diff = np.asarray(mu1, dtype=np.float64) - np.asarray(mu2, dtype=np.float64)
    value = diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * np.sqrt(eig).sum()
    return float(max(value, 0.0))


def frechet_distance_features(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(*feature_stats(a), *feature_stats(b))


def _pairwise(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def knn_radii(x: np.ndarray, k: int = K_NEIGHBOURS, chunk: int = 1024) -> np.ndarray:
    """Distance from each point to its k-th nearest *other* point."""
    t = torch.as_tensor(x, dtype=torch.float64)
    if t.shape[0] <= k:
        raise ValueError(f"need more than k={k} points, got {t.shape[0]}")
    out = [_pairwise(t[i:i + chunk], t).topk(k + 1, dim=1, largest=False).values[:, k]
           for i in range(0, t.shape[0], chunk)]
    return torch.cat(out).numpy()


def in_manifold(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """For each point: does it lie within some centre's radius (the k-NN manifold estimate)?"""
    p = torch.as_tensor(points, dtype=torch.float64)
    c = torch.as_tensor(centres, dtype=torch.float64)
    r = torch.as_tensor(radii, dtype=torch.float64)
    out = [(_pairwise(p[i:i + chunk], c) <= r[None, :]).any(1) for i in range(0, p.shape[0], chunk)]
    return torch.cat(out).numpy()


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = K_NEIGHBOURS) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): the share of fake samples inside the real
    manifold, and of real samples inside the fake manifold, each manifold a union of k-NN balls."""
    precision = float(in_manifold(fake, real, knn_radii(real, k)).mean())
    recall = float(in_manifold(real, fake, knn_radii(fake, k)).mean())
    return precision, recall


def classifier_score(probs: np.ndarray, eps: float = 1e-12) -> float:
    """exp(E_x KL(p(y|x) || p(y))): the Inception Score's idea with the dataset's own classifier. 1 = every image
    gets the same class distribution (e.g. one class only); at most the number of classes."""
    p = np.asarray(probs, dtype=np.float64)
    marginal = p.mean(0, keepdims=True)
    kl = (p * (np.log(p + eps) - np.log(marginal + eps))).sum(1)
    return float(np.exp(kl.mean()))


def class_coverage(predicted: np.ndarray, class_shares: np.ndarray) -> float:
    """How well the rarest class is represented: min over classes of (share among the images / share in the real
    data). 1 = every class as frequent as in real data; 0 = some class never appears (mode collapse)."""
    k = len(class_shares)
    shares = np.bincount(np.asarray(predicted, dtype=np.int64), minlength=k)[:k] / max(len(predicted), 1)
    return float(np.min(shares / np.maximum(np.asarray(class_shares, dtype=np.float64), 1e-12)))


def classes_seen(predicted: np.ndarray, num_classes: int, min_share: float | None = None) -> int:
    """How many classes hold at least `min_share` of the images (default: a tenth of 1 / num_classes): 1 means the
    generator draws a single class."""
    min_share = SEEN_SHARE_OF_UNIFORM / num_classes if min_share is None else min_share
    counts = np.bincount(np.asarray(predicted, dtype=np.int64), minlength=num_classes)[:num_classes]
    return int((counts >= min_share * max(len(predicted), 1)).sum())


def label_accuracy(probs: np.ndarray, requested: np.ndarray) -> float:
    """Share of conditionally generated images that the classifier reads as the label that was asked for."""
    return float((np.asarray(probs).argmax(1) == np.asarray(requested)).mean())


# ------------------------------------------------------------------------------------------------ registry
@dataclass
class Embedded:
    """An image set in feature space: features [N, d] and class probabilities [N, K] (None without a classifier)."""

    features: np.ndarray
    probs: np.ndarray | None
    labels: np.ndarray | None = None  # true classes (real images of a labelled dataset)
    digits: np.ndarray | None = None  # [N, C] each channel's digit as the MNIST reader reads it (stacked-mnist)
    confidence: np.ndarray | None = None  # [N, C] the reader's probability for those digits

    def __len__(self) -> int:
        return self.features.shape[0]


@dataclass(frozen=True)
class Split:
    """Indices of one comparison: a reference part of the held-out set, a disjoint real sample, a generated one."""

    ref: np.ndarray
    real: np.ndarray
    gen: np.ndarray


@dataclass
class EvalContext:
    gen: Embedded
    real: Embedded  # the held-out reference set
    splits: list[Split]
    requested: np.ndarray | None  # labels asked of a conditional generator, else None
    class_shares: np.ndarray | None  # class frequencies of the training split
    seed: int


MetricFn = Callable[[EvalContext], dict[str, float | None]]
_METRICS: dict[str, MetricFn] = {}


def register_metric(fn: MetricFn) -> MetricFn:
    _METRICS[fn.__name__] = fn
    return fn


def list_metrics() -> list[str]:
    return list(_METRICS)


def validate_metrics(names: Sequence[str] | None) -> list[str]:
    """The metric names to compute (all by default); unknown names are a user error, raised before any work."""
    if names is None:
        return list_metrics()
    unknown = [n for n in names if n not in _METRICS]
    if unknown:
        raise UserError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(_METRICS)}")
    return list(names)


def make_splits(n_real: int, n_gen: int, seed: int, count: int = FD_SPLITS) -> list[Split]:
    """Matched comparisons (see the module docstring): split s takes generated chunk s (cycling when n allows
    fewer chunks than splits) and a fresh random halving of the held-out set."""
    m = min(n_gen, n_real // 2)
    rng = np.random.default_rng([seed, 0x5EED])
    gen_order = rng.permutation(n_gen)
    chunks = max(1, n_gen // m)
    splits = []
    for s in range(count):
        real_order = rng.permutation(n_real)
        start = (s % chunks) * m
        splits.append(Split(ref=np.sort(real_order[m:]), real=np.sort(real_order[:m]),
                            gen=np.sort(gen_order[start:start + m])))
    return splits


def pr_split_count(n_gen: int, n_real: int) -> int:
    """Splits used by precision/recall (k-NN over all pairs: dearer than FD): one per generated chunk, 4..16."""
    m = min(n_gen, n_real // 2)
    return int(min(MAX_PR_SPLITS, max(MIN_PR_SPLITS, math.ceil(n_gen / m))))


def perfect_draws(labels: np.ndarray, class_shares: np.ndarray, n: int, seed: int) -> list[np.ndarray]:
    """Indices of held-out images as a perfect generator would draw n of them: classes in the real proportions
    (multinomial, so with its sampling noise at size n), then an image of that class. A plain bootstrap would copy
    the held-out set's own class imbalance (digits: ~27 images per class), which a perfect generator doesn't have."""
    rng = np.random.default_rng([seed, 0xB007])
    by_class = [np.flatnonzero(labels == c) for c in range(len(class_shares))]
    shares = np.where([len(b) > 0 for b in by_class], class_shares, 0.0)
    draws = []
    for _ in range(REAL_RESAMPLES):
        classes = rng.choice(len(shares), size=n, p=shares / shares.sum())
        draws.append(np.array([by_class[c][rng.integers(len(by_class[c]))] for c in classes], dtype=np.int64))
    return draws


@register_metric
def fd(ctx: EvalContext) -> dict[str, float | None]:
    values, floors = [], []
    for sp in ctx.splits:
        mu_ref, cov_ref = feature_stats(ctx.real.features[sp.ref])
        sqrt_ref = psd_sqrt(cov_ref)  # shared by the generated and the real comparison
        values.append(frechet_distance(*feature_stats(ctx.gen.features[sp.gen]), mu_ref, cov_ref, sqrt_cov2=sqrt_ref))
        floors.append(frechet_distance(*feature_stats(ctx.real.features[sp.real]), mu_ref, cov_ref,
                                       sqrt_cov2=sqrt_ref))
    value, floor = float(np.mean(values)), float(np.mean(floors))
    return {"fd": value, "fd_floor": floor, "fd_ratio": value / max(floor, 1e-12)}


@register_metric
def precision_recall_k3(ctx: EvalContext) -> dict[str, float | None]:
    gen_pr, real_pr = [], []
    rng = np.random.default_rng([ctx.seed, 0x9E7])

    def at_most(idx: np.ndarray) -> np.ndarray:  # the same set when it is small enough
        return np.sort(rng.choice(idx, size=min(len(idx), PR_MAX_POINTS), replace=False))

    for sp in ctx.splits[:pr_split_count(len(ctx.gen), len(ctx.real))]:
        ref = ctx.real.features[at_most(sp.ref)]
        gen_pr.append(precision_recall(ref, ctx.gen.features[at_most(sp.gen)]))
        real_pr.append(precision_recall(ref, ctx.real.features[at_most(sp.real)]))
    g, r = np.mean(gen_pr, axis=0), np.mean(real_pr, axis=0)
    return {"precision": float(g[0]), "recall": float(g[1]), "precision_real": float(r[0]),
            "recall_real": float(r[1])}


def _real_draws(ctx: EvalContext) -> list[np.ndarray]:
    if ctx.real.labels is None or ctx.class_shares is None:
        rng = np.random.default_rng([ctx.seed, 0xB007])
        return [rng.integers(0, len(ctx.real), size=len(ctx.gen)) for _ in range(REAL_RESAMPLES)]
    return perfect_draws(ctx.real.labels, ctx.class_shares, len(ctx.gen), ctx.seed)


@register_metric
def classifier_scores(ctx: EvalContext) -> dict[str, float | None]:
    if ctx.gen.probs is None:
        return {"classifier_score": None, "classifier_score_real": None}
    real = [classifier_score(ctx.real.probs[idx]) for idx in _real_draws(ctx)]
    return {"classifier_score": classifier_score(ctx.gen.probs), "classifier_score_real": float(np.mean(real))}


@register_metric
def class_coverages(ctx: EvalContext) -> dict[str, float | None]:
    if ctx.gen.probs is None or ctx.class_shares is None:
        return {"class_coverage": None, "class_coverage_real": None, "classes_seen": None}
    real_pred = ctx.real.probs.argmax(1)
    real = [class_coverage(real_pred[idx], ctx.class_shares) for idx in _real_draws(ctx)]
    gen_pred = ctx.gen.probs.argmax(1)
    return {"class_coverage": class_coverage(gen_pred, ctx.class_shares),
            "class_coverage_real": float(np.mean(real)),
            "classes_seen": classes_seen(gen_pred, len(ctx.class_shares))}


@register_metric
def label_accuracies(ctx: EvalContext) -> dict[str, float | None]:
    if ctx.gen.probs is None or ctx.requested is None:
        return {"label_accuracy": None}
    return {"label_accuracy": label_accuracy(ctx.gen.probs, ctx.requested)}


@register_metric
def mode_coverage(ctx: EvalContext) -> dict[str, float | None]:
    """Modes hit and KL to uniform of the read digit triples, beside a real held-out sample of the same size (all
    of it at the protocol's 26,000; drawn with replacement only when more images are scored than it holds)."""
    from gan_ray.eval.modes import modes_and_kl

    if ctx.gen.digits is None or ctx.real.digits is None:
        return {k: None for k in ("modes", "modes_real", "mode_kl", "mode_kl_real", "reader_confidence",
                                  "reader_confidence_real")}
    n, n_real = len(ctx.gen), len(ctx.real)
    rng = np.random.default_rng([ctx.seed, 0x40DE])
    idx = rng.permutation(n_real)[:n] if n <= n_real else rng.integers(0, n_real, size=n)
    modes, kl = modes_and_kl(ctx.gen.digits)
    modes_real, kl_real = modes_and_kl(ctx.real.digits[idx])
    return {"modes": modes, "modes_real": modes_real, "mode_kl": kl, "mode_kl_real": kl_real,
            "reader_confidence": float(ctx.gen.confidence.mean()),
            "reader_confidence_real": float(ctx.real.confidence[idx].mean())}


# ------------------------------------------------------------------------------------------------ evaluation
@dataclass
class Reference:
    """A dataset's extractor and its held-out set, embedded once per process."""

    extractor: Any  # gan_ray.eval.features.Extractor
    real: Embedded
    dataset: str

    @property
    def min_samples(self) -> int:
        return GENERATED_PER_DIM * self.extractor.feature_dim


_REFERENCES: dict[tuple, Reference] = {}


def clear_references() -> None:
    """Forget the per-process references (the next evaluation reloads the extractor and re-embeds held-out)."""
    _REFERENCES.clear()


def reference_for(dataset: str, *, data_dir: str = DEFAULT_DATA_DIR, image_size: int = 28,
                  cache_dir: str | Path | None = None, device: torch.device | str = "cpu",
                  extractor=None, log=lambda msg: None) -> Reference:
    """The extractor (trained and cached on first use) and the embedded held-out set of a dataset."""
    from gan_ray.core.data import load_dataset
    from gan_ray.eval.features import cache_root, load_extractor

    key = (dataset, str(Path(data_dir).expanduser()), image_size, str(cache_root(cache_dir)), str(device),
           extractor.key if extractor is not None else None)
    if key in _REFERENCES:
        return _REFERENCES[key]
    if extractor is None:
        extractor = load_extractor(dataset, data_dir=data_dir, image_size=image_size, cache_dir=cache_dir, log=log)
    heldout = load_dataset(dataset, "heldout", data_dir=data_dir, image_size=image_size)
    ref = reference_from(extractor.to(device), heldout.images, dataset,
                         heldout.labels if heldout.num_classes else None)
    _REFERENCES[key] = ref
    return ref


def reference_from(extractor, heldout_images: torch.Tensor, dataset: str,
                   heldout_labels: torch.Tensor | None = None) -> Reference:
    labels = heldout_labels.cpu().numpy().astype(np.int64) if heldout_labels is not None else None
    return Reference(extractor, embedded(extractor, heldout_images, labels), dataset)


def embedded(extractor, images: torch.Tensor, labels: np.ndarray | None = None) -> Embedded:
    """Images in an extractor's feature space; a channel reader also reads each channel's digit (same pass)."""
    if extractor.kind == "channels":
        features, digits, confidence = extractor.read(images)
        return Embedded(features, None, labels, digits, confidence)
    return Embedded(*extractor.embed(images), labels)


def check_images(images: torch.Tensor, what: str = "images") -> torch.Tensor:
    """Float images [N, C, H, W], finite, in [0, 1]; anything else is a user error."""
    if not isinstance(images, torch.Tensor):
        images = torch.as_tensor(np.asarray(images))
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise UserError(f"{what} must have shape [N, C, H, W] with C = 1 or 3, got {list(images.shape)}")
    if images.numel() == 0:  # nothing to score (and min()/max() below have no value to return)
        raise UserError(f"{what} are empty: shape {list(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float().div(255.0)
    if not images.is_floating_point():
        raise UserError(f"{what} must be float in [0, 1] (or uint8 0..255), got {images.dtype}")
    images = images.float()
    if not bool(torch.isfinite(images).all()):
        raise UserError(f"{what} contain NaN or infinite values")
    lo, hi = float(images.min()), float(images.max())
    if lo < 0.0 or hi > 1.0:
        raise UserError(f"{what} must lie in [0, 1], found values in [{lo:.4g}, {hi:.4g}]")
    return images


def evaluate(images: torch.Tensor, reference: Reference, *, labels: torch.Tensor | np.ndarray | None = None,
             seed: int = 0, metrics: Sequence[str] | None = None) -> dict[str, Any]:
    """Score a batch of images (float [N, C, H, W] in [0, 1]) against a dataset's reference.

    `labels`: the labels a conditional generator was asked for (enables label_accuracy), else None.
    Returns every key of METRIC_KEYS (None where it does not apply) plus what was measured how.
    """
    names = validate_metrics(metrics)
    t0 = time.perf_counter()
    ex = reference.extractor.require_quality()
    images = check_images(images)
    n = images.shape[0]
    if n < reference.min_samples:
        raise UserError(f"{n} images are too few to score in a {ex.feature_dim}-dimensional feature space; "
                        f"give at least {reference.min_samples}")
    requested = None
    if labels is not None:
        requested = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64)
        if requested.shape != (n,):
            raise UserError(f"expected {n} labels, one per image, got shape {list(requested.shape)}")
        if ex.kind != "classifier":
            requested = None  # no classifier to read them with
        elif requested.min() < 0 or requested.max() >= ex.num_classes:
            raise UserError(f"labels must lie in 0..{ex.num_classes - 1}")
    gen = embedded(ex, images)
    shares = np.asarray(ex.meta["class_shares"]) if "class_shares" in ex.meta else None
    ctx = EvalContext(gen, reference.real, make_splits(len(reference.real), n, seed), requested, shares, seed)
    values: dict[str, Any] = {k: None for k in METRIC_KEYS}
    with single_thread():  # many small kernels: one thread is faster on a busy machine, and deterministic
        for name in names:
            values.update(_METRICS[name](ctx))
    return {
        **values,
        "n": n, "seed": seed, "dataset": reference.dataset,
        "reference_size": len(reference.real), "split_size": len(ctx.splits[0].gen), "fd_splits": len(ctx.splits),
        "pr_splits": pr_split_count(n, len(reference.real)),
        "extractor": ex.kind, "extractor_quality": ex.quality, "feature_dim": ex.feature_dim,
        "seconds": round(time.perf_counter() - t0, 3),
    }


@torch.no_grad()
def sample_images(net: torch.nn.Module, spec, n: int, seed: int, device: torch.device | str = "cpu",
                  batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor | None]:
    """n images from a generator module (in eval mode, restored afterwards) with a private noise seed; labels
    cycle over the classes for a conditional model. The global RNG is not touched."""
    from gan_ray.core.step import eval_mode, latent_for_seed

    z = latent_for_seed(n, spec.latent_dim, seed)
    labels = torch.arange(n) % spec.num_classes if spec.conditional else None
    with eval_mode(net):
        out = [net(z[i:i + batch_size].to(device),
                   labels[i:i + batch_size].to(device) if labels is not None else None).float().cpu()
               for i in range(0, n, batch_size)]
    return torch.cat(out), labels


def evaluate_generator(source, dataset: str | Reference | None = None, n: int = 2000, seed: int = 0, *,
                       labels=None, data_dir: str | None = None, image_size: int | None = None,
                       cache_dir: str | Path | None = None, device: torch.device | str = "cpu",
                       metrics: Sequence[str] | None = None, log=lambda msg: None) -> dict[str, Any]:
    """Score a generator or a set of images: the one entry point of the CLI, the training hook and Tune.

    `source`: a `gan_ray.core.generator.Generator` (n images from `seed`), a `(module, ModelSpec)` pair, an image
    tensor/array [N, C, H, W] in [0, 1], or an `(images, labels)` pair. `dataset`: a name or a `Reference`;
    by default a Generator's own dataset.
    """
    from gan_ray.core.generator import Generator

    info: dict[str, Any] = {}
    if isinstance(source, Generator):
        info = source.info.get("config", {}) or {}
        dataset = dataset if dataset is not None else source.info.get("dataset")
        images, lab = source.generate_with_labels(n, labels, seed=seed)
        requested = lab if source.spec.conditional else None
    elif isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], torch.nn.Module):
        images, requested = sample_images(source[0], source[1], n, seed, device)
    elif isinstance(source, tuple) and len(source) == 2:
        images, requested = source
    else:
        images, requested = source, labels
    if dataset is None:
        raise UserError("which dataset should the images be compared with? (give --dataset)")
    if isinstance(dataset, Reference):
        ref = dataset
    else:
        images = check_images(images)
        ref = reference_for(dataset, data_dir=data_dir or info.get("data_dir", DEFAULT_DATA_DIR),
                            image_size=image_size or info.get("image_size") or int(images.shape[-1]),
                            cache_dir=cache_dir, device=device, log=log)
    if requested is not None and bool((torch.as_tensor(requested) < 0).all()):
        requested = None  # -1 = "no label" (the `gan-ray sample` format for unconditional models)
    return evaluate(images, ref, labels=requested, seed=seed, metrics=metrics)


def score_labels(images: torch.Tensor, requested: Sequence[int] | torch.Tensor, dataset: str = "digits",
                 **kw) -> float:
    """Label accuracy of conditionally generated images (e.g. for a serving smoke check): the share the
    dataset's classifier reads as the requested label."""
    ref = reference_for(dataset, **kw)
    ex = ref.extractor.require_quality()
    if ex.kind != "classifier":
        raise UserError(f"{dataset} has no labels: label accuracy is undefined")
    _, probs = ex.embed(check_images(images))
    return label_accuracy(probs, np.asarray(requested, dtype=np.int64))


# ---------------------------------------------------------------------------------------- optional real FID
def load_inception(weights: str | Path) -> torch.nn.Module:
    """torchvision's Inception-v3 with the user's weights (a state_dict as .safetensors or a tensors-only .pt/.pth),
    its classifier removed: the 2048-d pool features. Any file that is not such weights is a UserError (checked
    before anything is scored, so a wrong path costs seconds, not a whole evaluation)."""
    import torchvision
    from safetensors import SafetensorError

    path = Path(weights).expanduser()
    if not path.is_file():
        raise UserError(f"--inception-weights {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise UserError(f"--inception-weights {path}: not a readable weights file "
                        f"({type(exc).__name__}: {one_line(exc, 160)})") from None
    if not isinstance(state, dict):
        raise UserError(f"--inception-weights {path}: expected a state_dict, got {type(state).__name__}")
    net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    try:
        net.load_state_dict(state)
    except (RuntimeError, TypeError) as exc:
        raise UserError(f"{path} does not hold torchvision Inception-v3 weights: {str(exc).splitlines()[0]}") from None
    net.fc = torch.nn.Identity()
    return net.eval()


def inception_fd(images: torch.Tensor, real_images: torch.Tensor, weights: str | Path | torch.nn.Module,
                 device: torch.device | str = "cpu", batch_size: int = 100) -> float:
    """FID in torchvision's Inception-v3 pool features (2048-d), with weights the user supplies on disk
    (see `load_inception`; a module it returned may be passed instead). Not the default: with a few thousand images
    the 2048x2048 covariances are rank-deficient and the value is dominated by sample-size bias, and ImageNet
    features say little about 28x28 digits. Numbers match papers only with the weights they used (pytorch-fid's
    port of the TF graph differs from torchvision's). Untested here against real weights (none offline)."""
    net = weights if isinstance(weights, torch.nn.Module) else load_inception(weights)
    net = net.to(device)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def pool(x: torch.Tensor) -> np.ndarray:
        out = []
        for i in range(0, x.shape[0], batch_size):
            b = x[i:i + batch_size].float().to(device)
            b = b.expand(-1, 3, -1, -1) if b.shape[1] == 1 else b
            b = torch.nn.functional.interpolate(b, size=(299, 299), mode="bilinear", align_corners=False)
            out.append(net((b - mean) / std).double().cpu())
        return torch.cat(out).numpy()

    return frechet_distance_features(pool(images), pool(real_images))
