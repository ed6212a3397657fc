"""Prepared datasets on the session's Ray cluster: `prepare` as Ray Data work (a corrupt image named or skipped, in
`make test`), then a Ray Train run that streams it (every rank the same number of steps each epoch, the quality
metrics scored against the prepared held-out sample; in `make test-e2e`, with the rest of the matrix in
tests/test_stream_e2e.py: object storage, resume, a lost worker, a Tune trial)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from gan_ray.core import prepared as fmt
from gan_ray.core.config import TrainConfig
from gan_ray.core.errors import UserError
from gan_ray.core.run_dir import read_metrics
from gan_ray.train.driver import fit
from gan_ray.train.prepare import PrepareSettings, prepare

pytestmark = pytest.mark.slow


@pytest.mark.e2e
def test_prepare_then_stream_digits_on_two_workers(ray_cluster, tmp_path):
    dest = str(tmp_path / "digits")
    result = prepare("digits", PrepareSettings(out=dest, shard_mb=0.25))  # ~330 images per shard: 6 shards
    m = result.manifest
    assert (m.count, m.shape, m.num_classes) == ({"train": 1527, "heldout": 270}, (1, 28, 28), 10)
    assert len(m.shards["train"]) == 5 and fmt.read_manifest(dest).content_hash == m.content_hash
    assert not (tmp_path / "digits" / ".gan-ray-prepare").exists()
    again = prepare("digits", PrepareSettings(out=dest, shard_mb=0.25))
    assert again.already and again.manifest.content_hash == m.content_hash  # the same dataset: nothing to do

    cfg = TrainConfig(dataset=dest, data_mode="stream", workers=2, batch_size=32, epochs=2, checkpoint_every=2,
                      storage=str(tmp_path / "runs"), name="stream", eval_samples=500)
    out = fit(cfg, progress=False)
    assert out.error is None
    rows = read_metrics(cfg.run_dir / "metrics.jsonl")
    # 1527 rows split equally (763 each, one dropped), full batches of 32: 23 steps on each rank, every epoch
    assert [r["rank_steps"] for r in rows] == [[23, 23], [23, 23]]
    assert rows[-1]["step"] == 46 and rows[-1]["images_seen"] == 2 * 23 * 32 * 2
    assert "fd" in rows[-1] and rows[-1]["fd"] > 0  # scored against the prepared held-out split
    saved = json.loads((cfg.run_dir / "config.json").read_text())
    assert saved["data_mode"] == "stream" and saved["image_size"] == 28


def test_a_corrupt_image_is_named_or_skipped_and_counted(ray_cluster, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(src / f"{i:02d}.png")
    good = (src / "05.png").read_bytes()
    (src / "05.png").write_bytes(good[: len(good) // 2])  # a valid header, half its pixels: found when decoded
    dest = str(tmp_path / "out")
    with pytest.raises(UserError, match=r"cannot read image .*05\.png"):
        prepare(str(src), PrepareSettings(out=dest, image_size=16))
    assert not (tmp_path / "out" / "train").exists() and not (tmp_path / "out" / "manifest.json").exists()
    m = prepare(str(src), PrepareSettings(out=dest, image_size=16, skip_corrupt=True)).manifest
    assert m.count["train"] + m.count["heldout"] == 11 and m.source["skipped"] == [str(src / "05.png")]
