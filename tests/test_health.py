"""Watching a run: a failed run that is not recovering is named in one line, and --stop-on-collapse ends it."""
from __future__ import annotations

import json

import pytest

from gan_ray.core.health import CollapseWatch
from tests.conftest import run_cli


def row(epoch, d_real=0.6, d_fake=0.4, **kw):
    return {"epoch": epoch, "loss_d": 1.0, "loss_g": 1.0, "d_real": d_real, "d_fake": d_fake, **kw}


def test_d_winning_counts_only_in_a_row():
    watch = CollapseWatch(patience=3)
    assert watch.check(row(1, 0.99, 0.01)) is None
    assert watch.check(row(2, 0.99, 0.01)) is None
    assert watch.check(row(3, 0.7, 0.3)) is None  # recovered: the count starts again
    assert watch.check(row(4, 0.99, 0.01)) is None and watch.check(row(5, 0.99, 0.01)) is None
    warning = watch.check(row(6, 0.98, 0.02))
    assert warning.startswith("D has won for 3 epochs (D(x) 0.98, D(G(z)) 0.02)") and "--r1-gamma" in warning


def test_one_class_twice_in_a_row_and_nan_at_once():
    watch = CollapseWatch()
    assert watch.check(row(5, classes_seen=1, class_coverage=0.0)) is None  # once: a young G's blobs can
    assert watch.check(row(6)) is None  # not an evaluation epoch: the count holds
    assert "mode collapse" in watch.check(row(10, classes_seen=1, class_coverage=0.0))
    recovering = CollapseWatch()
    recovering.check(row(5, classes_seen=1))
    assert recovering.check(row(10, classes_seen=9, class_coverage=0.3)) is None
    assert "diverged: loss_g is nan" in CollapseWatch().check({**row(2), "loss_g": float("nan")})


@pytest.mark.e2e
@pytest.mark.slow
def test_stop_on_collapse_ends_a_failed_run_with_exit_1(tmp_path):
    """A run set up to fail (G barely learns, D learns fast, R1 off: D wins within an epoch) on 2 Ray Train
    workers: the warning is printed at the epoch it is recognised, the run stops there on both ranks (a checkpoint
    of that epoch kept), and `gan-ray train` exits 1 saying why."""
    r = run_cli("train", "--dataset", "digits", "--workers", "2", "--epochs", "12", "--batch-size", "32",
                "--lr-g", "1e-7", "--lr-d", "3e-3", "--sample-every", "0", "--checkpoint-every", "20",
                "--no-ema", "--r1-gamma", "0", "--stop-on-collapse", "--storage", str(tmp_path), "--name", "doomed",
                timeout=600)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "doomed" / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert "D has won for 3 epochs" in last["stopped"] and last["epoch"] < 12
    assert all("stopped" not in r for r in rows[:-1])
    assert f"warning: {last['warning']}; stopping (--stop-on-collapse)" in r.stdout
    assert r.stderr.strip().splitlines()[-1].startswith("gan-ray train: stopped early: D has won")
    ckpts = [json.loads(p.read_text())["epoch"] for p in (tmp_path / "doomed").glob("checkpoint_*/config.json")]
    assert last["epoch"] in ckpts  # the epoch it stopped at is kept, resumable
