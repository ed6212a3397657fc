"""The prepared-dataset format and `gan-ray prepare` / `train` refusing bad input: Ray-free, in-process.

Every refusal here must happen before any Ray work: `ensure_ray` is replaced by a function that fails the test.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from gan_ray.cli import main
from gan_ray.core import prepared as fmt
from gan_ray.core.config import TrainConfig
from gan_ray.core.data import HELDOUT_FRACTION, describe_dataset, load_dataset, resolve_dataset
from gan_ray.core.errors import UserError
from tests.conftest import own_lines


def write_prepared(dest, n_train=40, n_held=10, shape=(1, 8, 8), classes=("a", "b"), per_shard=16, name="test"):
    """A small prepared dataset written with the format's own functions (what a prepare task writes)."""
    rng = np.random.default_rng(0)
    shards = {}
    for split, n in (("train", n_train), ("heldout", n_held)):
        images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        labels = rng.integers(0, max(1, len(classes)), n) if classes else np.full(n, -1)
        shards[split] = [fmt.write_shard(str(dest), f"{split}/part-{k:05d}.parquet", images[s:s + per_shard],
                                         labels[s:s + per_shard]) for k, s in enumerate(range(0, n, per_shard))]
    m = fmt.Manifest(shape=shape, classes=list(classes), count={"train": n_train, "heldout": n_held}, shards=shards,
                     source={"kind": "test", "name": name, "key": name}, split={"seed": 0},
                     content_hash=fmt.content_hash(shards), location=str(dest))
    fmt.write_manifest(m)
    return m


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if a command gets as far as starting (or joining) Ray."""
    import gan_ray.cluster.connect as connect

    def refuse(*a, **k):
        raise AssertionError("Ray work started before the bad input was refused")

    monkeypatch.setattr(connect, "ensure_ray", refuse)


def run(capsys, *argv):
    code = main(list(argv))
    err = "\n".join(own_lines(capsys.readouterr().err))  # the command's lines, not those Ray forwards
    return code, err


# ------------------------------------------------------------------------------------------------- the format
def test_shards_round_trip_images_labels_and_a_content_hash(tmp_path):
    m = write_prepared(tmp_path / "ds", n_train=40, n_held=10, per_shard=16)
    again = fmt.read_manifest(str(tmp_path / "ds"))
    assert again == m and again.num_classes == 2 and len(again.shards["train"]) == 3
    images, labels = fmt.read_split(again, "train")
    assert images.shape == (40, 1, 8, 8) and images.dtype == np.uint8 and labels.shape == (40,)
    rng = np.random.default_rng(0)
    assert np.array_equal(images, rng.integers(0, 256, (40, 1, 8, 8), dtype=np.uint8))  # bit for bit
    head, _ = fmt.read_split(again, "train", limit=20)  # a prefix across two shards
    assert np.array_equal(head, images[:20])
    # the content hash follows the pixels: one changed shard, another hash
    other = write_prepared(tmp_path / "other", n_train=41, n_held=10, per_shard=16)
    assert other.content_hash != m.content_hash
    ds = load_dataset(str(tmp_path / "ds"), "train")
    assert ds.shape == (1, 8, 8) and ds.num_classes == 2 and len(ds) == 40 and ds.images.dtype == torch.uint8


def test_the_held_out_split_and_the_extractor_read_a_bounded_sample(tmp_path, monkeypatch):
    m = write_prepared(tmp_path / "ds", n_train=40, n_held=30, shape=(3, 64, 64), per_shard=8)
    assert len(load_dataset(str(tmp_path / "ds"), "heldout")) == 30  # small: all of it
    monkeypatch.setattr(fmt, "HELDOUT_SAMPLE_MAX", 12)
    monkeypatch.setattr(fmt, "TRAIN_SAMPLE_MAX", 20)
    held = load_dataset(str(tmp_path / "ds"), "heldout")  # the evaluation's reference: a prefix, across shards
    assert len(held) == 12 and np.array_equal(held.images.numpy(), fmt.read_split(m, "heldout")[0][:12])
    assert len(load_dataset(str(tmp_path / "ds"), "train", sample=True)) == 20  # the feature extractor's
    assert len(load_dataset(str(tmp_path / "ds"), "train")) == 40  # training in memory mode: all of it
    monkeypatch.undo()
    # a large set: the held-out sample stays bounded (by count, and by bytes for big images)
    m.count = {"train": 2_000_000, "heldout": 300_000}
    assert fmt.sample_size(m, "heldout") == fmt.HELDOUT_SAMPLE_MAX
    assert fmt.sample_size(m, "train") == min(fmt.TRAIN_SAMPLE_MAX, fmt.TRAIN_SAMPLE_BYTES // (3 * 64 * 64))
    m.shape = (3, 256, 256)
    assert fmt.sample_size(m, "heldout") == fmt.HELDOUT_SAMPLE_BYTES // (3 * 256 * 256) < fmt.HELDOUT_SAMPLE_MAX


def test_auto_mode_keeps_data_in_memory_only_when_it_fits_comfortably():
    assert fmt.choose_mode(47_000_000, 4e9)[0] == "memory"
    mode, why = fmt.choose_mode(2_400_000_000, 4e9)
    assert mode == "stream" and "2.4 GB" in why


def test_a_training_config_adopts_the_prepared_image_size_or_refuses_a_mismatch(tmp_path):
    write_prepared(tmp_path / "ds", shape=(3, 32, 32))
    cfg = resolve_dataset(TrainConfig(dataset=str(tmp_path / "ds"), batch_size=4, workers=2))
    assert cfg.image_size == 32 and describe_dataset(cfg) == ((3, 32, 32), 2)
    with pytest.raises(UserError, match="--image-size 28 does not fit the prepared dataset"):
        resolve_dataset(TrainConfig(dataset=str(tmp_path / "ds"), image_size=28))
    with pytest.raises(UserError, match="--data-mode stream reads a prepared dataset"):
        TrainConfig(dataset="mnist", data_mode="stream")
    assert TrainConfig(storage="s3://bucket/runs/", name="x").run_dir == "s3://bucket/runs/x"  # a run may live there
    from gan_ray.tune.space import SweepSettings

    with pytest.raises(UserError, match="a sweep's trials share files .* on a file system"):
        SweepSettings(storage="s3://bucket/runs")  # a sweep may not
    with pytest.raises(UserError, match="unknown --dataset 'imagenet'"):
        TrainConfig(dataset="imagenet")


# ------------------------------------------------------------------------------------------ train: bad input
def test_train_refuses_a_prepared_dataset_it_cannot_use_before_ray(tmp_path, capsys, no_ray):
    storage = str(tmp_path / "runs")
    (tmp_path / "half").mkdir()  # an interrupted prepare: shards, no manifest
    code, err = run(capsys, "train", "--dataset", str(tmp_path / "half"), "--storage", storage)
    assert code == 2 and "no manifest.json there" in err and len(err.splitlines()) == 1, err
    write_prepared(tmp_path / "big", shape=(3, 48, 48))
    code, err = run(capsys, "train", "--dataset", str(tmp_path / "big"), "--arch", "dcgan", "--storage", storage)
    assert code == 2 and "--arch dcgan supports 28, 32 or 64 pixel images, got 48" in err, err
    code, err = run(capsys, "train", "--dataset", str(tmp_path / "big"), "--image-size", "64", "--storage", storage)
    assert code == 2 and "does not fit the prepared dataset" in err, err
    write_prepared(tmp_path / "plain", classes=())
    code, err = run(capsys, "train", "--dataset", str(tmp_path / "plain"), "--conditional", "--storage", storage)
    assert code == 2 and "--conditional needs labelled data" in err, err
    (tmp_path / "bad" ).mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{\"format\": \"gan-ray-prepared/1\", \"shape\": [2, 8]}")
    code, err = run(capsys, "train", "--dataset", str(tmp_path / "bad"), "--storage", storage)
    assert code == 2 and "is not a gan-ray prepared-dataset manifest" in err, err
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------- prepare: bad input
def _images(folder, n, mode="L", size=12):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new(mode, (size, size), color=(i * 20) % 256 if mode == "L" else ((i * 20) % 256, 0, 0)).save(
            folder / f"{mode}{i}.png")


def test_prepare_refuses_bad_sources_and_destinations_before_ray(tmp_path, capsys, no_ray):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    code, err = run(capsys, "prepare", str(empty), "--out", str(tmp_path / "o1"))
    assert code == 2 and "no images" in err and len(err.splitlines()) == 1, err

    mixed = tmp_path / "mixed"
    _images(mixed, 3, "L")
    _images(mixed, 2, "RGB")
    code, err = run(capsys, "prepare", str(mixed), "--out", str(tmp_path / "o2"))
    assert code == 2 and "mixes channel counts: 3 grayscale" in err and "--channels" in err, err

    broken = tmp_path / "broken"
    _images(broken, 4, "L")
    (broken / "zz.png").write_bytes(b"this is not a PNG")
    code, err = run(capsys, "prepare", str(broken), "--out", str(tmp_path / "o3"))
    assert code == 2 and "cannot read image" in err and "zz.png" in err and "--skip-corrupt" in err, err

    other = tmp_path / "holds-another"
    write_prepared(other, name="something-else")
    code, err = run(capsys, "prepare", str(mixed), "--channels", "3", "--out", str(other))
    assert code == 2 and "already holds a different dataset (from something-else" in err, err

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.tex").write_text("mine")
    code, err = run(capsys, "prepare", str(mixed), "--channels", "3", "--out", str(busy))
    assert code == 2 and "holds files that are not a prepared dataset" in err, err
    assert sorted(p.name for p in busy.iterdir()) == ["thesis.tex"]

    code, err = run(capsys, "prepare", str(mixed))
    assert code == 2 and "--out: Field required" in err, err
    for out in ("o1", "o2", "o3"):
        assert not (tmp_path / out).exists(), out


def test_the_split_is_the_folder_datasets_own(tmp_path):
    """prepare holds out exactly the images `folder:` holds out (same seed and fraction)."""
    from gan_ray.train.prepare import PrepareSettings, read_source

    for c in ("a", "b"):
        _images(tmp_path / "src" / c, 10, "L")
    source = read_source(str(tmp_path / "src"), PrepareSettings(out=str(tmp_path / "o"), image_size=12))
    held = load_dataset(f"folder:{tmp_path / 'src'}", "heldout", image_size=12)
    assert source.count("heldout") == len(held) == round(20 * HELDOUT_FRACTION)
    from gan_ray.train.prepare import decode_file

    mine = sorted(decode_file(str(p), (1, 12, 12)).tobytes() for p, _ in source.items["heldout"])
    assert mine == sorted(x.numpy().tobytes() for x in held.images)
    assert source.classes == ["a", "b"] and json.loads(json.dumps(source.key))
