"""A run directory: its config.json, its metrics.jsonl and its checkpoints (which one is latest, which is best).

Ray Train writes the checkpoint directories (`checkpoint_*`, each a `gan_ray.core.checkpoint`); the worker loop
appends one metrics row per epoch. Everything here only reads and writes files, so the CLI (`export RUN_DIR`
without a cluster), the driver and the tests share it. A run directory is a location (gan_ray.core.locations): a
local path or shared mount (given as a Path), or an object-store URI (`--storage s3://bucket/runs`, a string).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from gan_ray.core import locations
from gan_ray.core.checkpoint import CONFIG_FILE, STATE_FILE
from gan_ray.core.config import TrainConfig
from gan_ray.core.errors import UserError
from gan_ray.core.locations import join

METRICS_FILE = "metrics.jsonl"
RUN_CONFIG = "config.json"  # the resolved TrainConfig of the run (each checkpoint holds its own copy too)
# What must match for a re-used run directory to resume: its checkpoints could not be loaded otherwise.
IDENTITY_KEYS = ("dataset", "arch", "conditional", "latent_dim", "image_size", "clusters")
IDENTITY_DEFAULTS = {"clusters": 0}  # what a run saved before the key existed trained with


# ---------------------------------------------------------------------------------------------- config.json
def check_compatible(cfg: TrainConfig) -> None:
    """A re-used run directory must hold the same model and data."""
    locations.check_bucket(cfg.run_dir, "write runs to")
    try:
        saved = locations.read_bytes(join(cfg.run_dir, RUN_CONFIG))
    except OSError as exc:
        raise locations.storage_error(cfg.run_dir, exc, "read the run at") from None
    if saved is not None:
        old = json.loads(saved)
        for key in IDENTITY_KEYS:
            was = old.get(key, IDENTITY_DEFAULTS.get(key))
            if was != getattr(cfg, key):
                raise UserError(f"run {cfg.run_dir} was trained with {key}={was!r}; cannot resume it with "
                                f"{key}={getattr(cfg, key)!r} (use another --name)")


def prepare_run_dir(cfg: TrainConfig) -> None:
    """Create the run directory and save the resolved config (call after `check_compatible` passed)."""
    text = json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n"
    try:
        locations.write_bytes(join(cfg.run_dir, RUN_CONFIG), text.encode())
    except OSError as exc:
        raise locations.storage_error(cfg.run_dir, exc, "write the run at") from None


# -------------------------------------------------------------------------------------------- metrics.jsonl
def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl (a path or URI); [] when there is none."""
    data = locations.read_bytes(path)
    if data is None:
        return []
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


def append_metrics(path: str | Path, row: dict[str, Any]) -> None:
    """One epoch's row (rank 0 only: one writer)."""
    locations.append_bytes(path, (json.dumps(row) + "\n").encode())


def truncate_metrics(path: str | Path, last_epoch: int) -> None:
    """Drop rows after `last_epoch`: after a failure those epochs are trained again from the checkpoint."""
    rows = read_metrics(path)
    kept = [r for r in rows if r.get("epoch", 0) <= last_epoch]
    if len(kept) != len(rows):
        locations.write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept).encode())


def stop_reason(run_dir: str | Path) -> str | None:
    """Why the run stopped early (--stop-on-collapse), from its last metrics row; None if it did not."""
    rows = read_metrics(join(run_dir, METRICS_FILE))
    return rows[-1].get("stopped") if rows else None


def format_progress(row: dict, total_epochs: int) -> str:
    """One console line per epoch."""
    parts = [f"epoch {row['epoch']:>3}/{total_epochs}", f"step {row['step']:>6}",
             f"loss_d {row['loss_d']:.3f}", f"loss_g {row['loss_g']:.3f}",
             f"D(x) {row['d_real']:.2f}", f"D(G(z)) {row['d_fake']:.2f}",
             f"{row['images_per_s']:,.0f} img/s", f"{row.get('wall_s', 0):.1f}s"]
    for key in ("fd", "fd_ratio", "class_coverage", "label_accuracy", "modes", "mode_kl", "reader_confidence"):
        if key in row:
            parts.append(f"{key} {row[key]:.3g}")
    return "  ".join(parts)


# ---------------------------------------------------------------------------------------------- checkpoints
# Ray Train's list of the checkpoints it registered (written by its controller after each report).
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


def registered_checkpoints(run_dir: str | Path) -> set[str] | None:
    """Names of the checkpoint directories Ray Train registered for the run; None when it kept no list (a run
    directory copied without it) or the list cannot be read.

    A worker uploads its checkpoint before the controller registers it. A run stopped (or killed) in between leaves
    a complete directory that Ray will not resume from, so what a resume will use is Ray's list, not the directory
    listing."""
    try:
        snapshot = json.loads(locations.read_bytes(join(run_dir, RAY_SNAPSHOT)) or b"")
        return {str(r["checkpoint_dir_name"]) for r in snapshot["checkpoint_results"]}
    except (OSError, ValueError, TypeError, KeyError):
        return None


def checkpoints(run_dir: str | Path) -> list[tuple[str | Path, dict[str, Any]]]:
    """(directory, config.json contents) of every readable checkpoint of a run that a resume would know about (Ray
    Train's registered ones, `registered_checkpoints`), oldest epoch first."""
    found = []
    registered = registered_checkpoints(run_dir)
    run_dir = Path(run_dir).expanduser() if isinstance(run_dir, Path) else run_dir
    for name in sorted(locations.list_dir(run_dir)):
        if not name.startswith("checkpoint_") or (registered is not None and name not in registered):
            continue
        directory = join(run_dir, name)
        try:
            meta = json.loads(locations.read_bytes(join(directory, CONFIG_FILE)) or b"")
            int(meta.get("epoch", -1))
            if not locations.exists(join(directory, STATE_FILE)):
                continue
        except (ValueError, TypeError, AttributeError, OSError):
            continue
        found.append((directory, meta))
    return sorted(found, key=lambda item: (int(item[1].get("epoch", -1)), str(item[0])))


def latest_checkpoint(run_dir: str | Path) -> str | Path | None:
    """The newest checkpoint directory of a run (by epoch), or None."""
    found = checkpoints(run_dir)
    return found[-1][0] if found else None


def finished_epochs(run_dir: str | Path) -> int:
    """Epochs a resume continues from: those of the newest checkpoint Ray Train registered. 0 when it registered
    none: Ray starts a run without its list from scratch, whatever directories are there."""
    if registered_checkpoints(run_dir) is None:
        return 0
    found = checkpoints(run_dir)
    return int(found[-1][1]["epoch"]) if found else 0


def _fd(meta: dict[str, Any]) -> float | None:
    value = (meta.get("metrics") or {}).get("fd")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def best_checkpoint(run_dir: str | Path) -> str | Path | None:
    """The checkpoint with the lowest fd (the later one on a tie); the latest when none recorded fd; None when the
    run has no checkpoint."""
    return select(run_dir)[0]


def select(run_dir: str | Path) -> tuple[str | Path | None, str]:
    """(checkpoint, why it was chosen): the best by `fd` (recorded at each checkpoint by the training hook), else
    the latest."""
    found = checkpoints(run_dir)
    if not found:
        return None, "no checkpoints"
    scored = [(fd, int(meta["epoch"]), path) for path, meta in found if (fd := _fd(meta)) is not None]
    if scored:
        fd, epoch, path = min(scored, key=lambda t: (t[0], -t[1]))
        return path, f"best fd {fd:.4g} (epoch {epoch}) of {len(scored)} scored checkpoint(s)"
    path, meta = found[-1]
    return path, f"latest (epoch {meta['epoch']}; no checkpoint recorded fd)"


def resolve_checkpoint(path: str | Path) -> tuple[str | Path, str]:
    """A checkpoint directory as given, or a run directory's best checkpoint (a Path, or a URI for one in object
    storage); a clear error otherwise."""
    p: str | Path = path if locations.is_remote(path) else Path(path).expanduser()
    try:
        if locations.exists(join(p, STATE_FILE)):
            return p, "as given"
        if locations.is_dir(p):
            chosen, why = select(p)
            if chosen is not None:
                return chosen, why
            raise UserError(f"{p} is neither a checkpoint nor a run directory with checkpoints")
    except OSError as exc:
        raise locations.storage_error(p, exc, "read") from None
    raise UserError(f"checkpoint not found: {p}")
