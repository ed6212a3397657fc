"""What every command shares: the parser class, the typed-number flags, the flags built from a settings model's
fields (`add_settings_flags`: training, sweeps, serving), turning the flags given into a validated config, and how
a command is stopped.

Usage errors are one line (exit code 2), like every other user error. SIGTERM (docker stop, kubectl delete,
systemd) is handled like Ctrl-C: the handler runs the process's Ctrl-C handler, so every command stops the way it
does on Ctrl-C (Tune saves its state, Serve deletes its app, ...), says in one line what it stopped, and exits 143.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any, Callable, Sequence

from gan_ray.core.config import TrainConfig, load_yaml, resolve
from gan_ray.core.errors import UserError
from gan_ray.core.settings import Settings, field_choices, field_kind, flag_name


class Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line (exit 2) like every other user error."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{message} (see {self.prog} --help)")


# ----------------------------------------------------------------------------------------------- typed values
def number(kind: Callable[[str], Any], ok: Callable[[Any], bool], what: str, name: str | None = None):
    """An argparse type converting to `kind` and checking `ok`; the message says what was expected."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return v
    parse.__name__ = name or what  # argparse names the type in "invalid <name> value" messages
    return parse


positive_int = number(int, lambda v: v >= 1, "a positive integer")
nonneg_int = number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = number(float, lambda v: v > 0, "a number > 0")
nonneg_float = number(float, lambda v: v >= 0, "a number >= 0")
port = number(int, lambda v: 1 <= v <= 65535, "a port 1..65535")


def key_value(text: str) -> tuple[str, str]:
    """KEY=VALUE (e.g. an environment variable)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def int_list(text: str, flag: str) -> list[int]:
    """Comma-separated integers (at least one)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip() != ""]
    except ValueError:
        raise UserError(f"{flag} expects comma-separated integers, got {text!r}") from None
    if not values:
        raise UserError(f"{flag} is empty")
    return values


def labels_arg(text: str | None) -> int | list[int] | None:
    """--labels: one label for every image, or one per image."""
    if text is None:
        return None
    values = int_list(text, "--labels")
    return values[0] if len(values) == 1 else values


# ------------------------------------------------------------------------------------------- settings flags
def add_settings_flags(p: argparse.ArgumentParser, model: type[Settings], *, exclude: Sequence[str] = (),
                       aliases: dict[str, str] | None = None, bools_take_values: bool = False) -> None:
    """One flag per field of a settings model (TrainConfig, SweepSettings, ServeArgs), help from its description.

    Values are kept as the text given (a sweep parses ranges like `1e-5:1e-2` from it) and every check is left to
    the model, so a rule is written once and its error names the flag wherever the value came from. Defaults are
    suppressed: only flags actually given override a config file or the model's own defaults. `aliases` adds an
    older spelling of a flag. `bools_take_values`: `--ema false` or `--ema true,false` (a sweep may search a
    switch) instead of `--ema` / `--no-ema`."""
    for name, f in model.model_fields.items():
        if name in exclude:
            continue
        flags = [flag_name(name)] + ([aliases[name]] if aliases and name in aliases else [])
        help_text = f.description or ""
        if "default" not in help_text:  # a description that explains its default says it better
            default = "none" if f.default is None else f.default
            help_text = f"{help_text} (default: {default})".strip()
        if field_kind(model, name) is bool and not bools_take_values:
            p.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=help_text)
            continue
        choices = field_choices(model, name)
        const = (f.json_schema_extra or {}).get("const") if isinstance(f.json_schema_extra, dict) else None
        extra = {"nargs": "?", "const": const} if const is not None else {}
        p.add_argument(*flags, dest=name, type=str, default=argparse.SUPPRESS, help=help_text,
                       metavar="{" + ",".join(choices) + "}" if choices else name.upper(), **extra)


def given_values(args: argparse.Namespace, model: type[Settings]) -> dict[str, Any]:
    """The fields of `model` given as flags."""
    return {k: v for k, v in vars(args).items() if k in model.model_fields}


def resolve_train_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults < --config FILE < flags, validated once."""
    file_values = load_yaml(args.config) if getattr(args, "config", None) else None
    return resolve(file_values, given_values(args, TrainConfig), source=getattr(args, "config", None) or "config")


def add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else start one)")


def add_cluster_wait(p: argparse.ArgumentParser) -> None:
    from gan_ray.cluster.autoscaler import DEFAULT_WAIT_S, WAIT_ENV

    p.add_argument("--cluster-wait-s", type=nonneg_float, default=None, metavar="SECONDS",
                   help="on an autoscaling cluster, how long to wait for the nodes this job needs (a progress line "
                        f"meanwhile; what can never fit is refused at once); default ${WAIT_ENV}, else "
                        f"{DEFAULT_WAIT_S:g}. A fixed cluster refuses at once what it lacks")


def add_ingress(p: argparse.ArgumentParser) -> None:
    from gan_ray.cluster.ingress import MODES

    p.add_argument("--ingress", choices=MODES, default=None,
                   help="front door of a cluster this command starts: haproxy (default where its binary exists; "
                        "replicas answer HTTP directly) or proxy (Serve's Python proxy). A joined cluster keeps "
                        "its own (set RAY_SERVE_ENABLE_HA_PROXY=1 where it starts)")


# ------------------------------------------------------------------------------------------------ stopping
class Stopping:
    """Which signal is stopping this command: set by the SIGTERM handler, read when printing the stop line and
    choosing the exit code (130 for Ctrl-C, 143 for SIGTERM)."""

    cause = "Ctrl-C"
    by_sigterm = False
    reported = False  # the stop line was printed

    @classmethod
    def install(cls) -> None:
        """Start of a command: no stop yet (in-process callers run several commands), and SIGTERM handled."""
        cls.cause, cls.by_sigterm, cls.reported = "Ctrl-C", False, False
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, cls._on_sigterm)

    @classmethod
    def _on_sigterm(cls, signum, frame) -> None:
        cls.cause, cls.by_sigterm = "SIGTERM", True
        on_ctrl_c = signal.getsignal(signal.SIGINT)
        # The command's own Ctrl-C path: Python's KeyboardInterrupt, or Tune's graceful stop (it saves the sweep).
        # Not Ray Train's: its handler calls the controller with a nested ray.get inside the signal handler while
        # the driver waits in ray.get, and the driver dies with exit code 1; a KeyboardInterrupt stops the driver,
        # and the CLI then ends the run's cluster (the last registered checkpoint stays the one to resume from).
        # SIGINT ignored (a background job of a non-interactive shell): stop all the same.
        if callable(on_ctrl_c) and not getattr(on_ctrl_c, "__module__", "").startswith("ray.train"):
            on_ctrl_c(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt


def stopped(command: str, what: str) -> int:
    """Print the one line that says what an interrupted command stopped; the exit code for it."""
    Stopping.reported = True
    print(f"gan-ray {command}: stopped ({Stopping.cause}): {what}", file=sys.stderr, flush=True)
    return 143 if Stopping.by_sigterm else 130
