"""`gan-ray generate`: ask a running `gan-ray serve` for images over HTTP and save the answer."""
from __future__ import annotations

import argparse

from gan_ray.cli.flags import labels_arg, positive_int
from gan_ray.core.errors import UserError

DEFAULT_URL = "http://127.0.0.1:8000"


def add_command(sub) -> None:
    p = sub.add_parser("generate", help="ask a running `gan-ray serve` for images over HTTP")
    p.add_argument("--url", default=DEFAULT_URL, help=f"server base URL (default: {DEFAULT_URL})")
    p.add_argument("--n", type=positive_int, default=16, help="number of images (1..256); with --text, writers "
                                                              "(1..64)")
    p.add_argument("--labels", default=None, help="comma-separated labels, one per image or one for all")
    p.add_argument("--text", default=None, help="digits and spaces (1..64 characters), written by --n writers, a "
                                               "line each (conditional models; not with --labels)")
    p.add_argument("--seed", type=int, default=None, help="same seed, same bytes (default: random, printed)")
    p.add_argument("--out", required=True, help="FILE.png (grid), FILE.npz (arrays) or FILE.json")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gan_ray.serve.client import format_for, generate, save

    fmt = format_for(args.out)
    if args.text is not None and args.labels is not None:
        raise UserError("give --text or --labels, not both")
    result = generate(args.url, n=args.n, labels=labels_arg(args.labels), seed=args.seed, format=fmt,
                      text=args.text)
    path = save(result, args.out)
    if args.text is not None:
        print(f"wrote {args.text!r} written by {args.n} writers to {path} (seed {result.seed})")
        return 0
    shown = ",".join(map(str, result.labels[:16])) + ("..." if len(result.labels) > 16 else "")
    print(f"wrote {args.n} images to {path} (seed {result.seed}, labels {shown})")
    return 0
