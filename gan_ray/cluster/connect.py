"""The Ray cluster a command runs on: join one (`--address`, RAY_ADDRESS) or start a local one, and end it.

Every Ray layer (Train, Tune, Serve, the benchmarks) connects through `ensure_ray`, so a local cluster always
starts the same way, whichever command starts it: its Serve front door chosen first (`gan_ray.cluster.ingress`),
quiet, and remembered.

A cluster this process started is also this process's to stop: `shutdown()` ends Ray and then every process of
that cluster still alive (Ray leaves its dashboard and runtime-env agents, and an HAProxy started by a reload
during shutdown, running after the driver exits), so a stopped command leaves no process and no bound port.
Joining a cluster only disconnects from it.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any

from gan_ray.cluster import processes
from gan_ray.cluster.ingress import apply_to_local_cluster, haproxy_side_ports_setup
from gan_ray.core.errors import UserError, one_line

SETUP_HOOK = "gan_ray.cluster.connect.local_worker_setup"  # runs in every worker process of a local cluster
PIN_HOOK = "gan_ray.cluster.connect.pin_cluster_address"  # ... and of this driver's job on a joined cluster
# Ray Train's preemption watcher (an actor per run polling the nodes' drain state) has nothing to watch on a local
# cluster, whose nodes no cloud reclaims; and creating it logs an error line (core_worker.cc: "constructor arguments
# in the object store and max_restarts > 0") on the console of every healthy run. Joined clusters keep it.
LOCAL_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}

_local: dict[str, Any] = {}  # the local cluster this process started: its session directory and our pid


def pin_cluster_address() -> None:
    """Worker setup hook (before any task or actor code runs in the process): RAY_ADDRESS pinned to this worker's
    own cluster. Ray's own actors (Train's placement-group cleaner, say) look a cluster up by themselves, and on a
    machine running more than one Ray cluster that lookup fails ("Found multiple active Ray instances"), ending
    their threads: the cleaner's, and with it the removal of a dead run's placement group."""
    import ray

    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


def local_worker_setup() -> None:
    """Worker setup hook of local clusters: HAProxy's side ports on localhost (`gan_ray.cluster.ingress`), and the
    cluster's address pinned (`pin_cluster_address`)."""
    haproxy_side_ports_setup()
    pin_cluster_address()


def job_setup_hook() -> dict[str, str]:
    """The runtime_env that pins the address in this driver's workers on a joined cluster; none when the job that
    runs this driver (a Ray Job's entrypoint) brings a setup hook of its own (Ray refuses two)."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    job = os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR, "")
    return {} if "worker_process_setup_hook" in job else {"worker_process_setup_hook": PIN_HOOK}


def init_local(ingress: str | None = None, **kwargs: Any) -> None:
    """Start a local Ray cluster the way every gan-ray command does: the Serve front door chosen first, HAProxy's
    side ports on localhost, Ray's lookups pinned to it, and its session remembered so that `shutdown()` can make
    sure all of it ends. (Its processes inherit this process's environment: flags are set before it starts.)"""
    import ray

    apply_to_local_cluster(ingress)
    for key, value in LOCAL_ENV.items():
        os.environ.setdefault(key, value)
    runtime_env = dict(kwargs.pop("runtime_env", None) or {})
    runtime_env.setdefault("worker_process_setup_hook", SETUP_HOOK)
    ray.init(runtime_env=runtime_env, **kwargs)
    node = ray._private.worker._global_node
    _local.update(session_dir=node.get_session_dir_path() if node else None, owner=os.getpid())


def ensure_ray(address: str | None, ingress: str | None = None) -> None:
    """Join `address` (or RAY_ADDRESS) if given, else start a local cluster, quietly, whose Serve uses the
    `ingress` front door (it must be chosen before the cluster's processes start). A SIGTERM handler the caller
    installed (the CLI's) survives: ray.init replaces it with its own."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    previous = signal.getsignal(signal.SIGTERM)
    try:
        if address:  # quiet: Ray's "Connecting to existing Ray cluster" lines would break one-line errors
            ray.init(address=address, runtime_env=job_setup_hook(), configure_logging=True, logging_level="ERROR")
        else:
            # A local cluster is ours: keep its start-up quiet (its token-auth notice included) so the console
            # shows the run's progress and errors, each on one line.
            init_local(ingress, configure_logging=True, logging_level="ERROR")
    except ConnectionError as exc:
        raise UserError(f"cannot reach the Ray cluster at {address}: {one_line(str(exc).splitlines()[0])}") from None
    finally:
        if callable(previous) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)


def ray_connected() -> bool:
    """Whether this process is connected to a Ray cluster already (without importing Ray if it is not loaded)."""
    if "ray" not in sys.modules:
        return False
    import ray

    return ray.is_initialized()


def _marks(pids: set[int]) -> set[str]:
    """Strings that name this cluster in a command line: its session directory and its HAProxy's config directory
    (a reload may start a new HAProxy after the snapshot, as a child of a process that is about to die)."""
    marks = {_local["session_dir"]} if _local.get("session_dir") else set()
    for pid in pids:
        cmd = processes.command_line(pid)
        if "haproxy" in cmd and " -f " in cmd:
            marks.add(os.path.dirname(cmd.split(" -f ", 1)[1].split()[0]) + "/")
    return marks


def shutdown(grace_s: float = 3.0) -> list[int]:
    """Shut Ray down; if this process started the local cluster, end every one of its processes still alive
    afterwards (SIGTERM, then SIGKILL after `grace_s`). Returns the pids that had to be ended. Joining a remote
    cluster only disconnects."""
    if "ray" not in sys.modules:  # this command never touched Ray (and importing it now would cost a second)
        return []
    import ray

    ours = _local.get("owner") == os.getpid()
    pids = processes.descendants(os.getpid()) if ours else set()
    marks = _marks(pids) if ours else set()
    if ray.is_initialized():
        ray.shutdown()
    if not ours:
        return []
    _local.clear()
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:  # give ray.shutdown's own kills a moment to land
        left = (processes.alive(pids) | processes.naming(marks)) - {os.getpid()}
        if not left:
            return []
        time.sleep(0.2)
    return sorted(processes.end(left, grace_s))
