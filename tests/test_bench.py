"""`gan-ray bench`: bad input, and one real run (plain loop and a Ray Train worker) whose JSON feeds the issue-7 table.

The GPU script (benchmarks/gpu_check.sh) runs the same command with `--device cuda` on a lent machine and builds its
table with benchmarks/gpu_summary.py; both are exercised here on CPU so that one prepared GPU run cannot fail on
the plumbing.
"""
from __future__ import annotations

import importlib
import json
import statistics
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, own_lines

SUMMARY = ROOT / "benchmarks" / "gpu_summary.py"


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0,32"], "--batch-size expects positive integers"),
    (["--batch-size", "64,x"], "--batch-size expects positive integers"),
    (["--steps", "0"], "must be positive"),
    (["--arch", "dcgan", "--image-size", "48"], "48"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--cuda-graph", "on"], "CUDA"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    from gan_ray.cli import main

    assert main(["bench", *args]) == 2
    err = own_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("gan-ray bench: error:") and message in err[0], err


@pytest.mark.parametrize("arch, size", [("mlp", 28), ("dcgan", 32), ("dcgan", 64)])
def test_bench_images_fill_the_model_shape(arch, size):
    from gan_ray.bench.training import _images, _spec

    shape = _spec(arch, size).image_shape
    images = _images(100, shape)
    assert images.shape == (100, *shape) and images.dtype == torch.float32
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0 and float(images.std()) > 0.1  # real digits


@pytest.mark.e2e
@pytest.mark.slow
def test_bench_measures_both_sides_and_the_summary_tabulates_them(ray_cluster, tmp_path, capsys):
    from gan_ray.cli import main

    assert main(["bench", "--json", "--batch-size", "16,32", "--steps", "8", "--repeats", "2", "--threads", "1",
                 "--address", ray_cluster.get_runtime_context().gcs_address]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    rows = [json.loads(line) for line in lines]
    assert [r["batch_size"] for r in rows] == [16, 32]
    for r in rows:
        assert r["arch"] == "mlp" and r["image_size"] == 28 and r["device"] == "CPU x1 threads"
        assert r["fast_path"] == {"precision": "fp32", "cuda_graph": False, "compile": False, "channels_last": False}
        assert len(r["plain_runs"]) == len(r["ray_train_runs"]) == 2 and min(r["plain_runs"] + r["ray_train_runs"]) > 0
        assert r["plain_images_per_s"] == pytest.approx(statistics.median(r["plain_runs"]))
        assert r["ray_train_images_per_s"] == pytest.approx(statistics.median(r["ray_train_runs"]))
        assert r["ratio"] == pytest.approx(r["ray_train_images_per_s"] / r["plain_images_per_s"])
        assert "plain_graph_images_per_s" not in r  # the CUDA-graph baseline exists on a GPU only

    bench_file = tmp_path / "bench.jsonl"
    bench_file.write_text("\n".join(lines) + "\n")
    table = subprocess.run([sys.executable, str(SUMMARY), str(bench_file)], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    assert table[0] == "card: CPU x1 threads" and table[1].startswith("| model | batch |")
    body = table[3:]
    assert len(body) == 2
    for r, line in zip(rows, body):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:3] == ["mlp 28x28", str(r["batch_size"]), f"{r['plain_images_per_s']:,.0f}"]
        assert cells[3] == "-" and cells[4] == f"{r['ray_train_images_per_s']:,.0f}"
        assert cells[5] == f"{r['ratio']:.2f}x" and cells[6] == "-"


def test_summary_usage_error():
    r = subprocess.run([sys.executable, str(SUMMARY)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("usage:")


def test_serving_load_counts_requests_by_completion_without_bias():
    """bench-serve's closed-loop client on a server whose every answer takes 200 ms: 4 clients complete about
    4 / latency requests per second, and the count over a 2 s window follows from the measured latency (Little's
    law) within one turn of the 4 clients: which turn ends first inside the window depends on this machine's
    timing. What is counted, exactly: `test_a_window_counts_completions_not_starts`."""
    import asyncio
    import threading

    from aiohttp import web

    from gan_ray.bench.serving import load_test

    async def slow(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(0.2)
        return web.Response(text="ok")

    ready, box = threading.Event(), {}

    def serve() -> None:
        async def main() -> None:
            app = web.Application()
            app.router.add_post("/", slow)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            box["port"] = runner.addresses[0][1]
            box["stop"] = asyncio.Event()
            ready.set()
            await box["stop"].wait()
            await runner.cleanup()

        box["loop"] = asyncio.new_event_loop()
        box["loop"].run_until_complete(main())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        stats = load_test(f"http://127.0.0.1:{box['port']}/", {}, concurrency=4, duration_s=2.0, warmup_s=0.3)
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(10)
    assert stats["errors"] == 0
    assert 195 <= stats["p50_ms"] <= 260, stats
    expected = 4 * 2.0 / (stats["p50_ms"] / 1000)  # 40 at exactly 200 ms
    assert expected - 4 <= stats["requests"] <= expected + 4, stats


def test_a_window_counts_completions_not_starts():
    """4 closed-loop clients whose requests take 0.2 s each, every client in its own phase; the window [0.3, 2.3]
    holds 10 turns of each client: 40 completions. Requests that started before 0.3 (or end after 2.3) do not
    shift the count; counting only requests that started in the window too would find 36."""
    from gan_ray.bench.serving import in_window, summary

    made = [(phase + 0.2 * k, phase + 0.2 * (k + 1), not (client == 3 and k == 5))
            for client, phase in enumerate((0.01, 0.06, 0.11, 0.16)) for k in range(12)]
    latencies, errors = in_window(made, 0.3, 2.3)
    assert len(latencies) == 40 and errors == 1
    assert all(abs(lat - 0.2) < 1e-9 for lat in latencies)
    stats = summary(latencies, errors, 2.0)
    assert stats["rps"] == 20 and stats["requests"] == 40 and abs(stats["p50_ms"] - 200) < 1e-6
    assert sum(0.3 <= t0 and t1 <= 2.3 for t0, t1, _ in made) == 36  # the count a start-and-end rule would give


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_scale_benchmark_times_each_arch_and_side_beside_its_all_reduce(capsys):
    """benchmarks/bench_scale.py, smallest real run: one row per (arch, side) the arch supports (dcgan has no
    128), each timed in its own process, with the all-reduce volume that is G's and D's parameters in float32."""
    sys.path.insert(0, str(ROOT / "benchmarks"))  # also for the spawned measuring processes, which import it
    try:
        bench_scale = importlib.import_module("bench_scale")  # a script beside the package, not a distribution
        assert bench_scale.main(["--arch", "resnet,dcgan", "--sides", "32,128", "--batch-size", "2", "--steps", "4",
                                 "--width", "16", "--json"]) == 0
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["arch"], r["side"]) for r in rows] == [("resnet", 32), ("resnet", 128), ("dcgan", 32)]
    for r in rows:
        assert r["step_s"] > 0 and r["images_per_s"] == pytest.approx(2 / r["step_s"])
        assert r["allreduce_mb"] == pytest.approx((r["params_g"] + r["params_d"]) * 4 / 2 ** 20)
        assert r["allreduce_s"] > 0 and r["comm_to_compute"] == pytest.approx(r["allreduce_s"] / r["step_s"])
        assert r["peak_mb"] > r["step_mb"] >= 0
    resnet32, resnet128 = rows[0], rows[1]
    assert resnet128["params_g"] > resnet32["params_g"]  # more stages at 128 px


def test_precision_benchmark_times_a_recipe_in_fp32_and_bf16_side_by_side(capsys):
    """benchmarks/bench_precision.py, smallest real run: the recipe's own networks and batch, the plain fp32 step
    against the bf16 fast path, with their ratio (no bar on it: CI's CPU may lack bf16 units)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        bench_precision = importlib.import_module("bench_precision")
        assert bench_precision.main(["--recipes", "stacked-mnist", "--rounds", "1", "--cycles", "1", "--json"]) == 0
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (row["recipe"], row["arch"], row["shape"], row["batch"]) == ("stacked-mnist", "dcgan", [3, 28, 28], 32)
    assert row["fp32_ms"] > 0 and row["bf16_ms"] > 0
    assert row["speedup"] == pytest.approx(row["fp32_ms"] / row["bf16_ms"])
    assert row["bf16_images_per_s"] == pytest.approx(32 / row["bf16_ms"] * 1e3)
