"""Exported model directories, `load_generator` and the `Generator` sampling API: what sweeps hand to serving.

A model directory is self-contained and safe to load: `model.json` (architecture, latent size, classes, image
shape, dataset, metrics, source), `generator.safetensors` (the EMA generator's weights) and `samples.png`.

Besides single images, a conditional generator writes whole strings of digits "by hand" (`Generator.write`): one
latent vector per writer, reused for every character of the line, so a line looks like one person wrote it. The
service, `gan-ray sample --text` and the Python API all go through the helpers here, so they draw alike.
"""
from __future__ import annotations

import errno
import json
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch

from gan_ray.core.errors import UserError, one_line
from gan_ray.core.models import ModelSpec, build_generator
from gan_ray.core.step import latent_for_seed

MODEL_JSON = "model.json"
WEIGHTS = "generator.safetensors"
FORMAT = "gan-ray-model/1"
MAX_GENERATE = 100_000
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


class Generator:
    """A loaded generator with a plain sampling API. Deterministic: same (n, labels, seed) -> same images."""

    def __init__(self, net: torch.nn.Module, spec: ModelSpec, info: dict[str, Any], device: str | torch.device = "cpu"):
        self.net = net.eval().requires_grad_(False).to(device)
        self.spec = spec
        self.info = info
        self.device = torch.device(device)

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    def resolve_labels(self, n: int, labels: int | Sequence[int] | torch.Tensor | None) -> torch.Tensor:
        """Validated int64 labels [n]: cycling 0..K-1 when a conditional model gets none, -1 when unconditional."""
        k = self.spec.num_classes
        if labels is None:
            return torch.arange(n) % k if k else torch.full((n,), -1, dtype=torch.int64)
        if not k:
            raise UserError("this model is unconditional: it takes no labels")
        if isinstance(labels, int):
            t = torch.full((n,), labels, dtype=torch.int64)
        else:
            t = torch.as_tensor(list(labels) if not isinstance(labels, torch.Tensor) else labels, dtype=torch.int64)
            if t.ndim != 1 or t.numel() != n:
                raise UserError(f"expected {n} labels (one per image), got {t.numel()}")
        if n and (t.min() < 0 or t.max() >= k):
            raise UserError(f"labels must lie in 0..{k - 1}, got {sorted(set(t.tolist()))}")
        return t

    @torch.no_grad()
    def generate(self, n: int, labels: int | Sequence[int] | torch.Tensor | None = None,
                 seed: int | None = None) -> torch.Tensor:
        """n images as float [n, C, H, W] in [0, 1] (on CPU)."""
        return self.generate_with_labels(n, labels, seed)[0]

    @torch.no_grad()
    def generate_with_labels(self, n: int, labels=None, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if not 1 <= n <= MAX_GENERATE:
            raise UserError(f"n must lie in 1..{MAX_GENERATE}, got {n}")
        lab = self.resolve_labels(n, labels)
        z = latent_for_seed(n, self.spec.latent_dim, seed)
        out = self.net(z.to(self.device), lab.to(self.device) if self.spec.conditional else None)
        return out.float().cpu(), lab

    @torch.no_grad()
    def write(self, text: str, n: int = 1, seed: int | None = None) -> Writing:
        """`text` (digits and spaces, 1..64 characters) written by `n` writers (1..64), one line each: every writer
        is one latent vector used for every character, so each line looks like one hand. Conditional models only.
        Images [n, len(text), C, H, W] in [0, 1] (CPU), labels [n, len(text)] (-1 for spaces); the same seed gives
        the same images, and writer i is the latent of image i of `generate(n, seed=seed)`."""
        line = text_line(text, self.spec.num_classes)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_WRITERS:
            raise UserError(f"n (writers) must lie in 1..{MAX_WRITERS}, got {n!r}")
        z, lab = text_rows(latent_for_seed(n, self.spec.latent_dim, seed), line)
        rows = self.net(z.to(self.device), lab.to(self.device)).float().cpu()
        return Writing(place_text(rows, line), line.repeat(n, 1), text)


def export(checkpoint_dir: str | Path, out_dir: str | Path, *, extra: dict[str, Any] | None = None) -> Path:
    """Write a model directory from a training checkpoint. Atomic: the files are written to a temp dir of its own
    beside `out` and swapped in whole, so `out` is always a complete model (the old one or the new one), even with
    concurrent exports to the same place or a crash half-way."""
    from safetensors.torch import save_file

    from gan_ray.core.checkpoint import load_sampler
    from gan_ray.core.images import grid_png

    G, spec, meta = load_sampler(checkpoint_dir)
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a model directory; refusing to overwrite it")
    if out.exists() and not (out / MODEL_JSON).is_file() and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not a gan-ray model directory; refusing to overwrite it")
    cfg = meta.get("config", {})
    info = {
        "format": FORMAT,
        **spec.to_dict(),
        "dataset": cfg.get("dataset"),
        "loss": cfg.get("loss"),
        "ema": cfg.get("ema", True),
        "epoch": meta.get("epoch"),
        "metrics": meta.get("metrics", {}),
        "config": cfg,
        "source": {"checkpoint": str(Path(checkpoint_dir).expanduser().resolve()),
                   "run": str(Path(cfg.get("storage", ".")).expanduser().resolve() / cfg.get("name", ""))},
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise UserError(f"--out {out}: {exc.filename} is not a directory") from None
    tmp = _unique_sibling(out, "tmp")
    tmp.mkdir()  # exclusive, like tempfile.mkdtemp, but with the usual permissions (mkdtemp's are 0700)
    try:
        save_file({k: v.contiguous() for k, v in G.state_dict().items()}, str(tmp / WEIGHTS))
        (tmp / MODEL_JSON).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        gen = Generator(G, spec, info)
        n = 10 * spec.num_classes if spec.conditional else 64
        labels = (torch.arange(n) // 10) if spec.conditional else None  # one row per class
        (tmp / "samples.png").write_bytes(grid_png(gen.generate(n, labels, seed=0),
                                                   nrow=10 if spec.conditional else 8))
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already unless something failed
    return out


def _unique_sibling(out: Path, kind: str) -> Path:
    """A hidden name beside `out` that no other export uses (same filesystem, so renames stay atomic)."""
    return out.with_name(f".{out.name}.{secrets.token_hex(6)}.{kind}")


def _swap_in(new: Path, out: Path, attempts: int = 100) -> None:
    """Put directory `new` at `out`: the old model (if any) is renamed aside, `new` renamed in, the old one deleted.
    Every step is a rename, so `out` never holds a partial model. If a concurrent export lands its own model
    between the two renames, ours cannot overwrite it (rename refuses a non-empty target): move that one aside
    too and retry, so the last export to finish wins, complete."""
    asides: list[Path] = []
    try:
        for _ in range(attempts):
            aside = _unique_sibling(out, "old")
            try:
                out.rename(aside)
                asides.append(aside)
            except FileNotFoundError:
                pass
            try:
                new.rename(out)
                return
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    if asides:  # put the previous model back rather than leave no model at all
                        try:
                            asides[-1].rename(out)
                            asides.pop()
                        except OSError:
                            pass
                    raise
        raise UserError(f"--out {out}: could not replace it ({attempts} concurrent exports kept replacing it)")
    finally:
        for aside in asides:
            shutil.rmtree(aside, ignore_errors=True)


def load_generator(model_dir: str | Path, device: str | torch.device = "cpu") -> Generator:
    """Load an exported model directory (safetensors only: nothing is unpickled)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(model_dir).expanduser()
    if not d.is_dir():
        raise UserError(f"model directory not found: {d}")
    if not (d / MODEL_JSON).is_file() or not (d / WEIGHTS).is_file():
        raise UserError(f"{d} is not a gan-ray model directory (expected {MODEL_JSON} and {WEIGHTS})")
    try:
        info = json.loads((d / MODEL_JSON).read_text())
        if not isinstance(info, dict):
            raise ValueError(f"expected a JSON object, got {type(info).__name__}")
        if info.get("format") != FORMAT:
            raise ValueError(f"format is {info.get('format')!r}; this gan-ray reads {FORMAT!r}")
        spec = ModelSpec.from_dict(info)
        net = build_generator(spec)  # an architecture that cannot be built from these sizes is malformed too
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, RuntimeError,
            MemoryError) as exc:
        raise UserError(f"{d / MODEL_JSON} is malformed: {one_line(exc, 300)}") from None
    try:
        net.load_state_dict(load_file(str(d / WEIGHTS)))
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise UserError(f"{d / WEIGHTS} does not hold this model's weights: {str(exc).splitlines()[0][:200]}") from None
    return Generator(net, spec, info, device)


def open_generator(*, checkpoint: str | None = None, model: str | None = None, device: str = "cpu") -> Generator:
    """A Generator from either a training checkpoint or an exported model directory (exactly one of them)."""
    if (checkpoint is None) == (model is None):
        raise UserError("give exactly one of --checkpoint or --model")
    if model is not None:
        return load_generator(model, device)
    from gan_ray.core.checkpoint import load_sampler

    net, spec, meta = load_sampler(checkpoint, map_location=device)
    return Generator(net, spec, {**spec.to_dict(), "dataset": meta.get("config", {}).get("dataset"),
                                 "metrics": meta.get("metrics", {}), "epoch": meta.get("epoch")}, device)
