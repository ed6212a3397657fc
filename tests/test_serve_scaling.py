"""Ray Serve under load (issue 5): autoscaling up and back down, and a replica process killed mid-load.

Real replicas, real HTTP on loopback, a real SIGKILL. Load is bounded in time and count; autoscaling knobs are
short (metrics every 0.5 s, 2 s look-back and downscale delay) so each test takes tens of seconds.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field

import pytest
import requests

from tests.conftest import deploy, start_serve, wait_for

pytestmark = pytest.mark.slow


@dataclass
class Load:
    """Closed-loop HTTP load from `workers` threads until stopped (or `max_s`): counts successes and failures."""

    url: str
    body: dict
    workers: int
    max_s: float = 120.0
    ok: int = 0
    failed: list = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(self.workers)]
        self._deadline = time.monotonic() + self.max_s

    def _run(self) -> None:
        with requests.Session() as s:
            while not self._stop.is_set() and time.monotonic() < self._deadline:
                try:
                    r = s.post(self.url + "/v1/generate", json=self.body, timeout=30)
                    good, what = r.status_code == 200, r.status_code
                except requests.RequestException as exc:
                    good, what = False, type(exc).__name__
                with self._lock:
                    if good:
                        self.ok += 1
                    else:
                        self.failed.append(what)

    @property
    def total(self) -> int:
        return self.ok + len(self.failed)

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)


def running_replicas(app: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return 0
    dep = status.deployments["GeneratorServer"]
    return int(dep.replica_states.get("RUNNING", 0))


def replica_actors(app: str) -> list:
    import ray
    from ray.util.state import list_actors

    # explicit address: other Ray clusters may run on the same machine
    return list_actors(address=ray.get_runtime_context().gcs_address, filters=[("class_name", "=", f"ServeReplica:{app}:GeneratorServer"),
                                ("state", "=", "ALIVE")])


FAST_SCALING = dict(upscale_delay_s=0.5, downscale_delay_s=2.0, look_back_period_s=2.0, metrics_interval_s=0.5,
                    cpus_per_replica=0.5)


def test_autoscales_up_under_load_and_back_down(ray_cluster, serve_models):
    from ray import serve

    start_serve(ray_cluster)
    app = "t-scale"
    url = deploy(app, serve_models["unconditional"], min_replicas=1, max_replicas=2, target_ongoing=1,
                 max_ongoing=4, max_batch_size=4, **FAST_SCALING)
    try:
        assert running_replicas(app) == 1
        with Load(url, {"n": 64, "format": "npz"}, workers=6, max_s=90) as load:
            up_s = wait_for(lambda: running_replicas(app) >= 2, 75, "a second replica under load")
            print(f"scaled up to {running_replicas(app)} replicas after {up_s:.1f}s of load")
        assert load.ok > 0 and not load.failed, load.failed[:5]
        down_s = wait_for(lambda: running_replicas(app) == 1, 75, "scaling back to 1 replica")
        print(f"scaled back to 1 replica {down_s:.1f}s after the load stopped ({load.total} requests served)")
    finally:
        serve.delete(app)


@pytest.mark.e2e
def test_killed_replica_is_replaced_and_clients_barely_notice(ray_cluster, serve_models):
    from ray import serve

    start_serve(ray_cluster)
    app = "t-kill"
    url = deploy(app, serve_models["unconditional"], min_replicas=2, max_replicas=2, cpus_per_replica=0.5,
                 health_check_period_s=1.0, health_check_timeout_s=5.0)
    try:
        wait_for(lambda: running_replicas(app) == 2 and len(replica_actors(app)) == 2, 60, "two replicas")
        before = {a.actor_id: a.pid for a in replica_actors(app)}
        with Load(url, {"n": 4, "format": "json"}, workers=4, max_s=120) as load:
            wait_for(lambda: load.total >= 50, 30, "traffic to flow")
            victim_id, victim_pid = next(iter(before.items()))
            os.kill(victim_pid, signal.SIGKILL)
            at_kill = load.total
            replaced_s = wait_for(
                lambda: running_replicas(app) == 2 and len(after := {a.actor_id for a in replica_actors(app)}) == 2
                and victim_id not in after, 90, "a replacement replica")
            # keep the load on until enough requests ran for a 1% bound to mean something
            wait_for(lambda: load.total >= max(500, at_kill + 300), 90, "500 requests in total")
        failure_rate = len(load.failed) / load.total
        print(f"replica pid {victim_pid} killed after {at_kill} requests; replaced in {replaced_s:.1f}s; "
              f"{len(load.failed)} of {load.total} requests failed ({failure_rate:.2%}): {load.failed[:5]}")
        assert failure_rate <= 0.01
        assert victim_pid not in {a.pid for a in replica_actors(app)}
        assert requests.get(url + "/healthz", timeout=10).status_code == 200
    finally:
        serve.delete(app)


@pytest.mark.e2e
def test_gan_ray_serve_runs_until_ctrl_c(serve_models, tmp_path):
    """The user command end to end: its own Ray cluster, real HTTP, SIGINT, clean exit (and no Ray left)."""
    import subprocess
    import sys

    from tests.conftest import ROOT
    from gan_ray.cluster.processes import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "gan_ray.cli", "serve", "--model",
                             str(serve_models["conditional"]), "--port", str(port), "--max-replicas", "1",
                             "--cpus-per-replica", "0.5"], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{port}"
    try:
        from gan_ray.serve.client import generate

        wait_for(lambda: any(line.startswith("serving ") for line in lines) or proc.poll() is not None, 240,
                 "the `serving ... at URL` line")
        assert f"serving {serve_models['conditional'].resolve()} at {url}" in "".join(lines)
        result = generate(url, n=4, labels=[1, 2, 3, 4], seed=3, format="npz")
        assert result.arrays()[1].tolist() == [1, 2, 3, 4]
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-2000:]  # Ctrl-C's exit code
    assert "gan-ray serve: stopped (Ctrl-C): deleted the deployment" in err and f"port {port} is free" in err
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/healthz", timeout=5)
