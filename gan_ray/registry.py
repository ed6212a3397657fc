"""Exported model directories and `load_generator`: what sweeps hand to serving.

A model directory is self-contained and safe to load: `model.json` (architecture, latent size, classes, image
shape, dataset, metrics, source), `generator.safetensors` (the EMA generator's weights) and `samples.png`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from gan_ray.errors import UserError
from gan_ray.models import ModelSpec, build_generator

MODEL_JSON = "model.json"
WEIGHTS = "generator.safetensors"
FORMAT = "gan-ray-model/1"
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


def latent_for_seed(n: int, latent_dim: int, seed: int | None) -> torch.Tensor:
    """Noise drawn on the CPU from a private generator: same seed, same z on every machine and device."""
    gen = torch.Generator().manual_seed(int(seed) if seed is not None else torch.seed())
    return torch.randn(n, latent_dim, generator=gen)


def export(checkpoint_dir: str | Path, out_dir: str | Path, *, extra: dict[str, Any] | None = None) -> Path:
    """Write a model directory from a training checkpoint (atomically: a temp dir renamed at the end)."""
    import shutil

    from safetensors.torch import save_file

    from gan_ray.checkpoint import load_sampler
    from gan_ray.images import grid_png

    G, spec, meta = load_sampler(checkpoint_dir)
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not (out / MODEL_JSON).is_file() and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not a gan-ray model directory; refusing to overwrite it")
    cfg = meta.get("config", {})
    info = {
        "format": FORMAT,
        **spec.to_dict(),
        "dataset": cfg.get("dataset"),
        "loss": cfg.get("loss"),
        "ema": cfg.get("ema", True),
        "epoch": meta.get("epoch"),
        "metrics": meta.get("metrics", {}),
        "config": cfg,
        "source": {"checkpoint": str(Path(checkpoint_dir).expanduser().resolve()),
                   "run": str(Path(cfg.get("storage", ".")).expanduser().resolve() / cfg.get("name", ""))},
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in G.state_dict().items()}, str(tmp / WEIGHTS))
    (tmp / MODEL_JSON).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    gen = Generator(G, spec, info)
    n = 10 * spec.num_classes if spec.conditional else 64
    labels = (torch.arange(n) // 10) if spec.conditional else None  # one row per class
    (tmp / "samples.png").write_bytes(grid_png(gen.generate(n, labels, seed=0), nrow=10 if spec.conditional else 8))
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


def load_generator(model_dir: str | Path, device: str | torch.device = "cpu") -> Generator:
    """Load an exported model directory (safetensors only: nothing is unpickled)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(model_dir).expanduser()
    if not d.is_dir():
        raise UserError(f"model directory not found: {d}")
    if not (d / MODEL_JSON).is_file() or not (d / WEIGHTS).is_file():
        raise UserError(f"{d} is not a gan-ray model directory (expected {MODEL_JSON} and {WEIGHTS})")
    try:
        info = json.loads((d / MODEL_JSON).read_text())
        spec = ModelSpec.from_dict(info)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{d / MODEL_JSON} is malformed: {exc}") from None
    net = build_generator(spec)
    try:
        net.load_state_dict(load_file(str(d / WEIGHTS)))
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise UserError(f"{d / WEIGHTS} does not hold this model's weights: {str(exc).splitlines()[0][:200]}") from None
    return Generator(net, spec, info, device)
