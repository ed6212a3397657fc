"""`gan-ray train` refuses bad input with one line and exit code 2, and writes nothing."""
from __future__ import annotations

import pytest
from PIL import Image

from tests.conftest import run_cli
from tests.test_artifacts import assert_one_line_error


@pytest.mark.parametrize("args, fragment", [
    (["--dataset", "imagenet"], "unknown --dataset"),
    (["--arch", "vit"], "invalid choice"),
    (["--lr-g", "0"], "--lr-g must be positive"),
    (["--lr-d=-1e-4"], "--lr-d must be positive"),
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--epochs", "abc"], "invalid int value"),
    (["--dataset", "folder:/definitely/not/here"], "no such directory"),
    (["--config", "/definitely/not/here.yaml"], "config file not found"),
])
def test_bad_training_flags(tmp_path, args, fragment):
    r = run_cli("train", "--storage", str(tmp_path), "--name", "bad", *args)
    assert_one_line_error(r, fragment)
    assert not (tmp_path / "bad").exists()


def test_config_file_with_unknown_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr_g: 1e-3\nlearning_rate: 3\n")
    assert_one_line_error(run_cli("train", "--config", str(cfg), "--storage", str(tmp_path)), "learning_rate")


def test_conditional_on_an_unlabelled_folder(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("L", (10, 10), color=i * 50).save(folder / f"{i}.png")
    r = run_cli("train", "--dataset", f"folder:{folder}", "--conditional", "--storage", str(tmp_path / "s"))
    assert_one_line_error(r, "--conditional needs labelled data")
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_more_workers_than_cpus_from_the_cli(tmp_path):
    """Starts its own local Ray (2 CPUs here) and refuses before any trainer or run directory exists."""
    import os

    r = run_cli("train", "--workers", str((os.cpu_count() or 2) + 7), "--storage", str(tmp_path), "--name", "x")
    assert_one_line_error(r, "CPU in all but the cluster has")
    assert not (tmp_path / "x").exists()
