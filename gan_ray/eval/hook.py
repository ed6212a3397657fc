"""Quality metrics during training: the epoch hook that adds `fd` (and the rest) to checkpoint reports.

`hooks_for(cfg)` runs on the driver: it trains (or loads from the cache) the dataset's feature extractor once and
packs its weights into the hook, so workers on other nodes need neither a shared cache nor a second training run.
The hook runs on rank 0 at every checkpoint epoch (and every `--eval-every` epochs); other ranks wait at the
report barrier meanwhile, so it scores `--eval-samples` images from the EMA generator with a fixed noise seed (the
same images every evaluation: differences between epochs come from the generator alone) and stays well under a
second: the held-out set is embedded once per worker process, and precision/recall (k-NN radii over the held-out
set, ~30 s on MNIST) are left to `gan-ray evaluate` unless --eval-full. On stacked-mnist the mode coverage is
counted over the `--eval-samples` images, fewer than the protocol's 26,000 (so fewer modes than `gan-ray evaluate`
finds: compare with its `modes_real`, measured at the same size).
Ray-free: `ray_train` calls it like any other hook.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from gan_ray.core.config import TrainConfig
from gan_ray.core.errors import UserError

_REFERENCES: dict[tuple, Any] = {}  # per worker process: (extractor key, dataset, device) -> metrics.Reference


@dataclass
class QualityHook:
    """Picklable epoch hook: (cfg, state, epoch, device) -> {"fd": ..., "fd_ratio": ..., ...}."""

    extractor: dict[str, Any]  # gan_ray.eval.features.to_bytes payload
    metrics: list[str] | None = field(default=None)  # None: TRAINING_METRICS, or every metric with --eval-full

    def reference(self, cfg: TrainConfig, device: torch.device):
        from gan_ray.core.data import load_dataset
        from gan_ray.eval.features import from_bytes
        from gan_ray.eval.metrics import reference_from

        key = (self.extractor["meta"]["key"], cfg.dataset, cfg.data_dir, cfg.image_size, str(device))
        if key not in _REFERENCES:
            heldout = load_dataset(cfg.dataset, "heldout", data_dir=cfg.data_dir, image_size=cfg.image_size)
            _REFERENCES[key] = reference_from(from_bytes(self.extractor, device), heldout.images, cfg.dataset,
                                              heldout.labels if heldout.num_classes else None)
        return _REFERENCES[key]

    def __call__(self, cfg: TrainConfig, state, epoch: int, device: torch.device) -> dict[str, float]:
        from gan_ray.eval.metrics import METRIC_KEYS, TRAINING_METRICS, evaluate, sample_images

        t0 = time.perf_counter()
        ref = self.reference(cfg, device)
        images, requested = sample_images(state.sampler, state.spec, cfg.eval_samples, seed=cfg.seed, device=device)
        # A diverged generator may emit NaN: score it as the black images it effectively draws, don't crash the run.
        images = torch.nan_to_num(images, nan=0.0, posinf=1.0, neginf=0.0).clamp_(0.0, 1.0)
        names = self.metrics if self.metrics is not None else (None if cfg.eval_full else list(TRAINING_METRICS))
        result = evaluate(images, ref, labels=requested, seed=cfg.seed, metrics=names)
        out = {k: float(result[k]) for k in METRIC_KEYS if result.get(k) is not None}
        out["eval_seconds"] = round(time.perf_counter() - t0, 3)
        return out


def hooks_for(cfg: TrainConfig, *, log=lambda msg: print(msg, file=sys.stderr)) -> list[QualityHook]:
    """The quality hook for a run, or [] (with a warning) when the dataset's extractor is too weak to trust.

    Raises UserError up front for settings that could never be scored (too few --eval-samples)."""
    from gan_ray.eval.features import load_extractor, to_bytes
    from gan_ray.eval.metrics import GENERATED_PER_DIM

    ex = load_extractor(cfg.dataset, data_dir=cfg.data_dir, image_size=cfg.image_size, log=log)
    try:
        ex.require_quality()
    except UserError as exc:
        log(f"warning: training without quality metrics (checkpoints kept by recency): {exc}")
        return []
    need = GENERATED_PER_DIM * ex.feature_dim
    if cfg.eval_samples < need:
        raise UserError(f"--eval-samples {cfg.eval_samples} is too few to score in the {ex.feature_dim}-dimensional "
                        f"feature space of {cfg.dataset}; give at least {need}")
    return [QualityHook(to_bytes(ex))]
