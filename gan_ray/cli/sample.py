"""`gan-ray sample`: write generated images from a checkpoint or an exported model as .npz arrays or a .png grid;
with --text, a string of digits written by --n writers, a line each (what the service's text requests return)."""
from __future__ import annotations

import argparse

from gan_ray.cli.flags import labels_arg, positive_int
from gan_ray.core.errors import UserError


def add_command(sub) -> None:
    p = sub.add_parser("sample", help="write generated images as .npz or a .png grid")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a training checkpoint directory")
    src.add_argument("--model", help="an exported model directory")
    p.add_argument("--n", type=positive_int, default=64, help="number of images; with --text, writers (1..64)")
    p.add_argument("--labels", default=None, help="comma-separated class labels, one per image or one for all "
                                                 "(conditional models; default cycles 0..K-1)")
    p.add_argument("--text", default=None, help="digits and spaces (1..64 characters), written by --n writers, a "
                                               "line each: one latent per writer (conditional models; not with "
                                               "--labels)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="FILE.npz or FILE.png")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gan_ray.core.images import save_samples
    from gan_ray.core.model_dir import open_generator
    from gan_ray.core.handwriting import text_line

    if not args.out.lower().endswith((".npz", ".png")):
        raise UserError(f"--out must end in .npz or .png, got {args.out!r}")
    if args.text is not None:
        if args.labels is not None:
            raise UserError("give --text or --labels, not both")
        text_line(args.text)  # a bad text fails before the model is loaded
        gen = open_generator(checkpoint=args.checkpoint, model=args.model)
        written = gen.write(args.text, args.n, seed=args.seed)
        path = save_samples(args.out, written.images, written.labels, text=args.text)
        print(f"wrote {args.text!r} written by {args.n} writers to {path}")
        return 0
    labels = labels_arg(args.labels)
    gen = open_generator(checkpoint=args.checkpoint, model=args.model)
    images, lab = gen.generate_with_labels(args.n, labels, seed=args.seed)
    path = save_samples(args.out, images, lab)
    print(f"wrote {args.n} samples to {path}")
    return 0
