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
        from gan_ray.cluster import init_local

        # what `gan-ray serve` gives a cluster it starts: HAProxy in front of Serve, its side ports on localhost
        init_local(num_cpus=4, include_dashboard=True, configure_logging=True, logging_level="WARNING")
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    from gan_ray.cluster import shutdown

    shutdown()  # Ray, and every process of the session's cluster still alive after it


def own_lines(stderr: str) -> list[str]:
    """The lines a command run in this process printed itself: Ray forwards its workers' output (of earlier tests
    too, whenever it arrives) to this process's stderr, each line prefixed "(Name pid=N)", maybe coloured."""
    import re

    return [line for line in stderr.strip().splitlines()
            if line.strip() and not re.match(r"^(\x1b\[[0-9;]*m)?\(\w+ pid=\d+", line)]


def process_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (ppid, state, cmdline) of every process."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        table[int(name)] = (int(rest[1]), rest[0], cmd)
    return table


def processes_of(temp_dir: str) -> set[int]:
    """Live processes whose command line names `temp_dir`, and all their descendants."""
    table = process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = set(), [pid for pid, (_, _, cmd) in table.items() if temp_dir in cmd and pid != os.getpid()]
    while stack:
        pid = stack.pop()
        if pid not in found:
            found.add(pid)
            stack.extend(children.get(pid, []))
    return {pid for pid in found if table.get(pid, (0, "Z", ""))[1] != "Z"}


def alive(pids: set[int]) -> set[int]:
    """Those of `pids` still running (zombies count as gone)."""
    table = process_table()
    return {pid for pid in pids if pid in table and table[pid][1] != "Z"}


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
def _socket_inodes(pids) -> dict[str, int]:
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:
            continue
    return inodes


def _tcp_sockets():
    """(local port, state, inode) of every TCP socket (/proc/net/tcp{,6}; state 0A = LISTEN, 06 = TIME_WAIT)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            yield int(fields[1].rsplit(":", 1)[1], 16), fields[3], fields[9]


def listening_ports(pids: set[int]) -> set[int]:
    """TCP ports the given processes listen on (their sockets' inodes matched in /proc/net/tcp{,6})."""
    inodes = _socket_inodes(pids)
    return {port for port, state, inode in _tcp_sockets() if state == "0A" and inode in inodes}


def only_time_wait(port: int) -> bool:
    states = {state for p, state, _ in _tcp_sockets() if p == port}
    return bool(states) and states <= {"06"}


def port_holders(port: int) -> set[int]:
    """Processes holding a socket on local `port` (TIME_WAIT aside: that belongs to no process)."""
    wanted = {inode for p, state, inode in _tcp_sockets() if p == port and state != "06"}
    if not wanted:
        return set()
    inodes = _socket_inodes(int(p) for p in os.listdir("/proc") if p.isdigit())
    return {pid for inode, pid in inodes.items() if inode in wanted}


def bindable(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a server would; a live listener still wins
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


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
        from gan_ray.cluster import descendants

        import re

        tree = descendants(self.proc.pid)
        ports = listening_ports(tree | {self.proc.pid})
        assert tree, "the command started no process: not a busy moment"
        # what names this command's cluster in a command line: its Ray session, its HAProxy's config directory
        cmdlines = " ".join(_cmdline(p) for p in tree)
        marks = set(re.findall(r"/tmp/ray/session_[\w.-]+", cmdlines)) | \
            set(re.findall(r"/tmp/haproxy-serve/\w+/", cmdlines))
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout_s)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
        time.sleep(0.5)  # the reader threads catch up
        alive = {p: Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")[:100] for p in tree
                 if Path(f"/proc/{p}").exists() and not _zombie(p)}
        assert not alive, f"left behind: {alive}\n{self.text()[-2000:]}"
        strays = {p: _cmdline(p)[:100] for p in map(int, filter(str.isdigit, os.listdir("/proc")))
                  if p != os.getpid() and any(m in _cmdline(p) for m in marks) and not _zombie(p)}
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
            detail = {p: [(pid, _cmdline(pid)[:60]) for pid in port_holders(p)] for p in busy}
            sockets = {p: [(state, inode) for q, state, inode in _tcp_sockets() if q == p] for p in busy}
            raise AssertionError(f"ports still bound after the command stopped: {detail} {sockets}") from None
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
