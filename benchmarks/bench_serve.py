"""Serving benchmark: Ray Serve (batched ingress) vs a plain single-process FastAPI + uvicorn server, same model,
same routes and encoders, same client, same run. Prints req/s and p50/p99 per cell and the Serve/plain ratio.

    .venv/bin/python benchmarks/bench_serve.py                 # builds a throwaway conditional MLP model
    .venv/bin/python benchmarks/bench_serve.py --model DIR     # = gan-ray bench-serve --model DIR

Serving cost does not depend on what the weights learnt, so without --model the script exports an untrained
conditional MLP generator (the seed architecture, 10 classes) to a temporary directory.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path


def throwaway_model(root: Path) -> Path:
    import torch

    from gan_ray.core import checkpoint
    from gan_ray.core.config import TrainConfig
    from gan_ray.core.models import ModelSpec, build
    from gan_ray.core.model_dir import export
    from gan_ray.core.step import make_state

    torch.manual_seed(0)
    cfg = TrainConfig(conditional=True)
    spec = ModelSpec("mlp", cfg.latent_dim, (1, 28, 28), 10)
    G, D = build(spec)
    state = make_state(spec, G, D, lr_g=cfg.lr_g, lr_d=cfg.lr_d, beta1=cfg.beta1)
    ckpt = checkpoint.save(root / "ckpt", state, epoch=0, config=cfg.to_dict())
    return export(ckpt, root / "model")


def main(argv: list[str] | None = None) -> int:
    """`gan-ray bench-serve` with the same flags; without --model, on a throwaway model."""
    from gan_ray.cli import main as cli_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--model" in argv or any(a.startswith("--model=") for a in argv):
        return cli_main(["bench-serve", *argv])
    with tempfile.TemporaryDirectory() as tmp:
        return cli_main(["bench-serve", "--model", str(throwaway_model(Path(tmp))), *argv])


if __name__ == "__main__":
    sys.exit(main())
