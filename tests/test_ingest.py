"""A streaming worker's reading (gan_ray/train/ingest.py): the byte-bounded lookahead, and a real Ray Data iterator
read epoch after epoch across the boundary, each epoch's batches whole, in order and shuffled by their own seed."""
from __future__ import annotations

import threading
import time

import numpy as np
import pyarrow as pa
import pytest
import torch

from gan_ray.train.ingest import Lookahead, StreamedShard, to_tensors
from tests.conftest import wait_for


def test_lookahead_holds_what_fits_in_its_bytes_and_always_one_item():
    ahead = Lookahead(100)
    ahead.put("a", 60)
    done = threading.Event()
    threading.Thread(target=lambda: (ahead.put("b", 60), done.set()), daemon=True).start()
    time.sleep(0.3)
    assert not done.is_set() and ahead.bytes == 60, "a put beyond the budget waits"
    assert ahead.get() == "a"
    assert done.wait(5) and ahead.get() == "b"
    ahead.put("huge", 1000)  # larger than the whole budget: passes when the queue is empty
    assert ahead.get() == "huge" and ahead.bytes == 0


def _table(n: int, shape=(1, 4, 4)) -> pa.Table:
    images = (np.arange(n * int(np.prod(shape))) % 251).astype(np.uint8).reshape(n, -1)
    return pa.table({"image": pa.array([row.tobytes() for row in images], type=pa.binary()),
                     "label": pa.array(np.arange(n) % 10, type=pa.int64())})


def test_to_tensors_gives_floats_in_0_1_and_int64_labels():
    images, labels = to_tensors(_table(6), (1, 4, 4))
    assert images.shape == (6, 1, 4, 4) and images.dtype == torch.float32
    assert float(images.max()) <= 1.0 and float(images[0, 0, 0, 1]) == pytest.approx(1 / 255)
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.slow
def test_epochs_are_read_back_to_back_each_whole_and_reshuffled(ray_cluster):
    import ray.data

    ds = ray.data.from_arrow(_table(200))
    shard = StreamedShard(ds.iterator(), (1, 4, 4), 16, batch_size=32, seed=0, rank=0, last_epoch=3)
    seen = []
    for epoch in (1, 2, 3):
        batches = list(shard.epoch(epoch))
        assert [len(b[1]) for b in batches] == [32] * 6, "full batches only (200 rows: 6, 8 dropped)"
        labels = torch.cat([b[1] for b in batches])
        seen.append(labels.tolist())
        if epoch == 1:  # the next epoch is being read before this one's batches are asked for again
            wait_for(lambda: any(tag == 2 for (tag, _), _n in list(shard.ahead.items)), 30,
                     "epoch 2 read ahead")
    assert seen[0] != seen[1] != seen[2], "each epoch shuffled by its own seed"
    assert not shard.reader.is_alive(), "the reader stops after the last epoch"


def _unreadable(batch):
    raise ValueError("shard 3 is unreadable")


@pytest.mark.slow
def test_an_error_while_reading_reaches_the_training_thread(ray_cluster):
    import ray.data

    ds = ray.data.from_arrow(_table(64)).map_batches(_unreadable, batch_format="pyarrow")
    shard = StreamedShard(ds.iterator(), (1, 4, 4), 16, batch_size=32, seed=0, rank=0, last_epoch=1)
    with pytest.raises(Exception, match="shard 3 is unreadable"):
        list(shard.epoch(1))
