"""Pick a run's checkpoint: the best by `fd` (recorded at each checkpoint by the training hook), else the latest.

Ray-free: reads only each checkpoint's config.json, so `gan-ray export RUN_DIR` works without a cluster.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from gan_ray.checkpoint import CONFIG_FILE, STATE_FILE
from gan_ray.errors import UserError


def checkpoints(run_dir: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """(directory, config.json contents) of every readable checkpoint of a run, oldest epoch first."""
    found = []
    for meta_file in Path(run_dir).expanduser().glob("checkpoint_*/" + CONFIG_FILE):
        if not (meta_file.parent / STATE_FILE).is_file():
            continue
        try:
            meta = json.loads(meta_file.read_text())
            int(meta.get("epoch", -1))
        except (ValueError, TypeError, json.JSONDecodeError, OSError):
            continue
        found.append((meta_file.parent, meta))
    return sorted(found, key=lambda item: (int(item[1].get("epoch", -1)), item[0].name))


def _fd(meta: dict[str, Any]) -> float | None:
    value = (meta.get("metrics") or {}).get("fd")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def best_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint with the lowest fd (the later one on a tie); the latest when none recorded fd; None when the
    run has no checkpoint."""
    return select(run_dir)[0]


def select(run_dir: str | Path) -> tuple[Path | None, str]:
    """(checkpoint, why it was chosen)."""
    found = checkpoints(run_dir)
    if not found:
        return None, "no checkpoints"
    scored = [(fd, int(meta["epoch"]), path) for path, meta in found if (fd := _fd(meta)) is not None]
    if scored:
        fd, epoch, path = min(scored, key=lambda t: (t[0], -t[1]))
        return path, f"best fd {fd:.4g} (epoch {epoch}) of {len(scored)} scored checkpoint(s)"
    path, meta = found[-1]
    return path, f"latest (epoch {meta['epoch']}; no checkpoint recorded fd)"


def resolve_checkpoint(path: str | Path) -> tuple[Path, str]:
    """A checkpoint directory as given, or a run directory's best checkpoint; a clear error otherwise."""
    p = Path(path).expanduser()
    if (p / STATE_FILE).is_file():
        return p, "as given"
    if p.is_dir():
        chosen, why = select(p)
        if chosen is not None:
            return chosen, why
        raise UserError(f"{p} is neither a checkpoint nor a run directory with checkpoints")
    raise UserError(f"checkpoint not found: {p}")
