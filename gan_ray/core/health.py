"""Is training still working? Rules over the per-epoch metrics rows that recognise a run that has failed and is
not recovering, so a user is told (and, with --stop-on-collapse, the run ends) instead of watching hours of
useless epochs.

- divergence: a loss is NaN or infinite;
- D has won: D(x) near 1 and D(G(z)) near 0 for `patience` epochs in a row: G gets vanishing gradients and its
  samples stop changing (on real MNIST the plain setups end here within a few epochs);
- mode collapse: the samples read as a single class at `eval_patience` evaluations in a row (metrics'
  `classes_seen`), on a labelled dataset.

Pure Python, no torch: the worker loop feeds it rank 0's rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

D_WINS_REAL, D_WINS_FAKE = 0.95, 0.05  # D(x) above and D(G(z)) below these: D has won the epoch
ADVICE = "try --r1-gamma 10, --spectral-norm, --augment translation,cutout or a lower --lr-d"


@dataclass
class CollapseWatch:
    patience: int = 3  # epochs in a row of D winning before it counts
    eval_patience: int = 2  # evaluations in a row reading a single class (a young G's blobs can, once)
    d_won_for: int = 0
    one_class_for: int = 0

    def check(self, row: dict) -> str | None:
        """A one-line diagnosis when this epoch's row shows a failed run, else None."""
        for key in ("loss_d", "loss_g"):
            value = row.get(key)
            if isinstance(value, float) and not math.isfinite(value):
                return f"training diverged: {key} is {value} at epoch {row.get('epoch')}"
        if row.get("d_real", 0.5) > D_WINS_REAL and row.get("d_fake", 0.5) < D_WINS_FAKE:
            self.d_won_for += 1
        else:
            self.d_won_for = 0
        if self.d_won_for >= self.patience:
            return (f"D has won for {self.d_won_for} epochs (D(x) {row['d_real']:.2f}, D(G(z)) {row['d_fake']:.2f}): "
                    f"G gets no useful gradient and is not recovering; {ADVICE}")
        seen = row.get("classes_seen")
        if seen is not None:  # an evaluation epoch
            self.one_class_for = self.one_class_for + 1 if seen <= 1 else 0
        if self.one_class_for >= self.eval_patience:
            return (f"mode collapse: the samples read as {int(seen)} class at {self.one_class_for} evaluations in a "
                    f"row (epoch {row.get('epoch')}, class_coverage {row.get('class_coverage', 0):.2f}); {ADVICE}")
        return None
