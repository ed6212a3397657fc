"""Differentiable augmentation (DiffAugment, Zhao et al. 2020) for the images D sees, real and fake alike.

With little data D memorises the training set and its feedback to G turns to noise. Augmenting only the reals
would teach G to draw augmented images; augmenting every image D sees, with differentiable ops, keeps the real
distribution as G's target while D can no longer memorise it. Each image gets its own random draw of every op
in the policy; the step calls `augment` on the batch it feeds D (reals and fakes together in the D update, the
fakes in the G update), so both see the same kinds of ops.

Ops (policy names, joined by commas or `+` in `--augment`; a sweep searching it writes `none,translation+cutout`,
since its commas separate choices):
- `translation`: shift by up to 1/8 of the side in x and y, zero fill.
- `cutout`: zero one square of half the side at a random place.
- `color`: brightness (+-0.5), contrast (x0.5..1.5) and, for colour images, saturation (x0..2).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

OPS = ("translation", "cutout", "color")
TRANSLATION_RATIO = 0.125
CUTOUT_RATIO = 0.5


def parse_policy(text: str) -> tuple[str, ...]:
    """`--augment` text -> the ops in order; "none" or "" -> ()."""
    names = tuple(t.strip() for t in str(text).replace("+", ",").split(",") if t.strip() and t.strip() != "none")
    unknown = [t for t in names if t not in OPS]
    if unknown:
        raise ValueError(f"unknown --augment op(s) {', '.join(unknown)}; choose from {', '.join(OPS)} (or none)")
    if len(set(names)) != len(names):
        raise ValueError(f"--augment lists an op twice: {text!r}")
    return names


def augment(x: torch.Tensor, policy: tuple[str, ...]) -> torch.Tensor:
    """`x` [N, C, H, W] with each op of `policy` applied, a fresh random draw per image (torch's RNG)."""
    for op in policy:
        x = _OPS[op](x)
    return x


def translation(x: torch.Tensor, ratio: float = TRANSLATION_RATIO) -> torch.Tensor:
    n, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-sh, sh + 1, (n, 1, 1), device=x.device)
    dx = torch.randint(-sw, sw + 1, (n, 1, 1), device=x.device)
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    src_y = (ys - dy + 1).clamp(0, h + 1)  # index into the 1-pixel zero-padded image: out of range reads zero
    src_x = (xs - dx + 1).clamp(0, w + 1)
    padded = F.pad(x, (1, 1, 1, 1))
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    out = padded.permute(0, 2, 3, 1)[batch, src_y.expand(n, h, w), src_x.expand(n, h, w)]
    return out.permute(0, 3, 1, 2).contiguous()


def cutout(x: torch.Tensor, ratio: float = CUTOUT_RATIO) -> torch.Tensor:
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    top = torch.randint(0, h + (1 - ch % 2), (n, 1, 1), device=x.device) - ch // 2  # the square may overhang
    left = torch.randint(0, w + (1 - cw % 2), (n, 1, 1), device=x.device) - cw // 2
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (ys >= top) & (ys < top + ch) & (xs >= left) & (xs < left + cw)
    return x * (~inside).unsqueeze(1).to(x.dtype)


def color(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    x = x + (torch.rand(n, 1, 1, 1, device=x.device, dtype=x.dtype) - 0.5)
    if x.shape[1] == 3:
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (torch.rand(n, 1, 1, 1, device=x.device, dtype=x.dtype) * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (torch.rand(n, 1, 1, 1, device=x.device, dtype=x.dtype) + 0.5) + mean


_OPS = {"translation": translation, "cutout": cutout, "color": color}
