"""Shared fixtures: one real local Ray cluster per test session (start-up costs ~5 s on 2 cores)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

# One intra-op thread per test process: the machines have 2 cores, and Ray workers run beside the tests.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
GAN_RAY = [sys.executable, "-m", "gan_ray.cli"]


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster shared by every test that needs one. 4 logical CPUs on 2 cores: trials, Train
    workers and Serve replicas are mostly idle, and the resource checks under test are logical ones anyway."""
    import ray

    if not ray.is_initialized():
        from gan_ray.cluster import apply_to_local_cluster

        apply_to_local_cluster()  # what `gan-ray serve` gives a cluster it starts: HAProxy in front of Serve
        ray.init(num_cpus=4, include_dashboard=True, configure_logging=True, logging_level="WARNING")
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.25) -> float:
    """Seconds until `predicate()` held; an AssertionError naming `what` after `timeout_s`. For what Ray (Serve's
    autoscaler, the GCS's job cleanup) does asynchronously, where a fixed sleep is either slow or flaky."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if predicate():
            return time.monotonic() - t0
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def run_cli(*args: str, timeout: float = 600, env: dict | None = None, cwd: str | Path | None = None):
    """Run `gan-ray ARGS` in a fresh process (its own Ray, if it needs one)."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("RAY_ADDRESS", None) if env is None or "RAY_ADDRESS" not in env else None
    return subprocess.run([*GAN_RAY, *args], capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=cwd or ROOT)


def tensorboard_tags(log_dir: Path) -> dict[str, set]:
    """Scalar tags, image tags and steps in the TensorBoard event files under `log_dir` (read with tensorboardX's
    protobufs: the files are TFRecords, a length, its CRC, the record, its CRC)."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, set] = {"scalars": set(), "images": set(), "steps": set()}
    files = sorted(Path(log_dir).glob("events.out.tfevents.*"))
    assert files, f"no event files in {log_dir}"
    for path in files:
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out["images" if value.HasField("image") else "scalars"].add(value.tag)
                out["steps"].add(event.step)
    return out
