"""HTTP client of the served generator (`gan-ray generate`, the demo, the tests), on `requests`; no Ray."""
from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import requests

from gan_ray.core.errors import UserError, one_line

FORMATS = {".png": "png", ".npz": "npz", ".json": "json"}


@dataclass
class Generated:
    """A /v1/generate response: the body as sent, plus the seed and labels the server used."""

    body: bytes
    media_type: str
    seed: int
    labels: list[int]

    def arrays(self):
        """(images float32 [N,C,H,W], labels int64 [N]) of an npz response; of a text request's, images
        [n,L,C,H,W] and labels [n,L] (-1 for spaces)."""
        import numpy as np

        with np.load(io.BytesIO(self.body), allow_pickle=False) as z:
            return z["images"], z["labels"]


def _request(url: str, body: dict[str, Any] | None = None, timeout: float = 60.0) -> requests.Response:
    """GET (no body) or POST `body` as JSON; a 4xx is a UserError with the server's `detail`, a 5xx a RuntimeError,
    an unreachable server a UserError."""
    try:
        resp = requests.request("GET" if body is None else "POST", url, json=body, timeout=timeout)
    except requests.RequestException as exc:
        raise UserError(f"cannot reach {url}: {one_line(exc, 300)}") from None
    if resp.status_code < 400:
        return resp
    try:
        detail = resp.json().get("detail", resp.text)
    except (ValueError, AttributeError):
        detail = resp.text[:300]
    if isinstance(detail, list):  # FastAPI validation errors: say which field and why
        detail = "; ".join(f"{'.'.join(str(p) for p in d.get('loc', [])[1:]) or 'body'}: {d.get('msg')}"
                           for d in detail)
    if 400 <= resp.status_code < 500:
        raise UserError(f"the server refused the request ({resp.status_code}): {detail}")
    raise RuntimeError(f"server error {resp.status_code} from {url}: {detail}")


def generate(url: str, n: int = 16, labels: int | Sequence[int] | None = None, seed: int | None = None,
             format: str = "png", timeout: float = 60.0, text: str | None = None) -> Generated:
    """POST {url}/v1/generate: n images, or `text` written by n writers (a line each). Client errors (4xx) raise
    UserError with the server's `detail`."""
    body: dict[str, Any] = {"n": n, "format": format}
    if labels is not None:
        body["labels"] = labels if isinstance(labels, int) else list(labels)
    if text is not None:
        body["text"] = text
    if seed is not None:
        body["seed"] = seed
    resp = _request(url.rstrip("/") + "/v1/generate", body, timeout)
    labels_header = resp.headers.get("X-Labels", "")
    return Generated(resp.content, resp.headers.get("Content-Type", ""), int(resp.headers.get("X-Seed", -1)),
                     [int(x) for x in labels_header.split(",") if x])


def model_info(url: str, timeout: float = 10.0) -> dict[str, Any]:
    return _request(url.rstrip("/") + "/v1/model", timeout=timeout).json()


def wait_ready(url: str, timeout_s: float = 120.0) -> None:
    """Poll /healthz until it answers 200 (Serve's proxy may come up a moment after `serve.run` returns)."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            resp = requests.get(url.rstrip("/") + "/healthz", timeout=5)
            if resp.status_code == 200:
                return
            last = RuntimeError(f"HTTP {resp.status_code}")
        except requests.RequestException as exc:
            last = exc
        time.sleep(0.2)
    raise UserError(f"{url} did not become ready within {timeout_s:.0f}s ({last})")


def save(result: Generated, out: str | Path) -> Path:
    """Write the response to FILE.png / FILE.npz / FILE.json (the format was chosen from the same suffix)."""
    from gan_ray.core.locations import write_bytes

    path = Path(out).expanduser()
    write_bytes(path, result.body)
    return path


def format_for(out: str | Path) -> str:
    suffix = Path(out).suffix.lower()
    if suffix not in FORMATS:
        raise UserError(f"--out must end in .png, .npz or .json, got {Path(out).name!r}")
    return FORMATS[suffix]
