"""How long a Ray Train run takes to start: gan-ray's trainer against Ray's plain TorchTrainer, in the same run.

Every `gan-ray train`, every Tune trial and every test that trains pays a TorchTrainer launch (a controller actor,
a placement group, the worker actors, the process group) before its first step. This times the launch alone: a
2-worker run whose loop only reports once, from `fit()` to the loop's first line and to `fit()`'s return,
alternating the two trainers so both see the same machine. Prints each pair and the medians' ratio.

    .venv/bin/python benchmarks/bench_launch.py --pairs 4
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def loop(config: dict) -> None:
    import ray.train

    entered = time.time()
    ray.train.report({"entered": entered})
    if ray.train.get_context().get_world_rank() == 0:
        Path(config["out"]).write_text(json.dumps({"entered": entered}))


def launch(trainer_class, storage: str, name: str) -> tuple[float, float]:
    from ray.train import RunConfig, ScalingConfig

    out = Path(storage) / f"{name}.json"
    t0 = time.time()
    trainer_class(loop, train_loop_config={"out": str(out)}, scaling_config=ScalingConfig(num_workers=2),
                  run_config=RunConfig(storage_path=storage, name=name)).fit()
    done = time.time()
    return json.loads(out.read_text())["entered"] - t0, done - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=4, help="launches of each trainer, alternating")
    args = p.parse_args()

    import os

    from ray.train.torch import TorchTrainer

    from gan_ray.cluster.connect import init_local, shutdown
    from gan_ray.train.driver import REPORT_POLL_S, _trainer_class

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", REPORT_POLL_S)  # as gan-ray's runs have it
    init_local(num_cpus=4, configure_logging=True, logging_level="ERROR")
    storage = tempfile.mkdtemp(prefix="bench-launch-")
    times: dict[str, list[tuple[float, float]]] = {"ray": [], "gan-ray": []}
    try:
        launch(TorchTrainer, storage, "warm-up")  # the first launch also starts Ray's own helper actors
        for i in range(args.pairs):
            for label, cls in (("ray", TorchTrainer), ("gan-ray", _trainer_class())):
                times[label].append(launch(cls, storage, f"{label}-{i}"))
                entry, total = times[label][-1]
                print(f"[{i + 1}/{args.pairs}] {label:8s} first line after {entry:5.1f} s, fit() returned after "
                      f"{total:5.1f} s", flush=True)
    finally:
        shutdown()
    med = {k: statistics.median(e for e, _ in v) for k, v in times.items()}
    print(f"median launch to the loop's first line: Ray's TorchTrainer {med['ray']:.1f} s, gan-ray's "
          f"{med['gan-ray']:.1f} s; ratio {med['gan-ray'] / med['ray']:.2f}")


if __name__ == "__main__":
    main()
