"""ASHA against running every trial to its full epochs: the same trials (same seed, same configs), the same budget.

Prints, for each: trial-epochs used, wall time, best fd found, and the ASHA/full ratios. Both sweeps run on one Ray
cluster started here, one after the other, with the same concurrency.

    .venv/bin/python benchmarks/bench_asha.py --trials 8 --epochs 6
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def run(scheduler: str, args, storage: str) -> dict:
    from gan_ray.tune.sweep import run_sweep
    from gan_ray.tune.space import SweepSettings, build_space

    space = build_space({"batch_size": str(args.batch_size), "eval_samples": str(args.eval_samples),
                         "sample_every": "0", "dataset": args.dataset})
    settings = SweepSettings(trials=args.trials, epochs=args.epochs, scheduler=scheduler,
                             grace_period=args.grace_period, reduction_factor=args.reduction_factor,
                             max_concurrent=args.max_concurrent, storage=storage, name=scheduler, seed=args.seed)
    t0 = time.perf_counter()
    result = run_sweep(space, settings)
    wall = time.perf_counter() - t0
    return {"scheduler": scheduler, "wall_s": wall, "trial_epochs": sum(r.epochs for r in result.rows),
            "stopped_early": sum(r.status == "stopped early" for r in result.rows),
            "best_fd": result.best.best_fd if result.best else None,
            "best_config": result.best.config if result.best else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--grace-period", type=int, default=1)
    p.add_argument("--reduction-factor", type=float, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-samples", type=int, default=256)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--max-concurrent", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all)")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args()

    import ray

    ray.init(num_cpus=args.num_cpus, configure_logging=True, logging_level="WARNING")
    with tempfile.TemporaryDirectory() as storage:
        full = run("none", args, storage)
        asha = run("asha", args, storage)
    ray.shutdown()

    print(f"\n{args.trials} trials x up to {args.epochs} epochs on {args.dataset} (same seed, same configs)")
    print(f"{'':14}{'trial-epochs':>14}{'wall s':>10}{'best fd':>10}  stopped early")
    for r in (full, asha):
        name = "every trial" if r["scheduler"] == "none" else "ASHA"
        print(f"{name:14}{r['trial_epochs']:>14}{r['wall_s']:>10.0f}{r['best_fd']:>10.4g}  {r['stopped_early']}")
    print(f"ASHA / full:  trial-epochs {asha['trial_epochs'] / full['trial_epochs']:.2f}x, "
          f"wall time {asha['wall_s'] / full['wall_s']:.2f}x, best fd {asha['best_fd'] / full['best_fd']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"full": full, "asha": asha, "args": vars(args)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
