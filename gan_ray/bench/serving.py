"""`gan-ray bench-serve`: requests/s and p50/p99 latency of the Ray Serve deployment next to a plain FastAPI +
uvicorn server of the same routes and encoders (`gan_ray.serve.http.plain_app`), same model, same machine, same
run; the figure that matters is the ratio.

`run_bench_serve(options)` takes the command's options (model, duration_s, warmup_s, concurrency, n, format,
replicas, port, address, ingress). The load is closed-loop: `concurrency` keep-alive clients POST back to back.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from typing import Any

from gan_ray.core.errors import UserError


def load_test(url: str, body: dict[str, Any], *, concurrency: int, duration_s: float, warmup_s: float = 1.0,
              timeout: float = 60.0) -> dict[str, float]:
    """Closed-loop load: `concurrency` keep-alive clients POST `body` back to back for `duration_s` (after a
    warm-up). Returns req/s, p50/p99 latency (ms) and the count of failed requests (non-200 or connection)."""
    return asyncio.run(_load(url, json.dumps(body).encode(), concurrency, duration_s, warmup_s, timeout))


async def _load(url: str, payload: bytes, concurrency: int, duration_s: float, warmup_s: float,
                timeout: float) -> dict[str, float]:
    import aiohttp
    import numpy as np

    latencies: list[float] = []
    errors = 0
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        loop = asyncio.get_running_loop()
        start = loop.time()
        t_measure, t_end = start + warmup_s, start + warmup_s + duration_s

        async def client() -> None:
            nonlocal errors
            while True:
                t0 = loop.time()
                if t0 >= t_end:
                    return
                try:
                    async with session.post(url, data=payload, headers=headers) as resp:
                        await resp.read()
                        ok = resp.status == 200
                except (aiohttp.ClientError, OSError, TimeoutError):
                    ok = False
                t1 = loop.time()
                if t0 >= t_measure and t1 <= t_end:
                    latencies.append(t1 - t0)
                    errors += not ok

        await asyncio.gather(*[client() for _ in range(concurrency)])
    lat = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    return {"rps": len(latencies) / duration_s, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "requests": len(latencies), "errors": errors}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plain_server(model: str, port: int) -> subprocess.Popen:
    """The baseline: the same FastAPI routes and encoders, one uvicorn process, no Ray, no batching."""
    code = ("import uvicorn\nfrom gan_ray.serve.http import plain_app\n"
            f"uvicorn.run(plain_app({str(model)!r}), host='127.0.0.1', port={port}, log_level='warning')\n")
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "RAY_ADDRESS": ""})


def _measure(url: str, cells: list[tuple[int, int]], fmt: str, duration: float, warmup: float) -> list[dict]:
    rows = []
    for n, conc in cells:
        body = {"n": n, "seed": 1, "format": fmt}
        stats = load_test(url + "/v1/generate", body, concurrency=conc, duration_s=duration, warmup_s=warmup)
        rows.append({"n": n, "concurrency": conc, **stats})
    return rows


def run_bench_serve(args: Any) -> dict[str, Any]:
    from gan_ray.serve.client import wait_ready
    from gan_ray.serve.deployment import check_model

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

    from gan_ray.cluster import mode_from_env
    from gan_ray.serve.deployment import start_serving, stop_serving

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
