"""Folder datasets as the driver checks them and as the workers load them, the driver's progress lines, and sample
grids drawn in eval mode: pure PyTorch and files, no Ray cluster."""
from __future__ import annotations

import json
import time

import pytest
import torch
from PIL import Image

from gan_ray.core.config import TrainConfig
from gan_ray.core.data import load_dataset
from gan_ray.core.errors import UserError
from gan_ray.core.data import describe_dataset
from gan_ray.core.run_dir import truncate_metrics


def _image(path, mode: str, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (12, 12), color=value if mode == "L" else (value, 255 - value, 40)).save(path)


def test_class_folders_with_sub_folders_are_checked_as_they_are_loaded(tmp_path):
    """Images nested below a class folder belong to it, for the driver's checks as for the loader."""
    for label in ("a", "b"):
        for i in range(10):
            _image(tmp_path / label / "batch1" / f"{i}.png", "L", 10 * i)
    cfg = TrainConfig(dataset=f"folder:{tmp_path}", conditional=True, batch_size=4, workers=2)
    assert describe_dataset(cfg) == ((1, 28, 28), 2)
    train, held = load_dataset(cfg.dataset, "train"), load_dataset(cfg.dataset, "heldout")
    assert len(train) + len(held) == 20 and train.num_classes == 2 and set(train.labels.tolist()) <= {0, 1}


def test_one_colour_image_makes_the_folder_rgb(tmp_path):
    """Grayscale only if every image is: the first file alone (grayscale here) must not drop the others' colour."""
    _image(tmp_path / "0.png", "L", 128)
    for i in range(1, 4):
        _image(tmp_path / f"{i}.png", "RGB", 60 * i)
    cfg = TrainConfig(dataset=f"folder:{tmp_path}", batch_size=1, workers=1)
    assert describe_dataset(cfg)[0] == (3, 28, 28)
    data = load_dataset(cfg.dataset, "train")
    assert data.images.shape[1] == 3
    assert (data.images[:, 0] != data.images[:, 1]).any()  # the colour survived


def test_a_batch_larger_than_a_workers_share_of_a_folder_is_refused(tmp_path):
    for i in range(40):
        _image(tmp_path / f"{i}.png", "L", i)
    ok = TrainConfig(dataset=f"folder:{tmp_path}", batch_size=17, workers=2)  # 34 training images: 17 each
    describe_dataset(ok)
    with pytest.raises(UserError, match=r"--batch-size 18 is larger than each worker's share .*\(34 / 2 workers = 17\)"):
        describe_dataset(TrainConfig(dataset=f"folder:{tmp_path}", batch_size=18, workers=2))


def _row(epoch: int) -> dict:
    return {"epoch": epoch, "step": epoch * 10, "images_seen": epoch * 320, "loss_d": 1.0, "loss_g": 1.0,
            "d_real": 0.5, "d_fake": 0.5, "images_per_s": 1000.0, "time": time.time() + epoch * 1e-3}


def _append(path, *epochs: int) -> None:
    with open(path, "a") as f:
        for e in epochs:
            f.write(json.dumps(_row(e)) + "\n")


def test_progress_survives_a_restore_that_rewrites_metrics_between_polls(tmp_path):
    """A worker restored from epoch 5 rewrites metrics.jsonl and appends past the old end before the next poll:
    every replayed epoch prints once more, nothing else prints twice, and the printer keeps going."""
    from gan_ray.train.driver import ProgressPrinter

    path = tmp_path / "metrics.jsonl"
    _append(path, 1)  # an earlier run's row: not this run's progress
    lines: list[str] = []
    printer = ProgressPrinter(path, 10, lines.append)
    _append(path, 2, 3, 4, 5, 6, 7)
    printer.poll()
    truncate_metrics(path, 5)  # the restore: rows 6, 7 dropped (a new file) ...
    _append(path, 6, 7, 8)  # ... and replayed, past the old end, before the printer looks again
    printer.poll()
    _append(path, 9)
    printer.poll()
    epochs = [int(line.split("/")[0].split()[-1]) for line in lines]
    assert epochs == [2, 3, 4, 5, 6, 7, 6, 7, 8, 9]


def test_progress_skips_a_line_it_cannot_read(tmp_path):
    from gan_ray.train.driver import ProgressPrinter

    path = tmp_path / "metrics.jsonl"
    lines: list[str] = []
    printer = ProgressPrinter(path, 3, lines.append)
    path.write_text("not json\n")
    _append(path, 1)
    printer.poll()
    assert len(lines) == 1 and lines[0].lstrip().startswith("epoch   1/3")


def _checkpoint_dir(run, epoch: int):
    d = run / f"checkpoint_2026-12-05_00-00-{epoch:02d}.000000"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"epoch": epoch}))
    (d / "state.pt").write_bytes(b"")
    return d


def test_a_run_continues_from_the_checkpoint_ray_registered_not_from_a_newer_directory(tmp_path):
    """A worker uploads its checkpoint before Ray Train's controller registers it; a run stopped in between keeps a
    complete directory Ray will not resume from. The stop line and `train`'s "nothing to do" must name the epoch the
    resume really continues from (this raced in `test_train_stops_keeping_its_checkpoint_and_resumes`)."""
    from gan_ray.core.run_dir import RAY_SNAPSHOT, finished_epochs, latest_checkpoint, select

    run = tmp_path / "run"
    two, four = _checkpoint_dir(run, 2), _checkpoint_dir(run, 4)
    assert finished_epochs(run) == 0  # no list yet: Ray starts from scratch, whatever directories are there
    assert latest_checkpoint(run) == four  # a run directory copied without Ray's list still exports
    (run / RAY_SNAPSHOT).write_text(json.dumps({"checkpoint_results": [{"checkpoint_dir_name": two.name}]}))
    assert finished_epochs(run) == 2 and latest_checkpoint(run) == two and select(run)[0] == two
    (run / RAY_SNAPSHOT).write_text(json.dumps({"checkpoint_results": [{"checkpoint_dir_name": n.name}
                                                                       for n in (two, four)]}))
    assert finished_epochs(run) == 4 and latest_checkpoint(run) == four


def test_sample_grids_use_eval_mode_and_leave_batchnorm_alone():
    """--no-ema samples from G itself, which trains in train mode: a grid must neither use batch statistics nor
    move BatchNorm's running statistics (rank 0 alone would drift from the other ranks)."""
    from gan_ray.core.models import ModelSpec, build
    from gan_ray.core.step import eval_mode

    G, _ = build(ModelSpec("dcgan", 16, (1, 28, 28), 0))
    G.train()
    buffers = {k: v.clone() for k, v in G.state_dict().items() if "running" in k}
    z = torch.randn(4, 16)
    with torch.no_grad(), eval_mode(G) as g:
        assert not g.training
        one, four = g(z[:1]), g(z)
    assert torch.allclose(one, four[:1], atol=1e-6)  # eval mode: an image does not depend on its batch
    assert G.training
    assert all(torch.equal(v, G.state_dict()[k]) for k, v in buffers.items())
