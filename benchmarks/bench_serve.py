"""Serving benchmark: Ray Serve (batched ingress) vs a plain single-process FastAPI + uvicorn server, same model,
same routes and encoders, same client, same run. Prints req/s and p50/p99 per cell and the Serve/plain ratio.

    .venv/bin/python benchmarks/bench_serve.py                 # builds a throwaway conditional MLP model
    .venv/bin/python benchmarks/bench_serve.py --model DIR     # = gan-ray bench-serve --model DIR

Serving cost does not depend on what the weights learnt, so without --model the script exports an untrained
conditional MLP generator (the seed architecture, 10 classes) to a temporary directory.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path


def throwaway_model(root: Path) -> Path:
    import torch

    from gan_ray import checkpoint
    from gan_ray.config import TrainConfig
    from gan_ray.models import ModelSpec, build
    from gan_ray.registry import export
    from gan_ray.step import make_state

    torch.manual_seed(0)
    cfg = TrainConfig(conditional=True)
    spec = ModelSpec("mlp", cfg.latent_dim, (1, 28, 28), 10)
    G, D = build(spec)
    state = make_state(spec, G, D, lr_g=cfg.lr_g, lr_d=cfg.lr_d, beta1=cfg.beta1)
    ckpt = checkpoint.save(root / "ckpt", state, epoch=0, config=cfg.to_dict() if hasattr(cfg, "to_dict")
                           else asdict(cfg))
    return export(ckpt, root / "model")


def main(argv: list[str] | None = None) -> int:
    from gan_ray.serve_cli import add_bench_args, print_bench, run_bench_serve

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_args(p)
    for action in p._actions:
        if action.dest == "model":
            action.required = False
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            args.model = str(throwaway_model(Path(tmp)))
        result = run_bench_serve(args)
    print(json.dumps(result, indent=2) if args.json else "", end="")
    if not args.json:
        print_bench(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
