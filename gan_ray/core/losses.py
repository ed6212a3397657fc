"""Adversarial losses on discriminator logits, and the gradient penalties.

Every loss is a pair (D's loss, G's loss) over D's raw outputs ("logits"); the discriminators return one logit
per image and the sigmoid, where a loss has one, lives here:

- `bce`: the non-saturating loss written with softplus (= BCE-with-logits, without the sigmoid's saturation).
- `hinge`: the SNGAN/BigGAN hinge loss.
- `mse`: least squares on D's probability sigmoid(logit), real -> 1, fake -> 0, and G pushes fakes -> 1: the
  MSE loss the seed's article names, computed exactly as a sigmoid-output D trained with nn.MSELoss would.
- `lsgan`: least squares on the raw output (Mao et al. 2017: a = 0, b = c = 1), the unsaturating form of `mse`.
- `rpgan`: the relativistic pairing loss (Jolicoeur-Martineau 2018; R3GAN): each real is compared with the fake
  beside it, softplus(-(D(x) - D(G(z)))) for D and the mirror image for G, so G's loss needs D's real logits.

R1 (Mescheder et al. 2018) penalises the gradient of D's output with respect to real inputs, R2 with respect
to fakes: gamma / 2 * E[||grad_x D(x)||^2]. They keep D from sharpening around the data, the usual cause of
oscillation and collapse on real MNIST.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

DLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (real_logits, fake_logits) -> loss
GLoss = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]  # (fake_logits, real_logits or None) -> loss


@dataclass(frozen=True)
class Loss:
    d: DLoss
    g: GLoss
    g_needs_real: bool = False  # G's loss compares with D's real logits (relativistic)


def bce_d(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """-log D(x) - log(1 - D(G(z)))."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def bce_g(fake_logits: torch.Tensor, real_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Non-saturating: -log D(G(z))."""
    return F.softplus(-fake_logits).mean()


def hinge_d(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def hinge_g(fake_logits: torch.Tensor, real_logits: torch.Tensor | None = None) -> torch.Tensor:
    return -fake_logits.mean()


def mse_d(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """MSE(D(x), 1) + MSE(D(G(z)), 0) on D's probabilities."""
    return (torch.sigmoid(real_logits) - 1).square().mean() + torch.sigmoid(fake_logits).square().mean()


def mse_g(fake_logits: torch.Tensor, real_logits: torch.Tensor | None = None) -> torch.Tensor:
    """MSE(D(G(z)), 1) on D's probability."""
    return (torch.sigmoid(fake_logits) - 1).square().mean()


def lsgan_d(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((real_logits - 1).square().mean() + fake_logits.square().mean())


def lsgan_g(fake_logits: torch.Tensor, real_logits: torch.Tensor | None = None) -> torch.Tensor:
    return 0.5 * (fake_logits - 1).square().mean()


def rpgan_d(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(-(real_logits - fake_logits)).mean()


def rpgan_g(fake_logits: torch.Tensor, real_logits: torch.Tensor | None = None) -> torch.Tensor:
    if real_logits is None:
        raise ValueError("the relativistic G loss needs D's logits on a real batch")
    return F.softplus(-(fake_logits - real_logits)).mean()


LOSSES: dict[str, Loss] = {
    "bce": Loss(bce_d, bce_g),
    "hinge": Loss(hinge_d, hinge_g),
    "mse": Loss(mse_d, mse_g),
    "lsgan": Loss(lsgan_d, lsgan_g),
    "rpgan": Loss(rpgan_d, rpgan_g, g_needs_real=True),
}


def get(name: str) -> Loss:
    return LOSSES[name]


def gradient_penalty(D: Callable[..., torch.Tensor], images: torch.Tensor,
                     labels: torch.Tensor | None) -> torch.Tensor:
    """E[||grad_x D(x)||^2] over the batch, differentiable (for R1 on reals, R2 on fakes); the gradient is taken
    with respect to the images only, never the labels of a conditional D. Call it with the plain (unwrapped) D:
    its graph then joins the D loss's, and DDP all-reduces the summed gradient once."""
    x = images.detach().float().requires_grad_(True)
    out = D(x, labels)
    (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    return grad.square().flatten(1).sum(1).mean()
