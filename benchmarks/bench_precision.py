"""Benchmark: a recipe's training step in bf16 against fp32 on this CPU, as a ratio.

CPUs with bf16 units (Intel AMX or AVX512-BF16: Sapphire Rapids and newer, AMD Zen 4 and newer) run oneDNN's bf16
convolutions several times faster than fp32 ones; `--precision bf16` (autocast on the forward passes; weights,
Adam, the losses and the R1/R2 penalties stay fp32) takes that path, with channels_last activations. Elsewhere bf16
is emulated and slower, which is why `auto` stays fp32 on CPUs and the recipes opt in.

For each recipe, in this one process and on one thread (what a CPU Ray Train worker gets): G and D built as
`gan-ray train` builds them from the recipe, one worker's batch, and
- the baseline: fp32, the plain `gan_ray.core.step.train_step` (what `auto` runs on a CPU);
- the project's path: the recipe's bf16 fast step, resolved as the training worker resolves it.
The two are timed in alternating blocks of whole R1/R2 cycles (`r1_every` steps, so the penalty's share is
counted), `--rounds` times; the medians of the blocks' ms/step are printed with their ratio.

    .venv/bin/python benchmarks/bench_precision.py [--recipes stacked-mnist,mnist-rpgan] [--rounds 5]
        [--cycles 4] [--json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any


def cpu_has_bf16_units() -> bool:
    """Whether the CPU advertises native bf16 (AMX tiles or AVX512-BF16), from /proc/cpuinfo (Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def measure(recipe: str, rounds: int, cycles: int) -> dict[str, Any]:
    import torch

    from gan_ray.core.config import load_yaml, resolve as resolve_config
    from gan_ray.core.data import KNOWN_SHAPES
    from gan_ray.core.fast_step import make_step_fn, resolve
    from gan_ray.core.step import build_state, spec_for, train_step

    torch.set_num_threads(1)
    cfg = resolve_config(load_yaml(recipe), {"precision": "fp32"})
    shape, classes = KNOWN_SHAPES[cfg.dataset]
    spec = spec_for(cfg, shape, classes)
    gen = torch.Generator().manual_seed(0)
    real = torch.rand(cfg.batch_size, *shape, generator=gen)
    labels = torch.randint(0, classes, (cfg.batch_size,), generator=gen) if spec.conditional else None
    paths = {}
    for precision in ("fp32", "bf16"):
        fast = resolve(precision, "off", False, arch=cfg.arch, device="cpu")
        state = build_state(cfg, spec, "cpu", channels_last=fast.channels_last)
        step = make_step_fn(state, fast)
        assert (step is train_step) == (precision == "fp32"), "the baseline is the plain eager step"
        paths[precision] = (state, step)
    steps = cycles * cfg.r1_every
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for r in range(rounds + 1):  # round 0 warms both up (allocator, oneDNN's kernel choice) and is not counted
        for precision, (state, step) in paths.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                step(state, real, labels)
            if r:
                times[precision].append((time.perf_counter() - t0) / steps)
    fp32, bf16 = statistics.median(times["fp32"]), statistics.median(times["bf16"])
    return {"recipe": recipe, "arch": cfg.arch, "shape": list(shape), "batch": cfg.batch_size,
            "r1_every": cfg.r1_every, "fp32_ms": fp32 * 1e3, "bf16_ms": bf16 * 1e3, "speedup": fp32 / bf16,
            "fp32_images_per_s": cfg.batch_size / fp32, "bf16_images_per_s": cfg.batch_size / bf16}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default="stacked-mnist,mnist-rpgan")
    ap.add_argument("--rounds", type=int, default=5, help="timed blocks per precision (alternating)")
    ap.add_argument("--cycles", type=int, default=4, help="whole R1/R2 cycles per block")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = [measure(name, args.rounds, args.cycles) for name in args.recipes.split(",")]
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    units = "has bf16 units (AMX / AVX512-BF16)" if cpu_has_bf16_units() else "has no bf16 units: bf16 is emulated"
    print(f"one training step of a CPU worker (1 thread), fp32 eager (baseline) vs bf16 fast path; "
          f"this CPU {units}")
    print(f"{'recipe':<15}{'batch':>6}{'fp32 ms':>9}{'bf16 ms':>9}{'fp32 img/s':>12}{'bf16 img/s':>12}"
          f"{'bf16/fp32':>11}")
    for r in rows:
        print(f"{r['recipe']:<15}{r['batch']:>6}{r['fp32_ms']:>9.1f}{r['bf16_ms']:>9.1f}"
              f"{r['fp32_images_per_s']:>12.0f}{r['bf16_images_per_s']:>12.0f}{r['speedup']:>10.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
