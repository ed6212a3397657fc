"""Ray Train end to end on digits: a real local cluster, 2 DDP workers, checkpoints, resume, a killed worker."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import torch

from gan_ray.core import checkpoint as ckpt_io
from gan_ray.core import clusters
from gan_ray.core.config import TrainConfig
from gan_ray.core.data import load_dataset
from gan_ray.core.model_dir import export, load_generator
from gan_ray.core.errors import UserError
from gan_ray.core.run_dir import finished_epochs, latest_checkpoint
from gan_ray.train.driver import fit
from gan_ray.core.run_dir import read_metrics
from gan_ray.core.step import build_state, spec_for
from gan_ray.train.worker import weights_digest
from tests.conftest import tensorboard_tags, wait_for

pytestmark = pytest.mark.slow


def small_config(tmp_path, name: str, **over) -> TrainConfig:
    base = dict(dataset="digits", arch="mlp", workers=2, batch_size=32, epochs=3, checkpoint_every=2, keep=2,
                storage=str(tmp_path), name=name, eval_every=0)
    return TrainConfig(**{**base, **over})


# A small DCGAN: its generator has BatchNorm, whose running statistics DDP does not keep in sync by itself.
DCGAN = dict(arch="dcgan", g_width=8, d_width=8)


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


def test_two_workers_write_metrics_grids_and_checkpoints_then_resume(ray_cluster, storage):
    cfg = small_config(storage, "resume", lr_final=0.5, **DCGAN)
    managers = len(_actors("DatasetManager", alive_only=False))
    result = fit(cfg, progress=False)
    assert result.error is None
    # an in-memory run starts no Ray Data actor (gan_ray.train.driver._trainer_class: 1-2 s of every launch)
    assert len(_actors("DatasetManager", alive_only=False)) == managers
    run = cfg.run_dir
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for r in rows:
        for key in ("epoch", "step", "loss_d", "loss_g", "d_real", "d_fake", "images_per_s", "wall_s"):
            assert key in r, key
        assert r["images_per_s"] > 0 and 0 < r["d_real"] < 1
    # 1527 images / 2 workers / 32 per batch = 23 steps per worker per epoch, counted once (rank 0's view)
    assert rows[-1]["step"] == 3 * 23 and rows[-1]["images_seen"] == 3 * 23 * 32 * 2
    # --lr-final 0.5: both rates at 1, 0.75 and 0.5 of their base (the cosine's ends and middle)
    for key in ("lr_g", "lr_d"):
        assert [r[key] for r in rows] == pytest.approx([2e-4, 1.5e-4, 1e-4]), key
    assert sorted(p.name for p in (run / "samples").iterdir()) == [f"epoch_000{i}.png" for i in (1, 2, 3)]
    ckpts = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())
    assert len(ckpts) == 2, "epochs 2 and 3 (the end)"
    meta = json.loads((latest_checkpoint(run) / "config.json").read_text())
    assert meta["epoch"] == 3 and meta["config"]["workers"] == 2
    assert json.loads((run / "config.json").read_text())["epochs"] == 3
    # Data parallelism really happened and the ranks agree: at every checkpoint both hold bit-identical parameters
    # (DDP averaged their gradients although each trained on its own shard) and bit-identical BatchNorm statistics
    # (averaged at the end of each epoch), each moved from where it started and between checkpoints.
    initial = build_state(cfg, spec_for(cfg, (1, 28, 28), 10), "cpu")
    assert [r["epoch"] for r in rows if "weights_digest" in r] == [2, 3]
    for key, part in (("weights_digest", "parameters"), ("buffers_digest", "buffers")):
        digests = [r[key] for r in rows if key in r]
        for pair in digests:
            assert len(pair) == 2 and pair[0] == pair[1], (part, digests)
            assert pair[0] != weights_digest(initial, part), part
        assert digests[0][0] != digests[1][0], part
    assert not any("ranks'" in r.get("warning", "") for r in rows), [r.get("warning") for r in rows]
    # TensorBoard: a scalar per metric and the sample grid, every epoch
    tags = tensorboard_tags(run / "tensorboard")
    assert {"train/loss_d", "train/loss_g", "train/d_real", "train/d_fake", "train/images_per_s"} <= tags["scalars"]
    assert tags["steps"] == {1, 2, 3} and "samples" in tags["images"]

    # Same name, more epochs: continues from epoch 3's checkpoint.
    cfg5 = small_config(storage, "resume", epochs=5, lr_final=0.5, lr_decay_epochs=3, **DCGAN)
    fit(cfg5, progress=False)
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
    # the schedule is the resumed run's: its last 3 of 5 epochs (3, 4, 5) at 1, 0.75 and 0.5
    for key in ("lr_g", "lr_d"):
        assert [r[key] for r in rows[3:]] == pytest.approx([1.5e-4, 1e-4]), key
    assert rows[3]["restored_from"] == 3 and rows[3]["step"] == 4 * 23
    assert finished_epochs(run) == 5
    kept = [p for p in run.glob("checkpoint_*") if p.is_dir()]
    # --keep 2: the two best (by fd when evaluation is on, else the newest), plus Ray always keeps the latest
    assert 2 <= len(kept) <= 3 and latest_checkpoint(run) in kept
    # A finished run does nothing more (and doesn't even start a trainer).
    assert fit(cfg5, progress=False) is None
    assert len(read_metrics(run / "metrics.jsonl")) == 5
    with pytest.raises(UserError, match="was trained with latent_dim=100; cannot resume it with latent_dim=32"):
        fit(small_config(storage, "resume", epochs=5, latent_dim=32, **DCGAN), progress=False)  # finished, refused


def test_clusters_on_two_workers_resume_with_their_centres_and_export_an_unconditional_generator(ray_cluster, storage,
                                                                                               tmp_path):
    """--clusters: the run's k-means centres and cluster shares travel in its checkpoints (a resume assigns with
    the same centres), and the exported generator samples without labels, clusters picked by z."""
    cfg = small_config(storage, "clusters", clusters=10, latent_dim=16, epochs=1, checkpoint_every=1, **DCGAN)
    assert fit(cfg, quality=False, progress=False).error is None
    first = latest_checkpoint(cfg.run_dir)
    meta, sd = ckpt_io.load(first)
    assert meta["spec"]["clusters"] == 10 and meta["spec"]["num_classes"] == 0
    centres = sd["cluster_centres"]
    assert centres.shape == (10, 28 * 28)
    digits = load_dataset("digits", "train", image_size=28)
    shares = clusters.shares_of(clusters.assign(digits.images, centres), 10)
    for key in ("G", "G_ema"):  # every rank's shares (averaged across ranks each epoch) are the data's
        assert torch.equal(sd[key]["shares"], shares), key
    row = read_metrics(cfg.run_dir / "metrics.jsonl")[-1]
    assert row["weights_digest"][0] == row["weights_digest"][1]
    assert row["buffers_digest"][0] == row["buffers_digest"][1]

    assert fit(cfg.replace(epochs=2), quality=False, progress=False).error is None
    rows = read_metrics(cfg.run_dir / "metrics.jsonl")
    assert rows[-1]["epoch"] == 2 and rows[-1]["restored_from"] == 1
    _, sd2 = ckpt_io.load(latest_checkpoint(cfg.run_dir))
    assert torch.equal(sd2["cluster_centres"], centres) and torch.equal(sd2["G_ema"]["shares"], shares)

    with pytest.raises(UserError, match="was trained with clusters=10; cannot resume it with clusters=20"):
        fit(cfg.replace(epochs=3, clusters=20), progress=False)

    gen = load_generator(export(latest_checkpoint(cfg.run_dir), tmp_path / "model"))
    assert gen.spec.clusters == 10 and not gen.spec.conditional
    assert torch.equal(gen.net.shares, shares)
    assert gen.generate(64, seed=0).shape == (64, 1, 28, 28)
    assert torch.equal(gen.generate(8, seed=3), gen.generate(8, seed=3))
    with pytest.raises(UserError, match="this model is unconditional: it takes no labels"):
        gen.generate(4, labels=1)


def _actors(class_name: str, alive_only: bool = True) -> list:
    """This cluster's actors of `class_name` (with `alive_only=False`, dead ones too), from its own API server:
    other local clusters (parallel test runs) must not be asked."""
    from ray._private.worker import get_dashboard_url
    from ray.util.state import list_actors

    filters = [("class_name", "=", class_name)] + ([("state", "=", "ALIVE")] if alive_only else [])
    return list_actors(address=f"http://{get_dashboard_url()}", filters=filters, limit=10_000)


def _train_worker_pids() -> list[int]:
    return [a.pid for a in _actors("RayTrainWorker") if a.pid]


def fit_then_kill_a_worker(cfg: TrainConfig, after_epoch: int = 3, wait_s: float = 300):
    """Start `fit(cfg)` in a thread, SIGKILL one of its two real worker processes once Ray Train has registered a
    checkpoint of epoch `after_epoch` or later; returns the thread, the dict its result lands in (`result`) and the
    killed pid. (Not once the epoch's metrics row is written: a kill before the checkpoint's report completes on
    every rank leaves it unregistered, and the run then rightly restarts from scratch, with nothing restored.)"""
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(result=fit(cfg, quality=False, progress=False)))
    thread.start()
    deadline = time.time() + wait_s
    while time.time() < deadline and finished_epochs(cfg.run_dir) < after_epoch:
        time.sleep(0.5)
    pids = _train_worker_pids()
    assert len(pids) == 2, pids
    os.kill(pids[1], signal.SIGKILL)  # a real worker process dies mid-run
    return thread, outcome, pids[1]


def test_a_killed_worker_is_replaced_and_training_continues(ray_cluster, storage):
    cfg = small_config(storage, "recover", epochs=10, checkpoint_every=2, batch_size=16, max_failures=2)
    metrics = cfg.run_dir / "metrics.jsonl"
    thread, outcome, killed = fit_then_kill_a_worker(cfg, wait_s=240)
    replaced: list[int] = []

    def training_again_on_two_workers() -> bool:  # after the restore, while the run still goes on
        if not any("restored_from" in r for r in read_metrics(metrics)):
            return False
        replaced[:] = _train_worker_pids()
        return len(replaced) == 2 or not thread.is_alive()

    wait_for(training_again_on_two_workers, 300, "training to go on after the restore")
    assert len(replaced) == 2 and killed not in replaced, (killed, replaced)  # a new process took the dead one's place
    thread.join(timeout=400)
    assert not thread.is_alive()
    assert outcome["result"].error is None
    rows = read_metrics(metrics)
    assert [r["epoch"] for r in rows] == list(range(1, 11)), "every epoch once, replayed ones replaced"
    restores = [r["restored_from"] for r in rows if "restored_from" in r]
    assert restores and restores[0] >= 2 and restores[0] % 2 == 0, "restarted from an even-epoch checkpoint"
    assert finished_epochs(cfg.run_dir) == 10


def test_more_workers_than_the_cluster_has_cpus_is_refused(ray_cluster, tmp_path):
    import ray

    cpus = int(ray.cluster_resources()["CPU"])
    with pytest.raises(UserError, match="CPU in all but the cluster has"):
        fit(small_config(tmp_path, "too-many", workers=cpus + 1), quality=False, progress=False)
    assert not (tmp_path / "too-many").exists(), "nothing written for a refused run"


def test_a_batch_larger_than_a_workers_share_is_refused_before_ray(tmp_path):
    """1527 training digits over 2 workers: 763 each. A bigger batch would train no step at all (epochs of zero
    steps that still write checkpoints); the driver refuses it before any cluster or file exists."""
    with pytest.raises(UserError, match=r"--batch-size 800 is larger than each worker's share .*1527 / 2 workers = 763"):
        fit(small_config(tmp_path, "big-batch", batch_size=800), quality=False, progress=False)
    assert not (tmp_path / "big-batch").exists()


@pytest.mark.e2e
def test_bad_input_a_worker_finds_comes_back_as_one_user_error(ray_cluster, tmp_path):
    """What only a worker can check (its device, its copy of the data) fails in the worker; Train wraps it in a
    TrainingFailedError, and the driver unwraps it to the one-line UserError the CLI prints (exit 2). The driver's
    own checks are skipped here (trainer_for directly) so that the worker's check is the one that fires."""
    from ray.train import TrainingFailedError

    from gan_ray.core.run_dir import prepare_run_dir
    from gan_ray.train.driver import trainer_for, worker_user_error

    cfg = small_config(tmp_path, "worker-refuses", batch_size=800, max_failures=0)
    prepare_run_dir(cfg)
    with pytest.raises(TrainingFailedError) as failed:
        trainer_for(cfg).fit()
    error = worker_user_error(failed.value)
    assert isinstance(error, UserError) and "--batch-size 800 is larger than each worker's share" in str(error)
    assert "\n" not in str(error)
    assert worker_user_error(RuntimeError("not Train's")) is None
