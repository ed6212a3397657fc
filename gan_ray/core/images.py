"""The one image stack: batches of [N, C, H, W] floats in [0, 1] to grids, PNG and NPZ bytes, saved atomically.

Grids are torchvision's `make_grid`, PNGs Pillow's encoder (zlib level 1); training's sample grids, exported
`samples.png`, `gan-ray sample` and the HTTP service all go through here, so they draw and encode alike.
"""
from __future__ import annotations

import io
import math
import zipfile
from pathlib import Path

import numpy as np
import torch

from gan_ray.core.locations import write_bytes

GRID_PAD = 2  # dark pixels between tiles
GRID_SCALE = 2  # grids are upscaled (nearest) so 28-pixel digits are readable at 100% zoom
PNG_COMPRESSION = 1  # fastest zlib level: these images are small, and speed matters when serving
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] float in [0, 1] -> [N, C, H, W] uint8 on the CPU (values rounded, out-of-range clamped)."""
    return images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()


def grid(images: torch.Tensor, *, nrow: int | None = None, pad: int = GRID_PAD, scale: int = 1) -> torch.Tensor:
    """Tile a batch into one uint8 image [C, H', W'] with `nrow` tiles per row (default: a square-ish grid)."""
    from torchvision.utils import make_grid

    tiles = to_uint8(images)
    n, c = tiles.shape[:2]
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    if n == 1:  # make_grid returns a lone image as it is; a grid of one keeps its border like any other
        out = torch.nn.functional.pad(tiles[0], (pad, pad, pad, pad), value=0)
    else:
        out = make_grid(tiles, nrow=nrow, padding=pad, pad_value=0)
        out = out[:1] if c == 1 else out  # make_grid repeats one channel to three; keep grey grey
    if scale > 1:
        out = out.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    return out.contiguous()


def png_bytes(image: torch.Tensor) -> bytes:
    """Encode one uint8 image [C, H, W] (C = 1 or 3) as PNG."""
    from PIL import Image

    array = image.permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buf, format="PNG",
                                                                           compress_level=PNG_COMPRESSION)
    return buf.getvalue()


def grid_png(images: torch.Tensor, *, nrow: int | None = None, scale: int = GRID_SCALE) -> bytes:
    return png_bytes(grid(images, nrow=nrow, scale=scale))


def lines_png(images: torch.Tensor, *, scale: int = GRID_SCALE) -> bytes:
    """Written lines [n, L, C, H, W] as one picture: a row per writer, a column per character (a space's blank
    cell is as dark as the border, so it reads as a gap)."""
    return grid_png(images.flatten(0, 1), nrow=images.shape[1], scale=scale)


def tile_pngs(images: torch.Tensor) -> list[bytes]:
    """One PNG per image of the batch."""
    return [png_bytes(tile) for tile in to_uint8(images)]


def npz_bytes(images: torch.Tensor, labels: torch.Tensor, **extra: np.ndarray) -> bytes:
    """The `gan-ray sample` array format: images float32 [N,C,H,W] in [0,1], labels int64 [N] (-1 = none), plus
    any `extra` arrays. Fixed zip timestamps, so the same arrays always give the same bytes (np.savez stamps the
    current time into the archive)."""
    arrays = {"images": images.detach().float().cpu().numpy().astype(np.float32, copy=False),
              "labels": labels.detach().cpu().numpy().astype(np.int64), **extra}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            body = io.BytesIO()
            np.lib.format.write_array(body, np.asarray(arr, order="C"), allow_pickle=False)  # 0-d stays 0-d
            zf.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH), body.getvalue())
    return buf.getvalue()


def text_npz_bytes(images: torch.Tensor, labels: torch.Tensor, text: str) -> bytes:
    """Written lines as arrays: images [n, L, C, H, W], labels [n, L] (-1 for spaces) and the text (a 0-d unicode
    array, readable without pickle)."""
    return npz_bytes(images, labels, text=np.asarray(text))


def save_samples(path: str | Path, images: torch.Tensor, labels: torch.Tensor, *, nrow: int | None = None,
                 text: str | None = None) -> Path:
    """Write `.npz` (arrays) or `.png` (grid) by the file's extension; with `text`, written lines
    [n, L, C, H, W] (one picture row per writer), as the service sends them."""
    from gan_ray.core.errors import UserError

    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    if suffix == ".npz":
        write_bytes(p, npz_bytes(images, labels) if text is None else text_npz_bytes(images, labels, text))
    elif suffix == ".png":
        write_bytes(p, grid_png(images, nrow=nrow) if text is None else lines_png(images))
    else:
        raise UserError(f"--out must end in .npz or .png, got {p.name!r}")
    return p
