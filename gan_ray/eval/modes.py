"""Mode coverage on Stacked-MNIST: how many of the 1000 digit triples a generator draws, and how evenly.

The protocol of VEEGAN, PacGAN and R3GAN (Table 2): 26,000 samples, each colour channel read by an MNIST
classifier; the triple of digits read is the sample's mode.
- `modes`: how many of the 1000 triples are read at least once.
- `mode_kl`: the reverse KL divergence KL(p_gen || uniform) of the triples' histogram from the uniform one,
  = log(1000) - entropy (nats). 0 for a perfectly even draw; a perfect generator's finite sample scores the
  plug-in estimate's bias, about 999 / (2 * 26,000) = 0.019, plus MNIST's own slight class imbalance and what the
  reader misreads: real held-out triples score 0.025 with this reader.
- `reader_confidence`: the reader's mean probability for the digit it reads, over every channel of every sample:
  how legible the digits are (blurred or ambiguous strokes read with low confidence; real digits: 0.988).
Real held-out triples are read the same way, at the same sample size, and their figures (`*_real`) are the floor
a perfect generator reaches with this reader.

The reader is the project's own MNIST classifier: the `mnist` feature extractor of `gan_ray.eval.features`,
trained on MNIST's training split only (never on stacked, generated or test images), cached like every extractor
and applied to each channel as a grey 28x28 digit (the `channels` extractor of stacked-mnist, whose features the
Frechet distance uses too). Pure numpy, no Ray.
"""
from __future__ import annotations

import numpy as np

MODE_SAMPLES = 26_000  # the protocol's sample size (gan-ray evaluate's default on stacked-mnist)
DIGITS = 10


def mode_counts(digits: np.ndarray) -> np.ndarray:
    """How often each of the 10^C digit tuples occurs (tuple (r, g, b) at index 100 r + 10 g + b)."""
    digits = np.asarray(digits, dtype=np.int64)
    weights = DIGITS ** np.arange(digits.shape[1] - 1, -1, -1)
    return np.bincount(digits @ weights, minlength=DIGITS ** digits.shape[1])


def modes_and_kl(digits: np.ndarray) -> tuple[int, float]:
    """(modes hit, KL(p || uniform) in nats) of a set of read digit tuples [N, C]."""
    counts = mode_counts(digits)
    p = counts[counts > 0] / counts.sum()
    return int((counts > 0).sum()), float(np.log(len(counts)) + (p * np.log(p)).sum())
