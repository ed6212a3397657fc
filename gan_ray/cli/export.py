"""`gan-ray export`: a checkpoint (or a run's best one) as a self-contained model directory for serving."""
from __future__ import annotations

import argparse


def add_command(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint's EMA generator as a model directory")
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint directory, or a run directory (then its best checkpoint by fd, else the latest)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gan_ray.core.model_dir import export
    from gan_ray.core.run_dir import resolve_checkpoint

    checkpoint, why = resolve_checkpoint(args.checkpoint)  # a run directory -> its best checkpoint by fd
    out = export(checkpoint, args.out)
    print(f"exported {checkpoint} ({why}) -> {out}")
    return 0
