"""`gan-ray` command line: argument parsing and error reporting only; the work lives in the modules it calls.

User errors (bad flags, files, paths) print one line and exit with code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import fields
from typing import Any, Sequence

from gan_ray.config import TrainConfig, field_types
from gan_ray.errors import UserError, one_line


class Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line (exit 2) like every other user error."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{message} (see {self.prog} --help)")


def add_train_flags(p: argparse.ArgumentParser, *, exclude: Sequence[str] = (), as_strings: bool = False) -> None:
    """One flag per TrainConfig field. Defaults are suppressed so only flags actually given override the file.

    `as_strings` keeps values as typed text (sweeps parse ranges like `1e-5:1e-2` from them).
    """
    types = field_types()
    for f in fields(TrainConfig):
        if f.name in exclude:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} (default: {f.default})"
        if types[f.name] is bool and not as_strings:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            choices = None if as_strings else f.metadata.get("choices")
            const = None if as_strings else f.metadata.get("const")
            extra = {"nargs": "?", "const": const} if const is not None else {}
            p.add_argument(flag, type=str if as_strings else types[f.name], choices=choices,
                           default=argparse.SUPPRESS, help=help_text, metavar=f.name.upper(), **extra)


def given_train_values(args: argparse.Namespace) -> dict[str, Any]:
    names = {f.name for f in fields(TrainConfig)}
    return {k: v for k, v in vars(args).items() if k in names}


def resolve_train_config(args: argparse.Namespace) -> TrainConfig:
    from gan_ray.config import load_yaml, resolve

    file_values = load_yaml(args.config) if getattr(args, "config", None) else None
    return resolve(file_values, given_train_values(args))


# ------------------------------------------------------------------------------------------------- commands
def cmd_train(args: argparse.Namespace) -> int:
    from gan_ray.ray_train import fit
    from gan_ray.train_cli import report_result

    from gan_ray.run_files import describe_dataset

    cfg = resolve_train_config(args)
    describe_dataset(cfg)  # refuse bad data before preparing evaluation (which may train a feature extractor)
    result = fit(cfg, address=args.address, hooks=_train_hooks(cfg))
    return report_result(cfg, result)


def _train_hooks(cfg: TrainConfig) -> list:
    from gan_ray.train_eval import hooks_for

    return hooks_for(cfg)


def cmd_sample(args: argparse.Namespace) -> int:
    from gan_ray.images import save_samples
    from gan_ray.sources import open_generator

    gen = open_generator(checkpoint=args.checkpoint, model=args.model)
    labels = parse_int_list(args.labels, "--labels") if args.labels is not None else None
    if not args.out.lower().endswith((".npz", ".png")):
        raise UserError(f"--out must end in .npz or .png, got {args.out!r}")
    images, lab = gen.generate_with_labels(args.n, labels, seed=args.seed)
    path = save_samples(args.out, images, lab)
    print(f"wrote {args.n} samples to {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from gan_ray.registry import export
    from gan_ray.run_select import resolve_checkpoint

    checkpoint, why = resolve_checkpoint(args.checkpoint)  # a run directory -> its best checkpoint by fd
    out = export(checkpoint, args.out)
    print(f"exported {checkpoint} ({why}) -> {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gan_ray.demo import run_demo

    return run_demo(out_dir=args.out, address=args.address, workers=args.workers)


def cmd_bench(args: argparse.Namespace) -> int:
    from gan_ray.bench import run_bench

    return run_bench(args)


def parse_int_list(text: str, flag: str) -> list[int] | int:
    try:
        values = [int(x) for x in text.split(",") if x.strip() != ""]
    except ValueError:
        raise UserError(f"{flag} expects comma-separated integers, got {text!r}") from None
    if not values:
        raise UserError(f"{flag} is empty")
    return values


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


# -------------------------------------------------------------------------------------------------- parser
# Modules that add their own sub-commands: each exposes `add_commands(subparsers)` and must import no Ray at
# module level (parsing `--help` should stay fast).
COMMAND_MODULES = ("gan_ray.eval_cli", "gan_ray.tune_cli", "gan_ray.serve_cli", "gan_ray.jobs_cli")


def build_parser() -> Parser:
    parser = Parser(prog="gan-ray", description="GANs trained, swept and served on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("train", help="train (or resume) a GAN data-parallel on Ray Train")
    p.add_argument("--config", help="YAML file of flag: value (command-line flags override it)")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else start one)")
    add_train_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="write generated images as .npz or a .png grid")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a training checkpoint directory")
    src.add_argument("--model", help="an exported model directory")
    p.add_argument("--n", type=positive_int, default=64, help="number of images")
    p.add_argument("--labels", default=None, help="comma-separated class labels, one per image or one for all "
                                                 "(conditional models; default cycles 0..K-1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="FILE.npz or FILE.png")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("export", help="export a checkpoint's EMA generator as a model directory")
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint directory, or a run directory (then its best checkpoint by fd, else the latest)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="the main job on the embedded digits: train, export, sample")
    p.add_argument("--out", default="demo", help="output directory")
    p.add_argument("--address", default=None)
    p.add_argument("--workers", type=positive_int, default=2)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="images/s inside a Ray Train worker vs a plain PyTorch loop")
    from gan_ray.bench import add_bench_args

    add_bench_args(p)
    p.set_defaults(func=cmd_bench)

    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except UserError as exc:
        cmd = f"gan-ray {sys.argv[1]}" if argv is None and len(sys.argv) > 1 else "gan-ray"
        print(f"{cmd}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
