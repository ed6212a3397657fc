"""`gan-ray bench-serve`: requests/s and p50/p99 latency of the Ray Serve deployment next to a plain FastAPI +
uvicorn server of the same routes and encoders (`gan_ray.serve.http.plain_app`), same model, same machine, same
run; the figure that matters is the ratio.

`run_bench_serve(options)` takes the command's options (model, duration_s, warmup_s, rounds, concurrency, n,
format, replicas, port, address, ingress). The load is closed-loop: `concurrency` keep-alive clients POST back
to back. Both servers are up for the whole measurement (the baseline shares the machine with the idle Ray
cluster, as Serve does), and each cell alternates them in `rounds` (plain, Serve, Serve, plain, ...): on a
noisy machine the load of the moment drifts by 10-30% over a minute, and a single block per side measured that
drift as often as the servers.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

from gan_ray.core.errors import UserError
from gan_ray.cluster.processes import free_port


def load_test(url: str, body: dict[str, Any], *, concurrency: int, duration_s: float, warmup_s: float = 1.0,
              timeout: float = 60.0) -> dict[str, float]:
    """Closed-loop load: `concurrency` keep-alive clients POST `body` back to back for `duration_s` (after a
    warm-up). Returns req/s, p50/p99 latency (ms) and the count of failed requests (non-200 or connection), over
    the requests that completed within the timed window (`in_window`)."""
    return summary(*_latencies(url, body, concurrency=concurrency, duration_s=duration_s, warmup_s=warmup_s,
                               timeout=timeout), duration_s)


def _latencies(url: str, body: dict[str, Any], *, concurrency: int, duration_s: float, warmup_s: float,
               timeout: float = 60.0) -> tuple[list[float], int]:
    """The timed requests' latencies (s) and how many of them failed."""
    return asyncio.run(_load(url, json.dumps(body).encode(), concurrency, duration_s, warmup_s, timeout))


def in_window(requests: list[tuple[float, float, bool]], t_measure: float, t_end: float) -> tuple[list[float], int]:
    """Of the requests made, as (start, end, ok), the latencies of those that completed within [t_measure, t_end]
    and how many of them failed: a closed loop's completions per second of the window are its throughput.
    (Counting only those that also started in it would undercount by about latency/window: 40% for a 0.5 s turn
    of 200 ms requests.)"""
    timed = [(t1 - t0, ok) for t0, t1, ok in requests if t_measure <= t1 <= t_end]
    return [lat for lat, _ in timed], sum(not ok for _, ok in timed)


def summary(latencies: list[float], errors: int, duration_s: float) -> dict[str, float]:
    import numpy as np

    lat = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    return {"rps": len(latencies) / duration_s, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "requests": len(latencies), "errors": errors}


async def _load(url: str, payload: bytes, concurrency: int, duration_s: float, warmup_s: float,
                timeout: float) -> tuple[list[float], int]:
    import aiohttp

    made: list[tuple[float, float, bool]] = []
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        loop = asyncio.get_running_loop()
        start = loop.time()
        t_measure, t_end = start + warmup_s, start + warmup_s + duration_s

        async def client() -> None:
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
                made.append((t0, loop.time(), ok))

        await asyncio.gather(*[client() for _ in range(concurrency)])
    return in_window(made, t_measure, t_end)


def _plain_server(model: str, port: int, torch_threads: int) -> subprocess.Popen:
    """The baseline: the same FastAPI routes and encoders, one uvicorn process, no Ray, no batching; its forward
    on as many intra-op threads as a replica's, so the two sides differ in how they serve, not in how they
    compute."""
    code = ("import uvicorn\nfrom gan_ray.serve.http import plain_app\n"
            f"uvicorn.run(plain_app({str(model)!r}, torch_threads={torch_threads}), host='127.0.0.1', port={port}, "
            "log_level='warning')\n")
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "RAY_ADDRESS": ""})


ROUND_WARMUP_S = 0.1  # least untimed start of a turn after a side's first (a new client connection's first requests)


def _measure(urls: dict[str, str], cells: list[tuple[int, int]], fmt: str, duration: float, warmup: float,
             rounds: int) -> list[dict]:
    """Each cell: `rounds` short alternating turns per server (ABBA order), each of duration/rounds timed
    seconds. A side's req/s and latencies pool its turns; the ratio is the median of the rounds' Serve/plain
    ratios (a burst of load from elsewhere lands in a round or two instead of tilting a whole side), with the
    quartiles of the rounds' ratios as its spread."""
    import numpy as np

    rows = []
    for n, conc in cells:
        body = {"n": n, "seed": 1, "format": fmt}
        pooled: dict[str, tuple[list[float], int]] = {side: ([], 0) for side in urls}
        per_round = []
        turn_warmup = {}  # after a side's first turn: long enough for its first requests to settle (2 latencies)
        for r in range(rounds):
            done = {}
            for side in (("plain", "serve") if r % 2 == 0 else ("serve", "plain")):
                lat, err = _latencies(urls[side] + "/v1/generate", body, concurrency=conc,
                                      duration_s=duration / rounds, warmup_s=turn_warmup.get(side, warmup))
                if side not in turn_warmup:
                    turn_warmup[side] = max(ROUND_WARMUP_S, 2 * float(np.median(lat))) if lat else 1.0
                pooled[side] = (pooled[side][0] + lat, pooled[side][1] + err)
                done[side] = len(lat)
            per_round.append(done["serve"] / done["plain"] if done["plain"] else float("nan"))
        stats = {side: summary(lat, err, duration) for side, (lat, err) in pooled.items()}
        p, s = stats["plain"], stats["serve"]
        rows.append({"n": n, "concurrency": conc, "plain": p, "serve": s,
                     "ratio": float(np.median(per_round)),
                     "ratio_spread": [float(np.percentile(per_round, 25)), float(np.percentile(per_round, 75))],
                     "p99_ratio": s["p99_ms"] / p["p99_ms"] if p["p99_ms"] else float("nan")})
    return rows


def run_bench_serve(args: Any) -> dict[str, Any]:
    from gan_ray.cluster.ingress import mode_from_env
    from gan_ray.serve.client import wait_ready
    from gan_ray.serve.deployment import check_model, start_serving, stop_serving

    check_model(args.model)
    try:
        ns = [int(x) for x in args.n.split(",")]
        concs = [int(x) for x in args.concurrency.split(",")]
    except ValueError:
        raise UserError("--n and --concurrency take comma-separated integers") from None
    cells = [(n, c) for n in ns for c in concs]

    port = free_port()
    proc = _plain_server(args.model, port, args.torch_threads)
    try:
        plain_url = f"http://127.0.0.1:{port}"
        wait_ready(plain_url, timeout_s=120)
        print(f"[bench-serve] plain FastAPI+uvicorn (1 process) on :{port}", file=sys.stderr, flush=True)
        url = start_serving(args.model, port=args.port or free_port(), address=args.address,
                            ingress=args.ingress, min_replicas=args.replicas, max_replicas=args.replicas,
                            torch_threads=args.torch_threads)
        ingress = "the cluster's own" if args.address or os.environ.get("RAY_ADDRESS") else \
            ("HAProxy" if mode_from_env() == "haproxy" else "Serve proxy")
        try:
            print(f"[bench-serve] Ray Serve ({args.replicas} replica(s), batched, {ingress} ingress) at {url}; "
                  f"measuring {len(cells)} cell(s), {args.rounds} alternating rounds each",
                  file=sys.stderr, flush=True)
            rows = _measure({"plain": plain_url, "serve": url}, cells, args.format, args.duration_s,
                            args.warmup_s, args.rounds)
        finally:
            stop_serving()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {"format": args.format, "duration_s": args.duration_s, "rounds": args.rounds,
            "torch_threads": args.torch_threads,
            "replicas": args.replicas, "ingress": ingress, "cpus": os.cpu_count(), "rows": rows}


def print_bench(result: dict[str, Any]) -> None:
    print(f"POST /v1/generate, format={result['format']}, {result['duration_s']:g}s per cell and side in "
          f"{result['rounds']} alternating rounds, "
          f"{result['replicas']} Serve replica(s), {result['ingress']} ingress, {result['torch_threads']} torch "
          f"thread(s) per forward on each side, {result['cpus']} CPUs "
          "(same machine, same run)")
    head = (f"{'n':>4} {'conc':>4} | {'plain req/s':>11} {'p50 ms':>7} {'p99 ms':>7} | {'serve req/s':>11} "
            f"{'p50 ms':>7} {'p99 ms':>7} | {'ratio':>5} {'rounds':>9} {'p99 x':>5} {'errors':>6}")
    print(head)
    print("-" * len(head))
    for r in result["rows"]:
        p, s = r["plain"], r["serve"]
        print(f"{r['n']:>4} {r['concurrency']:>4} | {p['rps']:>11.1f} {p['p50_ms']:>7.1f} {p['p99_ms']:>7.1f} | "
              f"{s['rps']:>11.1f} {s['p50_ms']:>7.1f} {s['p99_ms']:>7.1f} | {r['ratio']:>5.2f} "
              f"{'{:.2f}-{:.2f}'.format(*r['ratio_spread']):>9} {r['p99_ratio']:>5.2f} "
              f"{p['errors'] + s['errors']:>6}")
    print("ratio = median over the rounds of Serve req/s / plain req/s (targets: >= 0.9 at concurrency 1, >= 2 at "
          "16); rounds = its quartiles; p99 x = Serve p99 / plain p99")
