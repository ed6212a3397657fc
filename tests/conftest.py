"""Shared fixtures: one real local Ray cluster per test session (start-up costs ~5 s on 2 cores)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gan_ray.cluster import processes
from gan_ray.cluster.processes import alive, bindable, command_line, listening_ports, port_holders

# One intra-op thread per test process: the machines have 2 cores, and Ray workers run beside the tests.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
GAN_RAY = [sys.executable, "-m", "gan_ray.cli"]
# Ray's default worker ports: a fixed port given to a cluster must lie outside them.
RAY_WORKER_PORTS = range(10002, 20001)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster shared by every test that needs one. 4 logical CPUs on 2 cores: trials, Train
    workers and Serve replicas are mostly idle, and the resource checks under test are logical ones anyway."""
    import ray

    if not ray.is_initialized():
        from gan_ray.cluster.connect import init_local

        # what `gan-ray serve` gives a cluster it starts: HAProxy in front of Serve, its side ports on localhost
        init_local(num_cpus=4, include_dashboard=True, configure_logging=True, logging_level="WARNING")
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    from gan_ray.cluster.connect import shutdown

    shutdown()  # Ray, and every process of the session's cluster still alive after it


def own_lines(stderr: str) -> list[str]:
    """The lines a command run in this process printed itself: Ray forwards its workers' output (of earlier tests
    too, whenever it arrives) to this process's stderr, each line prefixed "(Name pid=N)", maybe coloured."""
    import re

    return [line for line in stderr.strip().splitlines()
            if line.strip() and not re.match(r"^(\x1b\[[0-9;]*m)?\(\w+ pid=\d+", line)]


def processes_of(temp_dir: str) -> set[int]:
    """Live processes whose command line names `temp_dir`, and all their descendants."""
    return processes.naming([temp_dir], exclude=[os.getpid()])


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


# ------------------------------------------------------------------------------- stopping a command cleanly
def only_time_wait(port: int) -> bool:
    """Whether every socket left on `port` is in TIME_WAIT (kernel state after a close, owned by no process)."""
    import psutil

    states = {c.status for c in psutil.net_connections(kind="tcp") if c.laddr and c.laddr.port == port}
    return bool(states) and states <= {psutil.CONN_TIME_WAIT}


class Command:
    """A `gan-ray` command in its own process group, its output collected line by line."""

    def __init__(self, *args: str, env: dict | None = None, cwd: Path | None = None):
        import threading

        full_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        full_env.update(env or {})
        self.proc = subprocess.Popen([*GAN_RAY, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     cwd=cwd or ROOT, env=full_env, start_new_session=True)
        self.out: list[str] = []
        self.err: list[str] = []
        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=lambda s=stream, k=sink: k.extend(iter(s.readline, "")), daemon=True).start()

    def wait_for_line(self, pattern: str, timeout_s: float) -> str:
        import re

        wait_for(lambda: any(re.search(pattern, line) for line in self.out + self.err) or self.proc.poll() is not None,
                 timeout_s, f"a line matching {pattern!r}")
        found = [line for line in self.out + self.err if re.search(pattern, line)]
        assert found, f"exited {self.proc.returncode} before {pattern!r}:\n{self.text()[-3000:]}"
        return found[0]

    def text(self) -> str:
        return "".join(self.out) + "".join(self.err)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 180) -> int:
        """Send `sig` at this moment, wait for the exit, and check that no process the command started is left
        and that every port they listened on can be bound again. Returns the exit code."""
        import re

        tree = processes.descendants(self.proc.pid)
        ports = listening_ports(tree | {self.proc.pid})
        assert tree, "the command started no process: not a busy moment"
        # what names this command's cluster in a command line: its Ray session, its HAProxy's config directory
        cmdlines = " ".join(command_line(p) for p in tree)
        marks = set(re.findall(r"/tmp/ray/session_[\w.-]+", cmdlines)) | \
            set(re.findall(r"/tmp/haproxy-serve/\w+/", cmdlines))
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout_s)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
        time.sleep(0.5)  # the reader threads catch up
        left = {p: command_line(p)[:100] for p in alive(tree)}
        assert not left, f"left behind: {left}\n{self.text()[-2000:]}"
        strays = {p: command_line(p)[:100] for p in processes.naming(marks, exclude=[os.getpid()])}
        assert not strays, f"processes of the command's cluster left behind: {strays}"
        busy: list[int] = []

        def free() -> bool:
            # A listener closes with its process (give the kernel a moment); a port another program on this
            # machine (another Ray cluster, say) took meanwhile is not the command's.
            # Connections the command's servers closed linger in TIME_WAIT (kernel state, no process: a server
            # setting SO_REUSEADDR binds over them, as Ray's replicas do).
            busy[:] = sorted(p for p in ports if not bindable(p) and not only_time_wait(p)
                             and not (port_holders(p) - tree - {self.proc.pid}))
            return not busy

        try:
            wait_for(free, 10, "the command's ports to be free")
        except AssertionError:
            detail = {p: [(pid, command_line(pid)[:60]) for pid in port_holders(p)] for p in busy}
            raise AssertionError(f"ports still bound after the command stopped: {detail}") from None
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()



# ------------------------------------------------------------------------------------------ real MNIST
MNIST_GZ = ROOT.parent / "shared" / "data" / "mnist"
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory):
    """A --data-dir holding real MNIST (gunzipped from ../shared/data/mnist into DIR/MNIST/raw/), or a skip with
    the reason when the shared data is not beside the checkout (a user's clone has none)."""
    import gzip
    import shutil

    if not all((MNIST_GZ / f"{name}.gz").is_file() for name in MNIST_FILES):
        pytest.skip(f"real MNIST not found in {MNIST_GZ} (the shared data beside the checkout)")
    raw = tmp_path_factory.mktemp("mnist") / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_FILES:
        with gzip.open(MNIST_GZ / f"{name}.gz") as src, open(raw / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return raw.parent.parent
