"""Handwriting: a string of digits written "by hand" by a conditional generator, one line per writer.

Each writer is one latent vector, reused for every character of the line, so a line looks like one person wrote
it. `Generator.write`, the service's `text` requests and `gan-ray sample --text` all go through these helpers, so
they draw alike. Digit d is class d: a digits model (digits, MNIST, a folder of 0..9).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from gan_ray.core.errors import UserError

MAX_TEXT = 64  # characters of a written line: a line of 64 cells is already wider than a screen
MAX_WRITERS = 64  # lines (writers) per text request
TEXT_PATTERN = r"^[0-9 ]*[0-9][0-9 ]*$"  # digits and spaces, at least one digit (the JSON schema's pattern)


class Writing(NamedTuple):
    """What `Generator.write` returns, as the `.npz` of a text request holds it."""

    images: torch.Tensor  # float [n, L, C, H, W] in [0, 1]; a space is a blank (all-zero) cell
    labels: torch.Tensor  # int64 [n, L]: the digit of each cell, -1 for a space
    text: str


def text_line(text: object, num_classes: int | None = None) -> torch.Tensor:
    """The class of each character of `text` (int64 [L], -1 for a space), or a UserError saying what is wrong.

    Digit d is class d: handwriting on a digits model (digits, MNIST, a folder of 0..9). `num_classes` (the
    model's) refuses unconditional models and digits that are not a class of the model; None checks the text only
    (what the request schema can do before it knows the model)."""
    if not isinstance(text, str) or not text:
        raise UserError("text must be a non-empty string of digits and spaces")
    if len(text) > MAX_TEXT:
        raise UserError(f"text has {len(text)} characters; at most {MAX_TEXT}")
    bad = sorted({c for c in text if c not in "0123456789 "})
    if bad:
        raise UserError(f"text may hold only digits 0-9 and spaces, got {''.join(bad)[:10]!r}")
    if not text.strip():
        raise UserError("text holds only spaces; give at least one digit")
    line = torch.tensor([-1 if c == " " else int(c) for c in text], dtype=torch.int64)
    if num_classes is not None:
        if not num_classes:
            raise UserError("this model is unconditional: it cannot write a given text (one latent per writer needs "
                            "a class per character); ask for `n` images without `text`")
        if int(line.max()) >= num_classes:
            raise UserError(f"text digits must be classes of this model (0..{num_classes - 1}), "
                            f"got {sorted({int(v) for v in line if v >= num_classes})}")
    return line


def text_rows(z: torch.Tensor, line: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The generator's input rows for writers `z` [n, D] writing `line` [L]: writer-major, one row per digit (no
    rows for spaces), each writer's latent repeated along its line."""
    digits = line[line >= 0]
    return z.repeat_interleave(len(digits), dim=0), digits.repeat(z.shape[0])


def place_text(rows: torch.Tensor, line: torch.Tensor) -> torch.Tensor:
    """The generator's output `rows` (in `text_rows` order) laid out as lines [n, L, C, H, W], spaces blank."""
    keep = line >= 0
    n = rows.shape[0] // int(keep.sum())
    out = rows.new_zeros(n, len(line), *rows.shape[1:])
    out[:, keep] = rows.view(n, int(keep.sum()), *rows.shape[1:])
    return out


