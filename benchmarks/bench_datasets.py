"""Prepared datasets: streaming (Ray Data) against the in-memory path, measured in one run on one Ray cluster.

Three parts, each printing the project's figure next to the in-memory baseline and their ratio:

  memory   peak private memory (RssAnon, sampled from /proc every 0.25 s) of each Ray Train worker, training one
           epoch on synthetic prepared sets of N and 4N 64x64 RGB images, in memory mode and in stream mode;
  speed    images/s of the second epoch and start-up (launch to first step) of real MNIST prepared on local disk,
           memory mode against stream mode, on the same 2 CPU workers;
  prepare  images/s of `gan-ray prepare` on a folder of PNG files, with 1 and 2 decoding tasks.

    .venv/bin/python benchmarks/bench_datasets.py --parts memory,speed,prepare --mnist ../shared/data/mnist

The cluster started here has the workers' CPUs plus one for Ray Data's read tasks (a streaming run needs a CPU
beyond its workers'); on this 2-core machine all of them share the same two cores, memory mode included.
"""
from __future__ import annotations

import argparse
import gzip
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


# --------------------------------------------------------------------------------------------- measurements
def rss_anon_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory(threading.Thread):
    """Samples RssAnon of the cluster's live RayTrainWorker processes; keeps each one's peak."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peaks: dict[int, int] = {}
        self.stop_event = threading.Event()

    def run(self) -> None:
        from ray._private.worker import get_dashboard_url
        from ray.util.state import list_actors

        address = f"http://{get_dashboard_url()}"
        pids: list[int] = []
        last_list = 0.0
        while not self.stop_event.wait(0.25):
            if time.time() - last_list > 2.0:
                try:
                    pids = [a.pid for a in list_actors(address=address, filters=[
                        ("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]) if a.pid]
                except Exception:
                    pass
                last_list = time.time()
            for pid in pids:
                kb = rss_anon_kb(pid)
                if kb is not None:
                    self.peaks[pid] = max(self.peaks.get(pid, 0), kb)

    def stop(self) -> int:
        self.stop_event.set()
        self.join()
        return max(self.peaks.values()) * 1024 if self.peaks else 0


def train(dataset: str, mode: str, storage: str, name: str, *, epochs: int, batch_size: int, arch: str,
          workers: int = 2, **extra) -> dict:
    """One training run; its peak worker RssAnon, start-up time and per-epoch images/s."""
    from gan_ray.core.config import TrainConfig
    from gan_ray.core.run_dir import read_metrics
    from gan_ray.train.driver import fit

    cfg = TrainConfig(dataset=dataset, data_mode=mode, workers=workers, batch_size=batch_size, epochs=epochs,
                      arch=arch, storage=storage, name=name, sample_every=0, checkpoint_every=epochs,
                      r1_gamma=0, **extra)
    sampler = PeakMemory()
    sampler.start()
    t0 = time.time()
    fit(cfg, quality=False, progress=False)
    wall = time.time() - t0
    peak = sampler.stop()
    rows = read_metrics(cfg.run_dir / "metrics.jsonl")
    first = rows[0]
    # launch to first step: the first epoch's row is written at t0 + startup + its own training seconds + a little
    startup = first["time"] - first["wall_s"] - t0
    return {"mode": mode, "dataset": dataset, "peak_rss_anon": peak, "startup_s": startup, "wall_s": wall,
            "images_per_s": [r["images_per_s"] for r in rows], "epochs": len(rows)}


# ------------------------------------------------------------------------------------------------- datasets
def synthetic_prepared(dest: Path, n: int, side: int = 64, per_shard: int = 2048, seed: int = 0) -> str:
    """A prepared dataset of `n` smooth random 3 x side x side images (10 labels), written with the format's own
    functions (the data to measure with, not a measurement)."""
    from gan_ray.core import prepared as fmt

    if (dest / fmt.MANIFEST).exists():
        return str(dest)
    rng = np.random.default_rng(seed)
    n_held = n // 20
    shards: dict = {}
    for split, count in (("train", n), ("heldout", n_held)):
        shards[split] = []
        for k, start in enumerate(range(0, count, per_shard)):
            m = min(per_shard, count - start)
            low = rng.integers(0, 256, (m, 3, side // 8, side // 8), dtype=np.uint8)
            images = low.repeat(8, axis=2).repeat(8, axis=3)  # blocks: compressible like real images are
            noise = rng.integers(0, 16, images.shape, dtype=np.uint8)
            shards[split].append(fmt.write_shard(str(dest), f"{split}/part-{k:05d}.parquet", images + noise,
                                                 rng.integers(0, 10, m)))
    manifest = fmt.Manifest(shape=(3, side, side), classes=[str(i) for i in range(10)],
                            count={"train": n, "heldout": n_held}, shards=shards,
                            source={"kind": "synthetic", "name": f"synthetic-{n}", "key": f"synthetic-{n}-{seed}"},
                            split={"rule": "synthetic"}, content_hash=fmt.content_hash(shards), location=str(dest))
    fmt.write_manifest(manifest)
    return str(dest)


def mnist_dir(raw: Path, work: Path) -> str:
    """../shared/data/mnist/*.gz unpacked where torchvision looks for them."""
    out = work / "mnist-data"
    (out / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)
    for gz in raw.glob("*.gz"):
        target = out / "MNIST" / "raw" / gz.name[:-3]
        if not target.exists():
            with gzip.open(gz) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return str(out)


def png_folder(dest: Path, n: int, side: int = 64) -> Path:
    rng = np.random.default_rng(1)
    from PIL import Image

    for c in range(4):
        (dest / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        low = rng.integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
        Image.fromarray(low).save(dest / f"class{i % 4}" / f"{i:06d}.png")
    return dest


# ---------------------------------------------------------------------------------------------------- parts
def part_memory(args, work: Path) -> list[dict]:
    out = []
    for n in (args.n, 4 * args.n):
        ds = synthetic_prepared(work / f"synthetic-{n}", n)
        for mode in ("memory", "stream"):
            r = train(ds, mode, str(work / "runs"), f"mem-{mode}-{n}", epochs=1, batch_size=args.mem_batch,
                      arch="dcgan", g_width=8, d_width=8)
            r["n"] = n
            out.append(r)
            print(f"memory  n={n:>7}  {mode:6}  peak RssAnon {r['peak_rss_anon'] / 2**20:8.0f} MiB  "
                  f"({r['wall_s']:.0f} s)", flush=True)
    return out


def part_speed(args, work: Path) -> list[dict]:
    from gan_ray.train.prepare import PrepareSettings, prepare

    dest = str(work / "mnist-prepared")
    prepare("mnist", PrepareSettings(out=dest, data_dir=mnist_dir(Path(args.mnist), work)), log=lambda m: None)
    out = []
    for mode in ("memory", "stream"):
        r = train(dest, mode, str(work / "runs"), f"speed-{mode}", epochs=args.speed_epochs, batch_size=64,
                  arch="mlp")
        out.append(r)
        print(f"speed   mnist  {mode:6}  {r['images_per_s'][-1]:8.0f} img/s (last epoch)  start-up "
              f"{r['startup_s']:.1f} s", flush=True)
    return out


def part_prepare(args, work: Path) -> list[dict]:
    from gan_ray.train.prepare import PrepareSettings, prepare

    src = png_folder(work / "pngs", args.pngs)
    warm = png_folder(work / "pngs-warmup", 64)  # Ray's worker processes started and imports done: not timed
    prepare(str(warm), PrepareSettings(out=str(work / "prepared-warmup"), workers=2), log=lambda m: None)
    out = []
    for workers in (1, 2):
        r = prepare(str(src), PrepareSettings(out=str(work / f"prepared-w{workers}"), workers=workers),
                    log=lambda m: None)
        out.append({"workers": workers, "images_per_s": r.images_per_s, "seconds": r.seconds,
                    "images": r.manifest.count["train"] + r.manifest.count["heldout"]})
        print(f"prepare {args.pngs} PNGs  {workers} task(s)  {r.images_per_s:8.0f} img/s ({r.seconds:.1f} s)",
              flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="memory,speed,prepare")
    p.add_argument("--n", type=int, default=50_000, help="memory: images of the smaller synthetic set (and 4x)")
    p.add_argument("--mem-batch", type=int, default=256)
    p.add_argument("--mnist", default="../shared/data/mnist", help="a folder holding MNIST's four .gz files")
    p.add_argument("--speed-epochs", type=int, default=2)
    p.add_argument("--pngs", type=int, default=8000, help="prepare: PNG files to decode")
    p.add_argument("--work", default=None, help="where the datasets and runs go (default: a temporary folder)")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args()
    parts = args.parts.split(",")

    from gan_ray.cluster.connect import init_local, shutdown

    init_local(num_cpus=3, configure_logging=True, logging_level="WARNING")  # 2 workers + 1 for Ray Data's reads
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-datasets-"))
    results: dict = {"date": time.strftime("%Y-%m-%d"), "cpus": 3}
    try:
        if "prepare" in parts:
            results["prepare"] = part_prepare(args, work)
        if "speed" in parts:
            results["speed"] = part_speed(args, work)
        if "memory" in parts:
            results["memory"] = part_memory(args, work)
    finally:
        shutdown()  # Ray, and every process of the cluster started here
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    print()
    if "memory" in results:
        by = {(r["n"], r["mode"]): r["peak_rss_anon"] / 2**20 for r in results["memory"]}
        n, n4 = args.n, 4 * args.n
        print(f"peak worker RssAnon (MiB)  {'n=' + str(n):>10} {'n=' + str(n4):>10} {'growth':>8}")
        for mode in ("memory", "stream"):
            print(f"  {mode:24} {by[(n, mode)]:10.0f} {by[(n4, mode)]:10.0f} {by[(n4, mode)] - by[(n, mode)]:8.0f}")
        print(f"  stream / memory at n={n4}: {by[(n4, 'stream')] / by[(n4, 'memory')]:.2f}")
    if "speed" in results:
        mem, st = results["speed"]
        print(f"MNIST img/s (last epoch): memory {mem['images_per_s'][-1]:.0f}, stream {st['images_per_s'][-1]:.0f}, "
              f"ratio {st['images_per_s'][-1] / mem['images_per_s'][-1]:.2f}; start-up memory "
              f"{mem['startup_s']:.1f} s, stream {st['startup_s']:.1f} s")
    if "prepare" in results:
        one, two = results["prepare"]
        print(f"prepare img/s: 1 task {one['images_per_s']:.0f}, 2 tasks {two['images_per_s']:.0f}, "
              f"scaling {two['images_per_s'] / one['images_per_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
