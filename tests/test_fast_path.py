"""The GPU fast path (issue 7): same training as the eager step, options resolved per device, DDP intact.

CPU tests run everywhere: option resolution and refusals, the fast step's compiled/channels_last variants against
the eager step (fp32, same seeds), bf16 autocast training against fp32 on digits, and DDP (gloo, two processes)
with the fast path. The CUDA tests (whole-step CUDA graph vs eager, bf16/dcgan graphs, checkpoint round trip,
compile + graph, the epoch loop on a GPU-resident dataset) skip without a GPU; benchmarks/gpu_check.sh runs them on
a lent GPU machine.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from gan_ray.core import checkpoint as ckpt_io
from gan_ray.core.config import TrainConfig
from gan_ray.core.data import load_dataset
from gan_ray.core.errors import UserError
from gan_ray.core.fast_step import FastPath, FastStep, make_step_fn, prepare_module, resolve
from gan_ray.core.epoch import run_epoch
from gan_ray.core.models import ModelSpec, build
from gan_ray.core.step import make_state, train_step
from gan_ray.cluster.processes import free_port
from tests.conftest import own_lines

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def new_state(spec: ModelSpec, *, device: str = "cpu", fast: FastPath = FastPath(), seed: int = 0, **kw):
    """A seeded state built the way the Ray worker builds it (layout first, then optimisers)."""
    torch.manual_seed(seed)
    G, D = (prepare_module(m.to(device), fast) for m in build(spec))
    kw.setdefault("ema_halflife_kimg", 0.5)
    return make_state(spec, G, D, lr_g=2e-4, lr_d=2e-4, beta1=0.5, capturable=fast.cuda_graph, **kw)


def batches(spec: ModelSpec, n_steps: int, batch: int, device: str = "cpu", seed: int = 1):
    """Fixed real batches (digits resized to the spec's shape) and labels, identical for every run."""
    data = load_dataset("digits")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_steps):
        idx = torch.randint(0, len(data), (batch,), generator=gen)
        real, labels = data.batch(idx)
        if real.shape[1:] != spec.image_shape:
            real = torch.nn.functional.interpolate(real, size=spec.image_shape[1:])
        out.append((real.to(device), labels.to(device)))
    return out


def run_steps(state, step_fn, data, *, seed: int = 2) -> list[dict[str, float]]:
    torch.manual_seed(seed)
    cond = state.spec.conditional
    outs = [step_fn(state, real, labels if cond else None) for real, labels in data]
    return [{k: float(v) for k, v in o.items()} for o in outs]  # (a sync per step: fine in a test)


# A bias right before BatchNorm has a zero gradient up to rounding noise, which Adam normalises into +-lr steps
# whose sign follows the noise: it differs between any two kernel orders and cancels in BatchNorm (train and eval).
DEAD_PARAMS = {"project.0.bias"}


def DEVICE_OF(state) -> torch.device:
    return next(state.G_ema.parameters()).device


def assert_same_training(a, b, outs_a, outs_b, *, atol: float, rtol: float = 1e-3) -> None:
    assert [sorted(o) for o in outs_a] == [sorted(o) for o in outs_b], "G updates on the same steps"
    for i, (x, y) in enumerate(zip(outs_a, outs_b)):
        for k in x:
            assert x[k] == pytest.approx(y[k], abs=atol, rel=rtol), f"step {i + 1} {k}: {x[k]} vs {y[k]}"
    for name, ma, mb in (("G", a.G, b.G), ("D", a.D, b.D), ("G_ema", a.G_ema, b.G_ema)):
        for (pn, pa), pb in zip(ma.named_parameters(), mb.parameters()):
            if pn in DEAD_PARAMS:
                continue
            torch.testing.assert_close(pa, pb, atol=atol, rtol=rtol, msg=f"{name}.{pn} differs")
    # what is sampled: the EMA generator (eval mode) on fixed noise
    z = torch.randn(16, a.spec.latent_dim, generator=torch.Generator().manual_seed(5)).to(DEVICE_OF(a))
    y = torch.arange(16, device=z.device) % a.spec.num_classes if a.spec.conditional else None
    with torch.no_grad():
        torch.testing.assert_close(a.G_ema(z, y), b.G_ema(z, y), atol=atol, rtol=rtol)
    assert (a.step, a.images_seen) == (b.step, b.images_seen)


# ------------------------------------------------------------------------------------------------ resolution
def test_auto_on_cpu_is_exactly_the_eager_fp32_step():
    for arch in ("mlp", "dcgan"):
        fast = resolve("auto", "auto", False, arch=arch, device="cpu")
        assert fast.is_plain and fast.precision == "fp32"
        state = new_state(ModelSpec(arch, 100, (1, 28, 28)))
        assert make_step_fn(state, fast) is train_step, "the CPU path keeps running train_step itself"


def test_auto_on_a_gpu_picks_graph_bf16_or_tf32_and_channels_last():
    """Resolution needs no GPU: it only looks at the device type, the worker count and the card's bf16 support."""
    one = resolve("auto", "auto", False, arch="dcgan", device="cuda", world_size=1)
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert one == FastPath("bf16" if bf16 else "tf32", cuda_graph=True, channels_last=True)
    assert resolve("auto", "auto", False, arch="mlp", device="cuda") == FastPath("tf32", cuda_graph=True)
    ddp = resolve("auto", "auto", False, arch="mlp", device="cuda", world_size=4)
    assert ddp == FastPath("tf32", cuda_graph=False), "DDP: no graph (its all-reduce is not captured)"
    assert resolve("fp32", "off", True, arch="mlp", device="cuda") == FastPath("fp32", compile=True)
    assert resolve("bf16", "auto", False, arch="mlp", device="cpu") == FastPath("bf16")
    assert resolve("bf16", "auto", False, arch="dcgan", device="cpu") == FastPath("bf16", channels_last=True), \
        "bf16 convolutions on a CPU run in oneDNN's channels_last layout"


def test_impossible_requests_are_one_line_user_errors():
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        resolve("fp32", "on", False, arch="mlp", device="cpu")
    with pytest.raises(UserError, match="one worker only"):
        resolve("fp32", "on", False, arch="mlp", device="cuda", world_size=2)
    with pytest.raises(UserError, match="--precision"):
        resolve("fp16", "auto", False, arch="mlp", device="cpu")
    with pytest.raises(UserError, match="--cuda-graph"):
        resolve("fp32", "sometimes", False, arch="mlp", device="cpu")
    # the driver refuses before Ray starts
    with pytest.raises(UserError, match="--gpus-per-worker"):
        TrainConfig(cuda_graph="on")
    with pytest.raises(UserError, match="--workers 1"):
        TrainConfig(cuda_graph="on", gpus_per_worker=1, workers=2)
    with pytest.raises(UserError, match="R1 is on by default, --r1-gamma 0"):
        TrainConfig(cuda_graph="on", gpus_per_worker=1, workers=1)


def test_cuda_graph_accepts_boolean_spellings_from_yaml():
    cfg = TrainConfig.from_mapping({"cuda_graph": True, "gpus_per_worker": 1, "workers": 1, "r1_gamma": 0})
    assert cfg.cuda_graph == "on"
    assert TrainConfig.from_mapping({"cuda_graph": False}).cuda_graph == "off"
    assert TrainConfig().cuda_graph == "auto" and TrainConfig().precision == "auto"


def test_cli_flags_for_the_fast_path(capsys):
    from gan_ray.cli import build_parser, main

    args = build_parser().parse_args(["train", "--precision", "bf16", "--cuda-graph", "off", "--compile"])
    assert (args.precision, args.cuda_graph, args.compile) == ("bf16", "off", True)
    assert main(["train", "--cuda-graph", "on", "--epochs", "1"]) == 2  # no GPU workers asked for
    err = own_lines(capsys.readouterr().err)
    assert len(err) == 1 and "--gpus-per-worker" in err[0], err


# ------------------------------------------------------------------------------------ CPU: same training
def test_channels_last_fast_step_matches_eager_dcgan():
    spec = ModelSpec("dcgan", 32, (1, 28, 28), 10)
    data = batches(spec, 6, 16)
    eager = new_state(spec, d_steps=2)
    fast_path = FastPath(channels_last=True)
    fast = new_state(spec, fast=fast_path, d_steps=2)
    assert next(p for p in fast.D.parameters() if p.dim() == 4).is_contiguous(memory_format=torch.channels_last)
    assert_same_training(fast, eager, run_steps(fast, FastStep(fast, fast_path), data),
                         run_steps(eager, train_step, data), atol=1e-4)


@pytest.mark.slow
def test_compiled_fast_step_matches_eager_mlp():
    """torch.compile (aot_eager on CPU: the same tracing and autograd graphs as inductor, without C++ code
    generation, which takes minutes on CI's 2 cores) through the conditional step with d_steps=2."""
    spec = ModelSpec("mlp", 100, (1, 28, 28), 10)
    data = batches(spec, 8, 32)
    eager = new_state(spec, d_steps=2)
    fast_path = FastPath(compile=True, compile_backend="aot_eager")
    fast = new_state(spec, fast=fast_path, d_steps=2)
    from torch._dynamo.utils import counters

    graphs_before = counters["stats"]["unique_graphs"]
    fast_outs = run_steps(fast, FastStep(fast, fast_path), data)
    assert counters["stats"]["unique_graphs"] > graphs_before, "the step really went through torch.compile"
    assert_same_training(fast, eager, fast_outs, run_steps(eager, train_step, data), atol=1e-4)


def test_bf16_dcgan_on_cpu_runs_the_regularised_step_in_bf16_channels_last():
    """The CPU bf16 path (recipes opt in: oneDNN's bf16 convolutions, 1.6x fp32 per step on AMX CPUs) through the
    step the recipes run: relativistic loss with lazy R1 and R2. D's convolutions compute on channels_last
    activations, in bf16 for the loss and in fp32 for the penalties (their double backward stays out of autocast);
    every number stays finite, and the losses track fp32's."""
    spec = ModelSpec("dcgan", 32, (3, 28, 28), 0, g_width=16, d_width=16)
    fast_path = resolve("bf16", "auto", False, arch="dcgan", device="cpu")
    reg = dict(loss="rpgan", r1_gamma=0.2, r2_gamma=0.2, reg_every=2)
    data = [(torch.cat([x, x.flip(0), x.roll(1, 0)], dim=1), y)  # three digits per image: Stacked-MNIST's shape
            for x, y in batches(ModelSpec("dcgan", 32, (1, 28, 28)), 6, 16)]
    eager, fast = new_state(spec, **reg), new_state(spec, fast=fast_path, **reg)
    seen: set[tuple[torch.dtype, bool]] = set()
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.add(
        (out.dtype, out.is_contiguous(memory_format=torch.channels_last))))
        for m in fast.D.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    fast_outs = run_steps(fast, make_step_fn(fast, fast_path), data)
    for h in hooks:
        h.remove()
    assert seen == {(torch.bfloat16, True), (torch.float32, True)}, seen
    eager_outs = run_steps(eager, train_step, data)
    assert sum("r1" in o for o in fast_outs) == 3, "R1/R2 ran on every 2nd step"
    for i, (a, b) in enumerate(zip(fast_outs, eager_outs), start=1):
        assert all(math.isfinite(v) for v in a.values()), (i, a)
        assert a["loss_d"] == pytest.approx(b["loss_d"], abs=0.05), f"step {i}"
    assert all(torch.isfinite(p).all() for p in list(fast.G.parameters()) + list(fast.D.parameters()))


def test_channels_last_weights_get_gradients_in_their_own_strides():
    """DDP copies a gradient whose strides differ from its parameter's into its bucket, with a warning, every step.
    On grey images D's first convolution reads a single channel, where channels_last and the default layout are
    one order with different strides, and the R1/R2 pass (fp32, outside autocast) gives its weight a gradient in
    the default strides: that weight keeps the default, so that every gradient of the regularised step in bf16 on
    a CPU (as the recipes run it) has its weight's strides."""
    spec = ModelSpec("dcgan", 32, (1, 28, 28), 10, g_width=16, d_width=16)
    fast_path = resolve("bf16", "auto", False, arch="dcgan", device="cpu")
    state = new_state(spec, fast=fast_path, loss="rpgan", r1_gamma=0.2, r2_gamma=0.2, reg_every=1)
    out = run_steps(state, make_step_fn(state, fast_path), batches(spec, 1, 8))
    assert {"r1", "r2", "loss_g"} <= set(out[0]), "one step with the penalties and a G update"
    params = [(n, p) for net in (state.G, state.D) for n, p in net.named_parameters()]
    convs = [(n, p) for n, p in params if p.dim() == 4]
    assert any(p.shape[1] == 1 for _, p in convs), "a single-channel weight is there to check"
    assert all(p.is_contiguous(memory_format=torch.channels_last) for n, p in convs if p.shape[1] > 1)
    mismatched = [(n, p.stride(), p.grad.stride()) for n, p in params if p.grad.stride() != p.stride()]
    assert not mismatched, mismatched


def _mean_image_gap(state, real_mean: torch.Tensor) -> float:
    with torch.no_grad():
        gen = state.sampler(torch.randn(512, state.spec.latent_dim, generator=torch.Generator().manual_seed(9)))
    return float((gen.mean(0) - real_mean).norm())


@pytest.mark.e2e
def test_bf16_trains_digits_like_fp32():
    """bf16 autocast (fp32 weights, optimiser and losses) through the epoch loop tracks fp32 on digits: per-epoch
    losses and D's outputs stay close, and both pull the generated mean image towards the data's."""
    torch.set_num_threads(1)
    data = load_dataset("digits")
    real_mean = data.images.mean(0)
    spec = ModelSpec("mlp", 100, data.shape)
    runs = {}
    for precision in ("fp32", "bf16"):
        state = new_state(spec, ema_halflife_kimg=1.0)
        gap0 = _mean_image_gap(state, real_mean)
        step_fn = make_step_fn(state, FastPath(precision))
        assert (step_fn is train_step) == (precision == "fp32")
        torch.manual_seed(3)
        hist = [run_epoch(state, data, epoch=e, rank=0, world_size=1, batch_size=64, seed=0, step_fn=step_fn)
                for e in range(1, 7)]  # fp32 and bf16 both at 0.41x the first gap by epoch 6
        runs[precision] = (hist, gap0, _mean_image_gap(state, real_mean))
        dtypes: set[torch.dtype] = set()  # what D's layers computed in, on one more step
        hooks = [m.register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype))
                 for m in state.D.modules() if isinstance(m, torch.nn.Linear)]
        step_fn(state, data.images[:64].float(), None)
        for h in hooks:
            h.remove()
        assert dtypes == {torch.bfloat16 if precision == "bf16" else torch.float32}, (precision, dtypes)
    (h32, g0, g32), (h16, _, g16) = runs["fp32"], runs["bf16"]
    assert any(a.loss_d != b.loss_d for a, b in zip(h32, h16)), "bf16 really computed differently"
    for e, (a, b) in enumerate(zip(h32, h16), start=1):
        print(f"epoch {e}: fp32 d={a.loss_d:.3f} g={a.loss_g:.3f} | bf16 d={b.loss_d:.3f} g={b.loss_g:.3f}")
        assert abs(a.loss_d - b.loss_d) < 0.15 and abs(a.loss_g - b.loss_g) < 0.25, f"epoch {e}"
        assert abs(a.d_real - b.d_real) < 0.08 and abs(a.d_fake - b.d_fake) < 0.08, f"epoch {e}"
    print(f"mean-image gap: init {g0:.2f}, fp32 {g32:.2f}, bf16 {g16:.2f}")
    assert g32 < 0.5 * g0 and g16 < 0.5 * g0, "both learn the data's mean image"
    assert g16 < 1.5 * g32 + 0.2


# --------------------------------------------------------------------------------------------- DDP (gloo)
def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    spec = ModelSpec("mlp", 100, (1, 28, 28), 10)
    fast_path = FastPath("bf16")
    torch.manual_seed(0)
    G, D = (DDP(prepare_module(m, fast_path)) for m in build(spec))
    state = make_state(spec, G, D, lr_g=2e-4, lr_d=2e-4, beta1=0.5, world_size=world)
    step_fn = make_step_fn(state, fast_path)
    data = batches(spec, 4, 16, seed=10 + rank)  # each rank its own data and noise
    outs = run_steps(state, step_fn, data, seed=20 + rank)
    flat = torch.cat([p.detach().flatten() for p in list(G.parameters()) + list(D.parameters())])
    torch.save({"params": flat, "loss_d": [o["loss_d"] for o in outs], "images_seen": state.images_seen},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_with_the_fast_path_keeps_ranks_identical(tmp_path):
    """Two gloo processes, different data and noise per rank, bf16 fast step: gradients are all-reduced every
    step, so the weights stay identical across ranks although their losses differ."""
    mp.start_processes(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["loss_d"] != r1["loss_d"], "ranks saw different batches"
    assert torch.equal(r0["params"], r1["params"]), "DDP kept the ranks' weights identical"
    assert r0["images_seen"] == 4 * 16 * 2


# ----------------------------------------------------------------------------------------------- CUDA only
@cuda
@pytest.mark.parametrize("arch,cond,d_steps", [("mlp", False, 1), ("mlp", True, 2), ("dcgan", False, 1)])
def test_cuda_graph_step_matches_eager(arch, cond, d_steps, monkeypatch):
    """fp32 (no TF32): the graphed step replays the same kernels and the same random numbers as eager steps."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)  # same convolution algorithms both sides
    spec = ModelSpec(arch, 100, (1, 28, 28), 10 if cond else 0)
    data = batches(spec, 12, 64, device="cuda")
    graph_path = FastPath("fp32", cuda_graph=True, channels_last=arch == "dcgan")
    eager_path = FastPath("fp32", channels_last=arch == "dcgan")
    g = new_state(spec, device="cuda", fast=graph_path, d_steps=d_steps)
    e = new_state(spec, device="cuda", fast=eager_path, d_steps=d_steps)
    graph_step = FastStep(g, graph_path)
    outs_g = run_steps(g, graph_step, data)
    assert all(v.graph is not None for k, v in graph_step.variants.items() if d_steps > 1 or k), "captured"
    outs_e = run_steps(e, FastStep(e, eager_path), data)
    assert_same_training(g, e, outs_g, outs_e, atol=2e-4, rtol=2e-3)


@cuda
def test_cuda_graph_bf16_dcgan_64_trains_and_round_trips_a_checkpoint(tmp_path):
    spec = ModelSpec("dcgan", 100, (1, 64, 64))
    fast = resolve("auto", "auto", False, arch="dcgan", device="cuda")
    assert fast.cuda_graph and fast.channels_last
    state = new_state(spec, device="cuda", fast=fast)
    data = batches(spec, 10, 128, device="cuda")
    outs = run_steps(state, make_step_fn(state, fast), data)
    assert all(torch.isfinite(torch.tensor(list(o.values()))).all() for o in outs)
    ckpt_io.save(tmp_path / "ck", state, epoch=1, config={})
    # a fresh state (as after a resume) continues from the file, graph re-captured over the restored tensors
    resumed = new_state(spec, device="cuda", fast=fast, seed=5)
    _, sd = ckpt_io.load(tmp_path / "ck", map_location="cuda")
    ckpt_io.load_state_dict(resumed, sd)
    for a, b in zip(resumed.G.parameters(), state.G.parameters()):
        assert torch.equal(a, b)
    more = run_steps(resumed, make_step_fn(resumed, fast), data[:6])
    assert resumed.step == 16 and all(torch.isfinite(torch.tensor(o["loss_d"])) for o in more)


@cuda
def test_cuda_graph_resumes_a_checkpoint_from_a_non_capturable_run(tmp_path):
    spec = ModelSpec("mlp", 100, (1, 28, 28))
    data = batches(spec, 4, 64, device="cuda")
    plain = new_state(spec, device="cuda")  # eager, capturable=False: Adam's step counters on the CPU
    run_steps(plain, train_step, data)
    ckpt_io.save(tmp_path / "ck", plain, epoch=1, config={})
    fast = FastPath("fp32", cuda_graph=True)
    state = new_state(spec, device="cuda", fast=fast, seed=7)
    _, sd = ckpt_io.load(tmp_path / "ck", map_location="cuda")  # RNG states too: they must go back as CPU tensors
    ckpt_io.load_state_dict(state, sd)
    for mine, theirs in ((state.G, plain.G), (state.D, plain.D), (state.G_ema, plain.G_ema)):
        assert all(torch.equal(a, b) for a, b in zip(mine.state_dict().values(), theirs.state_dict().values()))
    assert all(g["capturable"] for g in state.opt_g.param_groups)  # this run's setting, not the file's
    outs = run_steps(state, FastStep(state, fast), data * 2)
    assert state.step == 12 and all(o["loss_d"] == o["loss_d"] for o in outs)


@cuda
@pytest.mark.slow
def test_compile_with_cuda_graph_matches_eager():
    spec = ModelSpec("mlp", 100, (1, 28, 28))
    data = batches(spec, 8, 256, device="cuda")
    path = FastPath("fp32", cuda_graph=True, compile=True)
    c = new_state(spec, device="cuda", fast=path)
    e = new_state(spec, device="cuda", fast=FastPath("fp32", cuda_graph=True))
    assert_same_training(c, e, run_steps(c, FastStep(c, path), data),
                         run_steps(e, FastStep(e, FastPath("fp32", cuda_graph=True)), data), atol=1e-3, rtol=1e-2)


@cuda
def test_epoch_loop_on_a_gpu_resident_dataset_with_the_graph():
    data = load_dataset("digits").to("cuda")
    spec = ModelSpec("mlp", 100, data.shape, 10)
    fast = resolve("auto", "auto", False, arch="mlp", device="cuda")
    state = new_state(spec, device="cuda", fast=fast)
    step_fn = make_step_fn(state, fast)
    assert isinstance(step_fn, FastStep)
    results = [run_epoch(state, data, epoch=e, rank=0, world_size=1, batch_size=64, seed=0, step_fn=step_fn)
               for e in (1, 2, 3)]
    assert state.step == 3 * (len(data) // 64)
    assert all(r.loss_d == r.loss_d and 0 < r.d_real < 1 for r in results)
    print("digits epoch images/s (GPU, graph):", [round(r.images / r.seconds) for r in results])
