"""Exported model directories: their file format, `export` (from a checkpoint) and `load_generator` (safe to load).
What sweeps hand to serving.

A model directory is self-contained and safe to load: `model.json` (architecture, latent size, classes, image
shape, dataset, metrics, source), `generator.safetensors` (the EMA generator's weights) and `samples.png`.

The sampling API of a loaded model is `gan_ray.core.generator.Generator`; its handwriting, `gan_ray.core.handwriting`.
"""
from __future__ import annotations

import errno
import json
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from gan_ray.core.errors import UserError, one_line
from gan_ray.core.generator import Generator
from gan_ray.core.locations import local_copy, uri
from gan_ray.core.models import ModelSpec, build_generator

MODEL_JSON = "model.json"
WEIGHTS = "generator.safetensors"
FORMAT = "gan-ray-model/1"


def export(checkpoint_dir: str | Path, out_dir: str | Path, *, extra: dict[str, Any] | None = None) -> Path:
    """Write a model directory from a training checkpoint. Atomic: the files are written to a temp dir of its own
    beside `out` and swapped in whole, so `out` is always a complete model (the old one or the new one), even with
    concurrent exports to the same place or a crash half-way."""
    from safetensors.torch import save_file

    from gan_ray.core.checkpoint import load_sampler
    from gan_ray.core.images import grid_png

    with local_copy(checkpoint_dir) as local:  # a checkpoint in object storage is downloaded first
        G, spec, meta = load_sampler(local)
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a model directory; refusing to overwrite it")
    if out.exists() and not (out / MODEL_JSON).is_file() and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not a gan-ray model directory; refusing to overwrite it")
    cfg = meta.get("config", {})
    info = {
        "format": FORMAT,
        **spec.to_dict(),
        "dataset": cfg.get("dataset"),
        "loss": cfg.get("loss"),
        "ema": cfg.get("ema", True),
        "epoch": meta.get("epoch"),
        "metrics": meta.get("metrics", {}),
        "config": cfg,
        "source": {"checkpoint": uri(checkpoint_dir), "run": uri(cfg.get("storage", "."), cfg.get("name", ""))},
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise UserError(f"--out {out}: {exc.filename} is not a directory") from None
    tmp = _unique_sibling(out, "tmp")
    tmp.mkdir()  # exclusive, like tempfile.mkdtemp, but with the usual permissions (mkdtemp's are 0700)
    try:
        save_file({k: v.contiguous() for k, v in G.state_dict().items()}, str(tmp / WEIGHTS))
        (tmp / MODEL_JSON).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        gen = Generator(G, spec, info)
        n = 10 * spec.num_classes if spec.conditional else 64
        labels = (torch.arange(n) // 10) if spec.conditional else None  # one row per class
        (tmp / "samples.png").write_bytes(grid_png(gen.generate(n, labels, seed=0),
                                                   nrow=10 if spec.conditional else 8))
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already unless something failed
    return out


def _unique_sibling(out: Path, kind: str) -> Path:
    """A hidden name beside `out` that no other export uses (same filesystem, so renames stay atomic)."""
    return out.with_name(f".{out.name}.{secrets.token_hex(6)}.{kind}")


def _swap_in(new: Path, out: Path, attempts: int = 100) -> None:
    """Put directory `new` at `out`: the old model (if any) is renamed aside, `new` renamed in, the old one deleted.
    Every step is a rename, so `out` never holds a partial model. If a concurrent export lands its own model
    between the two renames, ours cannot overwrite it (rename refuses a non-empty target): move that one aside
    too and retry, so the last export to finish wins, complete."""
    asides: list[Path] = []
    try:
        for _ in range(attempts):
            aside = _unique_sibling(out, "old")
            try:
                out.rename(aside)
                asides.append(aside)
            except FileNotFoundError:
                pass
            try:
                new.rename(out)
                return
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    if asides:  # put the previous model back rather than leave no model at all
                        try:
                            asides[-1].rename(out)
                            asides.pop()
                        except OSError:
                            pass
                    raise
        raise UserError(f"--out {out}: could not replace it ({attempts} concurrent exports kept replacing it)")
    finally:
        for aside in asides:
            shutil.rmtree(aside, ignore_errors=True)


def load_generator(model_dir: str | Path, device: str | torch.device = "cpu") -> Generator:
    """Load an exported model directory (safetensors only: nothing is unpickled)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(model_dir).expanduser()
    if not d.is_dir():
        raise UserError(f"model directory not found: {d}")
    if not (d / MODEL_JSON).is_file() or not (d / WEIGHTS).is_file():
        raise UserError(f"{d} is not a gan-ray model directory (expected {MODEL_JSON} and {WEIGHTS})")
    try:
        info = json.loads((d / MODEL_JSON).read_text())
        if not isinstance(info, dict):
            raise ValueError(f"expected a JSON object, got {type(info).__name__}")
        if info.get("format") != FORMAT:
            raise ValueError(f"format is {info.get('format')!r}; this gan-ray reads {FORMAT!r}")
        spec = ModelSpec.from_dict(info)
        net = build_generator(spec)  # an architecture that cannot be built from these sizes is malformed too
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, RuntimeError,
            MemoryError) as exc:
        raise UserError(f"{d / MODEL_JSON} is malformed: {one_line(exc, 300)}") from None
    try:
        net.load_state_dict(load_file(str(d / WEIGHTS)))
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise UserError(f"{d / WEIGHTS} does not hold this model's weights: {str(exc).splitlines()[0][:200]}") from None
    return Generator(net, spec, info, device)


def open_generator(*, checkpoint: str | None = None, model: str | None = None, device: str = "cpu") -> Generator:
    """A Generator from either a training checkpoint or an exported model directory (exactly one of them)."""
    if (checkpoint is None) == (model is None):
        raise UserError("give exactly one of --checkpoint or --model")
    if model is not None:
        return load_generator(model, device)
    from gan_ray.core.checkpoint import load_sampler

    net, spec, meta = load_sampler(checkpoint, map_location=device)
    return Generator(net, spec, {**spec.to_dict(), "dataset": meta.get("config", {}).get("dataset"),
                                 "metrics": meta.get("metrics", {}), "epoch": meta.get("epoch")}, device)
