"""The rest of the streaming matrix (`make test-e2e`): object storage for real (a moto S3 server on 127.0.0.1,
started here), a streamed run resumed, a streamed run that loses a worker to SIGKILL, and a Tune trial on a
streamed dataset, a bucket that refuses the caller. tests/test_stream.py checks the plain case in `make test`."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.fs as pafs
import pytest

from gan_ray.cluster.processes import free_port
from gan_ray.core.config import TrainConfig
from gan_ray.core.run_dir import finished_epochs, read_metrics
from gan_ray.train.prepare import PrepareSettings, prepare
from tests.conftest import assert_one_line_error, cli, run_cli, wait_for
from tests.test_train_ray import fit_then_kill_a_worker

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


@pytest.fixture(scope="module")
def digits_prepared(ray_cluster, tmp_path_factory):
    dest = str(tmp_path_factory.mktemp("prepared") / "digits")
    prepare("digits", PrepareSettings(out=dest, shard_mb=0.25))
    return dest


def stream_config(dataset: str, storage, name: str, **over) -> TrainConfig:
    base = dict(dataset=dataset, data_mode="stream", workers=2, batch_size=32, epochs=2, checkpoint_every=1, keep=2,
                storage=str(storage), name=name, sample_every=0)
    return TrainConfig(**{**base, **over})


# ------------------------------------------------------------------------------------------- object storage
def bucket_admin(url: str):
    """The test's own client of the server (explicit settings: it creates the bucket the product then finds)."""
    return pafs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1", scheme="http",
                             endpoint_override=url.removeprefix("http://"), allow_bucket_creation=True)


@pytest.fixture(scope="module")
def s3_server():
    """A real S3 API (moto's server) on a free 127.0.0.1 port, and the environment that points AWS clients at
    it: pyarrow (prepare, Ray Data, Train's storage) reads AWS_ENDPOINT_URL and the key pair from there."""
    pytest.importorskip("moto")
    import requests

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return requests.get(url, timeout=1).status_code < 500
        except requests.RequestException:
            return False

    try:
        wait_for(up, 60, "the moto S3 server")
        env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
        bucket_admin(url).create_dir("gan-data")
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_prepare_into_and_train_from_s3(s3_server, tmp_path):
    """Each command a fresh process with its own local Ray (its workers inherit the environment), as a user runs
    them; no flag names the endpoint or the keys."""
    r = run_cli("prepare", "digits", "--out", "s3://gan-data/digits", "--shard-mb", "0.25", env=s3_server)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "1,527 train + 270 held out" in r.stdout

    keys = sorted(i.path for i in bucket_admin(s3_server["AWS_ENDPOINT_URL"]).get_file_info(
        pafs.FileSelector("gan-data/digits", recursive=True)) if i.type == pafs.FileType.File)
    assert "gan-data/digits/manifest.json" in keys and sum("/train/part-" in k for k in keys) == 5
    assert not any(".gan-ray-prepare" in k for k in keys)

    # the run directory in the bucket too: Ray Train's checkpoints, and gan-ray's metrics, grids and TensorBoard
    train = ["train", "--dataset", "s3://gan-data/digits", "--data-mode", "stream", "--workers", "1",
             "--batch-size", "64", "--eval-samples", "300", "--sample-every", "1", "--storage", "s3://gan-data/runs",
             "--name", "from-s3"]
    r = run_cli(*train, "--epochs", "1", env=s3_server)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "epoch   1/1" in r.stdout, r.stdout[-2000:]  # the driver followed metrics.jsonl in the bucket
    admin = bucket_admin(s3_server["AWS_ENDPOINT_URL"])

    def run_files() -> dict[str, bytes]:
        infos = admin.get_file_info(pafs.FileSelector("gan-data/runs/from-s3", recursive=True))
        return {i.path.removeprefix("gan-data/runs/from-s3/"): admin.open_input_stream(i.path).read()
                for i in infos if i.type == pafs.FileType.File}

    def rows_of(files: dict[str, bytes]) -> list[dict]:
        return [json.loads(line) for line in files["metrics.jsonl"].decode().splitlines()]

    files = run_files()
    rows = rows_of(files)
    assert rows[0]["rank_steps"] == [1527 // 64] and "fd" in rows[0]
    assert {"config.json", "checkpoint_manager_snapshot.json", "samples/epoch_0001.png"} <= set(files), sorted(files)
    assert any(k.startswith("checkpoint_") and k.endswith("/state.pt") for k in files), sorted(files)
    assert any(k.startswith("tensorboard/events.out.tfevents") for k in files), sorted(files)
    # it resumes from the bucket, and exports from it
    r = run_cli(*train, "--epochs", "2", env=s3_server)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = rows_of(run_files())
    assert [row["epoch"] for row in rows] == [1, 2] and rows[1]["restored_from"] == 1, rows
    r = run_cli("export", "--checkpoint", "s3://gan-data/runs/from-s3", "--out", str(tmp_path / "model"),
                env=s3_server)
    assert r.returncode == 0, r.stderr[-3000:]
    model = json.loads((tmp_path / "model" / "model.json").read_text())
    assert model["epoch"] == 2 and model["source"]["run"] == "s3://gan-data/runs/from-s3", model["source"]

    # bad object-store input: one line, exit 2, before any Ray work (in this process: the same main())
    r = cli("prepare", "digits", "--out", "s3://no-such-bucket/digits", env=s3_server)
    assert_one_line_error(r, "no such bucket")
    assert_one_line_error(cli("train", "--storage", "s3://no-such-bucket/runs", env=s3_server), "no such bucket")
    assert_one_line_error(cli("tune", "--storage", "s3://gan-data/sweeps", env=s3_server),
                          "a sweep's trials share files")
    assert_one_line_error(cli("train", "--dataset", "s3://gan-data/nothing-here", env=s3_server),
                          "no manifest.json there")
    closed = {**s3_server, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    assert_one_line_error(cli("train", "--dataset", "s3://gan-data/digits", env=closed),
                          "cannot read the prepared dataset at s3://gan-data/digits")


def test_a_bucket_that_refuses_the_caller_is_one_line_before_ray(tmp_path):
    """Access denied for real: a moto server that enforces IAM once its bucket and one user exist. That user has
    no policy, so S3 refuses it everything (403 AccessDenied); prepare into and train from the bucket are one
    line each, exit 2, with no Ray started."""
    pytest.importorskip("moto")
    import boto3
    import socket

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"})  # the three set-up calls below

    def listening() -> bool:  # a TCP connect, not a request: requests count towards the three
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_for(listening, 60, "the moto S3 server")
        admin = dict(endpoint_url=url, region_name="us-east-1", aws_access_key_id="admin",
                     aws_secret_access_key="admin")
        boto3.client("s3", **admin).create_bucket(Bucket="locked")
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="nobody")
        key = iam.create_access_key(UserName="nobody")["AccessKey"]
        env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
               "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"], "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
        for argv, doing in ((("prepare", "digits", "--out", "s3://locked/digits"), "s3://locked/digits"),
                            (("train", "--dataset", "s3://locked/digits"), "s3://locked/digits"),
                            (("train", "--storage", "s3://locked/runs"), "s3://locked/runs")):
            r = run_cli(*argv, env=env, timeout=300)
            assert r.returncode == 2 and "access denied" in r.stderr and doing in r.stderr, r.stderr
            assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
            assert "Started a local Ray instance" not in r.stdout + r.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ------------------------------------------------------------------------------------ resume, a lost worker
def test_a_streamed_run_survives_a_killed_worker(ray_cluster, digits_prepared, tmp_path):
    """A worker SIGKILLed while it streams epoch 2 or 3 (its reader already reading ahead): the run restores from
    the last checkpoint on a new worker group, streams equal shares again (a new split) and finishes. (Four epochs
    of a few seconds each: the kill waits for epoch 1's registered checkpoint, and must still land mid-run. A
    streamed run resumed by a second command: test_prepare_into_and_train_from_s3.)"""
    cfg = stream_config(digits_prepared, tmp_path, "recover", epochs=4, batch_size=16, checkpoint_every=1,
                        max_failures=2)
    thread, outcome, _ = fit_then_kill_a_worker(cfg, after_epoch=1)  # a real worker process dies mid-stream
    thread.join(timeout=600)
    assert not thread.is_alive() and outcome["result"].error is None
    rows = read_metrics(cfg.run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == list(range(1, 5))
    assert any("restored_from" in r for r in rows), "the run was restored from a checkpoint"
    assert all(r["rank_steps"] == [47, 47] for r in rows)  # the new worker group streams equal shares too
    assert rows[-1]["step"] == 4 * 47 and finished_epochs(cfg.run_dir) == 4


# ------------------------------------------------------------------------------------------------- Tune
def test_a_tune_trial_streams_a_prepared_dataset(ray_cluster, digits_prepared, tmp_path):
    from gan_ray.tune.space import SweepSettings, build_space
    from gan_ray.tune.sweep import run_sweep

    space = build_space({"dataset": digits_prepared, "data_mode": "stream", "lr_g": "1e-4,2e-4",
                         "batch_size": "32", "eval_samples": "256", "sample_every": "0"})
    settings = SweepSettings(trials=1, epochs=1, scheduler="none", workers_per_trial=1, storage=str(tmp_path),
                             name="stream-sweep", seed=0)
    result = run_sweep(space, settings)
    assert len(result.rows) == 1 and result.best is not None and result.best.best_fd is not None
    trial = next(result.path.glob("trial_*"))
    rows = read_metrics(trial / "train" / "metrics.jsonl")
    assert rows[0]["rank_steps"] == [1527 // 32]
    assert json.loads((trial / "train" / "config.json").read_text())["data_mode"] == "stream"
