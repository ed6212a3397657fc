"""A Ray cluster with Ray's own autoscaler and its fake-node provider, private to one test module.

`ray.cluster_utils.AutoscalingCluster` would do this, but its start() and shutdown() run `ray stop --force`, which
kills every Ray process on the machine (the test session's cluster, other people's runs), and it reads a config
(`autoscaler/_private/fake_multi_node/example.yaml`) that Ray's wheel does not ship. So this starts the same thing
by hand: `RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...` with its own ports and temp dir, and Ray's
fake provider class named as an `external` provider (the `fake_multinode` type makes the autoscaler read its
defaults from that missing example.yaml, and the monitor dies at start). The autoscaler (the head's monitor process)
then adds and removes real raylets on this machine as nodes of the configured types; they inherit the head's temp
dir, so `down()` finds every process of this cluster (those whose command line names the temp dir, and all their
descendants) and nothing else.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from gan_ray.cluster.processes import free_port
from tests.conftest import RAY_WORKER_PORTS, alive, processes_of

RAY = str(Path(sys.executable).with_name("ray"))
FAKE_PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"
FAKE_HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"  # what the fake provider expects


class FakeAutoscalingCluster:
    """Head (`head_cpus`, default 0: it schedules no work, like the k8s and `ray up` configs) plus the autoscaler,
    which adds nodes of `worker_types` ({name: {"resources": {...}, "min_workers": .., "max_workers": ..}}) on
    demand. `v2`: Ray's autoscaler v2 (what the KubeRay manifests use), else v1 (what `ray up` uses)."""

    def __init__(self, temp_dir: str, worker_types: dict, *, head_cpus: int = 0, v2: bool = True,
                 idle_timeout_minutes: float = 5.0):
        import ray._private.services

        self.temp_dir = temp_dir
        self.v2 = v2
        used: set[int] = set()
        self.gcs_port, self.dashboard_port, self.client_port, self.agent_port = (
            free_port(avoid=used, outside=RAY_WORKER_PORTS) for _ in range(4))
        self.ip = ray._private.services.get_node_ip_address()
        self.gcs_address = f"{self.ip}:{self.gcs_port}"
        self.head_cpus = head_cpus
        provider = {"type": "external", "module": FAKE_PROVIDER, "use_node_id_as_ip": True,
                    "disable_node_updaters": True, "disable_launch_config_check": True,
                    "gcs_address": self.gcs_address}
        if v2:
            provider.update(launch_multiple=True, head_node_id=FAKE_HEAD_NODE_ID)
        types = {name: {"node_config": {}, **spec} for name, spec in worker_types.items()}
        types["ray.head.default"] = {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0}
        self.config = {
            "cluster_name": "fake-autoscaling", "max_workers": sum(t.get("max_workers", 0) for t in types.values()),
            "provider": provider, "available_node_types": types, "head_node_type": "ray.head.default",
            "upscaling_speed": 1.0, "idle_timeout_minutes": idle_timeout_minutes,
            # not used by the fake provider, but required by the config schema
            "auth": {}, "docker": {}, "initialization_commands": [], "setup_commands": [],
            "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
            "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
            "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": []}
        self.seen: set[int] = set()

    def env(self) -> dict[str, str]:
        """The environment of the head (and so of the autoscaler and the nodes it starts)."""
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        # Token authentication explicitly on (what KubeRay and cluster/local.sh do), so every process of the
        # cluster and every driver given this environment agree on it.
        env.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTH_MODE": "token"})
        if self.v2:
            env.update({"RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
                        "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID})
        else:  # explicitly v1: what `RAY_UP_enable_autoscaler_v2=0 ray up` and older KubeRay setups run
            env["RAY_enable_autoscaler_v2"] = "0"
        return env

    def up(self, timeout_s: float = 180) -> None:
        # Token authentication needs a token (~/.ray/auth_token, created if missing, as cluster/local.sh does):
        # on a fresh machine nothing has made one unless an earlier test happened to start Ray.
        subprocess.run([RAY, "get-auth-token", "--generate"], capture_output=True, check=True, timeout=60,
                       env=self.env())
        Path(self.temp_dir).mkdir(parents=True, exist_ok=True)
        config = Path(self.temp_dir) / "autoscaling.json"
        config.write_text(json.dumps(self.config))
        cmd = [RAY, "start", "--head", "--port", str(self.gcs_port), "--node-ip-address", self.ip,
               "--num-cpus", str(self.head_cpus), "--num-gpus", "0", f"--autoscaling-config={config}",
               "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
               "--dashboard-port", str(self.dashboard_port), "--ray-client-server-port", str(self.client_port),
               "--dashboard-agent-listen-port", str(self.agent_port), "--temp-dir", self.temp_dir,
               "--disable-usage-stats"]
        r = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=timeout_s)
        self.seen |= processes_of(self.temp_dir)
        if r.returncode != 0:
            raise RuntimeError(f"ray start failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")

    def driver_env(self) -> dict[str, str]:
        """The environment of a driver joining this cluster (gan-ray --address ...): no RAY_ADDRESS, the token."""
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        env["RAY_AUTH_MODE"] = "token"
        return env

    def nodes(self) -> list[dict[str, float]]:
        """The total resources of each live node, from the cluster's state API (over HTTP, with the token)."""
        from ray.util.state import StateApiClient
        from ray.util.state.common import ListApiOptions, StateResource

        from gan_ray.jobs import auth_headers

        address = f"http://127.0.0.1:{self.dashboard_port}"
        api = StateApiClient(address, headers=auth_headers(address)[0])
        self.seen |= processes_of(self.temp_dir)
        nodes = api.list(StateResource.NODES, options=ListApiOptions(limit=100, detail=True),
                         raise_on_missing_output=False)
        return [dict(n.resources_total) for n in nodes if n.state == "ALIVE"]

    def nodes_ever(self) -> int:
        """How many nodes the GCS ever registered, alive or dead (the head included): a node the autoscaler
        launched and removed again still counts."""
        from ray.util.state import StateApiClient
        from ray.util.state.common import ListApiOptions, StateResource

        from gan_ray.jobs import auth_headers

        address = f"http://127.0.0.1:{self.dashboard_port}"
        api = StateApiClient(address, headers=auth_headers(address)[0])
        return len(api.list(StateResource.NODES, options=ListApiOptions(limit=100), raise_on_missing_output=False))

    def launching(self) -> tuple[int, str]:
        """What the autoscaler is launching now (and its newest launch failure), read from the GCS's autoscaling
        state exactly as gan_ray.cluster.autoscaler reads it, in a process of its own (the cluster's auth mode)."""
        code = ("import json, sys; from gan_ray.cluster.autoscaler import Autoscaler, LegacyAutoscaler; "
                "cls = Autoscaler if sys.argv[2] == 'v2' else LegacyAutoscaler; "
                "print(json.dumps(cls(sys.argv[1]).launching()))")
        r = subprocess.run([sys.executable, "-c", code, self.gcs_address, "v2" if self.v2 else "v1"],
                           env=self.driver_env(), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        pending, failure = json.loads(r.stdout.strip().splitlines()[-1])
        return pending, failure

    def worker_cpus(self) -> float:
        return sum(n.get("CPU", 0.0) for n in self.nodes())

    def down(self) -> set[int]:
        """Stop every process of this cluster (TERM, then KILL after 10 s); returns those still alive (none)."""
        self.seen |= processes_of(self.temp_dir)
        for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            for pid in alive(self.seen | processes_of(self.temp_dir)):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and alive(self.seen | processes_of(self.temp_dir)):
                time.sleep(0.2)
        left = alive(self.seen | processes_of(self.temp_dir))
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return left
