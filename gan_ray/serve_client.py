"""HTTP client of the served generator (`gan-ray generate`, the demo, the tests). Standard library only, no Ray."""
from __future__ import annotations

import io
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from gan_ray.errors import UserError

FORMATS = {".png": "png", ".npz": "npz", ".json": "json"}


@dataclass
class Generated:
    """A /v1/generate response: the body as sent, plus the seed and labels the server used."""

    body: bytes
    media_type: str
    seed: int
    labels: list[int]

    def arrays(self):
        """(images float32 [N,C,H,W], labels int64 [N]) of an npz response."""
        import numpy as np

        with np.load(io.BytesIO(self.body), allow_pickle=False) as z:
            return z["images"], z["labels"]


def _request(url: str, body: dict[str, Any] | None = None, timeout: float = 60.0) -> tuple[bytes, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json"} if body is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read(), resp.headers
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            detail = json.loads(raw).get("detail", raw.decode(errors="replace"))
        except (ValueError, AttributeError):
            detail = raw.decode(errors="replace")[:300]
        if isinstance(detail, list):  # FastAPI validation errors: say which field and why
            detail = "; ".join(f"{'.'.join(str(p) for p in d.get('loc', [])[1:]) or 'body'}: {d.get('msg')}"
                               for d in detail)
        if 400 <= exc.code < 500:
            raise UserError(f"the server refused the request ({exc.code}): {detail}") from None
        raise RuntimeError(f"server error {exc.code} from {url}: {detail}") from None
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"cannot reach {url}: {reason}") from None


def generate(url: str, n: int = 16, labels: int | Sequence[int] | None = None, seed: int | None = None,
             format: str = "png", timeout: float = 60.0) -> Generated:
    """POST {url}/v1/generate. Client errors (4xx) raise UserError with the server's `detail`."""
    body: dict[str, Any] = {"n": n, "format": format}
    if labels is not None:
        body["labels"] = labels if isinstance(labels, int) else list(labels)
    if seed is not None:
        body["seed"] = seed
    raw, headers = _request(url.rstrip("/") + "/v1/generate", body, timeout)
    labels_header = headers.get("X-Labels", "")
    return Generated(raw, headers.get("Content-Type", ""), int(headers.get("X-Seed", -1)),
                     [int(x) for x in labels_header.split(",") if x])


def model_info(url: str, timeout: float = 10.0) -> dict[str, Any]:
    raw, _ = _request(url.rstrip("/") + "/v1/model", timeout=timeout)
    return json.loads(raw)


def wait_ready(url: str, timeout_s: float = 120.0) -> None:
    """Poll /healthz until it answers 200 (Serve's proxy may come up a moment after `serve.run` returns)."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/healthz", timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            last = exc
        time.sleep(0.2)
    raise UserError(f"{url} did not become ready within {timeout_s:.0f}s ({last})")


def save(result: Generated, out: str | Path) -> Path:
    """Write the response to FILE.png / FILE.npz / FILE.json (the format was chosen from the same suffix)."""
    from gan_ray.images import write_atomic

    path = Path(out).expanduser()
    write_atomic(path, result.body)
    return path


def format_for(out: str | Path) -> str:
    suffix = Path(out).suffix.lower()
    if suffix not in FORMATS:
        raise UserError(f"--out must end in .png, .npz or .json, got {Path(out).name!r}")
    return FORMATS[suffix]


def load_test(url: str, body: dict[str, Any], *, concurrency: int, duration_s: float, warmup_s: float = 1.0,
              timeout: float = 60.0) -> dict[str, float]:
    """Closed-loop load: `concurrency` keep-alive clients POST `body` back to back for `duration_s` (after a
    warm-up). Returns req/s, p50/p99 latency (ms) and the count of failed requests (non-200 or connection)."""
    import asyncio

    return asyncio.run(_load(url, json.dumps(body).encode(), concurrency, duration_s, warmup_s, timeout))


async def _load(url: str, payload: bytes, concurrency: int, duration_s: float, warmup_s: float,
                timeout: float) -> dict[str, float]:
    import aiohttp
    import numpy as np

    latencies: list[float] = []
    errors = 0
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        loop = asyncio_loop()
        start = loop.time()
        t_measure, t_end = start + warmup_s, start + warmup_s + duration_s

        async def client() -> None:
            nonlocal errors
            while True:
                t0 = loop.time()
                if t0 >= t_end:
                    return
                try:
                    async with session.post(url, data=payload, headers=headers) as resp:
                        await resp.read()
                        ok = resp.status == 200
                except (aiohttp.ClientError, OSError, TimeoutError):
                    ok = False
                t1 = loop.time()
                if t0 >= t_measure and t1 <= t_end:
                    latencies.append(t1 - t0)
                    errors += not ok

        await _gather([client() for _ in range(concurrency)])
    lat = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    return {"rps": len(latencies) / duration_s, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "requests": len(latencies), "errors": errors}


def asyncio_loop():
    import asyncio

    return asyncio.get_running_loop()


async def _gather(coros) -> None:
    import asyncio

    await asyncio.gather(*coros)
