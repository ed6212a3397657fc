"""`gan-ray serve`, `gan-ray generate` and `gan-ray bench-serve`: argument parsing and reporting only.

No Ray at import time (building the parser stays fast); gan_ray.serve is imported by the commands that need it.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from gan_ray.errors import UserError

DEFAULT_URL = "http://127.0.0.1:8000"


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve an exported model over HTTP with Ray Serve (autoscaled, batched)",
                       description="Deploy the generator behind POST /v1/generate, GET /v1/model, GET /healthz "
                                   "(OpenAPI at /docs) and run until Ctrl-C. With --build, print the `serve "
                                   "deploy` config for the same settings instead.")
    p.add_argument("--model", required=True, help="exported model directory (gan-ray export)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (0.0.0.0 to listen on every interface)")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--min-replicas", type=_nonneg_int, default=1)
    p.add_argument("--max-replicas", type=_pos_int, default=4)
    p.add_argument("--target-ongoing", type=_pos_float, default=8.0,
                   help="ongoing requests per replica the autoscaler aims at (default: 8)")
    p.add_argument("--max-ongoing", type=_pos_int, default=None,
                   help="requests a replica accepts at once; must exceed --target-ongoing (default: max(32, 2x))")
    p.add_argument("--max-batch-size", type=_pos_int, default=32, help="requests merged into one forward")
    p.add_argument("--batch-wait-s", type=_nonneg_float, default=0.0,
                   help="how long a batch waits for more requests (default 0: take what is queued)")
    p.add_argument("--upscale-delay-s", type=_nonneg_float, default=5.0)
    p.add_argument("--downscale-delay-s", type=_nonneg_float, default=60.0)
    p.add_argument("--cpus-per-replica", type=_nonneg_float, default=1.0)
    p.add_argument("--gpus-per-replica", type=_nonneg_float, default=0.0)
    p.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else start one)")
    add_ingress_arg(p)
    p.add_argument("--build", action="store_true", help="print the `serve deploy` config YAML and exit")
    p.add_argument("--out", default=None, help="with --build: write the YAML to this file instead of stdout")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("generate", help="ask a running `gan-ray serve` for images over HTTP")
    p.add_argument("--url", default=DEFAULT_URL, help=f"server base URL (default: {DEFAULT_URL})")
    p.add_argument("--n", type=_pos_int, default=16, help="number of images (1..256)")
    p.add_argument("--labels", default=None, help="comma-separated labels, one per image or one for all")
    p.add_argument("--seed", type=int, default=None, help="same seed, same bytes (default: random, printed)")
    p.add_argument("--out", required=True, help="FILE.png (grid), FILE.npz (arrays) or FILE.json")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench-serve", help="req/s and p50/p99 of Ray Serve vs plain FastAPI+uvicorn, same model")
    add_bench_args(p)
    p.set_defaults(func=cmd_bench_serve)


# ------------------------------------------------------------------------------------------------ arg types
def add_ingress_arg(p: argparse.ArgumentParser) -> None:
    from gan_ray.serve_ingress import MODES

    p.add_argument("--ingress", choices=MODES, default=None,
                   help="front door of a cluster this command starts: haproxy (default where its binary exists; "
                        "replicas answer HTTP directly) or proxy (Serve's Python proxy). A joined cluster keeps "
                        "its own (set RAY_SERVE_ENABLE_HA_PROXY=1 where it starts)")


def _number(kind, ok, what):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return v
    return parse


_pos_int = _number(int, lambda v: v >= 1, "a positive integer")
_nonneg_int = _number(int, lambda v: v >= 0, "an integer >= 0")
_pos_float = _number(float, lambda v: v > 0, "a number > 0")
_nonneg_float = _number(float, lambda v: v >= 0, "a number >= 0")
_port = _number(int, lambda v: 1 <= v <= 65535, "a port 1..65535")


def serve_options(args: argparse.Namespace) -> dict[str, Any]:
    """ServeArgs fields from the flags (the model is passed separately)."""
    return dict(min_replicas=args.min_replicas, max_replicas=args.max_replicas, target_ongoing=args.target_ongoing,
                max_ongoing=args.max_ongoing, max_batch_size=args.max_batch_size,
                batch_wait_timeout_s=args.batch_wait_s, upscale_delay_s=args.upscale_delay_s,
                downscale_delay_s=args.downscale_delay_s, cpus_per_replica=args.cpus_per_replica,
                gpus_per_replica=args.gpus_per_replica)


def _serve_args(model: str, options: dict[str, Any]):
    from pydantic import ValidationError

    from gan_ray.serve import ServeArgs

    try:
        return ServeArgs(model=model, **options)
    except ValidationError as exc:
        raise UserError("; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())) from None


# ------------------------------------------------------------------------------------------------- commands
def cmd_serve(args: argparse.Namespace) -> int:
    from gan_ray.registry import load_generator

    load_generator(args.model)  # a missing or corrupt model fails here, before Ray or Serve are even imported
    sargs = _serve_args(args.model, serve_options(args))
    if args.build:
        import yaml

        from gan_ray.serve import deploy_config

        text = yaml.safe_dump(deploy_config(sargs, host=args.host, port=args.port), sort_keys=False)
        if args.out:
            from gan_ray.images import write_atomic

            write_atomic(Path(args.out), text.encode())
            print(f"wrote {args.out}: deploy with `serve deploy {args.out}` (the model path must exist on every "
                  "node that runs a replica)")
        else:
            print(text, end="")
        return 0

    from gan_ray.serve import start_serving, stop_serving

    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        url = start_serving(args.model, host=args.host, port=args.port, address=args.address,
                            ingress=args.ingress, **sargs.model_dump(exclude={"model"}))
        print(f"serving {Path(args.model).resolve()} at {url}  (API docs: {url}/docs; Ctrl-C to stop)", flush=True)
        print(f"  try: curl -s -X POST {url}/v1/generate -H 'Content-Type: application/json' "
              "-d '{\"n\": 16, \"seed\": 1}' -o grid.png", flush=True)
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        print("shutting down", file=sys.stderr, flush=True)
        stop_serving()
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from gan_ray.cli import parse_int_list
    from gan_ray.serve_client import format_for, generate, save

    fmt = format_for(args.out)
    labels = parse_int_list(args.labels, "--labels") if args.labels is not None else None
    if isinstance(labels, list) and len(labels) == 1:
        labels = labels[0]
    result = generate(args.url, n=args.n, labels=labels, seed=args.seed, format=fmt)
    path = save(result, args.out)
    shown = ",".join(map(str, result.labels[:16])) + ("..." if len(result.labels) > 16 else "")
    print(f"wrote {args.n} images to {path} (seed {result.seed}, labels {shown})")
    return 0


# ------------------------------------------------------------------------------------------------ benchmark
def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="exported model directory to serve on both sides")
    p.add_argument("--duration-s", type=_pos_float, default=8.0, help="timed seconds per cell")
    p.add_argument("--warmup-s", type=_nonneg_float, default=2.0)
    p.add_argument("--concurrency", default="1,16", help="comma-separated client concurrencies")
    p.add_argument("--n", default="1,64", help="comma-separated images per request")
    p.add_argument("--format", choices=("json", "png", "npz"), default="json")
    p.add_argument("--replicas", type=_pos_int, default=1, help="Serve replicas (fixed: min = max)")
    p.add_argument("--port", type=_port, default=None, help="Serve HTTP port (default: a free one)")
    p.add_argument("--address", default=None)
    add_ingress_arg(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plain_server(model: str, port: int) -> subprocess.Popen:
    """The baseline: the same FastAPI routes and encoders, one uvicorn process, no Ray, no batching."""
    code = ("import uvicorn\nfrom gan_ray.serve import plain_app\n"
            f"uvicorn.run(plain_app({str(model)!r}), host='127.0.0.1', port={port}, log_level='warning')\n")
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "RAY_ADDRESS": ""})


def _measure(url: str, cells: list[tuple[int, int]], fmt: str, duration: float, warmup: float) -> list[dict]:
    from gan_ray.serve_client import load_test

    rows = []
    for n, conc in cells:
        body = {"n": n, "seed": 1, "format": fmt}
        stats = load_test(url + "/v1/generate", body, concurrency=conc, duration_s=duration, warmup_s=warmup)
        rows.append({"n": n, "concurrency": conc, **stats})
    return rows


def run_bench_serve(args: argparse.Namespace) -> dict[str, Any]:
    from gan_ray.serve import check_model
    from gan_ray.serve_client import wait_ready

    check_model(args.model)
    try:
        ns = [int(x) for x in args.n.split(",")]
        concs = [int(x) for x in args.concurrency.split(",")]
    except ValueError:
        raise UserError("--n and --concurrency take comma-separated integers") from None
    cells = [(n, c) for n in ns for c in concs]

    port = _free_port()
    proc = _plain_server(args.model, port)
    try:
        wait_ready(f"http://127.0.0.1:{port}", timeout_s=120)
        print(f"[bench-serve] plain FastAPI+uvicorn (1 process) on :{port}", file=sys.stderr, flush=True)
        plain = _measure(f"http://127.0.0.1:{port}", cells, args.format, args.duration_s, args.warmup_s)
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    from gan_ray.serve import start_serving, stop_serving
    from gan_ray.serve_ingress import mode_from_env

    url = start_serving(args.model, port=args.port or _free_port(), address=args.address, ingress=args.ingress,
                        min_replicas=args.replicas, max_replicas=args.replicas)
    ingress = "the cluster's own" if args.address or os.environ.get("RAY_ADDRESS") else \
        ("HAProxy" if mode_from_env() == "haproxy" else "Serve proxy")
    try:
        print(f"[bench-serve] Ray Serve ({args.replicas} replica(s), batched, {ingress} ingress) at {url}",
              file=sys.stderr, flush=True)
        served = _measure(url, cells, args.format, args.duration_s, args.warmup_s)
    finally:
        stop_serving()
    rows = []
    for p_row, s_row in zip(plain, served):
        rows.append({"n": p_row["n"], "concurrency": p_row["concurrency"], "plain": p_row, "serve": s_row,
                     "ratio": s_row["rps"] / p_row["rps"] if p_row["rps"] else float("nan"),
                     "p99_ratio": s_row["p99_ms"] / p_row["p99_ms"] if p_row["p99_ms"] else float("nan")})
    return {"format": args.format, "duration_s": args.duration_s, "replicas": args.replicas, "ingress": ingress,
            "cpus": os.cpu_count(), "rows": rows}


def print_bench(result: dict[str, Any]) -> None:
    print(f"POST /v1/generate, format={result['format']}, {result['duration_s']:g}s per cell, "
          f"{result['replicas']} Serve replica(s), {result['ingress']} ingress, {result['cpus']} CPUs "
          "(same machine, same run)")
    head = (f"{'n':>4} {'conc':>4} | {'plain req/s':>11} {'p50 ms':>7} {'p99 ms':>7} | {'serve req/s':>11} "
            f"{'p50 ms':>7} {'p99 ms':>7} | {'ratio':>5} {'p99 x':>5} {'errors':>6}")
    print(head)
    print("-" * len(head))
    for r in result["rows"]:
        p, s = r["plain"], r["serve"]
        print(f"{r['n']:>4} {r['concurrency']:>4} | {p['rps']:>11.1f} {p['p50_ms']:>7.1f} {p['p99_ms']:>7.1f} | "
              f"{s['rps']:>11.1f} {s['p50_ms']:>7.1f} {s['p99_ms']:>7.1f} | {r['ratio']:>5.2f} "
              f"{r['p99_ratio']:>5.2f} {p['errors'] + s['errors']:>6}")
    print("ratio = Serve req/s / plain req/s (target >= 1.0 at concurrency 16); p99 x = Serve p99 / plain p99 "
          "(target <= 2)")


def cmd_bench_serve(args: argparse.Namespace) -> int:
    result = run_bench_serve(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_bench(result)
    return 0
