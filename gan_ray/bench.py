"""`gan-ray bench`: images/s of the adversarial step inside a Ray Train worker vs a plain PyTorch loop.

Both sides run in the same invocation on the same machine, same model, batch and thread count; the figure that
matters is the ratio (machines here are noisy, absolute numbers less so). The plain side is the loop people write
first: a DataLoader over a TensorDataset, BCE on sigmoid outputs, D on real and on fake in separate forwards.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import torch

from gan_ray.config import ARCHS


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", choices=ARCHS, default="mlp")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=150, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (the median is reported)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads for each side")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--address", default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _images(n: int, shape: tuple[int, int, int]) -> torch.Tensor:
    from gan_ray.data import load_dataset

    data = load_dataset("digits")
    imgs = data.images
    if imgs.shape[1:] != shape:  # dcgan at other sizes: tile digits to the shape (throughput only)
        imgs = torch.nn.functional.interpolate(imgs, size=shape[1:]).repeat(1, shape[0], 1, 1)
    return imgs.repeat((n + len(imgs) - 1) // len(imgs), 1, 1, 1)[:n].float()


def plain_loop(arch: str, batch_size: int, steps: int, repeats: int, device: str) -> list[float]:
    """The textbook GAN loop: DataLoader batches, D(real) and D(fake) separately, sigmoid + BCELoss."""
    from torch.utils.data import DataLoader, TensorDataset

    from gan_ray.models import ModelSpec, build

    torch.manual_seed(0)
    spec = ModelSpec(arch, 100, (1, 28, 28), 0)
    G, D = (m.to(device) for m in build(spec))
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    bce = torch.nn.BCELoss()
    loader = DataLoader(TensorDataset(_images(batch_size * 64, spec.image_shape)), batch_size=batch_size,
                        shuffle=True, drop_last=True)

    def batches():
        while True:
            yield from loader

    it = batches()

    def step() -> None:
        (real,) = next(it)
        real = real.to(device)
        n = real.shape[0]
        ones, zeros = torch.ones(n, device=device), torch.zeros(n, device=device)
        fake = G(torch.randn(n, 100, device=device))
        loss_d = bce(torch.sigmoid(D(real)), ones) + bce(torch.sigmoid(D(fake.detach())), zeros)
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        loss_g = bce(torch.sigmoid(D(fake)), ones)
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()

    return _time_steps(step, batch_size, steps, repeats, device)


def _time_steps(step, batch_size: int, steps: int, repeats: int, device: str) -> list[float]:
    for _ in range(max(10, steps // 10)):  # warm-up: allocator, kernels, caches
        step()
    rates = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        rates.append(batch_size * steps / (time.perf_counter() - t0))
    return rates


def project_steps(arch: str, batch_size: int, steps: int, repeats: int, device: str) -> list[float]:
    """gan-ray's own step on the device-resident dataset, as the Ray Train worker loop runs it."""
    from gan_ray.data import ImageDataset
    from gan_ray.models import ModelSpec, build
    from gan_ray.step import make_state, train_step

    torch.manual_seed(0)
    spec = ModelSpec(arch, 100, (1, 28, 28), 0)
    G, D = (m.to(device) for m in build(spec))
    state = make_state(spec, G, D, lr_g=2e-4, lr_d=2e-4, beta1=0.5)
    images = _images(batch_size * 64, spec.image_shape).to(device)
    data = ImageDataset(images, torch.zeros(len(images), dtype=torch.int64, device=device), 0, "bench")
    perm = torch.randperm(len(data), device=device)
    cursor = [0]

    def step() -> None:
        if cursor[0] + batch_size > len(perm):
            perm.copy_(torch.randperm(len(data), device=device))
            cursor[0] = 0
        real, _ = data.batch(perm[cursor[0]:cursor[0] + batch_size])
        cursor[0] += batch_size
        train_step(state, real)

    return _time_steps(step, batch_size, steps, repeats, device)


def _bench_worker(config: dict[str, Any]) -> None:
    """Runs inside the Ray Train worker; reports its rates through a tiny checkpoint (metrics alone aren't kept)."""
    import tempfile

    import ray.train

    torch.set_num_threads(config["threads"])
    rates = project_steps(config["arch"], config["batch_size"], config["steps"], config["repeats"], config["device"])
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "rates.json"), "w") as f:
            json.dump(rates, f)
        ray.train.report({"rates": rates}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def ray_worker_rates(args: argparse.Namespace) -> list[float]:
    import tempfile

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from gan_ray.ray_train import ensure_ray

    ensure_ray(args.address)
    use_gpu = args.device == "cuda"
    resources = {"CPU": args.threads, **({"GPU": 1} if use_gpu else {})}
    with tempfile.TemporaryDirectory() as storage:
        trainer = TorchTrainer(
            _bench_worker,
            train_loop_config={k: getattr(args, k) for k in ("arch", "batch_size", "steps", "repeats", "threads",
                                                             "device")},
            scaling_config=ScalingConfig(num_workers=1, use_gpu=use_gpu, resources_per_worker=resources),
            run_config=RunConfig(name="bench", storage_path=storage),
        )
        result = trainer.fit()
        with result.checkpoint.as_directory() as d:
            with open(os.path.join(d, "rates.json")) as f:
                return json.load(f)


def run_bench(args: argparse.Namespace) -> int:
    from gan_ray.errors import UserError

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA GPU is visible")
    if args.batch_size < 1 or args.steps < 1 or args.repeats < 1 or args.threads < 1:
        raise UserError("--batch-size, --steps, --repeats and --threads must be positive")
    torch.set_num_threads(args.threads)
    plain = plain_loop(args.arch, args.batch_size, args.steps, args.repeats, args.device)
    inside = ray_worker_rates(args)
    card = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU x{args.threads} threads"
    result = {
        "arch": args.arch, "batch_size": args.batch_size, "device": card,
        "plain_images_per_s": statistics.median(plain), "ray_train_images_per_s": statistics.median(inside),
        "plain_runs": plain, "ray_train_runs": inside,
    }
    result["ratio"] = result["ray_train_images_per_s"] / result["plain_images_per_s"]
    if args.json:
        print(json.dumps(result))
    else:
        print(f"adversarial step, arch={args.arch} batch={args.batch_size} on {card}")
        print(f"  plain PyTorch loop (DataLoader): {result['plain_images_per_s']:>12,.0f} img/s")
        print(f"  gan-ray in a Ray Train worker:   {result['ray_train_images_per_s']:>12,.0f} img/s")
        print(f"  ratio:                           {result['ratio']:>12.2f}x  (target >= 0.9)")
    return 0
