"""Adversarial losses on discriminator logits.

`bce` is the seed's non-saturating loss written with softplus (= BCE-with-logits, without the sigmoid's
saturation); `hinge` is the SNGAN/BigGAN hinge loss.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LossPair = tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]


def bce_d(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """-log D(x) - log(1 - D(G(z)))."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def bce_g(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating: -log D(G(z))."""
    return F.softplus(-fake_logits).mean()


def hinge_d(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def hinge_g(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()


LOSSES: dict[str, LossPair] = {"bce": (bce_d, bce_g), "hinge": (hinge_d, hinge_g)}


def get(name: str) -> LossPair:
    return LOSSES[name]
