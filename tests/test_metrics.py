"""Quality metrics: real data scores at the floor, corrupted data scores worse step by step, collapse shows, errors
are one line. Pure PyTorch except the last (slow) test, which trains for real on the session's Ray cluster."""
from __future__ import annotations

import json
import pickle
import threading

import numpy as np
import pytest
import torch

from tests.conftest import cli, own_lines
from gan_ray.eval import features, metrics
from gan_ray.core.data import load_dataset

N = 1000  # generated images per evaluation in these tests (the CLI default is 2000)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, monkeypatch_module):
    """A private extractor cache, trained once for the module (and shared with CLI subprocesses via env)."""
    root = tmp_path_factory.mktemp("gan-ray-cache")
    monkeypatch_module.setenv("GAN_RAY_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def ref(cache):
    return metrics.reference_for("digits")


@pytest.fixture(scope="module")
def train_images():
    """N real training images (never in the held-out reference), a seeded random choice."""
    train = load_dataset("digits", "train")
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(1))[:N]
    return train.batch(idx)


def score(images, ref, labels=None, seed=0):
    return metrics.evaluate(images, ref, labels=labels, seed=seed)


# ------------------------------------------------------------------------------------------ building blocks
def test_frechet_distance_matches_closed_form_and_is_robust():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 8))
    b = rng.normal(size=(4000, 8)) * 2.0 + 1.0
    # N(0, I) vs N(1, 4I) in 8-d: 8*1 + 8*(1 + 4 - 2*2) = 16
    assert metrics.frechet_distance_features(a, b) == pytest.approx(16.0, rel=0.1)
    assert metrics.frechet_distance_features(a, a) == pytest.approx(0.0, abs=1e-9)
    # singular covariances (every sample identical) give a finite, non-negative, real value
    same = np.ones((50, 8))
    value = metrics.frechet_distance_features(same, a)
    assert np.isfinite(value) and value > 0
    assert metrics.frechet_distance_features(same, same) == 0.0
    with pytest.raises(ValueError):
        metrics.frechet_distance(np.full(8, np.nan), np.eye(8), np.zeros(8), np.eye(8))


def test_precision_recall_of_disjoint_and_identical_sets():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 4))
    assert metrics.precision_recall(real, real + 1e-9) == pytest.approx((1.0, 1.0))
    far = rng.normal(size=(300, 4)) + 100.0
    assert metrics.precision_recall(real, far) == (0.0, 0.0)


def test_registry_rejects_unknown_metric_names_before_work():
    assert "fd" in metrics.list_metrics()
    with pytest.raises(metrics.UserError, match="unknown metric"):
        metrics.validate_metrics(["fd", "fid_typo"])


# ----------------------------------------------------------------------------------------------- extractor
def test_extractor_is_accurate_cached_and_reloaded(cache, ref):
    ex = ref.extractor
    assert ex.kind == "classifier" and ex.quality >= features.MIN_ACCURACY["digits"]
    assert ex.feature_dim == 16  # 270 held-out images: 135 per half, >= 8 per dimension
    assert (ex.path / features.WEIGHTS_FILE).is_file() and ex.path.parent == cache / "extractors"
    again = features.load_extractor("digits")
    assert again.meta["created_at"] == ex.meta["created_at"]  # loaded, not retrained
    x = load_dataset("digits", "heldout").batch(torch.arange(50))[0]
    assert np.array_equal(again.embed(x)[0], ex.embed(x)[0])


def test_extractor_training_is_locked_once_across_threads(tmp_path):
    """Two callers racing on an empty cache: one trains, the other waits for it and loads the result."""
    train, held = load_dataset("digits", "train"), load_dataset("digits", "heldout")
    small = features.ImageDataset(train.images[:400], train.labels[:400], 10, "digits-small")
    held = features.ImageDataset(held.images, held.labels, 10, "digits-small")
    logs: list[str] = []
    results = []

    def worker():
        results.append(features.extractor_for(small, held, cache_dir=tmp_path, log=logs.append))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum("training a feature extractor" in line for line in logs) == 1
    assert results[0].meta["created_at"] == results[1].meta["created_at"]


def test_weak_extractor_is_refused(ref):
    weak = features.Extractor(ref.extractor.net, {**ref.extractor.meta, "quality": 0.3})
    with pytest.raises(metrics.UserError, match="30.0% held-out accuracy"):
        metrics.evaluate(torch.rand(200, 1, 28, 28), metrics.Reference(weak, ref.real, "digits"))


def test_unlabelled_fallback_autoencoder(tmp_path, train_images):
    """Unlabelled data gets an autoencoder: FD and precision/recall only, and FD still separates noise."""
    train, held = load_dataset("digits", "train"), load_dataset("digits", "heldout")
    unl = [features.ImageDataset(d.images, torch.full_like(d.labels, -1), 0, "digits-unlabelled")
           for d in (train, held)]
    ex = features.extractor_for(*unl, cache_dir=tmp_path)
    assert ex.kind == "autoencoder" and ex.quality >= features.MIN_EXPLAINED_VARIANCE
    reference = metrics.reference_from(ex, unl[1].images, "digits-unlabelled")
    x, _ = train_images
    clean = score(x, reference)
    noisy = score((x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1),
                  reference)
    assert clean["classifier_score"] is None and clean["label_accuracy"] is None
    assert clean["fd_ratio"] < 2.0 < noisy["fd_ratio"]


# ---------------------------------------------------------------------------------------- metric behaviour
def test_real_images_score_at_the_floor(ref, train_images):
    x, y = train_images
    r = score(x, ref, labels=y)
    assert set(metrics.METRIC_KEYS) <= set(r)
    assert 0.7 < r["fd_ratio"] < 1.4, r
    assert r["precision"] > 0.85 and r["recall"] > 0.85
    assert r["classifier_score"] == pytest.approx(r["classifier_score_real"], rel=0.1)
    assert r["class_coverage"] > 0.7
    assert r["label_accuracy"] > 0.95  # true labels of training images, read by the classifier


@pytest.mark.parametrize("corrupt,levels", [
    ("noise", [0.0, 0.1, 0.2, 0.35]),
    ("blur", [0.0, 1.5, 2.5, 3.5]),
    ("classes_removed", [0, 2, 5, 8]),
])
def test_fd_grows_monotonically_with_corruption(ref, train_images, corrupt, levels):
    import torchvision.transforms.functional as TF

    x, y = train_images
    gen = torch.Generator().manual_seed(0)
    fds = []
    for level in levels:
        if corrupt == "noise":
            imgs = (x + level * torch.randn(x.shape, generator=gen)).clamp(0, 1)
        elif corrupt == "blur":
            imgs = TF.gaussian_blur(x, kernel_size=11, sigma=level) if level else x
        else:  # keep N images, all drawn from the classes that remain
            keep = torch.nonzero(y >= level).squeeze(1)
            imgs = x[keep[torch.randint(len(keep), (N,), generator=gen)]]
        fds.append(score(imgs, ref)["fd"])
    assert all(a < b for a, b in zip(fds, fds[1:])), (corrupt, fds)
    assert fds[-1] > 3 * fds[0]


def test_single_class_collapse(ref):
    train = load_dataset("digits", "train")
    sevens = train.batch(torch.nonzero(train.labels == 7).squeeze(1))[0]
    r = score(sevens, ref)
    assert r["classifier_score"] < 1.5  # every image gets the same class distribution
    assert r["class_coverage"] < 0.05
    assert r["precision"] > 0.8  # they are real sevens...
    assert r["recall"] < 0.4  # ...covering a tenth of the variety
    assert r["fd_ratio"] > 10


def test_deterministic_for_a_seed(ref, train_images):
    x, _ = train_images
    a, b = score(x, ref, seed=3), score(x, ref, seed=3)
    a.pop("seconds"), b.pop("seconds")
    assert a == b
    c = score(x, ref, seed=4)
    assert c["fd"] != a["fd"]  # another seed draws other splits
    assert c["fd"] == pytest.approx(a["fd"], rel=0.2)


def test_too_few_samples_and_bad_images_are_user_errors(ref):
    with pytest.raises(metrics.UserError, match="too few"):
        score(torch.rand(50, 1, 28, 28), ref)
    with pytest.raises(metrics.UserError, match=r"lie in \[0, 1\]"):
        score(torch.rand(500, 1, 28, 28) * 2, ref)
    with pytest.raises(metrics.UserError, match="shape"):
        score(torch.rand(500, 28, 28), ref)


# ------------------------------------------------------------------------------------------ training hook
def test_training_hook_scores_the_ema_generator_without_touching_rng(cache, ref):
    from gan_ray.core.config import TrainConfig
    from gan_ray.core.epoch import run_epoch
    from gan_ray.core.models import ModelSpec, build
    from gan_ray.core.step import make_state
    from gan_ray.eval.hook import QualityHook, hooks_for

    cfg = TrainConfig(dataset="digits", conditional=True, eval_samples=500, seed=0)
    hooks = hooks_for(cfg)
    assert len(hooks) == 1 and isinstance(hooks[0], QualityHook)
    hook = pickle.loads(pickle.dumps(hooks[0]))  # what Ray does to ship it to rank 0
    spec = ModelSpec("mlp", cfg.latent_dim, (1, 28, 28), 10)
    torch.manual_seed(0)
    G, D = build(spec)
    state = make_state(spec, G, D, lr_g=2e-4, lr_d=2e-4, beta1=0.5)
    data = load_dataset("digits", "train")
    torch.manual_seed(1)
    run_epoch(state, data, epoch=1, rank=0, world_size=1, batch_size=64, seed=0)
    rng_before = torch.get_rng_state()
    out = hook(cfg, state, 1, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), rng_before)
    for key in ("fd", "fd_floor", "fd_ratio", "classifier_score", "class_coverage", "classes_seen",
                "label_accuracy"):
        assert isinstance(out[key], float) and np.isfinite(out[key]), key
    assert "precision" not in out and "recall" not in out  # the slow k-NN metrics wait for --eval-full
    assert out["fd_ratio"] > 2  # one epoch of an MLP GAN is far from real digits
    assert out == {**hook(cfg, state, 1, torch.device("cpu")), "eval_seconds": out["eval_seconds"]}
    full = hook(cfg.replace(eval_full=True), state, 1, torch.device("cpu"))
    assert all(isinstance(full[k], float) for k in ("precision", "recall")) and full["fd"] == out["fd"]
    with pytest.raises(metrics.UserError, match="eval-samples"):
        hooks_for(TrainConfig(dataset="digits", eval_samples=20))


# ------------------------------------------------------------------------------------------------- the CLI
MALFORMED = ["wrong_shape", "out_of_range", "missing_key", "not_npz", "nan", "bad_labels"]


def malformed_npz(tmp_path, case: str):
    path = tmp_path / f"{case}.npz"
    good = np.random.default_rng(0).random((300, 1, 28, 28), dtype=np.float32)
    if case == "wrong_shape":
        np.savez(path, images=good[:, :, :20, :20])
    elif case == "out_of_range":
        np.savez(path, images=good * 3 - 1)
    elif case == "missing_key":
        np.savez(path, pictures=good)
    elif case == "not_npz":
        path.write_bytes(b"this is not a zip archive")
    elif case == "nan":
        bad = good.copy()
        bad[0, 0, 0, 0] = np.nan
        np.savez(path, images=bad)
    else:
        np.savez(path, images=good, labels=np.arange(299))
    return path


@pytest.mark.parametrize("case", MALFORMED)
def test_evaluate_rejects_malformed_samples(tmp_path, capsys, case):
    """The CLI's own entry point, in-process (a subprocess per case costs a torch import each)."""
    from gan_ray.cli import main

    assert main(["evaluate", "--samples", str(malformed_npz(tmp_path, case)), "--json"]) == 2
    out, err = capsys.readouterr()
    lines = own_lines(err)
    assert not own_lines(out) and len(lines) == 1 and lines[0].startswith("gan-ray evaluate: error:"), err


def test_evaluate_samples_json_and_table(cache, ref, tmp_path, train_images, capsys):
    from gan_ray.cli import main

    x, y = train_images
    path = tmp_path / "real.npz"
    np.savez(path, images=x.numpy().astype(np.float32), labels=y.numpy())
    proc = cli("evaluate", "--samples", path, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert set(metrics.METRIC_KEYS) <= set(result)
    mode_keys = {"modes", "modes_real", "mode_kl", "mode_kl_real", "reader_confidence", "reader_confidence_real"}
    assert all(result[k] is not None for k in set(metrics.METRIC_KEYS) - mode_keys)
    assert all(result[k] is None for k in mode_keys)  # mode coverage is stacked-mnist's: digits have no triples
    assert result["n"] == N and result["dataset"] == "digits"
    in_process = score(x, ref, labels=y)
    assert result["fd"] == pytest.approx(in_process["fd"], rel=1e-9)
    assert main(["evaluate", "--samples", str(path)]) == 0
    table = capsys.readouterr().out
    assert "fd_ratio" in table and f"floor {in_process['fd_floor']:.3f}" in table


# ------------------------------------------------------------------------------------------------ with Ray
@pytest.mark.e2e
@pytest.mark.slow
def test_training_reports_fd_and_export_takes_the_best(ray_cluster, cache, tmp_path, capsys):
    """A real (tiny) Ray Train run with the hook: every checkpoint carries fd, Ray keeps the best, and
    `gan-ray export --checkpoint RUN_DIR` exports the lowest-fd checkpoint."""
    from gan_ray.core.config import TrainConfig
    from gan_ray.train.driver import fit
    from gan_ray.core.run_dir import METRICS_FILE, read_metrics
    from gan_ray.core.run_dir import checkpoints, select

    cfg = TrainConfig(dataset="digits", epochs=4, workers=1, checkpoint_every=1, keep=2, sample_every=0,
                      eval_samples=500, batch_size=64, storage=str(tmp_path / "runs"), name="fd")
    fit(cfg, progress=False)
    rows = read_metrics(cfg.run_dir / METRICS_FILE)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert all(np.isfinite(r["fd"]) and r["fd_ratio"] > 0 for r in rows)
    fd_by_epoch = {r["epoch"]: r["fd"] for r in rows}
    two_best = set(sorted(fd_by_epoch, key=fd_by_epoch.get)[:2])
    kept = {int(m["epoch"]) for _, m in checkpoints(cfg.run_dir)}
    assert kept - {4} == two_best - {4}  # Ray keeps the --keep best by fd, plus always the latest (for resume)
    best, why = select(cfg.run_dir)
    best_epoch = min(fd_by_epoch, key=fd_by_epoch.get)
    assert json.loads((best / "config.json").read_text())["epoch"] == best_epoch and "best fd" in why
    proc = cli("export", "--checkpoint", cfg.run_dir, "--out", tmp_path / "model")
    assert proc.returncode == 0, proc.stderr
    model = json.loads((tmp_path / "model" / "model.json").read_text())
    assert model["epoch"] == best_epoch and model["metrics"]["fd"] == pytest.approx(fd_by_epoch[best_epoch])
    # the exported model scores the same as the hook did (same n, seed and generator)
    from gan_ray.cli import main

    assert main(["evaluate", "--model", str(tmp_path / "model"), "--n", "500", "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["fd"] == pytest.approx(fd_by_epoch[best_epoch], rel=1e-4)
