"""Files of a run directory that are not checkpoints: metrics.jsonl, and the dataset description checks.

Ray-free so the CLI, the driver and tests share them.
"""
from __future__ import annotations

import json
from pathlib import Path

from gan_ray.config import TrainConfig
from gan_ray.errors import UserError

METRICS_FILE = "metrics.jsonl"

# Shapes, class counts and sizes (train + held out) of the built-in datasets, known without downloading them.
KNOWN_SHAPES = {"digits": ((1, 28, 28), 10), "mnist": ((1, 28, 28), 10), "fashion-mnist": ((1, 28, 28), 10),
                "cifar10": ((3, 32, 32), 10)}
KNOWN_TRAIN_IMAGES = {"mnist": 60_000, "fashion-mnist": 60_000, "cifar10": 50_000}  # their own test sets are held out
DIGITS_IMAGES = 1797  # scikit-learn's digits, split here into train and held out


def describe_dataset(cfg: TrainConfig) -> tuple[tuple[int, int, int], int]:
    """(image shape, number of classes) of the configured dataset; checks it can be trained as configured."""
    from gan_ray.data import IMAGE_SUFFIXES, folder_files, folder_mode, train_count, validate_dataset_name

    validate_dataset_name(cfg.dataset)
    if cfg.dataset in KNOWN_SHAPES:
        shape, k = KNOWN_SHAPES[cfg.dataset]
        n_train = KNOWN_TRAIN_IMAGES.get(cfg.dataset) or train_count(DIGITS_IMAGES)
    else:
        files, k = folder_files(Path(cfg.dataset[len("folder:"):]).expanduser())
        if not files:
            raise UserError(f"--dataset {cfg.dataset}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
        shape = (1 if folder_mode(files) == "L" else 3, cfg.image_size, cfg.image_size)
        n_train = train_count(len(files))
    if cfg.conditional and k == 0:
        raise UserError(f"--conditional needs labelled data; {cfg.dataset} has no class sub-folders")
    if cfg.arch == "dcgan" and shape[1] not in (28, 32, 64):
        raise UserError(f"--arch dcgan supports 28, 32 or 64 pixel images, got {shape[1]} (set --image-size)")
    check_batch_fits(n_train, cfg.workers, cfg.batch_size)
    return shape, k


def check_batch_fits(n_train: int, workers: int, batch_size: int) -> None:
    """Refuse a run whose epochs would hold no step: each worker trains on full batches of its share only."""
    share = n_train // workers
    if share < batch_size:
        raise UserError(f"--batch-size {batch_size} is larger than each worker's share of the training images "
                        f"({n_train} / {workers} workers = {share}): no step could run; lower --batch-size or "
                        "--workers")


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(path: Path, last_epoch: int) -> None:
    """Drop rows after `last_epoch`: after a failure those epochs are trained again from the checkpoint."""
    if not path.exists():
        return
    rows = read_metrics(path)
    kept = [r for r in rows if r.get("epoch", 0) <= last_epoch]
    if len(kept) != len(rows):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(path)


def format_progress(row: dict, total_epochs: int) -> str:
    """One console line per epoch."""
    parts = [f"epoch {row['epoch']:>3}/{total_epochs}", f"step {row['step']:>6}",
             f"loss_d {row['loss_d']:.3f}", f"loss_g {row['loss_g']:.3f}",
             f"D(x) {row['d_real']:.2f}", f"D(G(z)) {row['d_fake']:.2f}",
             f"{row['images_per_s']:,.0f} img/s", f"{row.get('wall_s', 0):.1f}s"]
    for key in ("fd", "fd_ratio", "class_coverage", "label_accuracy"):
        if key in row:
            parts.append(f"{key} {row[key]:.3g}")
    return "  ".join(parts)
