"""Every `gan-ray` command shown in the README and docs runs, so an example cannot rot: each is run as written,
with its paths pointed at test fixtures (a model, a run, a server), its sizes made small (epochs, trials,
steps, seconds: flags appended after the documented ones, which win) and the session's Ray cluster joined: in
this process through the CLI's own main(), except `serve`, which runs until stopped (its own process, joining
the session's cluster by address). What this machine cannot do is named and skipped: a GPU, a dataset download,
a remote cluster. `submit` examples run in tests/test_cluster_e2e.py, against its own cluster.

The commands that start Ray work (train, tune, bench, bench-serve, serve) are the e2e tier; the rest (sample,
export, evaluate, generate, serve --build) run in `make test`."""
from __future__ import annotations

import re
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import Command, cli, deploy, start_serve
from gan_ray.core.config import load_yaml
from tests.test_docs import COMMANDS

pytestmark = pytest.mark.slow

SMALL = {  # appended after the documented flags (argparse: the last one wins)
    "train": ["--epochs", "1", "--workers", "1", "--batch-size", "32", "--sample-every", "0", "--eval-samples",
              "256", "--checkpoint-every", "1"],
    "tune": ["--trials", "1", "--epochs", "1", "--batch-size", "32", "--sample-every", "0", "--eval-samples", "256",
             "--workers-per-trial", "1"],
    "bench": ["--steps", "8", "--repeats", "1", "--threads", "1"],
    "bench-serve": ["--duration-s", "1", "--warmup-s", "0.2", "--concurrency", "1", "--n", "1"],
    "evaluate": ["--n", "512"],
}


def why_not_here(argv: list[str]) -> str | None:
    """The reason a documented command cannot run on this machine (None if it can)."""
    import torch

    text = " ".join(argv)
    if argv[0] == "submit":
        return "runs in tests/test_cluster_e2e.py against its own cluster"
    if argv[0] == "demo":
        return "runs in tests/test_demo.py (the whole demo, checked)"
    if ("--device cuda" in text or "--gpus-per-worker" in text or "--gpus-per-replica" in text) \
            and not torch.cuda.is_available():
        return "needs a GPU"
    if re.search(r"--dataset (cifar10|fashion-mnist)", text):
        return "needs a dataset download (offline here)"
    recipe = argv[argv.index("--config") + 1] if "--config" in argv else None
    if re.search(r"--dataset mnist\b", text) or (recipe and load_yaml(recipe).get("dataset") == "mnist"):
        return "real MNIST (its path is the user's): recipes' and defaults' early steps run in tests/test_recipes.py"
    if "ray://" in text:
        return "joins a remote cluster"
    if re.search(r"(s3|gs)://", text):
        return "object storage: tests/test_stream_e2e.py prepares into and trains from a local S3 server"
    if re.search(r"--dataset (\.|~|/)", text) or (argv[0] == "prepare" and argv[1].startswith(("~", "/"))):
        return "a user's prepared dataset or image folder: tests/test_stream.py prepares and streams one"
    return None


@pytest.fixture(scope="module")
def world(tmp_path_factory, serve_models, ray_cluster):
    """What the documented commands refer to: a model directory, a run with a checkpoint, a sample file, a
    space file, a server answering at a URL, and the session cluster's address."""
    root = tmp_path_factory.mktemp("docs-world")
    model = serve_models["conditional"]
    run = root / "run"
    ckpt_src = model.parent / "ckpt-conditional"
    shutil.copytree(ckpt_src, run / "checkpoint_000001")
    from gan_ray.core.model_dir import load_generator

    images, labels = load_generator(model).generate_with_labels(300, None, seed=0)
    np.savez(root / "samples.npz", images=images.numpy(), labels=labels.numpy())
    (root / "space.yaml").write_text("lr_g: 1e-4:1e-3\nlr_d: 1e-4:1e-3\n")
    start_serve(ray_cluster)
    url = deploy("docs", model, min_replicas=1, max_replicas=1, cpus_per_replica=0.5)
    return {"root": root, "model": model, "run": run, "checkpoint": run / "checkpoint_000001", "url": url,
            "address": ray_cluster.get_runtime_context().gcs_address}


def localise(argv: list[str], world: dict, out_dir: Path) -> list[str]:
    """The documented command with its paths and addresses pointed at the fixtures, and its sizes made small."""
    out: list[str] = []
    it = iter(range(len(argv)))
    for i in it:
        arg = argv[i]
        value = argv[i + 1] if i + 1 < len(argv) else None
        if arg == "--model":
            out += [arg, str(world["model"])]
        elif arg == "--checkpoint":
            out += [arg, str(world["checkpoint"] if "checkpoint_" in (value or "") else world["run"])]
        elif arg == "--samples":
            out += [arg, str(world["root"] / "samples.npz")]
        elif arg == "--space":
            out += [arg, str(world["root"] / "space.yaml")]
        elif arg in ("--out", "--export", "--storage"):
            name = Path(value or "x").name or "x"
            out += [arg, str(out_dir / f"{arg.strip('-')}-{name}")]
        elif arg == "--url":
            out += [arg, world["url"]]
        elif arg == "--address":
            out += [arg, world["address"]]
        elif arg == "--port":
            from gan_ray.cluster.processes import free_port

            out += [arg, str(free_port())]
        else:
            out.append(arg)
            continue
        next(it, None)  # the value was replaced
    if out[0] == "generate" and "--url" not in out:
        out += ["--url", world["url"]]
    if out[0] in ("train", "tune", "bench", "serve", "prepare") and "--address" not in out and "--build" not in out:
        out += ["--address", world["address"]]  # join the session's cluster (a cluster start saved per command)
    if out[0] == "serve" and "--port" not in out:
        from gan_ray.cluster.processes import free_port

        out += ["--port", str(free_port())]
    if out[0] in ("train", "tune") and "--storage" not in out:
        out += ["--storage", str(out_dir / "runs")]
    return out + SMALL.get(out[0], [])


def shape(argv: list[str]) -> tuple[str, ...]:
    """What a documented command runs here once `localise` has pointed its paths at the fixtures and made its sizes
    small: two commands of one shape (`--epochs 90` or `--port 8000` aside) would run the same thing twice."""
    given_here = {"--port", "--address", "--storage", *(f for f in SMALL.get(argv[0], []) if f.startswith("--"))}
    to_fixtures = {"--model", "--checkpoint", "--samples", "--space", "--out", "--export", "--url"}
    out: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg in given_here | to_fixtures:
            next(it, None)
            if arg in to_fixtures:
                out.append(f"{arg} *")
        else:
            out.append(arg)
    return tuple(out)


RUNNABLE = list({shape(a): (w, a) for w, a in reversed(COMMANDS)}.values())[::-1]  # each distinct command once
RAY_WORK = ("train", "tune", "bench", "bench-serve", "serve")


def tier(argv: list[str]):
    return pytest.mark.e2e if argv[0] in RAY_WORK and "--build" not in argv else pytest.mark.slow


@pytest.mark.parametrize("where, argv", [pytest.param(w, a, marks=tier(a), id=w) for w, a in RUNNABLE])
def test_documented_command_runs(where, argv, world, tmp_path):
    reason = why_not_here(argv)
    if reason:
        pytest.skip(reason)
    args = localise(argv, world, tmp_path)
    if args[0] == "serve" and "--build" not in args:  # runs until stopped: start it, query it, stop it
        import requests

        cmd = Command(*args)
        try:
            line = cmd.wait_for_line(r"^serving ", 240)
            url = re.search(r" at (http://\S+)", line).group(1)
            assert requests.get(url + "/healthz", timeout=10).status_code == 200
            cmd.proc.send_signal(signal.SIGTERM)  # the cluster is the session's: only the command's process ends
            rc = cmd.proc.wait(timeout=120)
        finally:
            cmd.kill()
        assert rc == 143, cmd.text()[-2000:]
        return
    r = cli(*args)
    assert r.returncode == 0, f"{' '.join(args)}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
