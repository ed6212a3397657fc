"""SIGTERM (docker stop, kubectl delete, systemd) stops every long-running command like Ctrl-C does: one line
saying what it stopped, exit code 143, a training run's last checkpoint intact and resumable, and nothing left
behind: no process of its own (Ray's daemons and agents, workers, HAProxy, a benchmark's plain server) and no
bound port. Each test sends the signal at a busy moment and checks /proc and the ports afterwards
(tests/conftest.py: Command.stop). `submit --wait` is in tests/test_cluster_e2e.py, next to its cluster; `tune`
(stopped, then resumed to completion) in tests/test_tune.py, whose sweep it is.

`make test` stops `train` (and resumes it); the other commands are the e2e tier."""
from __future__ import annotations

import json
import re

import pytest

from gan_ray.cluster.processes import command_line, descendants
from tests.conftest import Command, cli, wait_for

pytestmark = pytest.mark.slow
e2e = pytest.mark.e2e

TRAIN = ["--dataset", "digits", "--workers", "2", "--batch-size", "32", "--sample-every", "0"]


def wait_for_a_train_run(cmd: Command, what: str) -> None:
    """Until a Ray Train run of the command's own cluster has started (its TrainController process is up)."""
    wait_for(lambda: any("TrainController" in command_line(p) for p in descendants(cmd.proc.pid)), 300, what)


def stop_line(cmd: Command, command: str) -> str:
    lines = [line for line in cmd.err if line.startswith(f"gan-ray {command}: stopped (SIGTERM): ")]
    assert len(lines) == 1, cmd.text()[-3000:]
    return lines[0]


def test_train_stops_keeping_its_checkpoint_and_resumes(tmp_path, ray_cluster):
    args = ["train", *TRAIN, "--epochs", "40", "--checkpoint-every", "2", "--storage", str(tmp_path), "--name", "t"]
    cmd = Command(*args)
    try:
        cmd.wait_for_line(r"^epoch\s+3/40", 300)  # a checkpoint (epoch 2) exists, training is under way
        assert cmd.stop() == 143, cmd.text()[-3000:]
    finally:
        cmd.kill()
    line = stop_line(cmd, "train")
    done = int(re.search(r"checkpoint of epoch (\d+)", line).group(1))
    assert done >= 2 and "re-run the same command to resume" in line
    # the run resumes from that checkpoint and finishes (here on the session's cluster: it is the run directory
    # that resumes, wherever it runs)
    r = cli(*args[:-6], "--epochs", str(done + 1), "--checkpoint-every", "2", "--storage", str(tmp_path),
            "--name", "t")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["epoch"] == done + 1 and rows[-1]["restored_from"] == done


@e2e
def test_demo_stops_during_its_sweep(tmp_path):
    """Tune takes the signal (as it takes a first Ctrl-C) and returns normally: the demo must then stop, not go on
    to train."""
    cmd = Command("demo", "--out", str(tmp_path / "demo"))
    try:  # a trial's Ray Train run is starting: Tune is under way
        wait_for_a_train_run(cmd, "the first trial's Ray Train run")
        assert cmd.stop() == 143
    finally:
        cmd.kill()
    assert "stopped during the sweep (1/4)" in stop_line(cmd, "demo")
    assert "[demo] 2/4 train" not in cmd.text()


@e2e
def test_bench_stops_inside_its_ray_train_run():
    cmd = Command("bench", "--steps", "300", "--repeats", "2", "--threads", "1")
    try:
        import time

        # busy: the Ray Train run is measuring (the plain loop ran first)
        wait_for_a_train_run(cmd, "the Ray Train run")
        time.sleep(5)
        assert cmd.stop() == 143, cmd.text()[-2000:]
    finally:
        cmd.kill()
    stop_line(cmd, "bench")


@e2e
def test_bench_serve_stops_its_plain_server_too(tmp_path, serve_models):
    cmd = Command("bench-serve", "--model", str(serve_models["conditional"]), "--duration-s", "60",
                  "--concurrency", "1", "--n", "1")
    try:
        cmd.wait_for_line(r"\[bench-serve\] Ray Serve .* measuring", 240)  # both servers up, the load running
        assert cmd.stop() == 143
    finally:
        cmd.kill()
    stop_line(cmd, "bench-serve")


@e2e
def test_two_local_deployments_coexist_with_side_ports_on_localhost(tmp_path, serve_models):
    """Two `gan-ray serve` on one machine: each cluster's HAProxy takes free stats/metrics ports when the defaults
    are taken, and binds them on 127.0.0.1 only. Each then stops on SIGTERM, its port free again."""
    from tests.conftest import listening_ports

    from gan_ray.cluster.processes import free_port

    cmds = []
    try:
        for _ in range(2):
            port = free_port()
            cmds.append((Command("serve", "--model", str(serve_models["conditional"]), "--port", str(port),
                                 "--max-replicas", "1"), port))
            cmds[-1][0].wait_for_line(r"^serving ", 240)
        from gan_ray.serve.client import generate

        side = []
        for cmd, port in cmds:
            assert generate(f"http://127.0.0.1:{port}", n=2, seed=1, format="npz").arrays()[0].shape[0] == 2
            assert _haproxy(cmd), "served through HAProxy"
            # Serve reloads HAProxy (a new process takes the listeners over, the old one drains) as the
            # deployment settles; caught mid-reload, the side ports belong to neither for a moment (seen once in CI).
            side.append(set())
            wait_for(lambda: side[-1].update(listening_ports(_haproxy(cmd)) - {port}) or side[-1], 30,
                     "HAProxy's side ports")
            for p in side[-1]:
                assert _listen_address(p) == "127.0.0.1", (p, _listen_address(p))
        assert side[0] and side[1] and not side[0] & side[1], side
        for cmd, port in cmds:
            assert cmd.stop() == 143
            assert f"port {port} is free" in stop_line(cmd, "serve")
    finally:
        for cmd, _ in cmds:
            cmd.kill()


def _haproxy(cmd: Command) -> set[int]:
    """The command's HAProxy processes (the live one, and any still draining after a reload)."""
    return {p for p in descendants(cmd.proc.pid) if "haproxy -db" in command_line(p)}


def _listen_address(port: int) -> str:
    """The local address a listener on `port` is bound to (IPv4)."""
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        fields = line.split()
        addr, p = fields[1].split(":")
        if fields[3] == "0A" and int(p, 16) == port:
            return ".".join(str(int(addr[i:i + 2], 16)) for i in (6, 4, 2, 0))
    return "?"


def test_a_sigterm_a_finished_command_took_still_prints_its_line(monkeypatch):
    """Tune's Ctrl-C handler only asks the sweep to stop. A SIGTERM it took once the sweep had finished let the
    command run to its end and exit 143 with no line at all. In-process: the signal arrives while a command runs
    under such a handler, and the command still finishes its work."""
    import os
    import signal
    import time

    import gan_ray.cli.export as export_command

    def finishes_all_the_same(args) -> int:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # the handler runs here, in this (the main) thread
        print("work done")
        return 0

    monkeypatch.setattr(export_command, "run", finishes_all_the_same)
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, lambda signum, frame: None)  # asks for a stop and returns, as Tune's does
    try:
        r = cli("export", "--checkpoint", "x", "--out", "y")
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    assert r.returncode == 143 and "work done" in r.stdout, r
    assert r.stderr.strip().splitlines() == [
        "gan-ray export: stopped (SIGTERM): the signal came after its work was done; nothing was left unfinished"]
