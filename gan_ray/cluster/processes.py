"""Processes and ports of this machine, through psutil: the process tree below a command, ending a set of processes
for good, and free TCP ports. What `gan_ray.cluster.connect.shutdown` uses to leave nothing of a local cluster
behind, and what the tests use to check that nothing was left.
"""
from __future__ import annotations

import socket
import time
from typing import Iterable

import psutil


def alive(pids: Iterable[int]) -> set[int]:
    """Those of `pids` still running: zombies (exited, not yet reaped by their parent) count as gone."""
    out = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.add(pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` in the process tree (empty when `pid` is gone)."""
    try:
        return alive(p.pid for p in psutil.Process(pid).children(recursive=True))
    except psutil.NoSuchProcess:
        return set()


def command_line(pid: int) -> str:
    """The process's command line as one string ("" once it is gone)."""
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""


def command_lines() -> dict[int, str]:
    """pid -> command line of every process (zombies and vanished ones left out)."""
    out = {}
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["status"] != psutil.STATUS_ZOMBIE and proc.info["cmdline"]:
            out[proc.pid] = " ".join(proc.info["cmdline"])
    return out


def naming(marks: Iterable[str], exclude: Iterable[int] = ()) -> set[int]:
    """Live processes whose command line contains any of `marks` (a cluster's session or temp directory), and
    all their descendants."""
    marks, skip = [m for m in marks if m], set(exclude)
    found: set[int] = set()
    for pid, cmd in command_lines().items():
        if pid not in skip and any(m in cmd for m in marks):
            found |= {pid} | descendants(pid)
    return found - skip


def end(pids: Iterable[int], grace_s: float = 3.0) -> set[int]:
    """SIGTERM, then SIGKILL after `grace_s` for those still running (Ray's agents ignore a plain SIGTERM while
    they shut down). Returns the processes that were still alive at the start."""
    left = alive(pids)
    ended = set(left)
    for kill in (psutil.Process.terminate, psutil.Process.kill):
        for pid in left:
            try:
                kill(psutil.Process(pid))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        deadline = time.monotonic() + grace_s
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = alive(left)
        if not left:
            break
    return ended


def listening_ports(pids: Iterable[int]) -> set[int]:
    """TCP ports that the given processes listen on."""
    wanted = set(pids)
    return {c.laddr.port for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.pid in wanted}


def port_holders(port: int) -> set[int]:
    """Processes holding a socket on local `port`, listening or connected (TIME_WAIT belongs to no process)."""
    return {c.pid for c in psutil.net_connections(kind="tcp")
            if c.laddr and c.laddr.port == port and c.pid is not None and c.status != psutil.CONN_TIME_WAIT}


def bindable(port: int, host: str = "0.0.0.0") -> bool:
    """Whether a server could bind `port` now (with SO_REUSEADDR, as servers do: TIME_WAIT does not block it)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def free_port(host: str = "127.0.0.1", avoid: set[int] | None = None, outside: range | None = None,
              span: int = 1) -> int:
    """A TCP port nothing listens on now, chosen by the OS, with the `span - 1` ports after it free too: none of
    them in `avoid` (which then records them, for a caller picking several), none inside `outside` (Ray's worker
    port range, say, where a Ray process might take it next)."""
    taken = avoid if avoid is not None else set()
    for _ in range(500):
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        block = range(port, port + span)
        if any(p in taken or (outside is not None and p in outside) for p in block):
            continue
        if all(bindable(p, host) for p in block[1:]):
            taken.update(block)
            return port
    raise RuntimeError("no free port found")


def port_or_free(preferred: int, host: str = "0.0.0.0") -> int:
    """`preferred` if nothing listens there on `host`, else a free port the OS picks."""
    with socket.socket() as s:
        try:
            s.bind((host, preferred))
            return preferred
        except OSError:
            s.bind((host, 0))
            return s.getsockname()[1]
