"""The adversarial step made fast for GPUs: one CUDA graph per step, torch.compile, bf16 autocast, channels_last.

Pure PyTorch, no Ray. Small GANs on a GPU are bound by Python and kernel launches, not arithmetic: a step is a few
hundred tiny kernels. Capturing the whole step (D update, G update, EMA) in one CUDA graph replays them with one
launch. The fast path runs the very code of `gan_ray.core.step` (`d_update`, `g_update`, `ema_lerp`) through
`StepNets`, so it computes the same training; what changes is how it is launched:

- `cuda_graph`: static input buffers, Adam with `capturable=True` (its step counters live on the GPU), z and labels
  drawn by the graph-safe CUDA generator, the EMA weight written into a device scalar before each replay. One graph
  for the D-only step and one for D + G + EMA (used every `d_steps`-th step); the host keeps the counters.
- `compile`: G and D through `torch.compile` (fused elementwise kernels; combines with the graph).
- `precision`: `fp32` (strict: no TF32 anywhere), `tf32` (CUDA matmuls/convolutions), `bf16` (autocast bf16 on
  the forward passes; fp32 master weights, optimiser and losses).
- `channels_last` for the DCGAN convolutions on CUDA (what cuDNN's fastest kernels want).

`resolve` turns the config's `auto` values into a concrete choice per device; on CPU `auto` is exactly the eager
fp32 step (`train_step` itself), so the CPU path is unchanged.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn

from gan_ray.core.config import graph_mode
from gan_ray.core.errors import UserError
from gan_ray.core.step import (GANState, StepNets, d_update, ema_beta, ema_lerp, g_update, to_channels_last,
                               train_step, unwrap)

CONCRETE_PRECISIONS = ("fp32", "tf32", "bf16")


class StepFn(Protocol):
    def __call__(self, state: GANState, real: torch.Tensor, labels: torch.Tensor | None = None
                 ) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class FastPath:
    """A resolved choice of speed options for one worker (no `auto` left)."""

    precision: str = "fp32"  # fp32 | tf32 | bf16
    cuda_graph: bool = False
    compile: bool = False
    channels_last: bool = False
    compile_backend: str = "inductor"  # tests on CPU use "aot_eager" (same tracing, no C++ code generation)

    @property
    def is_plain(self) -> bool:
        """Nothing to do: the eager fp32 step (`train_step`) is the fast path."""
        return self.precision == "fp32" and not (self.cuda_graph or self.compile or self.channels_last)

    def describe(self) -> str:
        return (f"precision={self.precision} cuda_graph={'on' if self.cuda_graph else 'off'} "
                f"compile={'on' if self.compile else 'off'} channels_last={'on' if self.channels_last else 'off'}")

    def to_dict(self) -> dict[str, object]:
        return {"precision": self.precision, "cuda_graph": self.cuda_graph, "compile": self.compile,
                "channels_last": self.channels_last}


CONV_ARCHS = ("dcgan", "resnet")  # convolutional: bf16 and channels_last pay on a GPU


def _bf16_ok() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve(precision: str = "auto", cuda_graph: str | bool = "auto", compile: bool = False, *, arch: str,
            device: torch.device | str, world_size: int = 1, compile_backend: str = "inductor",
            eager_only: tuple[str, ...] = ()) -> FastPath:
    """The fastest path that stays correct on `device`, unless the flags ask for something specific.

    auto precision: fp32 on CPU; on a GPU bf16 for the convolutional archs (dcgan, resnet: where bf16 pays) and
    tf32 for the MLPs. bf16 on a CPU is opt-in (a recipe's `precision: bf16`): on CPUs with bf16 units (AMX,
    AVX512-BF16) oneDNN runs the convolutional step 1.6x faster than fp32; elsewhere it is emulated and slower.
    auto cuda_graph: on with one CUDA worker, off otherwise (DDP's gradient all-reduce is not captured) and off
    when a setting in `eager_only` is used (the stabilisers: never captured and checked on a GPU, so not offered).
    Asking for what cannot work (a graph on CPU, with DDP or a stabiliser, bf16 on a GPU without it) is a
    UserError.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    if precision == "auto":
        precision = ("bf16" if arch in CONV_ARCHS and _bf16_ok() else "tf32") if cuda else "fp32"
    if precision not in CONCRETE_PRECISIONS:
        raise UserError(f"unknown --precision {precision!r}; choose one of auto, {', '.join(CONCRETE_PRECISIONS)}")
    if precision == "bf16" and cuda and not _bf16_ok():
        raise UserError("--precision bf16 needs a GPU with bf16 support (Ampere or newer); use tf32 or fp32")
    mode = graph_mode(cuda_graph)
    if mode == "on" and not cuda:
        raise UserError("--cuda-graph on needs a CUDA GPU, but this worker runs on the CPU "
                        "(use --gpus-per-worker 1, or --cuda-graph auto)")
    if mode == "on" and world_size > 1:
        raise UserError(f"--cuda-graph on supports one worker only, got {world_size}: DDP's gradient all-reduce "
                        "is not captured (use --workers 1, or --cuda-graph auto)")
    if mode == "on" and eager_only:
        raise UserError(f"--cuda-graph on captures the plain step only; {', '.join(eager_only)} run(s) eagerly "
                        "(use --cuda-graph auto or off)")
    graph = mode == "on" or (mode == "auto" and cuda and world_size == 1 and not eager_only)
    # channels_last: cuDNN's fast layout; on a CPU, oneDNN's for bf16 convolutions (1.1x over NCHW; none in fp32).
    channels_last = (cuda or precision == "bf16") and arch in CONV_ARCHS
    return FastPath(precision, graph, bool(compile), channels_last=channels_last, compile_backend=compile_backend)


def resolve_for(cfg, device: torch.device | str, world_size: int) -> FastPath:
    """`resolve` for a TrainConfig (kept loose-typed so this module needs no config import at load)."""
    return resolve(cfg.precision, cfg.cuda_graph, cfg.compile, arch=cfg.arch, device=device, world_size=world_size,
                   eager_only=cfg.eager_only_settings())


def prepare_module(module: nn.Module, fast: FastPath) -> nn.Module:
    """Memory layout before DDP wraps the module (DDP's buckets follow the parameters' layout)."""
    return to_channels_last(module) if fast.channels_last else module


def apply_backend_flags(fast: FastPath, device: torch.device | str) -> None:
    """Process-wide math settings for the chosen precision (a Ray Train worker owns its process)."""
    if torch.device(device).type != "cuda":
        return  # CPU: fp32 math whatever tf32 says; bf16 is autocast, per forward
    tf32 = fast.precision in ("tf32", "bf16")  # under bf16 autocast, what stays fp32 may use TF32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if fast.channels_last:
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest convolution once


def step_nets(state: GANState, fast: FastPath, device_type: str) -> StepNets:
    """The callables the step runs through: compiled where asked, under bf16 autocast where asked."""
    G_plain, D_plain = unwrap(state.G), unwrap(state.D)
    G_train, D_train = state.G, state.D
    if fast.compile:
        comp = functools.partial(torch.compile, dynamic=False, backend=fast.compile_backend)
        cG, cD = comp(G_plain), comp(D_plain)
        # With one worker the trained module is the plain one: one compiled object, two shape specialisations.
        G_train = cG if state.G is G_plain else comp(state.G)
        D_train = cD if state.D is D_plain else comp(state.D)
        G_plain, D_plain = cG, cD
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    if fast.precision == "bf16":
        autocast = functools.partial(torch.autocast, device_type=device_type, dtype=torch.bfloat16)
    return StepNets(G_train, G_plain, D_train, D_plain, autocast)


def ensure_capturable(opt: torch.optim.Optimizer) -> None:
    """Adam whose step counters live on the GPU, as graph capture needs; also after loading a checkpoint written
    by a non-capturable optimiser (load_state_dict restores `capturable` from the file and `step` to the CPU)."""
    for group in opt.param_groups:
        group["capturable"] = True
        for p in group["params"]:
            st = opt.state.get(p)
            if st and "step" in st and st["step"].device != p.device:
                st["step"] = st["step"].to(p.device, torch.float32)


@dataclass
class _Variant:
    """One captured step shape: D only, or D + G + EMA."""

    warm: int = 0
    graph: "torch.cuda.CUDAGraph | None" = None
    out: dict[str, torch.Tensor] | None = None


class FastStep:
    """Callable like `train_step(state, real, labels)`, for one state. Build it after any checkpoint was loaded
    into the state: a captured graph keeps pointing at the tensors it saw (optimiser state included)."""

    def __init__(self, state: GANState, fast: FastPath, *, warmup: int = 3):
        self.state, self.fast, self.warmup = state, fast, warmup
        self.device = next(unwrap(state.D).parameters()).device
        if fast.cuda_graph:
            if self.device.type != "cuda":
                raise UserError("--cuda-graph on needs a CUDA GPU; this state lives on the CPU")
            if state.world_size > 1:
                raise UserError("--cuda-graph on supports one worker only (DDP's all-reduce is not captured)")
            ensure_capturable(state.opt_g)
            ensure_capturable(state.opt_d)
        apply_backend_flags(fast, self.device)
        self.nets = step_nets(state, fast, self.device.type)
        self.variants = {False: _Variant(), True: _Variant()}
        self.static_real: torch.Tensor | None = None
        self.static_labels: torch.Tensor | None = None
        self.ema_weight = torch.zeros((), device=self.device)
        self.pool = None

    def _layout(self, real: torch.Tensor) -> torch.Tensor:
        if self.fast.channels_last and real.dim() == 4:
            return real.contiguous(memory_format=torch.channels_last)
        return real

    def __call__(self, state: GANState, real: torch.Tensor, labels: torch.Tensor | None = None
                 ) -> dict[str, torch.Tensor]:
        if state is not self.state:
            raise ValueError("a FastStep serves the state it was built for")
        if not self.fast.cuda_graph:
            return train_step(state, self._layout(real), labels, self.nets)
        return self._graphed(state, real, labels)

    # ------------------------------------------------------------------------------------------ CUDA graph
    def _body(self, state: GANState, do_g: bool) -> dict[str, torch.Tensor]:
        """What a graph captures: `train_step`'s math on the static buffers (the host does the counters)."""
        conditional = state.spec.condition_count > 0
        real = self.static_real
        out = d_update(state, real, self.static_labels if conditional else None, self.nets)
        if do_g:
            out["loss_g"] = g_update(state, real, self.static_labels if conditional else None, self.nets)
            if state.G_ema is not None:
                ema_lerp(state, self.ema_weight)
        return out

    def _graphed(self, state: GANState, real: torch.Tensor, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        conditional = state.spec.condition_count > 0
        if conditional and labels is None:
            raise ValueError("conditional model needs labels")
        if self.static_real is None:
            fmt = torch.channels_last if self.fast.channels_last and real.dim() == 4 else torch.contiguous_format
            self.static_real = torch.empty_like(real, device=self.device, memory_format=fmt)
            if conditional:
                self.static_labels = torch.empty_like(labels, device=self.device)
        if real.shape != self.static_real.shape:
            raise ValueError(f"a CUDA graph replays one batch shape: got {tuple(real.shape)}, captured "
                             f"{tuple(self.static_real.shape)} (use full batches)")
        # Counters exactly as train_step keeps them; the EMA weight goes to the device before the replay.
        n = real.shape[0]
        state.step += 1
        state.images_seen += n * state.world_size
        do_g = state.step % state.d_steps == 0
        if do_g and state.G_ema is not None:
            self.ema_weight.fill_(1.0 - ema_beta(state, n * state.world_size * state.d_steps))
        self.static_real.copy_(real, non_blocking=True)
        if conditional:
            self.static_labels.copy_(labels, non_blocking=True)
        v = self.variants[do_g]
        if v.graph is None:
            if v.warm < self.warmup:  # real steps, eagerly, on a side stream (lazy state, cuBLAS, autotuning)
                v.warm += 1
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    out = self._body(state, do_g)
                torch.cuda.current_stream(self.device).wait_stream(side)
                return out
            self._capture(state, v, do_g)
        v.graph.replay()
        return v.out

    def _capture(self, state: GANState, v: _Variant, do_g: bool) -> None:
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls from other threads of the process (Ray's) don't invalidate the capture.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = self._body(state, do_g)
        self.pool = graph.pool()  # the D-only and the D+G graphs never run at once: one memory pool
        v.graph, v.out = graph, out


def make_step_fn(state: GANState, fast: FastPath) -> StepFn:
    """`train_step` when nothing is to be gained, else a FastStep bound to `state`."""
    if fast.is_plain:
        return train_step
    return FastStep(state, fast)
