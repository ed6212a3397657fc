"""`gan-ray submit` against a real multi-node Ray cluster on this machine (cluster/local.sh: the e2e tier), one job
to the session's cluster (`make test`'s check of Ray Jobs), plus the submit command's own input checks.

The cluster is this module's own (`ray start` processes with their own ports and temp dir), separate from the
session `ray_cluster` fixture; nothing here touches os.environ, so RAY_ADDRESS cannot leak into other tests.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from gan_ray.cluster.processes import free_port
from tests.conftest import RAY_WORKER_PORTS, alive, own_lines, processes_of

ROOT = Path(__file__).resolve().parents[1]
LOCAL_SH = ROOT / "cluster" / "local.sh"


def run_cli(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """`gan-ray ARGS` in a fresh process with exactly `env` (no RAY_ADDRESS unless given)."""
    return subprocess.run([sys.executable, "-m", "gan_ray.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------- helpers
def _free_port(avoid: set[int], pair: bool = False) -> int:
    """A free TCP port outside Ray's worker port range, optionally with port+1 free too."""
    return free_port(avoid=avoid, outside=RAY_WORKER_PORTS, span=2 if pair else 1)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(extra)
    return env


def _submission_id(stdout: str) -> str:
    for line in stdout.splitlines():
        if line.startswith("submitted job "):
            return line.split()[2]
    raise AssertionError(f"no submission id in output:\n{stdout}")


# ------------------------------------------------------------------------------------------- the cluster
@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory):
    """cluster/local.sh up with this module's own ports: a 1-CPU head and a 1-CPU worker node, so a 2-worker
    Train run must put one worker on each node. Torn down (and checked) at module end."""
    used: set[int] = set()
    ports = {"GAN_RAY_GCS_PORT": _free_port(used), "GAN_RAY_DASHBOARD_PORT": _free_port(used),
             "GAN_RAY_CLIENT_PORT": _free_port(used), "GAN_RAY_AGENT_PORT": _free_port(used, pair=True)}
    temp_dir = f"/tmp/gr-e2e-{os.getpid()}"  # short: Unix socket paths live under it
    env = _clean_env(**{k: str(v) for k, v in ports.items()}, GAN_RAY_TEMP_DIR=temp_dir, GAN_RAY_HEAD_CPUS="1",
                     GAN_RAY_WORKER_NODES="1", GAN_RAY_WORKER_CPUS="1")
    up = subprocess.run(["bash", str(LOCAL_SH), "up"], env=env, capture_output=True, text=True, timeout=420)
    seen: set[int] = processes_of(temp_dir)
    info = {"address": f"http://127.0.0.1:{ports['GAN_RAY_DASHBOARD_PORT']}", "env": env, "temp_dir": temp_dir,
            "seen": seen, "storage": tmp_path_factory.mktemp("e2e-storage")}
    try:
        assert up.returncode == 0, f"local.sh up failed:\n{up.stdout}\n{up.stderr}"
        assert info["address"] in up.stdout
        yield info
    finally:
        seen |= processes_of(temp_dir)
        down = subprocess.run(["bash", str(LOCAL_SH), "down"], env=env, capture_output=True, text=True,
                              timeout=120)
        left = alive(seen) | processes_of(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert down.returncode == 0, down.stderr
    assert seen, "the cluster never had any process"
    assert not left, f"processes left behind after local.sh down: {sorted(left)}"


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    from gan_ray.jobs import auth_headers

    return JobSubmissionClient(address, headers=auth_headers(address)[0])


@pytest.mark.e2e
@pytest.mark.slow
def test_local_cluster_has_separate_nodes(local_cluster):
    from ray.util.state import StateApiClient
    from ray.util.state.common import StateResource

    from gan_ray.jobs import auth_headers

    address = local_cluster["address"]
    api = StateApiClient(address, headers=auth_headers(address)[0])
    nodes = api.list(StateResource.NODES, options=_list_options(), raise_on_missing_output=False)
    alive = [n for n in nodes if n.state == "ALIVE"]
    assert len(alive) == 2 and sorted(n.is_head_node for n in alive) == [False, True]
    assert all(n.resources_total.get("CPU") == 1.0 for n in alive)
    # `up` again while it runs is refused rather than starting a second cluster in the same place
    again = subprocess.run(["bash", str(LOCAL_SH), "up"], env=local_cluster["env"], capture_output=True,
                           text=True, timeout=60)
    assert again.returncode != 0 and "already running" in again.stderr



@pytest.mark.e2e
@pytest.mark.slow
def test_the_first_jobs_after_up_succeed_with_the_default_relative_storage(local_cluster):
    """The first job after `up` used to die in Path.resolve(): both nodes shared one temp directory, and the
    worker node's unpacking of the job's working_dir removed the head's copy under the running job. Two jobs
    right after `up` (this module's first jobs), default `--storage runs`: both succeed, each told where a relative
    path lands."""
    address = local_cluster["address"]
    for i in range(2):
        r = run_cli("submit", "--address", address, "--wait", "--", "train", "--dataset", "digits", "--workers",
                    "2", "--epochs", "1", "--name", f"first{i}", "--batch-size", "32", "--sample-every", "0",
                    "--eval-samples", "256", timeout=240, env=_clean_env())
        assert r.returncode == 0 and "SUCCEEDED" in r.stdout, f"job {i + 1} of 2:\n{r.stdout}\n{r.stderr}"
        assert "--storage ./runs is relative: on the cluster" in r.stderr, r.stderr


@pytest.mark.e2e
@pytest.mark.slow
def test_submit_wait_stops_following_on_sigterm_and_the_job_runs_on(local_cluster, tmp_path):
    """SIGTERM to `gan-ray submit --wait` (docker stop, kubectl delete) stops the following, like Ctrl-C: one line
    naming the job and how to stop it, exit 143, no process of its own left. The job is the cluster's: it keeps
    running until stopped there."""
    from tests.conftest import Command
    from gan_ray.cluster.processes import descendants

    address = local_cluster["address"]
    cmd = Command("submit", "--address", address, "--wait", "--", "train", "--dataset", "digits", "--workers", "1",
                  "--epochs", "200", "--batch-size", "32", "--sample-every", "0", "--storage", str(tmp_path),
                  "--name", "followed")
    try:
        sub_id = cmd.wait_for_line(r"^submitted job ", 120).split()[2]
        cmd.wait_for_line(r"epoch +1/200", 180)  # busy: the job is training and its log is being streamed
        tree = descendants(cmd.proc.pid)
        cmd.proc.send_signal(signal.SIGTERM)
        assert cmd.proc.wait(timeout=60) == 143, cmd.text()[-3000:]
        time.sleep(0.5)  # the reader threads catch up
        lines = [line for line in cmd.err if line.startswith("gan-ray submit: stopped (SIGTERM): ")]
        assert len(lines) == 1 and sub_id in lines[0] and "ray job stop" in lines[0], cmd.text()[-3000:]
        from tests.conftest import own_lines

        assert "Traceback" not in "\n".join(own_lines(cmd.text())), cmd.text()[-3000:]  # (Ray's workers' lines aside)
        assert not [p for p in tree if Path(f"/proc/{p}").exists()], "the submit command left a process behind"
        client = _client(address)
        assert client.get_job_status(sub_id).value == "RUNNING"  # the job was not the command's to stop
    finally:
        cmd.kill()
        if "sub_id" in locals():
            _client(address).stop_job(sub_id)
            _wait_for(lambda: _client(address).get_job_status(sub_id).value in ("STOPPED", "FAILED", "SUCCEEDED"),
                      60)


def _wait_for(predicate, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.5)

def _list_options(**filters):
    from ray.util.state.common import ListApiOptions

    return ListApiOptions(limit=1000, detail=True, filters=[(k, "=", v) for k, v in filters.items()])


@pytest.fixture(scope="module")
def submitted_training(local_cluster) -> dict:
    """A 2-worker training job submitted to the cluster and followed to its end (`submit --wait`): its output,
    submission id and last checkpoint, for every test that needs a model trained on the cluster."""
    from gan_ray.core.run_dir import latest_checkpoint

    address, storage = local_cluster["address"], local_cluster["storage"]
    r = run_cli("submit", "--address", address, "--wait", "--", "train", "--workers", "2", "--epochs", "2",
                "--storage", str(storage), "--name", "e2e", "--sample-every", "0", timeout=240,
                env=_clean_env())
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    return {"stdout": r.stdout, "submission_id": _submission_id(r.stdout),
            "checkpoint": latest_checkpoint(storage / "e2e")}


@pytest.mark.e2e
@pytest.mark.slow
def test_submitted_training_spans_nodes_and_checkpoints(local_cluster, submitted_training):
    from ray.util.state import StateApiClient
    from ray.util.state.common import StateResource

    from gan_ray.jobs import auth_headers

    address = local_cluster["address"]
    stdout, sub_id, ckpt = (submitted_training[k] for k in ("stdout", "submission_id", "checkpoint"))
    assert "SUCCEEDED" in stdout and "epoch   2/2" in stdout  # the job's own log lines were streamed
    assert ckpt is not None and (ckpt / "state.pt").is_file()
    assert json.loads((ckpt / "config.json").read_text())["epoch"] == 2

    # The two Ray Train workers of this job ran on two different nodes (raylets).
    job = _client(address).get_job_info(sub_id)
    api = StateApiClient(address, headers=auth_headers(address)[0])
    workers = api.list(StateResource.ACTORS, options=_list_options(class_name="RayTrainWorker", job_id=job.job_id),
                       raise_on_missing_output=False)
    assert len(workers) == 2, workers
    assert len({w.node_id for w in workers}) == 2, [w.node_id for w in workers]


@pytest.mark.e2e
@pytest.mark.slow
def test_failed_job_fails_the_command(local_cluster):
    """A command that parses here but fails on the cluster (no such checkpoint there): the job FAILS and so does
    `gan-ray submit --wait`, with the job's own error in the streamed log."""
    r = run_cli("submit", "--address", local_cluster["address"], "--wait", "--", "export", "--checkpoint",
                "/nonexistent/checkpoint", "--out", str(local_cluster["storage"] / "never"), timeout=120,
                env=_clean_env())
    assert r.returncode == 1, f"{r.stdout}\n{r.stderr}"
    assert "FAILED" in r.stdout and "/nonexistent/checkpoint" in r.stdout
    assert not (local_cluster["storage"] / "never").exists()


@pytest.mark.e2e
@pytest.mark.slow
def test_auth_token_is_required_and_checked(local_cluster, tmp_path, monkeypatch, capsys):
    from gan_ray.cli import main

    address = local_cluster["address"]
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    assert main(["submit", "--address", address, "--", "train", "--epochs", "1"]) == 2
    from tests.conftest import own_lines

    lines = own_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "rejected the auth token from RAY_AUTH_TOKEN" in lines[0], lines
    # No token anywhere (a fresh HOME, no RAY_AUTH_* variables): a clear error, never a silent fallback.
    env = {k: v for k, v in _clean_env(HOME=str(tmp_path)).items() if not k.startswith("RAY_AUTH")}
    missing = subprocess.run([sys.executable, "-m", "gan_ray.cli", "submit", "--address", address, "--", "train",
                              "--epochs", "1"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "requires a Ray auth token" in missing.stderr, missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1, missing.stderr


@pytest.mark.e2e
@pytest.mark.slow
def test_submitted_serve_answers_http(local_cluster, submitted_training, tmp_path):
    import requests

    from gan_ray.core.model_dir import export

    model = export(submitted_training["checkpoint"], tmp_path / "model")  # in-process: the export itself is tested elsewhere
    port = _free_port(set())
    r = run_cli("submit", "--address", local_cluster["address"], "--", "serve", "--model", str(model),
                "--host", "127.0.0.1", "--port", str(port), "--max-replicas", "1", timeout=60, env=_clean_env())
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    assert "follow it:" in r.stdout  # without --wait: returns at once, saying how to follow the job
    sub_id = _submission_id(r.stdout)
    client = _client(local_cluster["address"])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 150
        while True:
            status = client.get_job_status(sub_id).value
            assert status in ("PENDING", "RUNNING"), client.get_job_logs(sub_id)[-3000:]
            try:
                if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:  # proxy not listening yet, or the app still deploying
                pass
            assert time.time() < deadline, client.get_job_logs(sub_id)[-3000:]
            time.sleep(1)
        resp = requests.post(f"{url}/v1/generate", json={"n": 4, "seed": 1, "format": "png"}, timeout=30)
        assert resp.status_code == 200 and resp.content.startswith(b"\x89PNG")
        info = requests.get(f"{url}/v1/model", timeout=10)
        assert info.status_code == 200
        served = {k: v for k, v in info.json().items() if k != "serving"}  # (`serving`: the replica's batching)
        assert served == json.loads((model / "model.json").read_text())  # the model this job was told to serve
    finally:
        client.stop_job(sub_id)


# -------------------------------------------------------------------------- the session's cluster
@pytest.mark.slow
def test_a_job_submitted_to_the_session_cluster_runs_and_a_wrong_token_is_refused(ray_cluster, serve_models,
                                                                                  tmp_path):
    """`make test`'s check of Ray Jobs, on the session's cluster (token auth on, as every local cluster): the
    project is shipped as the job's working directory, the job runs `gan-ray sample` there and `submit --wait`
    streams its log and succeeds; the same submission with a wrong token is one line, exit 2."""
    from tests.conftest import assert_one_line_error, cli

    address = f"http://{ray_cluster._private.worker.get_dashboard_url()}"
    checkpoint = serve_models["conditional"].parent / "ckpt-conditional"
    out = tmp_path / "sevens.npz"
    job = ["--", "sample", "--checkpoint", str(checkpoint), "--n", "4", "--labels", "7", "--out", str(out)]
    clean = {"RAY_ADDRESS": "", "RAY_API_SERVER_ADDRESS": ""}
    # the session's cluster runs on this machine, its jobs with the tests' interpreter (an image's is `python`)
    r = cli("submit", "--address", address, "--wait", "--python", sys.executable, *job, env=clean)
    assert r.returncode == 0 and "SUCCEEDED" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert "wrote 4 samples" in r.stdout  # the job's own output, streamed back
    with __import__("numpy").load(out) as z:
        assert z["labels"].tolist() == [7] * 4
    refused = cli("submit", "--address", address, *job, env={**clean, "RAY_AUTH_TOKEN": "not-the-token"})
    assert_one_line_error(refused, "rejected the auth token from RAY_AUTH_TOKEN")


# -------------------------------------------------------------------------- input checks (no cluster)
@pytest.mark.parametrize("args, message", [
    (["--address", "http://127.0.0.1:1", "--", "trian"], "invalid choice: 'trian'"),
    (["--address", "http://127.0.0.1:1", "--", "train", "--epochs", "0"], "--epochs must be a positive integer"),
    (["--address", "http://127.0.0.1:1", "--", "train", "--lr-g", "fast"], "--lr-g"),
    (["--address", "http://127.0.0.1:1"], "nothing to submit"),
    (["--address", "http://127.0.0.1:1", "--", "submit", "--", "train"], "cannot submit another job"),
    (["--address", "127.0.0.1:6379", "--", "train"], "must be the Ray Jobs API URL"),
    (["--address", "ray://127.0.0.1:10001", "--", "train"], "must be the Ray Jobs API URL"),
    (["--address", "http://127.0.0.1:1", "--", "train", "--epochs", "1"], "cannot reach the Ray Jobs API"),
])
def test_submit_rejects_bad_input_in_one_line(args, message, capsys):
    """In-process through the CLI's own main() (the same path as the console script; see the subprocess case
    below): exit 2 and one line, before anything reaches a cluster."""
    from gan_ray.cli import main

    assert main(["submit", *args]) == 2
    err = capsys.readouterr().err
    lines = own_lines(err)
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("gan-ray"), err


def test_submit_bad_command_exits_2_from_the_console():
    r = run_cli("submit", "--address", "http://127.0.0.1:1", "--", "train", "--arch", "transformer",
                env=_clean_env(), timeout=120)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "--arch" in r.stderr, r.stderr


def test_address_from_the_environment_must_be_the_jobs_api(monkeypatch, capsys):
    from gan_ray.cli import main

    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a GCS address, as `ray start` prints it
    assert main(["submit", "--", "train"]) == 2
    assert "RAY_ADDRESS must be the Ray Jobs API URL" in capsys.readouterr().err


def test_token_lookup_follows_rays_order(monkeypatch, tmp_path):
    from gan_ray.core.errors import UserError
    from gan_ray.jobs import auth_headers, load_auth_token

    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    assert load_auth_token() == (None, "")
    assert auth_headers("http://127.0.0.1:8265") == ({}, "")
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert load_auth_token()[0] == "from-home"
    token_file = tmp_path / "token"
    token_file.write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    assert load_auth_token() == ("from-path", str(token_file))
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert auth_headers("http://127.0.0.1:8265")[0] == {"Authorization": "Bearer from-env"}
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(UserError, match="RAY_AUTH_TOKEN_PATH"):
        load_auth_token()


def test_runtime_env_ships_the_project_without_bulk(tmp_path):
    """The package Ray would upload (built with Ray's own packaging code) holds the sources, not the venv,
    runs or git history."""
    from ray._private.runtime_env.packaging import create_package

    from gan_ray.jobs import project_root, project_runtime_env

    env = project_runtime_env()
    assert env["working_dir"] == str(project_root()) == str(ROOT)
    assert env["env_vars"]["PYTHONUNBUFFERED"] == "1"
    target = tmp_path / "pkg.zip"
    create_package(env["working_dir"], target, include_gitignore=True, excludes=env["excludes"], logger=None)
    names = zipfile.ZipFile(target).namelist()
    assert "gan_ray/jobs.py" in names and "gan_ray/cli/__main__.py" in names and "pyproject.toml" in names
    for bulky in (".venv/", ".git/", "runs/", "demo/", "__pycache__/"):
        assert not any(n.startswith(bulky) or f"/{bulky}" in n for n in names), bulky


def test_entrypoint_runs_the_shipped_code():
    from gan_ray.jobs import entrypoint_command, validate_entrypoint

    argv = validate_entrypoint(["--", "train", "--epochs", "2", "--name", "a b"])
    assert entrypoint_command(argv) == "python -m gan_ray.cli train --epochs 2 --name 'a b'"
    assert validate_entrypoint(["gan-ray", "export", "--checkpoint", "c", "--out", "o"])[0] == "export"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
