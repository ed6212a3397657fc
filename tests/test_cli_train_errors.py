"""`gan-ray train` refuses bad input with one line and exit code 2, and writes nothing. In-process, through the
CLI's own main(); one case runs the console script in a subprocess, to show the same line reaches a terminal."""
from __future__ import annotations

import pytest
from PIL import Image

from tests.conftest import assert_one_line_error, cli, run_cli


@pytest.mark.parametrize("args, fragment", [
    (["--dataset", "imagenet"], "unknown --dataset"),
    (["--arch", "vit"], "unknown --arch 'vit'; choose one of mlp, seed, dcgan"),
    (["--lr-g", "0"], "--lr-g must be positive"),
    (["--lr-d=-1e-4"], "--lr-d must be positive"),
    (["--lr-final", "1.5"], "--lr-final must be at most 1, got 1.5"),
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--epochs", "abc"], "--epochs expects int, got 'abc'"),
    (["--name", "a/b"], "--name must be a plain directory name"),
    (["--dataset", "folder:/definitely/not/here"], "no such directory"),
    (["--config", "/definitely/not/here.yaml"], "config file not found"),
    (["--clusters", "1"], "--clusters 1 is one cluster"),
    (["--clusters", "10", "--conditional"], "with --conditional it has the dataset's labels already"),
    (["--clusters", "10", "--latent-dim", "1"], "--latent-dim must be 2 or more"),
    (["--clusters", "10", "--data-mode", "stream"], "--data-mode stream never holds them all"),
    (["--clusters", "1001"], "--clusters must be at most 1000"),
])
def test_bad_training_flags(tmp_path, args, fragment):
    r = cli("train", "--storage", tmp_path, "--name", "bad", *args)
    assert_one_line_error(r, fragment)
    assert not (tmp_path / "bad").exists()


def test_the_console_script_prints_the_same_one_line(tmp_path):
    r = run_cli("train", "--storage", str(tmp_path), "--name", "bad", "--lr-g", "0")
    assert_one_line_error(r, "gan-ray train: error: --lr-g must be positive, got 0")
    assert not (tmp_path / "bad").exists()


def test_config_file_with_unknown_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr_g: 1e-3\nlearning_rate: 3\n")
    assert_one_line_error(cli("train", "--config", cfg, "--storage", tmp_path), "learning_rate")


def test_conditional_on_an_unlabelled_folder(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("L", (10, 10), color=i * 50).save(folder / f"{i}.png")
    r = cli("train", "--dataset", f"folder:{folder}", "--conditional", "--storage", tmp_path / "s")
    assert_one_line_error(r, "--conditional needs labelled data")
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_more_workers_than_the_cluster_holds(ray_cluster, tmp_path):
    """On the session's cluster (fixed: no autoscaler), refused before any trainer or run directory exists."""
    cpus = int(ray_cluster.cluster_resources()["CPU"])
    r = cli("train", "--workers", cpus + 1, "--storage", tmp_path, "--name", "x")
    assert_one_line_error(r, f"--workers {cpus + 1} needs {cpus + 1} x (1 CPU)", "CPU in all but the cluster has")
    assert ray_cluster.is_initialized(), "the command left the session's cluster running"
    assert not (tmp_path / "x").exists()
