"""The optional Inception-v3 FID: user-supplied weights are loaded safely and checked before any scoring, and the
metric runs end to end (on randomly initialised weights: no real ones offline, so the value itself means nothing).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gan_ray.core.errors import UserError
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """torchvision's Inception-v3 state_dict, randomly initialised, as a .safetensors and a tensors-only .pt."""
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    state = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=True).state_dict()
    d = tmp_path_factory.mktemp("inception")
    save_file({k: v.contiguous() for k, v in state.items()}, str(d / "inception.safetensors"))
    torch.save(state, d / "inception.pt")
    return d


@pytest.mark.parametrize("name, content, message", [
    ("text.pt", b"not a checkpoint at all", "not a readable weights file"),
    ("garbage.safetensors", b"\x00\x01", "not a readable weights file"),
    ("tensor.pt", None, "expected a state_dict"),
    ("wrong.pt", {"conv.weight": torch.zeros(2, 2)}, "does not hold torchvision Inception-v3 weights"),
])
def test_unusable_weight_files_are_one_line_errors(tmp_path, name, content, message):
    from gan_ray.eval.metrics import load_inception

    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(torch.zeros(3) if content is None else content, path)
    with pytest.raises(UserError, match=message):
        load_inception(path)


def test_evaluate_refuses_bad_weights_before_scoring(tmp_path):
    samples = tmp_path / "s.npz"
    np.savez(samples, images=np.random.default_rng(0).random((64, 1, 28, 28), dtype=np.float32))
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"garbage")
    r = run_cli("evaluate", "--samples", str(samples), "--inception-weights", str(weights), timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a readable weights file" in lines[0], r.stderr  # nothing scored first


def test_both_weight_formats_load_the_same_network(random_inception):
    from gan_ray.eval.metrics import load_inception

    a, b = (load_inception(random_inception / f"inception.{s}") for s in ("safetensors", "pt"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_inception_fd_runs_on_supplied_weights(random_inception):
    from gan_ray.eval.metrics import inception_fd, load_inception

    net = load_inception(random_inception / "inception.safetensors")
    assert not net.training and isinstance(net.fc, torch.nn.Identity)
    torch.manual_seed(1)
    a, b = torch.rand(6, 1, 28, 28), torch.rand(6, 1, 28, 28)
    same = inception_fd(a, a.clone(), net, batch_size=6)
    other = inception_fd(a, b * 0.2, net, batch_size=6)
    assert abs(same) < 1e-6 and other > same  # a distance: zero to itself, positive to something else
