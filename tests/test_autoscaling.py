"""`gan-ray train` and `gan-ray tune` on an autoscaling cluster that starts with no worker CPUs: Ray's own
autoscaler (v2, as on KubeRay and `ray up`) with its fake-node provider, which adds real raylets on this machine.

The cluster is this module's own (tests/fake_autoscaler.py: its own ports and temp dir, separate from the session's
`ray_cluster`); every command is a separate `gan-ray ... --address` process, and the module checks at the end
that no process of the cluster is left. Its shape is the deployed one in miniature: a head with 0 CPUs and one
worker type (1 CPU) that the autoscaler adds on demand, 0 to 2 nodes, removed after 30 s idle.

`make test` checks the refusals and a training job that waits for its nodes; the e2e tier (a fresh cluster of its
own in that run) a sweep that waits for its nodes and then lets them go (so Ray Train's detached autoscaling
coordinator, which `gan-ray tune` creates on the head, does not pin a worker node), the timeout, and the same wait
on Ray's autoscaler v1, on a cluster of its own. One idle wait per tier at most: nodes go after 30 s idle.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.fake_autoscaler import FakeAutoscalingCluster

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
MAX_NODES = 2
FAST = ["--dataset", "digits", "--arch", "mlp", "--epochs", "1", "--batch-size", "64", "--eval-every", "0",
        "--sample-every", "0"]


def autoscaling_cluster(tag: str, *, v2: bool = True):
    c = FakeAutoscalingCluster(f"/tmp/gr-{tag}-{os.getpid()}",  # short: Unix socket paths live under it
                               {"cpu1": {"resources": {"CPU": 1}, "min_workers": 0, "max_workers": MAX_NODES}},
                               head_cpus=0, idle_timeout_minutes=0.5, v2=v2)
    t0 = time.monotonic()
    try:
        c.up()
        c.started_s = time.monotonic() - t0
        yield c
    finally:
        left = c.down()
    assert c.seen, "the cluster never had any process"
    assert not left, f"processes of the autoscaling cluster left behind: {sorted(left)}"


@pytest.fixture(scope="module")
def cluster():
    yield from autoscaling_cluster("as")


@pytest.fixture(scope="module")
def v1_cluster():
    yield from autoscaling_cluster("as1", v2=False)


def gan_ray(c: FakeAutoscalingCluster, *args: str, timeout: float = 420) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "gan_ray.cli", *args, "--address", c.gcs_address],
                       env=c.driver_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return r, time.monotonic() - t0


def no_worker_nodes(c: FakeAutoscalingCluster, timeout_s: float = 150) -> float:
    """Until the autoscaler has removed every worker node; returns how long that took. A node goes after 30 s idle,
    but not while a cluster resource request still covers it: Ray Train's AutoscalingCoordinator re-sends a run's
    worker resources every 20 s until the run cancels them or they expire (180 s)."""
    t0 = time.monotonic()
    wait_for(lambda: c.worker_cpus() == 0, timeout_s, "the autoscaler to remove the idle worker nodes", poll_s=2)
    return time.monotonic() - t0


def one_line(r: subprocess.CompletedProcess, *fragments: str) -> str:
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, (r.returncode, r.stdout, r.stderr)
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_what_can_never_fit_is_refused_at_once(cluster, tmp_path):
    """More workers than the largest cluster the autoscaler may build (2 one-CPU nodes), or GPUs from a type list
    without any: one line, exit 2, decided by the autoscaler's verdict, and no node launched for it."""
    assert cluster.worker_cpus() == 0
    r, seconds = gan_ray(cluster, "train", "--workers", "3", *FAST, "--storage", str(tmp_path), "--name", "big")
    one_line(r, "--workers 3 needs 3 x (1 CPU), more than this cluster can ever hold")
    assert seconds < 120, seconds  # the process's start and Ray's connection dominate; no waiting
    r, _ = gan_ray(cluster, "train", "--workers", "1", "--gpus-per-worker", "1", *FAST, "--storage", str(tmp_path),
                   "--name", "gpu")
    one_line(r, "more than this cluster can ever hold", "no node has GPU now")
    r, _ = gan_ray(cluster, "tune", "--trials", "2", "--workers-per-trial", "3", "--epochs", "1",
                   "--storage", str(tmp_path), "--name", "sweep")
    one_line(r, "one trial (--workers-per-trial 3) needs", "more than this cluster can ever hold")
    r, _ = gan_ray(cluster, "tune", "--trials", "3", "--max-concurrent", "3", "--epochs", "1",
                   "--storage", str(tmp_path), "--name", "sweep")
    one_line(r, "--max-concurrent 3 needs 3 x", "cannot hold that many trials at once")
    assert not any(tmp_path.iterdir()), "nothing written for a refused job"
    # Nothing launched for them, now or ever: the autoscaler reports no launch in progress or failed, and the GCS
    # never registered a node besides the head (a node launched and removed again would still be listed, dead).
    assert cluster.launching() == (0, ""), "a refused job made the autoscaler launch nodes"
    assert cluster.nodes_ever() == 1, "a refused job made the autoscaler add nodes"


def test_train_waits_for_the_autoscaler_then_trains(cluster, tmp_path):
    """From 0 worker CPUs: the driver waits (progress lines), the autoscaler adds two nodes, DDP trains on them."""
    assert cluster.worker_cpus() == 0
    r, seconds = gan_ray(cluster, "train", "--workers", "2", *FAST, "--storage", str(tmp_path), "--name", "grown")
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    # What the job found, printed before it asks: the autoscaler's verdict takes a round or more, and the request
    # launches nodes meanwhile, so the progress lines after it may already show one node, or none at all.
    assert "[cluster] --workers 2 needs 2 x (1 CPU); the cluster has 0 CPU on 0 node(s): asking its autoscaler" \
        in r.stdout, r.stdout[-3000:]
    ready = re.search(r"\[cluster\] ready after (\d+) s: 2 CPU on 2 node\(s\)", r.stdout)
    assert ready, r.stdout[-3000:]
    assert "epoch   1/1" in r.stdout
    assert (tmp_path / "grown" / "metrics.jsonl").is_file()
    assert sorted(n.get("CPU", 0) for n in cluster.nodes()) == [0, 1, 1]
    print(f"\ncluster up in {cluster.started_s:.0f} s; train: scaled up in {ready.group(1)} s, "
          f"command {seconds:.0f} s")


@pytest.mark.e2e
def test_tune_waits_for_the_autoscaler_sweeps_then_lets_the_nodes_go(cluster, tmp_path):
    """A 2-trial sweep from 0 worker CPUs: both trials at once (the most 2 one-CPU nodes hold), after a wait; then
    the nodes go idle and are removed (nothing of the sweep, Train's detached coordinator included, stays on
    them). In a run of the whole file, the training job's nodes must go first."""
    print(f"\nidle nodes gone after {no_worker_nodes(cluster):.0f} s")
    r, seconds = gan_ray(cluster, "tune", "--trials", "2", "--epochs", "1", "--workers-per-trial", "1",
                         "--scheduler", "none", "--dataset", "digits", "--arch", "mlp", "--batch-size", "64",
                         "--storage", str(tmp_path), "--name", "sweep", "--export", str(tmp_path / "model"))
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert re.search(r"\[cluster\] one trial \(--workers-per-trial 1\) needs .*; the cluster has 0 CPU on 0 "
                     r"node\(s\): asking its autoscaler", r.stdout), r.stdout[-3000:]
    ready = re.search(r"\[cluster\] ready after (\d+) s", r.stdout)
    assert ready, r.stdout[-3000:]
    assert "2 at a time" in r.stdout, r.stdout[-3000:]
    assert (tmp_path / "model" / "model.json").is_file()
    print(f"tune: scaled up in {ready.group(1)} s, command {seconds:.0f} s; the sweep's nodes gone after "
          f"{no_worker_nodes(cluster, timeout_s=240):.0f} s")


@pytest.mark.e2e
def test_a_cluster_that_does_not_grow_in_time_is_a_one_line_error(cluster, tmp_path):
    """The autoscaler would add the nodes, but not within the time allowed: one line saying what is missing."""
    assert cluster.worker_cpus() == 0, "the sweep's nodes are gone (the test before)"
    r, _ = gan_ray(cluster, "train", "--workers", "2", "--cluster-wait-s", "0", *FAST, "--storage", str(tmp_path),
                   "--name", "late")
    one_line(r, "waited 0 s for the autoscaler", "still missing 2 CPU for --workers 2")
    assert not (tmp_path / "late").exists()


@pytest.mark.e2e
def test_train_waits_for_the_v1_autoscaler_too(v1_cluster, tmp_path):
    """Ray's autoscaler v1 (`RAY_UP_enable_autoscaler_v2=0 ray up`, older KubeRay setups) launches nodes for the
    same request but answers no question: the job says so, then waits with the same progress line and trains."""
    assert v1_cluster.worker_cpus() == 0
    r, seconds = gan_ray(v1_cluster, "train", "--workers", "2", *FAST, "--storage", str(tmp_path), "--name", "v1")
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "[cluster] this cluster's autoscaler (v1) does not say whether it can ever hold --workers 2" in r.stdout
    assert "[cluster] --workers 2 needs 2 x (1 CPU); the cluster has 0 CPU on 0 node(s): asking its autoscaler" \
        in r.stdout, r.stdout[-3000:]
    # v1 gives no verdict, so the wait starts as the request is made: its first line sees no node yet.
    assert "[cluster] waiting for the autoscaler: --workers 2 needs 2 x (1 CPU); the cluster has 0 CPU" in r.stdout, \
        r.stdout[-3000:]
    ready = re.search(r"\[cluster\] ready after (\d+) s: 2 CPU on 2 node\(s\)", r.stdout)
    assert ready and "epoch   1/1" in r.stdout, r.stdout[-3000:]
    print(f"\nv1 cluster up in {v1_cluster.started_s:.0f} s; train: scaled up in {ready.group(1)} s, "
          f"command {seconds:.0f} s")
