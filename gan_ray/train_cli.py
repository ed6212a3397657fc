"""What `gan-ray train` prints when a run ends."""
from __future__ import annotations

from pathlib import Path

from gan_ray.config import TrainConfig
from gan_ray.ray_train import latest_checkpoint


def report_result(cfg: TrainConfig, result) -> int:
    run_dir = cfg.run_dir
    if result is not None and getattr(result, "error", None):
        print(f"training failed: {result.error}")
        return 1
    ckpt = latest_checkpoint(run_dir)
    print(f"run directory: {run_dir}")
    print(f"  metrics:     {run_dir / 'metrics.jsonl'}")
    print(f"  samples:     {run_dir / 'samples'}")
    print(f"  checkpoint:  {ckpt if ckpt else '(none)'}")
    if ckpt:
        print(f"export it:     gan-ray export --checkpoint {run_dir} --out {Path('models') / cfg.name}"
              "   (a run directory: its best checkpoint by fd)")
    return 0
