"""`gan-ray`: the parser of every command, and `main`, which runs one and turns user errors into one line.

Each command lives in its own module (`gan_ray.cli.<command>`) with `add_command(subparsers)`; none imports Ray
at module level, so `--help` stays fast. User errors (bad flags, files, paths) print one line and exit with code
2, never a traceback.
"""
from __future__ import annotations

import sys
from typing import Sequence

from gan_ray.cli import bench, demo, evaluate, export, generate, prepare, sample, serve, submit, train, tune
from gan_ray.cluster.connect import ray_connected
from gan_ray.cluster.connect import shutdown as shutdown_cluster
from gan_ray.cli.flags import Parser, Stopping, stopped
from gan_ray.core.errors import UserError, one_line

# In the order `gan-ray --help` lists them.
COMMANDS = (train, sample, export, evaluate, tune, serve, generate, submit, demo, bench, prepare)


def build_parser() -> Parser:
    parser = Parser(prog="gan-ray", description="GANs trained, swept and served on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in COMMANDS:
        command.add_command(sub)
    parser.set_defaults(parser=parser)  # for commands that parse another command line (submit checks its job's)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Whatever happens, a Ray cluster the command started is shut down with every one of its
    processes before returning (a stopped command leaves no process and no bound port). Called where Ray is
    already connected (a notebook, a test session), the command runs on that cluster and leaves it as it was."""
    argv = list(sys.argv[1:] if argv is None else argv)
    connected_before = ray_connected()
    command = argv[0] if argv and not argv[0].startswith("-") else ""
    cmd = f"gan-ray {command}".rstrip()
    parser = build_parser()
    Stopping.install()
    try:
        args = parser.parse_args(argv)
        code = int(args.func(args) or 0)
    except UserError as exc:
        print(f"{cmd}: error: {one_line(exc)}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = stopped(command or "", "interrupted before it finished")
    finally:
        if not connected_before:
            shutdown_cluster()
    if Stopping.by_sigterm and code != 2 and not Stopping.reported:
        # The signal was taken by a handler that only asks for a stop (Tune's, once the sweep had finished), and
        # the command ran to its end: still one line, so that a stop never ends silently.
        stopped(command or "", "the signal came after its work was done; nothing was left unfinished")
    return 143 if Stopping.by_sigterm and code != 2 else code
