"""`gan-ray train`: train (or resume) a GAN data-parallel on Ray Train, and say where everything went."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gan_ray.cli.flags import add_address, add_cluster_wait, add_settings_flags, resolve_train_config, stopped
from gan_ray.core.config import TrainConfig


def add_command(sub) -> None:
    p = sub.add_parser("train", help="train (or resume) a GAN data-parallel on Ray Train")
    p.add_argument("--config", help="YAML file of flag: value (command-line flags override it)")
    add_address(p)
    add_cluster_wait(p)
    add_settings_flags(p, TrainConfig)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gan_ray.train.driver import fit

    from gan_ray.core.run_dir import finished_epochs, stop_reason

    cfg = resolve_train_config(args)
    try:
        result = fit(cfg, address=args.address, cluster_wait_s=args.cluster_wait_s)
        # Ray Train takes a Ctrl-C (and the CLI's SIGTERM, which is one) itself: it aborts the run gracefully and
        # fit() returns, with fewer epochs than asked and no error.
        interrupted = (result is not None and not getattr(result, "error", None)
                       and finished_epochs(cfg.run_dir) < cfg.epochs and not stop_reason(cfg.run_dir))
    except KeyboardInterrupt:
        interrupted = True
    except SystemExit as exc:  # Train's handler exits 0 when its abort finds the run already gone
        if exc.code not in (0, None):
            raise
        interrupted = True
    if interrupted:
        done = finished_epochs(cfg.run_dir)
        kept = f"keeps its checkpoint of epoch {done}" if done else "has no checkpoint yet"
        return stopped("train", f"run {cfg.run_dir} {kept}; re-run the same command to resume")
    return report(cfg, result)


def report(cfg: TrainConfig, result) -> int:
    """What `gan-ray train` prints when a run ends."""
    from gan_ray.core.locations import join
    from gan_ray.core.run_dir import METRICS_FILE, latest_checkpoint, stop_reason

    run_dir = cfg.run_dir
    if result is not None and getattr(result, "error", None):
        print(f"training failed: {result.error}")
        return 1
    stopped = stop_reason(run_dir) if result is not None else None
    ckpt = latest_checkpoint(run_dir)
    print(f"run directory: {run_dir}")
    print(f"  metrics:     {join(run_dir, METRICS_FILE)}")
    print(f"  samples:     {join(run_dir, 'samples')}")
    print(f"  checkpoint:  {ckpt if ckpt else '(none)'}")
    if ckpt:
        print(f"export it:     gan-ray export --checkpoint {run_dir} --out {Path('models') / cfg.name}"
              "   (a run directory: its best checkpoint by fd)")
    if stopped:
        print(f"gan-ray train: stopped early: {stopped}", file=sys.stderr)
        return 1
    return 0
