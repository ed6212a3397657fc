"""`gan-ray tune`: sweep training hyperparameters on Ray Tune and export the best generator."""
from __future__ import annotations

import argparse
from typing import Any

from gan_ray.cli.flags import add_address, add_cluster_wait, add_settings_flags, given_values, stopped
from gan_ray.core.config import TrainConfig, load_yaml
from gan_ray.core.errors import UserError
from gan_ray.tune.space import SweepSettings

# TrainConfig fields that the sweep's own flags replace (same meaning, sweep-level names or parsing).
SWEEP_OWNED = ("workers", "gpus_per_worker", "cpus_per_worker", "storage", "name", "epochs", "seed")


def add_command(subparsers) -> None:
    p = subparsers.add_parser(
        "tune", help="sweep learning rates and latent sizes on Ray Tune; export the best generator",
        description="Search training hyperparameters on Ray Tune (each trial a Ray Train run), stop weak trials "
                    "early, and export the best generator. Any training flag takes one value (fixed), LOW:HIGH "
                    "(log-uniform; LOW:HIGH:lin for uniform) or A,B,C (a choice). Default space: --lr-g and --lr-d "
                    "2e-5:2e-3, --latent-dim 16,32,64,100,128.")
    add_settings_flags(p, SweepSettings)
    p.add_argument("--space", default=None, help="YAML file: flag: value | LOW:HIGH | [A, B] | {loguniform: [lo, hi]} "
                                                "| {uniform: [lo, hi]} | {choice: [...]} (flags override it)")
    p.add_argument("--export", default=None, metavar="DIR", help="export the best generator to DIR")
    add_address(p)
    add_cluster_wait(p)
    add_settings_flags(p, TrainConfig, exclude=SWEEP_OWNED, bools_take_values=True)
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> SweepSettings:
    return SweepSettings(**given_values(args, SweepSettings))


def space_from_args(args: argparse.Namespace):
    from gan_ray.tune.space import build_space

    file_values: dict[str, Any] | None = None
    if args.space:
        file_values = load_yaml(args.space)
        for key in file_values:
            if str(key).replace("-", "_") in SWEEP_OWNED:
                raise UserError(f"{args.space}: {key!r} is a sweep flag (--{str(key).replace('_', '-')}), "
                                f"not part of the space")
    flags = {k: v for k, v in given_values(args, TrainConfig).items() if k not in SWEEP_OWNED}
    return build_space(flags, file_values, file_name=args.space or "the space file")


def run(args: argparse.Namespace) -> int:
    from gan_ray.tune.sweep import run_sweep

    settings = settings_from_args(args)
    space = space_from_args(args)
    result = run_sweep(space, settings, export=args.export, address=args.address,
                       cluster_wait_s=args.cluster_wait_s)
    print(f"[tune] sweep {result.path}")
    print(f"  results (one row per trial): {result.results_csv}")
    if result.plot:
        print(f"  fd against the hyperparameters: {result.plot}")
    print(f"  TensorBoard:                 tensorboard --logdir {result.path}")
    if result.interrupted:
        return stopped("tune", f"the sweep {result.path} is saved; re-run the same command to resume it "
                               "(finished trials are kept)")
    if result.best is None:
        print("[tune] no trial produced a scored checkpoint")
        return 1
    b = result.best
    print(f"  best: {b.trial_id}  fd {b.best_fd:.4g}  " + "  ".join(f"{k}={v:.3g}" if isinstance(v, float)
                                                                   else f"{k}={v}" for k, v in b.config.items()))
    print(f"  best checkpoint:             {result.best_checkpoint}")
    if result.export_dir:
        print(f"  exported model:              {result.export_dir}")
    else:
        print(f"  export it:  gan-ray export --checkpoint {result.best_checkpoint} --out models/{settings.name}")
    return 0
