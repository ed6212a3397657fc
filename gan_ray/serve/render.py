"""The model side of the service, free of HTTP and Ray: validate a request, run one generator forward for many
requests, encode the results (PNG grid, NPZ, JSON of per-image PNGs). A text request (a string written by n
writers) is rows like any other in the same packed forward: one row per digit per writer, laid out in lines after.

Determinism: the same (n, labels, seed) gives byte-identical bodies however requests are batched. A matmul's
bits can depend on how many rows it holds, so every forward is padded to whole blocks of `ROW_BLOCK` rows (a
batch packs requests back to back and pads the total), and a CPU replica runs its forward on one thread. A
start-up self-check confirms that packed forwards reproduce each request's own forward bit for bit on this
hardware; a replica where they do not (some GPUs) runs one forward per request inside each batch instead (still
batched for queueing and encoding).
"""
from __future__ import annotations

import base64
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gan_ray.core.errors import UserError
from gan_ray.core.images import grid_png, lines_png, npz_bytes, text_npz_bytes, tile_pngs
from gan_ray.core.generator import Generator
from gan_ray.core.model_dir import load_generator
from gan_ray.core.handwriting import place_text, text_line, text_rows
from gan_ray.core.step import latent_for_seed
from gan_ray.serve.schema import MAX_TEXT_CELLS, MEDIA, GenerateRequest

ROW_BLOCK = 16  # rows per padded block: the unit whose forward bits must not depend on the batch around it


class RequestTooLarge(UserError):
    """A well-formed request over the service's size cap (HTTP 413, where other user errors are 422)."""


@dataclass
class Job:
    """One validated request, ready for the batched forward."""

    n: int  # images, or writers of a text
    labels: torch.Tensor  # int64 [n] (-1 for an unconditional model); a text's [n, L] (-1 for a space)
    seed: int
    format: str
    text: str | None = None

    @property
    def rows(self) -> int:
        """Rows this job adds to a forward (a text's spaces need none)."""
        return self.n if self.text is None else int((self.labels >= 0).sum())


@dataclass
class Rendered:
    body: bytes
    media_type: str
    headers: dict[str, str]


class Renderer:
    """The model side of the service, free of HTTP and Ray: validate, run one forward for many jobs, encode.

    The Serve replica and the plain-uvicorn benchmark baseline both use it, so they serve identical bytes.
    """

    def __init__(self, gen: Generator, *, merge_forwards: bool | None = None):
        self.gen = gen
        self.spec = gen.spec
        self.merge_forwards = self.batch_invariant() if merge_forwards is None else merge_forwards

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "cpu", **kw: Any) -> "Renderer":
        return cls(load_generator(model_dir, device), **kw)

    # -- validation (client errors never reach the batch)
    def job(self, req: GenerateRequest) -> Job:
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        if req.text is not None:
            line = text_line(req.text, self.spec.num_classes)
            if req.n * len(req.text) > MAX_TEXT_CELLS:
                raise RequestTooLarge(f"n x len(text) is {req.n} x {len(req.text)} = {req.n * len(req.text)} "
                                      f"characters; at most {MAX_TEXT_CELLS} per request")
            return Job(req.n, line.repeat(req.n, 1), seed, req.format, req.text)
        k = self.spec.num_classes
        if req.labels is not None and not k:
            raise UserError("this model is unconditional: it takes no labels (drop `labels`)")
        if k and req.labels is not None:
            values = [req.labels] if isinstance(req.labels, int) else req.labels
            bad = sorted({v for v in values if not 0 <= v < k})
            if bad:
                raise UserError(f"labels must lie in 0..{k - 1} for this model, got {bad[:10]}")
        labels = self.gen.resolve_labels(req.n, req.labels)
        return Job(req.n, labels, seed, req.format)

    # -- the forward
    def _inputs(self, job: Job) -> tuple[torch.Tensor, torch.Tensor]:
        z = latent_for_seed(job.n, self.spec.latent_dim, job.seed)
        if job.text is not None:
            return text_rows(z, job.labels[0])
        return z, (job.labels if self.spec.conditional else torch.zeros(job.n, dtype=torch.int64))

    @staticmethod
    def _images(job: Job, rows: torch.Tensor) -> torch.Tensor:
        """A job's images from its forward rows: [n, C, H, W], or a text's lines [n, L, C, H, W]."""
        return rows if job.text is None else place_text(rows, job.labels[0])

    @torch.no_grad()
    def _run(self, z: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        """The generator on rows padded up to a whole number of ROW_BLOCKs (zeros: rows don't interact)."""
        n = z.shape[0]
        rows = -(-n // ROW_BLOCK) * ROW_BLOCK
        if rows != n:
            z = torch.cat([z, z.new_zeros(rows - n, z.shape[1])])
            lab = torch.cat([lab, lab.new_zeros(rows - n)])
        dev = self.gen.device
        out = self.gen.net(z.to(dev), lab.to(dev) if self.spec.conditional else None)
        return out[:n].float().cpu()

    def forward(self, jobs: list[Job]) -> list[torch.Tensor]:
        """Images per job ([n, C, H, W], a text's [n, L, C, H, W]): the jobs' rows packed into one forward when
        that is bit-identical to running each job alone (see batch_invariant), else one forward per job."""
        inputs = [self._inputs(j) for j in jobs]
        if not self.merge_forwards or len(jobs) == 1:
            rows = [self._run(z, lab) for z, lab in inputs]
        else:
            out = self._run(torch.cat([z for z, _ in inputs]), torch.cat([lab for _, lab in inputs]))
            rows = list(out.split([j.rows for j in jobs]))
        return [self._images(j, r) for j, r in zip(jobs, rows)]

    def batch_invariant(self) -> bool:
        """Do a job's rows come out of a packed forward (any offset, any batch size) bit-identical to the job's
        own forward? Probed at start-up with requests of awkward sizes: matmul kernels pick tiles by shape."""
        g = torch.Generator().manual_seed(0)
        for sizes in ([1, 3, 16, 17, 5, 1, 7, 33], [1] * 16, [64, 1, 100, 2, 256, 31, 9, 77, 250, 129, 3],
                      [40, 1024, 5]):  # the last: a text request's rows (up to MAX_TEXT_CELLS) amid others
            z = torch.randn(sum(sizes), self.spec.latent_dim, generator=g)
            lab = torch.randint(0, max(self.spec.num_classes, 1), (sum(sizes),), generator=g)
            packed = self._run(z, lab).split(sizes)
            start = 0
            for size, rows in zip(sizes, packed):
                if not torch.equal(self._run(z[start:start + size], lab[start:start + size]), rows):
                    return False
                start += size
        return True

    # -- encoding
    def encode(self, job: Job, images: torch.Tensor) -> Rendered:
        if job.text is not None:
            return self.encode_text(job, images)
        labels = job.labels if self.spec.conditional else torch.full((job.n,), -1, dtype=torch.int64)
        headers = {"X-Seed": str(job.seed), "X-Labels": ",".join(map(str, labels.tolist()))}
        if job.format == "npz":
            body = npz_bytes(images, labels)
        elif job.format == "json":
            pngs = [base64.b64encode(png).decode("ascii") for png in tile_pngs(images)]
            body = json.dumps({"n": job.n, "seed": job.seed, "image_shape": list(images.shape[1:]),
                               "labels": labels.tolist(), "images": pngs}, separators=(",", ":")).encode()
        else:
            body = grid_png(images)
        return Rendered(body, MEDIA[job.format], headers)

    @staticmethod
    def encode_text(job: Job, images: torch.Tensor) -> Rendered:
        """Lines [n, L, C, H, W]: png a row per writer, npz the arrays and the text, json nested per writer.
        X-Labels holds every cell's label, writer by writer (-1 for a space)."""
        n, length = job.labels.shape
        headers = {"X-Seed": str(job.seed), "X-Labels": ",".join(map(str, job.labels.flatten().tolist()))}
        if job.format == "npz":
            body = text_npz_bytes(images, job.labels, job.text)
        elif job.format == "json":
            pngs = [base64.b64encode(png).decode("ascii") for png in tile_pngs(images.flatten(0, 1))]
            body = json.dumps({"n": n, "seed": job.seed, "text": job.text, "image_shape": list(images.shape[2:]),
                               "labels": job.labels.tolist(),
                               "images": [pngs[i * length:(i + 1) * length] for i in range(n)]},
                              separators=(",", ":")).encode()
        else:
            body = lines_png(images)
        return Rendered(body, MEDIA[job.format], headers)

    def render(self, jobs: list[Job]) -> list[Rendered]:
        return [self.encode(j, imgs) for j, imgs in zip(jobs, self.forward(jobs))]

    def model_info(self) -> dict[str, Any]:
        return self.gen.info
