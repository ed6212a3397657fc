"""`gan-ray bench`: images/s of the adversarial step inside a Ray Train worker vs plain PyTorch loops.

`run_bench(options)` takes the command's options (arch, batch_size, image_size, steps, repeats, threads, device,
precision, cuda_graph, compile, address, json: what `gan-ray bench` parses) and prints one result per batch size.

All sides run in the same invocation on the same machine, same model, batch and thread count; the figure that
matters is the ratio (machines here are noisy, absolute numbers less so).

- plain DataLoader loop: the loop people write first: a DataLoader over a TensorDataset, BCE on sigmoid outputs,
  D on real and on fake in separate forwards.
- plain CUDA graph (GPU only): the best plain loop: the same textbook step with the data on the GPU, capturable
  Adam and the whole step captured in one CUDA graph, at the precision and layout gan-ray chose (like for like).
- gan-ray: the project's own epoch loop (`run_epoch`) and step, on the device-resident dataset, with the fast path
  the training worker resolves (`--precision/--cuda-graph/--compile`, default auto), inside a Ray Train worker.

On a GPU the target is gan-ray >= 0.9x the best plain loop; on CPU >= 0.9x the DataLoader loop.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from typing import Any

import torch

from gan_ray.cluster.connect import ensure_ray
from gan_ray.core.errors import UserError

LATENT = 100
BATCHES_IN_DATA = 64  # the in-memory dataset holds this many batches (an epoch); repeats run whole epochs


def parse_batch_sizes(text: str | int) -> list[int]:
    try:
        sizes = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--batch-size expects positive integers separated by commas, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise UserError(f"--batch-size expects positive integers separated by commas, got {text!r}")
    return sizes


def _images(n: int, shape: tuple[int, int, int]) -> torch.Tensor:
    from gan_ray.core.data import load_dataset

    data = load_dataset("digits")
    imgs = data.images
    if imgs.shape[1:] != shape:  # conv archs at other sizes: digits resized/tiled to the shape (throughput only)
        imgs = torch.nn.functional.interpolate(imgs, size=shape[1:]).repeat(1, shape[0], 1, 1)
    return imgs.repeat((n + len(imgs) - 1) // len(imgs), 1, 1, 1)[:n].float().contiguous()


def _spec(arch: str, image_size: int):
    from gan_ray.core.models import ModelSpec

    return ModelSpec(arch, LATENT, (1, image_size, image_size), 0)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_steps(step, batch_size: int, steps: int, repeats: int, device: str, warmup: int | None = None
                ) -> list[float]:
    for _ in range(max(10, steps // 10) if warmup is None else warmup):  # allocator, kernels, caches, capture
        step()
    rates = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        rates.append(batch_size * steps / (time.perf_counter() - t0))
    return rates


# ------------------------------------------------------------------------------------------ plain references
def plain_loop(arch: str, batch_size: int, steps: int, repeats: int, device: str, image_size: int = 28
               ) -> list[float]:
    """The textbook GAN loop: DataLoader batches, D(real) and D(fake) separately, sigmoid + BCELoss."""
    from torch.utils.data import DataLoader, TensorDataset

    from gan_ray.core.models import build

    torch.manual_seed(0)
    spec = _spec(arch, image_size)
    G, D = (m.to(device) for m in build(spec))
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    bce = torch.nn.BCELoss()
    loader = DataLoader(TensorDataset(_images(batch_size * BATCHES_IN_DATA, spec.image_shape)),
                        batch_size=batch_size, shuffle=True, drop_last=True)

    def batches():
        while True:
            yield from loader

    it = batches()

    def step() -> None:
        (real,) = next(it)
        real = real.to(device)
        n = real.shape[0]
        ones, zeros = torch.ones(n, device=device), torch.zeros(n, device=device)
        fake = G(torch.randn(n, LATENT, device=device))
        loss_d = bce(torch.sigmoid(D(real)), ones) + bce(torch.sigmoid(D(fake.detach())), zeros)
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        loss_g = bce(torch.sigmoid(D(fake)), ones)
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()

    return _time_steps(step, batch_size, steps, repeats, device)


def plain_graph_loop(arch: str, batch_size: int, steps: int, repeats: int, image_size: int,
                     fast: dict[str, Any]) -> list[float]:
    """The best plain loop on a GPU: the textbook step, data on the GPU, the whole step in one CUDA graph.

    Written out independently of gan-ray's fast path (it is the baseline), with the same precision and layout.
    """
    from gan_ray.core.models import build

    device = "cuda"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = fast["precision"] != "fp32"
    fmt = torch.channels_last if fast["channels_last"] else torch.contiguous_format
    if fast["channels_last"]:
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    spec = _spec(arch, image_size)
    G, D = (m.to(device, memory_format=fmt) for m in build(spec))
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999), capturable=True)
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999), capturable=True)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    data = _images(batch_size * BATCHES_IN_DATA, spec.image_shape).to(device).contiguous(memory_format=fmt)
    idx = torch.zeros(batch_size, dtype=torch.int64, device=device)
    ones = torch.ones(batch_size, device=device)
    zeros = torch.zeros(batch_size, device=device)
    use_bf16 = fast["precision"] == "bf16"

    def body() -> None:
        real = data[idx]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            fake = G(torch.randn(batch_size, LATENT, device=device))
            d_real, d_fake = D(real).float(), D(fake.detach()).float()
        loss_d = bce(d_real, ones) + bce(d_fake, zeros)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            d_gen = D(fake).float()
        loss_g = bce(d_gen, ones)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    n_batches = BATCHES_IN_DATA
    state = {"perm": torch.randperm(len(data), device=device), "i": 0}

    def step() -> None:
        if state["i"] == n_batches:  # a new epoch: a new permutation, on the device
            state["perm"] = torch.randperm(len(data), device=device)
            state["i"] = 0
        i = state["i"]
        idx.copy_(state["perm"][i * batch_size:(i + 1) * batch_size])
        state["i"] += 1
        graph.replay()

    return _time_steps(step, batch_size, steps, repeats, device)


# ------------------------------------------------------------------------------------------------ gan-ray
def project_rates(arch: str, image_size: int, batch_size: int, steps: int, repeats: int, device: str,
                  precision: str = "auto", cuda_graph: str = "auto", compile: bool = False
                  ) -> tuple[list[float], dict[str, Any]]:
    """gan-ray's epoch loop and step on the device-resident dataset, with the fast path training resolves."""
    from gan_ray.core.data import ImageDataset
    from gan_ray.core.fast_step import make_step_fn, prepare_module, resolve
    from gan_ray.core.epoch import run_epoch
    from gan_ray.core.models import build
    from gan_ray.core.step import make_state

    fast = resolve(precision, cuda_graph, compile, arch=arch, device=device, world_size=1)
    torch.manual_seed(0)
    spec = _spec(arch, image_size)
    G, D = (prepare_module(m.to(device), fast) for m in build(spec))
    state = make_state(spec, G, D, lr_g=2e-4, lr_d=2e-4, beta1=0.5, capturable=fast.cuda_graph)
    images = _images(batch_size * BATCHES_IN_DATA, spec.image_shape).to(device)
    data = ImageDataset(images, torch.zeros(len(images), dtype=torch.int64, device=device), 0, "bench")
    step_fn = make_step_fn(state, fast)
    epoch = [0]

    def epochs(n: int) -> float:
        images_done, seconds = 0, 0.0
        for _ in range(n):
            epoch[0] += 1
            res = run_epoch(state, data, epoch=epoch[0], rank=0, world_size=1, batch_size=batch_size, seed=0,
                            step_fn=step_fn)  # its time ends with the epoch's one host sync
            images_done += res.images
            seconds += res.seconds
        return images_done / seconds

    epochs(1)  # warm-up: graph capture / compilation / cuDNN autotuning happen here
    per_repeat = max(1, math.ceil(steps / BATCHES_IN_DATA))
    return [epochs(per_repeat) for _ in range(repeats)], fast.to_dict()


def _bench_worker(config: dict[str, Any]) -> None:
    """Runs inside the Ray Train worker; reports its rates through a tiny checkpoint (metrics alone aren't kept)."""
    import tempfile

    import ray.train

    torch.set_num_threads(config["threads"])
    results = {}
    for b in config["batch_sizes"]:
        rates, fast = project_rates(config["arch"], config["image_size"], b, config["steps"], config["repeats"],
                                    config["device"], config["precision"], config["cuda_graph"], config["compile"])
        results[str(b)] = {"rates": rates, "fast_path": fast}
        if config["device"] == "cuda":
            torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "rates.json"), "w") as f:
            json.dump(results, f)
        ray.train.report({"done": 1}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def ray_worker_rates(args: Any, batch_sizes: list[int]) -> dict[str, Any]:
    import tempfile

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ensure_ray(args.address)
    use_gpu = args.device == "cuda"
    resources = {"CPU": args.threads, **({"GPU": 1} if use_gpu else {})}
    config = {k: getattr(args, k) for k in ("arch", "image_size", "steps", "repeats", "threads", "device",
                                            "precision", "cuda_graph", "compile")}
    config["batch_sizes"] = batch_sizes
    with tempfile.TemporaryDirectory() as storage:
        trainer = TorchTrainer(
            _bench_worker,
            train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=1, use_gpu=use_gpu, resources_per_worker=resources),
            run_config=RunConfig(name="bench", storage_path=storage),
        )
        result = trainer.fit()
        with result.checkpoint.as_directory() as d:
            with open(os.path.join(d, "rates.json")) as f:
                return json.load(f)


def _check_args(args: Any) -> list[int]:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA GPU is visible")
    sizes = parse_batch_sizes(args.batch_size)
    if args.steps < 1 or args.repeats < 1 or args.threads < 1:
        raise UserError("--steps, --repeats and --threads must be positive")
    from gan_ray.core.fast_step import resolve
    from gan_ray.core.models import check_image_size

    if args.image_size < 1:
        raise UserError("--image-size must be positive")
    check_image_size(args.arch, args.image_size)  # dcgan: 28/32/64, resnet: 28 or 32..256: one line otherwise
    resolve(args.precision, args.cuda_graph, args.compile, arch=args.arch, device=args.device)  # refuse early
    return sizes


def run_bench(args: Any) -> int:
    sizes = _check_args(args)
    torch.set_num_threads(args.threads)
    card = (f"{torch.cuda.get_device_name()} (torch {torch.__version__})" if args.device == "cuda"
            else f"CPU x{args.threads} threads")
    plain: dict[int, list[float]] = {}
    graph: dict[int, list[float]] = {}
    # Ray first: its daemons (GCS, raylet, dashboard) share these cores with whichever loop is being timed, so both
    # are measured beside them and the ratio is the cost of running inside a Train worker, not of Ray existing.
    ensure_ray(args.address)
    for b in sizes:
        plain[b] = plain_loop(args.arch, b, args.steps, args.repeats, args.device, args.image_size)
    inside = ray_worker_rates(args, sizes)
    if args.device == "cuda":  # after gan-ray, so that its process-wide math flags don't leak into the baseline
        for b in sizes:
            graph[b] = plain_graph_loop(args.arch, b, args.steps, args.repeats, args.image_size,
                                        inside[str(b)]["fast_path"])
            torch.cuda.empty_cache()
    for b in sizes:
        r: dict[str, Any] = {
            "arch": args.arch, "image_size": args.image_size, "batch_size": b, "device": card,
            "fast_path": inside[str(b)]["fast_path"],
            "plain_images_per_s": statistics.median(plain[b]),
            "ray_train_images_per_s": statistics.median(inside[str(b)]["rates"]),
            "plain_runs": plain[b], "ray_train_runs": inside[str(b)]["rates"],
        }
        r["ratio"] = r["ray_train_images_per_s"] / r["plain_images_per_s"]
        if b in graph:
            r["plain_graph_images_per_s"] = statistics.median(graph[b])
            r["plain_graph_runs"] = graph[b]
            r["ratio_vs_best_plain"] = r["ray_train_images_per_s"] / r["plain_graph_images_per_s"]
        if args.json:
            print(json.dumps(r), flush=True)
        else:
            print_result(r)
    return 0


def print_result(r: dict[str, Any]) -> None:
    fp = r["fast_path"]
    path = " ".join(f"{k}={'on' if v is True else 'off' if v is False else v}" for k, v in fp.items())
    print(f"adversarial step, arch={r['arch']} {r['image_size']}x{r['image_size']} batch={r['batch_size']} "
          f"on {r['device']}")
    print(f"  plain PyTorch loop (DataLoader):   {r['plain_images_per_s']:>12,.0f} img/s")
    if "plain_graph_images_per_s" in r:
        print(f"  plain loop, whole-step CUDA graph: {r['plain_graph_images_per_s']:>12,.0f} img/s  (best plain)")
    print(f"  gan-ray in a Ray Train worker:     {r['ray_train_images_per_s']:>12,.0f} img/s  ({path})")
    if "ratio_vs_best_plain" in r:
        print(f"  ratio vs DataLoader loop:          {r['ratio']:>12.2f}x")
        print(f"  ratio vs best plain loop:          {r['ratio_vs_best_plain']:>12.2f}x  (target >= 0.9)")
    else:
        print(f"  ratio:                             {r['ratio']:>12.2f}x  (target >= 0.9)")
