"""`gan-ray bench` (training throughput inside a Ray Train worker vs a plain PyTorch loop) and `gan-ray
bench-serve` (Ray Serve vs a plain FastAPI + uvicorn server): each prints the project's figure, the baseline
measured in the same run, and the ratio."""
from __future__ import annotations

import argparse
import json
import os

from gan_ray.cli.flags import add_address, add_ingress, nonneg_float, port, positive_float, positive_int
from gan_ray.core.config import ARCHS, CUDA_GRAPH_MODES, PRECISIONS


def add_command(sub) -> None:
    from gan_ray.bench.training import BATCHES_IN_DATA

    p = sub.add_parser("bench", help="images/s inside a Ray Train worker vs a plain PyTorch loop")
    p.add_argument("--arch", choices=ARCHS, default="mlp")
    p.add_argument("--batch-size", default="64", help="images per step; a comma-separated list measures each "
                                                      "(one Ray Train launch for all), e.g. 64,1024,4096")
    p.add_argument("--image-size", type=int, default=28, help="image side: 28 (digits) or, for dcgan, 32/64, "
                                                              "for resnet 32..256 (digits resized: throughput only)")
    p.add_argument("--steps", type=int, default=150, help="timed steps per repeat (rounded up to whole epochs of "
                                                          f"{BATCHES_IN_DATA} steps for gan-ray)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (the median is reported)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads for each side")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="gan-ray's precision (as in train)")
    p.add_argument("--cuda-graph", choices=CUDA_GRAPH_MODES, default="auto", help="gan-ray's CUDA graph mode")
    p.add_argument("--compile", action="store_true", help="gan-ray's step through torch.compile")
    add_address(p)
    p.add_argument("--json", action="store_true", help="print one JSON object per configuration instead of a table")
    p.set_defaults(func=run_bench)

    p = sub.add_parser("bench-serve", help="req/s and p50/p99 of Ray Serve vs plain FastAPI+uvicorn, same model")
    p.add_argument("--model", required=True, help="exported model directory to serve on both sides")
    p.add_argument("--duration-s", type=positive_float, default=8.0, help="timed seconds per cell")
    p.add_argument("--warmup-s", type=nonneg_float, default=2.0, help="untimed load before a side's first rounds")
    p.add_argument("--rounds", type=positive_int, default=16,
                   help="alternating turns per side and cell (the timed seconds are split among them)")
    p.add_argument("--concurrency", default="1,16", help="comma-separated client concurrencies")
    p.add_argument("--n", default="1,64", help="comma-separated images per request")
    p.add_argument("--format", choices=("json", "png", "npz"), default="json")
    p.add_argument("--replicas", type=positive_int, default=1, help="Serve replicas (fixed: min = max)")
    p.add_argument("--torch-threads", type=positive_int, default=1,
                   help="intra-op threads of the forward on both sides (a replica's default: 1)")
    p.add_argument("--port", type=port, default=None, help="Serve HTTP port (default: a free one)")
    add_address(p)
    add_ingress(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run_bench_serve)


def run_bench(args: argparse.Namespace) -> int:
    from gan_ray.bench.training import run_bench

    return run_bench(args)


def run_bench_serve(args: argparse.Namespace) -> int:
    from gan_ray.bench.serving import print_bench, run_bench_serve

    result = run_bench_serve(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_bench(result)
    return 0
