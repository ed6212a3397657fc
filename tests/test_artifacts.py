"""Config resolution, checkpoints, export/load and sampling: pure PyTorch, no Ray."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gan_ray.core import checkpoint as ckpt_io
from gan_ray import load_generator
from gan_ray.core.config import TrainConfig, resolve
from gan_ray.core.errors import UserError
from gan_ray.core.models import ModelSpec, build
from gan_ray.core.model_dir import export
from gan_ray.core.step import make_state, train_step
from tests.conftest import assert_one_line_error, cli


# ---------------------------------------------------------------------------------------------------- config
def test_file_values_are_overridden_by_flags(tmp_path):
    cfg = resolve({"lr-g": 1e-3, "epochs": 7, "arch": "dcgan"}, {"epochs": 9})
    assert (cfg.lr_g, cfg.epochs, cfg.arch, cfg.lr_d) == (1e-3, 9, "dcgan", 2e-4)


@pytest.mark.parametrize("values, message", [
    ({"lr_g": 0}, "--lr-g must be positive"),
    ({"batch_size": -3}, "--batch-size must be a positive integer"),
    ({"dataset": "imagenet"}, "unknown --dataset"),
    ({"arch": "transformer"}, "unknown --arch"),
    ({"lerning_rate": 1}, "unknown key"),
    ({"epochs": "ten"}, "--epochs expects int"),
])
def test_bad_config_values_are_rejected(values, message):
    with pytest.raises(UserError, match=message):
        resolve(values, {})


# -------------------------------------------------------------------------------------------- a tiny model
@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    """A conditional MLP trained for a handful of steps, saved as a training checkpoint."""
    torch.manual_seed(0)
    spec = ModelSpec("mlp", 16, (1, 28, 28), 10)
    G, D = build(spec)
    state = make_state(spec, G, D, lr_g=2e-4, lr_d=2e-4, beta1=0.5)
    for _ in range(5):
        train_step(state, torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,)))
    cfg = TrainConfig(conditional=True, latent_dim=16, name="tiny")
    d = tmp_path_factory.mktemp("ckpt") / "checkpoint_000005"
    ckpt_io.save(d, state, epoch=5, config=cfg.to_dict(), metrics={"loss_d": 1.0})
    return d, state


def test_checkpoint_round_trip_restores_everything(trained_checkpoint):
    d, state = trained_checkpoint
    meta, sd = ckpt_io.load(d)
    assert meta["epoch"] == 5 and meta["spec"]["num_classes"] == 10
    G, D = build(ModelSpec.from_dict(meta["spec"]))
    fresh = make_state(ModelSpec.from_dict(meta["spec"]), G, D, lr_g=2e-4, lr_d=2e-4, beta1=0.5)
    epoch = ckpt_io.load_state_dict(fresh, sd)
    assert epoch == 5 and fresh.step == 5 and fresh.images_seen == 40
    for a, b in zip(fresh.G_ema.parameters(), state.G_ema.parameters()):
        assert torch.equal(a, b)
    assert fresh.opt_d.state_dict()["state"][0]["step"] == state.opt_d.state_dict()["state"][0]["step"]


def _fresh_state(meta: dict, capturable: bool = False):
    spec = ModelSpec.from_dict(meta["spec"])
    G, D = build(spec)
    return make_state(spec, G, D, lr_g=2e-4, lr_d=2e-4, beta1=0.5, capturable=capturable)


def test_a_cuda_graph_runs_checkpoint_resumes_eagerly(trained_checkpoint):
    """A --cuda-graph run saves capturable Adam (float step counters); resuming it eagerly (on CPU, or a GPU with
    --cuda-graph off) keeps this optimiser's own setting and trains exactly like resuming a non-graph checkpoint."""
    d, _ = trained_checkpoint
    meta, plain_sd = ckpt_io.load(d)
    _, graph_sd = ckpt_io.load(d)
    for opt in ("opt_g", "opt_d"):  # what a capturable optimiser writes
        for group in graph_sd[opt]["param_groups"]:
            group["capturable"] = True
    losses = []
    for sd in (plain_sd, graph_sd):
        state = _fresh_state(meta)
        ckpt_io.load_state_dict(state, sd)
        assert not any(g["capturable"] for opt in (state.opt_g, state.opt_d) for g in opt.param_groups)
        assert all(st["step"].device.type == "cpu" for st in state.opt_d.state.values())
        torch.manual_seed(3)
        out = train_step(state, torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,)))
        losses.append((float(out["loss_d"]), float(out["loss_g"])))
    assert losses[0] == losses[1]


def test_a_capturable_state_keeps_its_setting_when_loading_a_plain_checkpoint(trained_checkpoint):
    d, _ = trained_checkpoint
    meta, sd = ckpt_io.load(d)
    state = _fresh_state(meta, capturable=True)
    ckpt_io.load_state_dict(state, sd)
    assert all(g["capturable"] for opt in (state.opt_g, state.opt_d) for g in opt.param_groups)
    assert all(st["step"].device == p.device for p, st in state.opt_g.state.items())


def test_checkpoint_refuses_foreign_pickles(tmp_path, trained_checkpoint):
    d, _ = trained_checkpoint
    bad = tmp_path / "evil"
    bad.mkdir()
    (bad / "config.json").write_text((d / "config.json").read_text())
    import pickle

    (bad / "state.pt").write_bytes(pickle.dumps({"x": object()}))  # weights_only loading must refuse this
    with pytest.raises(UserError, match="cannot load"):
        ckpt_io.load(bad)
    with pytest.raises(UserError, match="not a gan-ray checkpoint"):
        ckpt_io.load(tmp_path)


def test_export_and_load_round_trip(tmp_path, trained_checkpoint):
    d, state = trained_checkpoint
    out = export(d, tmp_path / "model")
    assert {p.name for p in out.iterdir()} == {"model.json", "generator.safetensors", "samples.png"}
    info = json.loads((out / "model.json").read_text())
    assert info["arch"] == "mlp" and info["latent_dim"] == 16 and info["num_classes"] == 10
    assert info["image_shape"] == [1, 28, 28] and info["dataset"] == "digits" and info["epoch"] == 5
    gen = load_generator(out)
    imgs = gen.generate(12, labels=[7] * 12, seed=3)
    assert imgs.shape == (12, 1, 28, 28) and imgs.dtype == torch.float32 and 0 <= imgs.min() and imgs.max() <= 1
    # the exported weights are the EMA generator's
    from gan_ray.core.step import latent_for_seed

    with torch.no_grad():
        expect = state.G_ema(latent_for_seed(12, 16, 3), torch.full((12,), 7))
    assert torch.allclose(imgs, expect, atol=1e-6)


def test_generate_is_deterministic_and_validates_labels(tmp_path, trained_checkpoint):
    gen = load_generator(export(trained_checkpoint[0], tmp_path / "m"))
    a, b = gen.generate(8, seed=11), gen.generate(8, seed=11)
    assert torch.equal(a, b)
    assert not torch.equal(a, gen.generate(8, seed=12))
    _, labels = gen.generate_with_labels(12)
    assert labels.tolist() == [i % 10 for i in range(12)], "labels cycle 0..K-1 by default"
    with pytest.raises(UserError, match="0..9"):
        gen.generate(2, labels=[3, 10])
    with pytest.raises(UserError, match="expected 3 labels"):
        gen.generate(3, labels=[1, 2])


def test_load_generator_rejects_broken_directories(tmp_path, trained_checkpoint):
    with pytest.raises(UserError, match="not found"):
        load_generator(tmp_path / "nope")
    out = export(trained_checkpoint[0], tmp_path / "m")
    (out / "generator.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="does not hold"):
        load_generator(out)


# ---------------------------------------------------------------------------------------------- the CLI
def test_cli_sample_writes_npz_and_png_deterministically(tmp_path, trained_checkpoint):
    d, _ = trained_checkpoint
    for name in ("a.npz", "b.npz"):
        r = cli("sample", "--checkpoint", str(d), "--n", "6", "--labels", "3,3,7,7,1,1", "--seed", "5",
                    "--out", str(tmp_path / name))
        assert r.returncode == 0, r.stderr
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert a["images"].dtype == np.float32 and a["images"].shape == (6, 1, 28, 28)
    assert a["labels"].dtype == np.int64 and a["labels"].tolist() == [3, 3, 7, 7, 1, 1]
    assert np.array_equal(a["images"], b["images"])
    r = cli("sample", "--checkpoint", str(d), "--n", "20", "--out", str(tmp_path / "grid.png"))
    assert r.returncode == 0 and (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
    r = cli("export", "--checkpoint", str(d), "--out", str(tmp_path / "exported"))
    assert r.returncode == 0, r.stderr
    r = cli("sample", "--model", str(tmp_path / "exported"), "--n", "6", "--labels", "3,3,7,7,1,1",
                "--seed", "5", "--out", str(tmp_path / "c.npz"))
    assert r.returncode == 0 and np.array_equal(np.load(tmp_path / "c.npz")["images"], a["images"])
    # one label for all, as the README's "sixteen 7s" example writes it
    r = cli("sample", "--model", str(tmp_path / "exported"), "--n", "16", "--labels", "7", "--seed", "1",
                "--out", str(tmp_path / "sevens.npz"))
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / "sevens.npz")["labels"].tolist() == [7] * 16


def test_cli_sample_and_export_reject_bad_sources(tmp_path, trained_checkpoint):
    assert_one_line_error(cli("sample", "--checkpoint", str(tmp_path / "missing"), "--out", "x.npz"),
                          "checkpoint not found")
    assert_one_line_error(cli("sample", "--checkpoint", str(tmp_path), "--out", "x.npz"),
                          "not a gan-ray checkpoint")
    assert_one_line_error(cli("export", "--checkpoint", str(tmp_path / "missing"), "--out",
                                  str(tmp_path / "o")), "checkpoint not found")
    assert not (tmp_path / "o").exists(), "nothing half-written"
    out = tmp_path / "samples.npz"
    assert_one_line_error(cli("sample", "--checkpoint", str(trained_checkpoint[0]), "--labels", "4,12",
                                  "--n", "2", "--out", str(out)), "0..9")
    assert not out.exists()
    assert_one_line_error(cli("sample", "--checkpoint", str(trained_checkpoint[0]), "--out",
                                  str(tmp_path / "x.jpg")), ".npz or .png")


def test_unconditional_models_reject_labels(tmp_path):
    spec = ModelSpec("mlp", 8, (1, 28, 28))
    G, D = build(spec)
    state = make_state(spec, G, D, lr_g=2e-4, lr_d=2e-4, beta1=0.5)
    d = ckpt_io.save(tmp_path / "ck", state, epoch=1, config=TrainConfig(latent_dim=8).to_dict())
    r = cli("sample", "--checkpoint", str(d), "--labels", "3", "--n", "2", "--out", str(tmp_path / "s.npz"))
    assert_one_line_error(r, "unconditional")
    r = cli("sample", "--checkpoint", str(d), "--n", "3", "--out", str(tmp_path / "s.npz"))
    assert r.returncode == 0 and np.load(tmp_path / "s.npz")["labels"].tolist() == [-1, -1, -1]
