"""The docs cannot drift from the code: every flag table lists exactly the flags of its command with the defaults
the code uses, and every `gan-ray` command shown in the README and docs parses with the real CLI (each is run
for real, at small sizes, by tests/test_docs_run.py)."""
from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from gan_ray.cli import build_parser
from gan_ray.core.config import TrainConfig
from gan_ray.serve.schema import ServeArgs
from gan_ray.tune.space import SweepSettings
from gan_ray.train.prepare import PrepareSettings

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def parser_flags(command: str) -> dict[str, object]:
    """Each option of `gan-ray COMMAND` (its first spelling, no --no- twins) -> the default the code applies."""
    models = {"serve": ServeArgs, "tune": SweepSettings, "train": TrainConfig, "prepare": PrepareSettings}
    out = {}
    for action in subparser(command)._actions:
        if not action.option_strings or action.dest == "help":
            continue
        default = action.default
        model = models.get(command)
        if model is not None and action.dest in model.model_fields:
            default = model.model_fields[action.dest].default
        out[action.option_strings[0]] = default
    return out


def table_rows(path: Path, first_header: str, flag_column: int) -> list[tuple[list[str], str]]:
    """(flags, default cell) of every row of the tables whose header starts with `first_header`."""
    rows, in_table = [], False
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]] if line.startswith("|") else []
        if not cells:
            in_table = False
            continue
        if cells[0] == first_header:
            in_table, header = True, cells
            continue
        if in_table and not set(cells[0]) <= set("-: "):
            flags = re.findall(r"`(--[a-z0-9-]+)`", cells[flag_column])
            default = cells[header.index("default")].strip("`")
            rows.append(([f for f in flags if not f.startswith("--no-")], default))
    return rows


def same_default(documented: str, actual: object) -> bool:
    if actual is None:  # no fixed value: "none", or a sentence saying where it comes from
        return documented in ("none", "") or not re.fullmatch(r"[\w.+-]+", documented)
    if documented == "required":
        return actual.__class__.__name__ == "PydanticUndefinedType"
    try:
        return float(documented) == float(actual)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return documented == str(actual)


@pytest.mark.parametrize("command, doc, first_header, column", [
    ("train", "docs/training.md", "group", 1),
    ("serve", "docs/serving.md", "flag", 0),
    ("tune", "docs/sweeps.md", "flag", 0),
    ("prepare", "docs/datasets.md", "flag", 0),
])
def test_flag_table_is_the_parser(command, doc, first_header, column):
    rows = table_rows(ROOT / doc, first_header, column)
    actual = parser_flags(command)
    if command == "tune":  # the training flags a sweep also takes are documented in the training table
        actual = {f: d for f, d in actual.items() if f.lstrip("-").replace("-", "_") not in TrainConfig.model_fields
                  or f.lstrip("-").replace("-", "_") in SweepSettings.model_fields}
    documented = {flags[0]: default for flags, default in rows if flags}
    assert set(documented) == set(actual), (f"{doc}: only in the docs {sorted(set(documented) - set(actual))}, "
                                            f"only in the parser {sorted(set(actual) - set(documented))}")
    wrong = {f: (documented[f], actual[f]) for f in actual if not same_default(documented[f], actual[f])}
    assert not wrong, f"{doc}: documented default != the code's: {wrong}"


# ------------------------------------------------------------------------------------------- the commands
def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, argv after `gan-ray`) of every gan-ray command shown in the README and docs: the lines of code blocks
    (continuation lines joined, comments dropped) and the README's command table's examples. (Inline mentions
    such as `gan-ray serve` name a command; they are not commands to run.)"""
    out = []
    for path in DOCS:
        text = path.read_text()
        lines, block, fenced = [], [], False
        for line in text.splitlines():
            if line.startswith("```"):
                if fenced:
                    lines += re.sub(r"\\\n\s*", " ", "\n".join(block)).splitlines()
                fenced, block = not fenced, []
            elif fenced:
                block.append(line)
        if path.name == "README.md":
            lines += [m for row in re.findall(r"^\| `[a-z-]+` \|.*$", text, flags=re.M)
                      for m in re.findall(r"`(gan-ray [^`]+)`", row)]
        for line in lines:
            line = line.split(" #")[0].strip()
            m = re.match(r"^(?:\.venv/bin/)?gan-ray ([a-z].*)$", line)
            if m and not m.group(1).startswith(("train|", "sample|")):
                try:
                    argv = shlex.split(m.group(1))
                except ValueError:
                    continue
                out.append((f"{path.relative_to(ROOT)}: {line[:80]}", argv))
    return out


COMMANDS = documented_commands()


def test_the_docs_show_every_command():
    shown = {argv[0] for _, argv in COMMANDS}
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert shown >= set(sub.choices), f"commands never shown: {sorted(set(sub.choices) - shown)}"


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_parses(where, argv):
    from gan_ray.cli.submit import check_job_command

    parser = build_parser()
    args = parser.parse_args(argv)  # a UserError (an unknown or mistyped flag) fails with its message
    if argv[0] == "submit":
        check_job_command(list(args.job[1:] if args.job[:1] == ["--"] else args.job), parser)
