"""Image grids and PNG/NPZ encoding for batches of [N, C, H, W] floats in [0, 1]."""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] float in [0, 1] -> [N, H, W, C] uint8."""
    arr = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()
    return arr.transpose(0, 2, 3, 1)


def grid(images: torch.Tensor, *, nrow: int | None = None, pad: int = 2, scale: int = 1) -> np.ndarray:
    """Tile a batch into one uint8 image [H', W', C] with a dark border between tiles."""
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    ncol = math.ceil(n / nrow)
    tiles = to_uint8(images)
    out = np.zeros((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        out[y:y + h, x:x + w] = tiles[i]
    if scale > 1:
        out = out.repeat(scale, axis=0).repeat(scale, axis=1)
    return out


def png_bytes(array: np.ndarray) -> bytes:
    """Encode an [H, W, C] uint8 array (C = 1 or 3) as PNG."""
    from PIL import Image

    img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def grid_png(images: torch.Tensor, *, nrow: int | None = None, scale: int = 2) -> bytes:
    return png_bytes(grid(images, nrow=nrow, scale=scale))


def npz_bytes(images: torch.Tensor, labels: torch.Tensor) -> bytes:
    """The `gan-ray sample` array format: images float32 [N,C,H,W] in [0,1], labels int64 [N] (-1 = none)."""
    buf = io.BytesIO()
    np.savez(buf, images=images.detach().float().cpu().numpy().astype(np.float32),
             labels=labels.detach().cpu().numpy().astype(np.int64))
    return buf.getvalue()


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so a crash never leaves half a file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def save_samples(path: str | Path, images: torch.Tensor, labels: torch.Tensor) -> Path:
    """Write `.npz` (arrays) or `.png` (grid) by the file's extension."""
    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    if suffix == ".npz":
        write_atomic(p, npz_bytes(images, labels))
    elif suffix == ".png":
        write_atomic(p, grid_png(images))
    else:
        from gan_ray.errors import UserError

        raise UserError(f"--out must end in .npz or .png, got {p.name!r}")
    return p
