"""`gan-ray evaluate`: score a checkpoint, an exported model or a `.npz` of samples against held-out real data."""
from __future__ import annotations

import argparse
import json
import math
import sys
import zipfile
from pathlib import Path
from typing import Any

from gan_ray.cli.flags import positive_int
from gan_ray.core.config import DEFAULT_DATA_DIR
from gan_ray.core.errors import UserError

# What each number means, for the table.
READINGS = {
    "fd": ("fd_floor", "floor", "Frechet distance to held-out data; lower is better"),
    "fd_ratio": (None, "", "fd / floor: 1 = as close as real data gets"),
    "classifier_score": ("classifier_score_real", "real", "exp E[KL(p(y|x)||p(y))]; 1..classes, higher is better"),
    "precision": ("precision_real", "real", "share of samples that look real"),
    "recall": ("recall_real", "real", "share of real variety the samples cover"),
    "class_coverage": ("class_coverage_real", "real", "rarest class vs its real share; 0 = a class missing"),
    "label_accuracy": ("extractor_quality", "reader", "samples read as the label they were asked for"),
    "modes": ("modes_real", "real", "digit triples drawn, of 1000 (each channel read by the MNIST reader)"),
    "mode_kl": ("mode_kl_real", "real", "KL(triples || uniform), nats; 0 = every triple equally often"),
    "reader_confidence": ("reader_confidence_real", "real", "the MNIST reader's confidence in each channel's digit"),
}


def add_command(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="score a generator against the dataset's held-out images "
                                               "(Frechet distance, precision/recall, classifier score, ...)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a training checkpoint directory")
    src.add_argument("--model", help="an exported model directory")
    src.add_argument("--samples", help="a .npz as `gan-ray sample` writes it: images float32 [N,C,H,W] in [0,1] "
                                       "(or uint8), optional labels int64 [N] (-1 = none); all N are scored")
    p.add_argument("--dataset", default=None, help="dataset to compare with (default: the generator's own; "
                                                   "digits for --samples)")
    p.add_argument("--data-dir", default=None, help="where downloadable datasets live (default: the run's, "
                                                    f"else {DEFAULT_DATA_DIR})")
    p.add_argument("--n", type=positive_int, default=None, help="images to generate and score (default: 2000; "
                                                                "stacked-mnist: 26000, the mode-coverage protocol's)")
    p.add_argument("--seed", type=int, default=0, help="noise and split seed (default: 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--inception-weights", default=None, metavar="FILE",
                   help="also compute a real FID with torchvision Inception-v3 weights from this file "
                        "(.safetensors or tensors-only .pt; see the README section on a real FID)")
    p.set_defaults(func=run)


def load_samples(path: str) -> tuple[Any, Any]:
    """(images [N,C,H,W], labels [N] or None) from an .npz, with a one-line error for anything malformed."""
    import numpy as np
    import torch

    from gan_ray.eval.metrics import check_images

    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"--samples {p}: no such file")
    try:
        archive = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"--samples {p} is not a readable .npz file ({type(exc).__name__})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise UserError(f"--samples {p} is a single .npy array, not an .npz with an 'images' array")
    with archive:
        if "images" not in archive.files:
            raise UserError(f"--samples {p} has no 'images' array (found: {', '.join(archive.files) or 'nothing'})")
        try:
            images = archive["images"]
            labels = archive["labels"] if "labels" in archive.files else None
        except (ValueError, OSError, zipfile.BadZipFile) as exc:
            raise UserError(f"--samples {p}: cannot read its arrays ({str(exc).splitlines()[0][:120]})") from None
    if images.dtype.kind not in "fu" or (images.dtype.kind == "u" and images.dtype != np.uint8):
        raise UserError(f"--samples {p}: images must be float in [0, 1] or uint8, got {images.dtype}")
    imgs = check_images(torch.from_numpy(np.ascontiguousarray(images)), what=f"--samples {p.name} images")
    lab = None
    if labels is not None:
        if labels.dtype.kind not in "iu" or labels.shape != (imgs.shape[0],):
            raise UserError(f"--samples {p}: labels must be integers of shape [{imgs.shape[0]}], got "
                            f"{labels.dtype} {list(labels.shape)}")
        if labels.dtype.kind == "u" and labels.size and labels.max() > np.iinfo(np.int64).max:
            # would wrap to negative int64 and read as "no labels", silently dropping label accuracy
            raise UserError(f"--samples {p}: labels must be class indices, found {int(labels.max())}")
        if ((labels < 0) & (labels != -1)).any():
            raise UserError(f"--samples {p}: labels must be class indices (or all -1 for none), "
                            f"found {int(labels.min())}")
        if (labels >= 0).any() and (labels < 0).any():
            raise UserError(f"--samples {p}: labels mix -1 (none) with class labels")
        lab = torch.from_numpy(labels.astype(np.int64)) if (labels >= 0).all() else None
    return imgs, lab


def run(args: argparse.Namespace) -> int:
    from gan_ray.eval.metrics import evaluate_generator

    def log(msg: str) -> None:
        print(msg, file=sys.stderr)

    inception = None
    if args.inception_weights:  # a wrong file is found before minutes of scoring, not after
        from gan_ray.eval.metrics import load_inception

        inception = load_inception(args.inception_weights)
    if args.samples is not None:
        images, labels = load_samples(args.samples)
        dataset = args.dataset or "digits"
        _check_known_shape(dataset, tuple(images.shape[1:]))
        result = evaluate_generator((images, labels), dataset, seed=args.seed, data_dir=args.data_dir, log=log)
        source = f"samples {args.samples}"
    else:
        from gan_ray.core.model_dir import open_generator

        gen = open_generator(checkpoint=args.checkpoint, model=args.model)
        args.n = args.n or default_count(args.dataset or gen.info.get("dataset"))
        result = evaluate_generator(gen, args.dataset, n=args.n, seed=args.seed, data_dir=args.data_dir, log=log)
        source = f"checkpoint {args.checkpoint}" if args.checkpoint else f"model {args.model}"
        if inception is not None:
            images = gen.generate(args.n, seed=args.seed)  # the scored images again: same seed, same images
    if inception is not None:
        result["fid_inception"] = _inception(args, result, images, inception)
    result["source"] = source
    if args.json:
        print(json.dumps({k: _finite(v) for k, v in result.items()}, sort_keys=False))
    else:
        print(format_table(result))
    return 0


def default_count(dataset: str | None) -> int:
    """Images scored unless --n says: the mode-coverage protocol's 26,000 where a reader counts modes, else 2000."""
    from gan_ray.eval.features import CHANNEL_READERS
    from gan_ray.eval.modes import MODE_SAMPLES

    return MODE_SAMPLES if dataset in CHANNEL_READERS else 2000


def _check_known_shape(dataset: str, shape: tuple[int, ...]) -> None:
    """Reject samples of the wrong size before training or loading any extractor."""
    from gan_ray.core.data import KNOWN_SHAPES

    if dataset in KNOWN_SHAPES and tuple(KNOWN_SHAPES[dataset][0]) != shape:
        raise UserError(f"--samples images have shape {list(shape)} but {dataset} images are "
                        f"{list(KNOWN_SHAPES[dataset][0])}")


def _inception(args: argparse.Namespace, result: dict, images, net) -> float:
    """The optional Inception-v3 FID on the same images vs the held-out split."""
    from gan_ray.core.data import load_dataset, to_float
    from gan_ray.eval.metrics import inception_fd

    real = load_dataset(result["dataset"], "heldout", data_dir=args.data_dir or DEFAULT_DATA_DIR,
                        image_size=int(images.shape[-1]))
    return inception_fd(images, to_float(real.images), net)


def _finite(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _number(v: Any) -> str:
    return str(v) if isinstance(v, int) else f"{v:.3f}"


def format_table(r: dict[str, Any]) -> str:
    lines = [f"{r['source']}: {r['n']} images vs {r['reference_size']} held-out {r['dataset']} images "
             f"(seed {r['seed']}, {r['seconds']:.1f}s)",
             f"  {'metric':<18}{'value':>10}  {'beside it':<16}reading"]
    for key, (other, label, reading) in READINGS.items():
        value = r.get(key)
        if value is None:
            continue
        beside = f"{label} {_number(r[other])}" if other and r.get(other) is not None else ""
        lines.append(f"  {key:<18}{_number(value):>10}  {beside:<16}{reading}")
    if r.get("fid_inception") is not None:
        lines.append(f"  {'fid_inception':<18}{r['fid_inception']:>10.3f}  {'':<16}Inception-v3 FID (see caveats)")
    split = (f"FD over {r['fd_splits']} splits of {r['split_size']} vs {r['reference_size'] - r['split_size']} "
             "images")
    if r["extractor"] == "channels":
        lines.append(f"features: {r['feature_dim']}-d, the MNIST reader's penultimate layer on each channel (its "
                     f"held-out accuracy {r['extractor_quality']:.1%}); {split}")
        return "\n".join(lines)
    what = "held-out accuracy" if r["extractor"] == "classifier" else "held-out explained variance"
    lines.append(f"features: {r['feature_dim']}-d penultimate layer of the {r['dataset']} {r['extractor']} "
                 f"({what} {r['extractor_quality']:.1%}); {split}")
    if r["extractor"] != "classifier":
        lines.append("note: unlabelled data: features come from an autoencoder (pixel statistics, not classes); "
                     "classifier score, coverage and label accuracy are not available")
    return "\n".join(lines)
