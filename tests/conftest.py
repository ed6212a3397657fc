"""Shared fixtures: one real local Ray cluster per test session (start-up costs ~5 s on 2 cores)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from gan_ray.cluster import processes
from gan_ray.cluster.processes import alive, bindable, command_line, free_port, listening_ports, port_holders
from gan_ray.core.config import TrainConfig

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


@dataclass
class CliResult:
    """What a `gan-ray` command returned and printed (the shape of subprocess.CompletedProcess)."""

    returncode: int
    stdout: str
    stderr: str


def cli(*args: object, env: dict[str, str] | None = None) -> CliResult:
    """Run `gan-ray ARGS` in this process, through the CLI's own `main()` (the console script's path), with its
    output captured and `env` set for the call. Seconds cheaper than a subprocess; a command that needs Ray uses
    the session's cluster if this process has joined it (and leaves it running), else starts its own. Lines Ray
    forwards from its workers (of any test, whenever they arrive) are not the command's: see `own_lines`."""
    import contextlib
    import io

    from gan_ray.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in args])
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return CliResult(code, out.getvalue(), "\n".join(own_lines(err.getvalue())))


def assert_one_line_error(r, *fragments: str) -> None:
    """Exit code 2, exactly one line on stderr containing every fragment, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for frag in fragments:
        assert frag in lines[0], lines[0]


def run_cli(*args: str, timeout: float = 600, env: dict | None = None, cwd: str | Path | None = None):
    """Run `gan-ray ARGS` in a fresh process (its own Ray, if it needs one): for what only a process shows (the
    console script, signals, a cluster of its own). Everything else: `cli`."""
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


# --------------------------------------------------------------------------------------------- served models
def train_model_dir(root: Path, *, conditional: bool, steps: int = 400, seed: int = 0) -> Path:
    """A real exported model in seconds: the MLP GAN trained in-process on digits with gan_ray.core.step (no Ray
    Train), checkpointed with gan_ray.core.checkpoint and exported with gan_ray.registry."""
    from gan_ray.core import checkpoint
    from gan_ray.core.data import load_dataset
    from gan_ray.core.models import ModelSpec, build
    from gan_ray.core.model_dir import export
    from gan_ray.core.step import make_state, train_step

    torch.manual_seed(seed)
    torch.set_num_threads(1)  # 2 cores shared with Ray: more threads only spin
    cfg = TrainConfig(dataset="digits", arch="mlp", conditional=conditional, batch_size=64, epochs=1,
                      ema_halflife_kimg=2.0, seed=seed)
    data = load_dataset("digits")
    spec = ModelSpec("mlp", cfg.latent_dim, data.shape, data.num_classes if conditional else 0)
    G, D = build(spec)
    state = make_state(spec, G, D, lr_g=cfg.lr_g, lr_d=cfg.lr_d, beta1=cfg.beta1, ema_halflife_kimg=2.0)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(data), (cfg.batch_size,), generator=gen)
        real, labels = data.batch(idx)
        train_step(state, real, labels if conditional else None)
    name = "conditional" if conditional else "unconditional"
    ckpt = checkpoint.save(root / f"ckpt-{name}", state, epoch=1, config=cfg.to_dict())
    return export(ckpt, root / f"model-{name}")


COND_STEPS = 200  # a real (if young) conditional GAN: enough to test the plumbing, seconds to train
UNCOND_STEPS = 40


@pytest.fixture(scope="session")
def serve_models(tmp_path_factory) -> dict[str, Path]:
    """One conditional and one unconditional exported model, shared by the serve test modules."""
    root = tmp_path_factory.mktemp("serve-models")
    return {"conditional": train_model_dir(root, conditional=True, steps=COND_STEPS),
            "unconditional": train_model_dir(root, conditional=False, steps=UNCOND_STEPS)}


def start_serve(ray_cluster) -> None:
    """Serve on the session cluster, on a free port unless another module already started it."""
    from ray import serve

    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})


def deploy(name: str, model_dir: Path, **options) -> str:
    """Deploy the app exactly as `serve run gan_ray.serve:app model=DIR` would (Ray's own builder call) under
    /<name>, and return its base URL once it answers."""
    from ray import serve
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray._common.utils import import_attr

    from gan_ray.serve.deployment import http_url
    from gan_ray.serve.client import wait_ready

    builder = import_attr("gan_ray.serve:app")
    app = call_user_app_builder_with_args_if_necessary(builder, {"model": str(model_dir), **options})
    serve.run(app, name=name, route_prefix=f"/{name}")
    url = f"{http_url()}/{name}"
    wait_ready(url, timeout_s=120)
    return url

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
