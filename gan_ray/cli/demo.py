"""`gan-ray demo` / `make demo`: the main job end to end on the embedded digits.

sweep (Ray Tune picks the learning rates and latent size on short trials) -> train (Ray Train, 2 DDP workers,
with the winner's values) -> export (the run's best checkpoint by fd) -> serve (Ray Serve) -> query over HTTP ->
demo/grid.png -> shut down.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import argparse

from gan_ray.cli.flags import add_address, positive_int, stopped
from gan_ray.core.config import TrainConfig, load_yaml

# The recipe `digits` (gan_ray/recipes/digits.yaml, measured there): a small class-conditional DCGAN with an AC-GAN
# class head and a weak lazy R1 reads as the asked digit (label accuracy 0.98) with smooth strokes.
DEMO_RECIPE = "digits"
# The short sweep: 4 trials of 3 epochs, ASHA stopping the weak ones after 1 epoch.
SWEEP_SPACE = {"lr_g": "1e-4:6e-4", "lr_d": "1e-4:6e-4", "latent_dim": "64,100"}
SWEEP_TRIALS, SWEEP_EPOCHS = 4, 3


def _sweep(out: Path, address: str | None) -> dict:
    """Learning rates and latent size from a short ASHA sweep (the fixed demo settings otherwise)."""
    from gan_ray.tune.space import SweepSettings, build_space
    from gan_ray.tune.sweep import run_sweep

    skip = ("epochs", "checkpoint_every", "sample_every", "eval_samples", *SWEEP_SPACE)
    fixed = {k: str(v) for k, v in load_yaml(DEMO_RECIPE).items() if k not in skip}
    space = build_space({**fixed, **SWEEP_SPACE, "eval_samples": "256", "sample_every": "0"}, use_defaults=False)
    sweep = run_sweep(space, SweepSettings(trials=SWEEP_TRIALS, epochs=SWEEP_EPOCHS, scheduler="asha",
                                           grace_period=1, reduction_factor=2, storage=str(out / "runs"),
                                           name="sweep"), address=address)
    if sweep.interrupted:  # Tune took the Ctrl-C and returned: the demo stops here too, as the user asked
        raise KeyboardInterrupt
    if sweep.best_config is None:
        print("[demo] the sweep found no scored trial; training with the default learning rates")
        return {}
    best = {k: getattr(sweep.best_config, k) for k in ("lr_g", "lr_d", "latent_dim")}
    print(f"[demo] sweep winner: {best} (results: {sweep.results_csv}, plot: {sweep.plot})")
    return best


def _serve_logs() -> str | None:
    """The running Ray session's Serve log directory (where the controller and replicas wrote)."""
    try:
        import ray

        return str(Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve")
    except Exception:  # a joined remote cluster: its logs are on its own nodes
        return None


def add_command(sub) -> None:
    p = sub.add_parser("demo", help="the main job on the embedded digits: sweep, train, export, serve, query")
    p.add_argument("--out", default="demo", help="output directory")
    add_address(p)
    p.add_argument("--workers", type=positive_int, default=2)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    step = {"now": "start-up"}
    try:
        return run_demo(out_dir=args.out, address=args.address, workers=args.workers, step=step)
    except KeyboardInterrupt:
        return stopped("demo", f"stopped during {step['now']}; what it wrote so far is in {Path(args.out).resolve()} "
                               "(re-running resumes the sweep and the training)")


def run_demo(out_dir: str = "demo", address: str | None = None, workers: int = 2,
             step: dict[str, str] | None = None) -> int:
    """The main job end to end; `step["now"]` names the step under way (for the line a stop prints)."""
    step = step if step is not None else {}
    from gan_ray.cluster.processes import port_or_free
    from gan_ray.core.images import save_samples
    from gan_ray.core.model_dir import export, load_generator
    from gan_ray.core.run_dir import best_checkpoint
    from gan_ray.serve.client import generate, save
    from gan_ray.serve.deployment import start_serving, stop_serving
    from gan_ray.train.driver import fit

    t0 = time.time()
    out = Path(out_dir).resolve()
    # Serve's actors log every HAProxy reload and replica change at INFO on stderr, which Ray forwards here and
    # which would bury the demo's own lines; they still go to the session's log files (printed at the end).
    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
    step["now"] = "the sweep (1/4)"
    print(f"[demo] 1/4 sweep: {SWEEP_TRIALS} Ray Tune trials of up to {SWEEP_EPOCHS} epochs over {SWEEP_SPACE}")
    best = _sweep(out, address)
    t_sweep = time.time()
    cfg = TrainConfig.from_mapping({**load_yaml(DEMO_RECIPE), **best, "workers": workers,
                                    "storage": str(out / "runs"), "name": "digits"}, source=f"recipe {DEMO_RECIPE}")
    step["now"] = "training (2/4)"
    print(f"[demo] 2/4 train: {cfg.arch} (conditional) on {cfg.dataset} with {workers} Ray Train workers for "
          f"{cfg.epochs} epochs, lr_g={cfg.lr_g:.2e} lr_d={cfg.lr_d:.2e} latent_dim={cfg.latent_dim}")
    fit(cfg, address=address)
    t_train = time.time()
    model_dir = export(best_checkpoint(cfg.run_dir), out / "model")
    images, labels = load_generator(model_dir).generate_with_labels(100, None, seed=0)
    save_samples(out / "samples.png", images, labels)
    step["now"] = "serving (3/4)"
    print(f"[demo] 3/4 serve: {model_dir} on Ray Serve")
    url = start_serving(model_dir, port=port_or_free(8000, "127.0.0.1"), address=address, max_replicas=1)
    try:
        step["now"] = "the query (4/4)"
        print(f"[demo] 4/4 query: POST {url}/v1/generate (100 digits, one column per class)")
        result = generate(url, n=100, labels=[i % 10 for i in range(100)], seed=0, format="png")
        grid = save(result, out / "grid.png")
        logs = _serve_logs()
    finally:
        stop_serving()
    t_end = time.time()
    print(f"[demo] done in {t_end - t0:.0f}s (sweep {t_sweep - t0:.0f}s, train {t_train - t_sweep:.0f}s, "
          f"export + serve + query {t_end - t_train:.0f}s)")
    print(f"  sweep (results.csv, sweep.png):                      {out / 'runs' / 'sweep'}")
    print(f"  run (metrics, sample grids per epoch, checkpoints): {cfg.run_dir}")
    print(f"  exported model:                                      {model_dir}")
    print(f"  samples (one column per digit):                      {out / 'samples.png'}")
    print(f"  served over HTTP:                                    {grid}")
    if logs:
        print(f"  Ray Serve logs:                                      {logs}")
    return 0
