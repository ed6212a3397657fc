"""Open a generator from either a training checkpoint or an exported model directory."""
from __future__ import annotations

from gan_ray.errors import UserError
from gan_ray.registry import Generator, load_generator


def open_generator(*, checkpoint: str | None = None, model: str | None = None, device: str = "cpu") -> Generator:
    if (checkpoint is None) == (model is None):
        raise UserError("give exactly one of --checkpoint or --model")
    if model is not None:
        return load_generator(model, device)
    from gan_ray.checkpoint import load_sampler

    net, spec, meta = load_sampler(checkpoint, map_location=device)
    return Generator(net, spec, {**spec.to_dict(), "dataset": meta.get("config", {}).get("dataset"),
                                 "metrics": meta.get("metrics", {}), "epoch": meta.get("epoch")}, device)
