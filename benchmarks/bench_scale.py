"""Benchmark: what one training step costs a worker at 32, 64, 128 and 256 pixels, and from which model size many
workers pay.

For each architecture and side, in a fresh process of its own (so that its peak memory is its own): G and D built as
`gan-ray train` builds them, the project's step (`gan_ray.core.step.train_step`: rpgan with R1 and R2 every 4th D
step, the R3GAN recipe, or the same step without penalties for `--no-penalties`) on one worker's batch; the median
seconds per step over the timed steps, images/s, and peak memory (CPU: the process's peak resident set and what
the steps added to it; GPU: peak allocated).

Beside the compute, the communication: data-parallel training all-reduces every gradient of D and of G each step,
(parameters of G + D) x 4 bytes, whatever the batch. That volume is all-reduced here for real, between two gloo
processes on this machine (the transport of CPU workers; across nodes the network's bandwidth replaces this
machine's memory bandwidth), and its median time printed next to the compute time as a ratio: well below 1,
adding workers multiplies throughput; near or above 1, workers mostly wait for each other. The compute grows with
pixels x batch, the volume only with the parameters: bigger images and batches are where many workers pay.

    .venv/bin/python benchmarks/bench_scale.py [--arch resnet,dcgan] [--sides 32,64,128,256] [--batch-size 16]
        [--steps 6] [--width 32] [--threads 1] [--device cpu|cuda] [--json]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from typing import Any


def _rss_mb() -> float:
    """The process's resident set now (Linux /proc), in MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def measure_step(arch: str, side: int, batch: int, steps: int, width: int, threads: int, device: str,
                 penalties: bool) -> dict[str, Any]:
    """One configuration, in the current process: seconds per step, images/s, memory, parameter counts."""
    import torch

    from gan_ray.core.config import TrainConfig
    from gan_ray.core.models import count_params
    from gan_ray.core.step import build_state, spec_for, train_step

    torch.set_num_threads(threads)
    gamma = 1.0 if penalties else 0.0
    cfg = TrainConfig(arch=arch, g_width=width, d_width=width, loss="rpgan", r1_gamma=gamma, r2_gamma=gamma,
                      r1_every=4, beta1=0.0, beta2=0.99, latent_dim=64, image_size=side)
    spec = spec_for(cfg, (3, side, side), 0)
    state = build_state(cfg, spec, device)
    real = torch.rand(batch, 3, side, side, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    before = _rss_mb()  # the models, optimisers and batch in memory; what the steps add is the step's own
    train_step(state, real)  # warm-up (allocator, kernels); a regularised step (step 0 is one)
    sync()
    times = []
    for _ in range(steps):  # 4 consecutive steps hold one R1/R2 step: time whole cycles for a fair mean
        t0 = time.perf_counter()
        train_step(state, real)
        sync()
        times.append(time.perf_counter() - t0)
    step_s = statistics.mean(times)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB -> MB (Linux)
    params_g, params_d = count_params(state.G), count_params(state.D)
    out = {"arch": arch, "side": side, "batch": batch, "width": width, "device": device, "threads": threads,
           "step_s": step_s, "images_per_s": batch / step_s, "params_g": params_g, "params_d": params_d,
           "allreduce_mb": (params_g + params_d) * 4 / 2 ** 20, "penalties": penalties}
    if device == "cuda":
        out["peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        out["peak_mb"] = peak
        out["step_mb"] = max(peak - before, 0.0)
    return out


def _child(conn, *args) -> None:
    try:
        conn.send(measure_step(*args))
    except Exception as exc:  # noqa: BLE001 - reported in the table, the other configurations still run
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
    conn.close()


def in_fresh_process(*args) -> dict[str, Any]:
    """`measure_step(*args)` in a spawned process; a child that dies without answering (killed for memory, say)
    is an error row, not a parent waiting forever."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(child, *args))
    p.start()
    child.close()  # the child holds the only writing end now: its death ends recv() with EOFError
    try:
        out = parent.recv()
    except EOFError:
        p.join()
        return {"error": f"the measuring process ended (exit code {p.exitcode}) before answering"}
    p.join()
    return out


def _allreduce_worker(rank: int, port: int, sizes: list[int], repeats: int, conn) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    out = {}
    for n in sizes:
        t = torch.ones(n)
        dist.all_reduce(t)  # warm-up: connections, buffers
        times = []
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(t)
            times.append(time.perf_counter() - t0)
        out[n] = statistics.median(times)
    dist.destroy_process_group()
    if rank == 0:
        conn.send(out)
    conn.close()


def allreduce_seconds(sizes: list[int], repeats: int = 5) -> dict[int, float]:
    """Median seconds to all-reduce float32 tensors of these sizes between two gloo processes."""
    from gan_ray.cluster.processes import free_port

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    port = free_port()
    procs = [ctx.Process(target=_allreduce_worker, args=(r, port, sizes, repeats, child)) for r in range(2)]
    for p in procs:
        p.start()
    child.close()  # as in_fresh_process: a rank that dies ends recv() instead of hanging it
    try:
        out = parent.recv()
    except EOFError:
        for p in procs:
            p.kill()
        raise RuntimeError("an all-reduce process ended before answering") from None
    for p in procs:
        p.join()
    return out


def _sides(arch: str, sides: list[int]) -> list[int]:
    from gan_ray.core.errors import UserError
    from gan_ray.core.models import check_image_size

    ok = []
    for side in sides:
        try:
            check_image_size(arch, side)
            ok.append(side)
        except UserError:
            pass  # dcgan has no 128 or 256: those rows are left out, not failed
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet,dcgan")
    ap.add_argument("--sides", default="32,64,128,256")
    ap.add_argument("--batch-size", type=int, default=16, help="images per worker per step")
    ap.add_argument("--steps", type=int, default=8, help="timed steps (a multiple of 4: whole R1/R2 cycles)")
    ap.add_argument("--width", type=int, default=32, help="--g-width/--d-width of both networks")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker (a worker's CPU)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--no-penalties", action="store_true", help="the step without R1/R2")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    sides = [int(s) for s in args.sides.split(",")]
    rows = []
    for arch in args.arch.split(","):
        for side in _sides(arch, sides):
            r = in_fresh_process(arch, side, args.batch_size, args.steps, args.width, args.threads, args.device,
                                 not args.no_penalties)
            if "error" in r:
                print(f"{arch} {side}: {r['error']}", file=sys.stderr)
                continue
            rows.append(r)
            print(f"measured {arch} {side}px: {r['step_s']:.2f} s/step", file=sys.stderr, flush=True)
    comm = allreduce_seconds(sorted({r["params_g"] + r["params_d"] for r in rows}))
    for r in rows:
        r["allreduce_s"] = comm[r["params_g"] + r["params_d"]]
        r["comm_to_compute"] = r["allreduce_s"] / r["step_s"]
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    import torch

    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} thread(s) per worker"
    print(f"one training step per worker, batch {args.batch_size}, width {args.width}, rpgan"
          f"{'' if args.no_penalties else ' + R1/R2 every 4th step'}, on {where}; all-reduce between 2 gloo processes")
    mem = "peak MB (step)" if args.device == "cpu" else "peak MB"
    print(f"{'arch':<7}{'side':>5}{'params G+D':>12}{'s/step':>9}{'img/s':>8}{mem:>17}{'all-reduce MB':>15}"
          f"{'all-reduce s':>14}{'comm/compute':>14}")
    for r in rows:
        memory = f"{r['peak_mb']:.0f} ({r['step_mb']:.0f})" if "step_mb" in r else f"{r['peak_mb']:.0f}"
        print(f"{r['arch']:<7}{r['side']:>5}{r['params_g'] + r['params_d']:>12,}{r['step_s']:>9.3f}"
              f"{r['images_per_s']:>8.1f}{memory:>17}{r['allreduce_mb']:>15.1f}{r['allreduce_s']:>14.4f}"
              f"{r['comm_to_compute']:>14.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
