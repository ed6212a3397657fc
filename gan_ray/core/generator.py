"""`Generator`: a loaded generator behind a plain, deterministic sampling API (images, labelled images, written
lines). What `gan_ray.load_generator` returns, what the service renders with, and what evaluation samples.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from gan_ray.core.errors import UserError
from gan_ray.core.handwriting import MAX_WRITERS, Writing, place_text, text_line, text_rows
from gan_ray.core.models import ModelSpec
from gan_ray.core.step import latent_for_seed

MAX_GENERATE = 100_000


class Generator:
    """A loaded generator with a plain sampling API. Deterministic: same (n, labels, seed) -> same images."""

    def __init__(self, net: torch.nn.Module, spec: ModelSpec, info: dict[str, Any], device: str | torch.device = "cpu"):
        self.net = net.eval().requires_grad_(False).to(device)
        self.spec = spec
        self.info = info
        self.device = torch.device(device)

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    def resolve_labels(self, n: int, labels: int | Sequence[int] | torch.Tensor | None) -> torch.Tensor:
        """Validated int64 labels [n]: cycling 0..K-1 when a conditional model gets none, -1 when unconditional."""
        k = self.spec.num_classes
        if labels is None:
            return torch.arange(n) % k if k else torch.full((n,), -1, dtype=torch.int64)
        if not k:
            raise UserError("this model is unconditional: it takes no labels")
        if isinstance(labels, int):
            t = torch.full((n,), labels, dtype=torch.int64)
        else:
            t = torch.as_tensor(list(labels) if not isinstance(labels, torch.Tensor) else labels, dtype=torch.int64)
            if t.ndim != 1 or t.numel() != n:
                raise UserError(f"expected {n} labels (one per image), got {t.numel()}")
        if n and (t.min() < 0 or t.max() >= k):
            raise UserError(f"labels must lie in 0..{k - 1}, got {sorted(set(t.tolist()))}")
        return t

    @torch.no_grad()
    def generate(self, n: int, labels: int | Sequence[int] | torch.Tensor | None = None,
                 seed: int | None = None) -> torch.Tensor:
        """n images as float [n, C, H, W] in [0, 1] (on CPU)."""
        return self.generate_with_labels(n, labels, seed)[0]

    @torch.no_grad()
    def generate_with_labels(self, n: int, labels=None, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if not 1 <= n <= MAX_GENERATE:
            raise UserError(f"n must lie in 1..{MAX_GENERATE}, got {n}")
        lab = self.resolve_labels(n, labels)
        z = latent_for_seed(n, self.spec.latent_dim, seed)
        out = self.net(z.to(self.device), lab.to(self.device) if self.spec.conditional else None)
        return out.float().cpu(), lab

    @torch.no_grad()
    def write(self, text: str, n: int = 1, seed: int | None = None) -> Writing:
        """`text` (digits and spaces, 1..64 characters) written by `n` writers (1..64), one line each: every writer
        is one latent vector used for every character, so each line looks like one hand. Conditional models only.
        Images [n, len(text), C, H, W] in [0, 1] (CPU), labels [n, len(text)] (-1 for spaces); the same seed gives
        the same images, and writer i is the latent of image i of `generate(n, seed=seed)`."""
        line = text_line(text, self.spec.num_classes)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_WRITERS:
            raise UserError(f"n (writers) must lie in 1..{MAX_WRITERS}, got {n!r}")
        z, lab = text_rows(latent_for_seed(n, self.spec.latent_dim, seed), line)
        rows = self.net(z.to(self.device), lab.to(self.device)).float().cpu()
        return Writing(place_text(rows, line), line.repeat(n, 1), text)


