"""Full resumable training state as plain tensors: no pickled modules, loadable with `weights_only=True`.

A checkpoint directory holds `state.pt` (state_dicts of G, D, G-EMA and both optimisers, counters, RNG state)
and `config.json` (the resolved TrainConfig plus the ModelSpec), so it can be rebuilt, sampled and exported
without the command that made it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from gan_ray.core.errors import UserError
from gan_ray.core.models import ModelSpec
from gan_ray.core.step import GANState, unwrap

STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
FORMAT = "gan-ray-checkpoint/1"


def state_dict(state: GANState, *, epoch: int) -> dict[str, Any]:
    """Everything needed to continue training bit-for-bit (RNG included), as tensors and plain values."""
    return {
        "format": FORMAT,
        "epoch": epoch,
        "step": state.step,
        "images_seen": state.images_seen,
        "G": unwrap(state.G).state_dict(),
        "D": unwrap(state.D).state_dict(),
        "G_ema": state.G_ema.state_dict() if state.G_ema is not None else None,
        "opt_g": state.opt_g.state_dict(),
        "opt_d": state.opt_d.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        # --clusters: the k-means centres the run's images were assigned with (a resume must not re-cluster)
        "cluster_centres": state.extra.get("cluster_centres"),
    }


def load_state_dict(state: GANState, sd: dict[str, Any], *, restore_rng: bool = True) -> int:
    """Restore a GANState in place; returns the epoch the checkpoint finished."""
    unwrap(state.G).load_state_dict(sd["G"])
    unwrap(state.D).load_state_dict(sd["D"])
    if state.G_ema is not None:
        state.G_ema.load_state_dict(sd["G_ema"] if sd["G_ema"] is not None else sd["G"])
    load_optimizer(state.opt_g, sd["opt_g"])
    load_optimizer(state.opt_d, sd["opt_d"])
    if sd.get("cluster_centres") is not None:
        state.extra["cluster_centres"] = sd["cluster_centres"].cpu()
    state.step = int(sd["step"])
    state.images_seen = int(sd["images_seen"])
    if restore_rng:  # RNG states are CPU byte tensors, wherever the checkpoint was mapped
        torch.set_rng_state(sd["rng_cpu"].cpu())
        if sd.get("rng_cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(sd["rng_cuda"].cpu())
    return int(sd["epoch"])


def load_optimizer(opt: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    """Load an optimiser's state but keep its own `capturable` setting: the file holds its writer's, and a CUDA-graph
    run's checkpoint must also resume eagerly (on CPU, or on a GPU with --cuda-graph off). Step counters go where
    the setting needs them: on the parameter's device when capturable, else on the CPU."""
    capturable = [group.get("capturable", False) for group in opt.param_groups]
    opt.load_state_dict(sd)
    for group, keep in zip(opt.param_groups, capturable):
        if "capturable" in group:
            group["capturable"] = keep
        for p in group["params"]:
            st = opt.state.get(p)
            if st and isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].to(p.device if keep else "cpu")


def save(directory: Path, state: GANState, *, epoch: int, config: dict[str, Any],
         metrics: dict[str, Any] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict(state, epoch=epoch), directory / STATE_FILE)
    meta = {"format": FORMAT, "epoch": epoch, "config": config, "spec": state.spec.to_dict(),
            "metrics": metrics or {}}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return directory


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The checkpoint's config.json, after checking that this really is a gan-ray checkpoint."""
    d = Path(directory).expanduser()
    if not d.exists():
        raise UserError(f"checkpoint not found: {d}")
    if not (d / STATE_FILE).is_file() or not (d / CONFIG_FILE).is_file():
        raise UserError(f"{d} is not a gan-ray checkpoint (expected {STATE_FILE} and {CONFIG_FILE})")
    try:
        meta = json.loads((d / CONFIG_FILE).read_text())
    except json.JSONDecodeError:
        raise UserError(f"{d / CONFIG_FILE} is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{d} is not a gan-ray checkpoint (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    return meta


def load(directory: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    """(meta, state dict) of a checkpoint directory; tensors only, never arbitrary pickles."""
    meta = read_meta(directory)
    try:
        sd = torch.load(Path(directory).expanduser() / STATE_FILE, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated file, foreign pickle refused by weights_only, ...
        raise UserError(f"cannot load {Path(directory) / STATE_FILE}: {str(exc).splitlines()[0][:200]}") from None
    return meta, sd


def load_sampler(directory: str | Path, map_location: str | torch.device = "cpu") -> tuple[torch.nn.Module, ModelSpec, dict]:
    """The generator to sample from (EMA weights when present), in eval mode, with its spec and meta."""
    from gan_ray.core.models import build_generator

    meta, sd = load(directory, map_location)
    spec = ModelSpec.from_dict(meta["spec"])
    G = build_generator(spec)
    G.load_state_dict(sd["G_ema"] if sd.get("G_ema") is not None else sd["G"])
    return G.eval().requires_grad_(False).to(map_location), spec, meta
