"""`--arch resnet` (gan_ray/core/resnet.py): every supported side builds and trains through the common step, the
R3GAN initialisation holds (each residual block starts as the identity, no normalisation, bias-free convs), and
sizes or widths it cannot build are one line, exit 2."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from gan_ray.cluster.processes import free_port
from gan_ray.core import resnet
from gan_ray.core.config import TrainConfig
from gan_ray.core.errors import UserError
from gan_ray.core.models import ModelSpec, build, check_image_size
from gan_ray.core.step import build_state, spec_for, train_step
from tests.conftest import own_lines


@pytest.mark.parametrize("side", resnet.SIDES)
@pytest.mark.parametrize("classes", [0, 10])
def test_every_side_builds_draws_in_range_and_scores_each_image(side, classes):
    spec = ModelSpec("resnet", 16, (3, side, side), classes, g_width=8, d_width=8, aux_classifier=bool(classes))
    G, D = build(spec)
    labels = torch.arange(3) % 10 if classes else None
    with torch.no_grad():
        x = G.eval()(torch.randn(3, 16), labels)
        out, aux = D(x, labels, with_aux=True) if classes else (D(x, labels), None)
    assert x.shape == (3, 3, side, side) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert out.shape == (3,) and torch.isfinite(out).all()
    assert aux is None or aux.shape == (3, 10)
    assert resnet.stage_widths(side, 8)[-1] == 8 and max(resnet.stage_widths(side, 8)) <= 8 * resnet.MAX_MULTIPLIER


def test_g_trains_on_its_linear_output_and_is_sampled_in_range():
    """No sigmoid to saturate: in training D sees G's raw output (values outside [0, 1] get a gradient back into
    range); sampled (eval mode) the same images are clamped to [0, 1]."""
    spec = ModelSpec("resnet", 16, (1, 28, 28), 0, g_width=8, d_width=8)
    torch.manual_seed(0)
    G, _ = build(spec)
    z = torch.randn(64, 16)
    raw = G.train()(z)
    assert float(raw.min()) < 0 or float(raw.max()) > 1, "the training output is not squashed"
    (raw.clamp(max=0) ** 2).sum().backward()  # pulling negative pixels up reaches every layer
    assert G.to_image.weight.grad.abs().sum() > 0
    with torch.no_grad():
        sampled = G.eval()(z)
    assert torch.equal(sampled, raw.detach().clamp(0, 1))


def test_conditioning_changes_the_image_and_the_score():
    spec = ModelSpec("resnet", 16, (1, 28, 28), 10, g_width=8, d_width=8)
    torch.manual_seed(0)
    G, D = build(spec)
    for block in G.modules():  # past the zero start, so the label's path reaches the output
        if isinstance(block, resnet.ResidualBlock):
            nn.init.normal_(block.project.weight, std=0.1)
    z = torch.randn(1, 16).repeat(2, 1)
    with torch.no_grad():
        x = G.eval()(z, torch.tensor([3, 7]))
        assert not torch.allclose(x[0], x[1])
        d = D(x[:1].repeat(2, 1, 1, 1), torch.tensor([3, 7]))
    assert not torch.allclose(d[0], d[1])


def test_r3gan_initialisation_no_normalisation_and_bias_free_convolutions():
    spec = ModelSpec("resnet", 16, (3, 32, 32), 0, g_width=16, d_width=16)
    torch.manual_seed(0)
    G, D = build(spec)
    for net in (G, D):
        assert not [m for m in net.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm,
                                                               nn.InstanceNorm2d, nn.BatchNorm1d))]
        assert all(m.bias is None for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)))
        blocks = [m for m in net.modules() if isinstance(m, resnet.ResidualBlock)]
        assert len(blocks) == resnet.BLOCKS_PER_STAGE * 4  # 4, 8, 16, 32 pixels
        for block in blocks:  # the last conv of every branch starts at zero: every block is the identity
            x = torch.randn(2, block.expand.in_channels, 8, 8)
            assert not block.project.weight.detach().any()
            assert torch.equal(block(x), x)
        # Fixup: the branch's first conv is He-initialised and scaled by L^(-1/4), L the network's block count
        w = blocks[0].expand.weight
        expected = resnet.ACT_GAIN * len(blocks) ** -0.25 / math.sqrt(w.shape[1])
        assert abs(float(w.detach().std()) / expected - 1) < 0.1
        assert blocks[0].spatial.groups == blocks[0].spatial.in_channels // resnet.GROUP_WIDTH


def test_resampling_is_r3gans_low_pass_filter_that_keeps_the_mean():
    x = torch.rand(2, 3, 7, 7)
    up, down = resnet.Resample(up=True), resnet.Resample(up=False)
    # R3GAN's reference resamplers: the [1, 3, 3, 1] kernel, zero insertion (x4) and a transposed conv up, a
    # strided conv down, zero padding
    k = torch.tensor([1.0, 3.0, 3.0, 1.0])
    k = (torch.outer(k, k) / 64)[None, None]
    flat = x.reshape(6, 1, 7, 7)
    assert torch.allclose(up(x), nn.functional.conv_transpose2d(flat, 4 * k, stride=2, padding=1).view(2, 3, 14, 14),
                          atol=1e-6)
    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(down(x), nn.functional.conv2d(x.reshape(6, 1, 8, 8), k, stride=2, padding=1)
                          .view(2, 3, 4, 4), atol=1e-6)
    assert up(x).shape == (2, 3, 16, 16) and down(x).shape == (2, 3, 4, 4)
    flat = torch.full((1, 1, 8, 8), 0.7)
    assert torch.allclose(up(flat)[..., 2:-2, 2:-2], torch.full((1, 1, 12, 12), 0.7))  # interior: no ripple
    assert torch.allclose(down(flat)[..., 1:-1, 1:-1], torch.full((1, 1, 2, 2), 0.7))
    stripes = torch.zeros(1, 1, 8, 8)
    stripes[..., ::2] = 1.0  # the highest frequency there is: filtered out, not aliased
    assert float(down(stripes)[..., 1:-1, 1:-1].std()) < 1e-6


def test_rpgan_steps_with_r1_and_r2_train_every_parameter():
    """The first step moves only what the zero-initialised branch ends let gradients reach (the last convs, the
    bases, the skip path); from the second every parameter of both networks learns."""
    cfg = TrainConfig(arch="resnet", g_width=8, d_width=8, loss="rpgan", r1_gamma=1.0, r2_gamma=1.0, r1_every=1,
                      beta1=0.0, beta2=0.99, batch_size=4)
    state = build_state(cfg, spec_for(cfg, (3, 28, 28), 0), "cpu")
    params = list(state.G.parameters()) + list(state.D.parameters())
    before = [p.detach().clone() for p in params]
    for _ in range(2):
        out = train_step(state, torch.rand(4, 3, 28, 28))
        assert {"r1", "r2", "loss_g"} <= set(out) and all(torch.isfinite(v) for v in out.values())
    assert all(not torch.equal(a, b) for a, b in zip(before, params))


def test_unsupported_sides_and_widths_are_user_errors():
    for side in (16, 48, 100, 512):
        with pytest.raises(UserError, match="--arch resnet supports 28 pixels or a power of two from 32 to 256"):
            check_image_size("resnet", side)
    with pytest.raises(UserError, match="--g-width 12: --arch resnet needs a multiple of 8"):
        TrainConfig(arch="resnet", g_width=12)
    with pytest.raises(UserError, match="--d-width must be at most 1024"):
        TrainConfig(arch="resnet", d_width=4096)
    with pytest.raises(UserError, match="--arch mlp has fixed sizes"):
        TrainConfig(arch="mlp", g_width=32)
    assert TrainConfig(arch="resnet", g_width=48, d_width=0).g_width == 48


@pytest.mark.parametrize("args, fragment", [
    (["--arch", "resnet", "--dataset", "folder:{folder}", "--image-size", "48"], "power of two from 32 to 256"),
    (["--arch", "resnet", "--g-width", "20"], "--g-width 20: --arch resnet needs a multiple of 8"),
    (["--arch", "resnet", "--d-width", "0.5"], "--d-width expects int"),
    (["--arch", "dcgan", "--g-width", "100000"], "--g-width must be at most 1024"),
    (["--dataset", "stacked-mnist", "--data-dir", "{empty}"], "stacked-mnist is built from MNIST's files"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, fragment):
    from PIL import Image

    from gan_ray.cli import main

    folder, empty = tmp_path / "imgs", tmp_path / "empty"
    folder.mkdir()
    empty.mkdir()
    for i in range(4):
        Image.new("L", (10, 10), color=i * 50).save(folder / f"{i}.png")
    argv = [a.format(folder=folder, empty=empty) for a in args]
    assert main(["train", "--storage", str(tmp_path / "runs"), "--name", "bad", *argv]) == 2
    err = own_lines(capsys.readouterr().err)
    assert len(err) == 1 and fragment in err[0], err
    assert not (tmp_path / "runs" / "bad").exists()


# ------------------------------------------------------------------------------------ DDP on 2 gloo ranks
def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = TrainConfig(arch="resnet", conditional=True, g_width=8, d_width=8, loss="rpgan", r1_gamma=1.0,
                      r2_gamma=1.0, r1_every=2, beta1=0.0, beta2=0.99, aux_weight=0.2)
    state = build_state(cfg, spec_for(cfg, (3, 28, 28), 10), "cpu", world, lambda m: DDP(m, broadcast_buffers=False))
    regularised = []
    for i in range(4):
        torch.manual_seed(100 * rank + i)  # each rank its own data and noise
        out = train_step(state, torch.rand(4, 3, 28, 28), torch.arange(4) % 10)
        regularised.append("r1" in out and "r2" in out)
    flat = torch.cat([p.detach().flatten() for p in list(state.G.parameters()) + list(state.D.parameters())])
    torch.save({"params": flat, "regularised": regularised}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_r1_and_r2_double_backward_through_the_resnet_d_keeps_ddp_ranks_identical(tmp_path):
    """R1 and R2 through the plain resnet D (grouped convs, low-pass resampling, projection and class head), joined
    to the DDP-wrapped D's loss, on two gloo ranks with different data: the weights stay bit-identical."""
    mp.start_processes(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["regularised"] == [True, False, True, False]
    assert torch.equal(r0["params"], r1["params"]), "DDP kept the ranks' weights identical"


# ------------------------------------------------------------------------------------------ the sweep space
def test_a_resnet_sweep_searches_widths_and_one_gamma_for_r1_and_r2(tmp_path):
    from gan_ray.tune.space import ARCH_SPACES, Range, build_space, corner_configs, sample_config, space_to_json
    from gan_ray.tune.trial import trial_config

    space = build_space({"arch": "resnet", "loss": "rpgan"})
    assert {"lr_g", "lr_d", "latent_dim", "g_width", "d_width", "r1_gamma"} == set(space.dims)
    assert space.tied == {"r2_gamma": "r1_gamma"} and space_to_json(space)["tied"] == space.tied
    cfg = sample_config(space, {"lr_g": 1e-4, "lr_d": 1e-4, "latent_dim": 64, "g_width": 16, "d_width": 32,
                                "r1_gamma": 0.37})
    assert (cfg.g_width, cfg.d_width, cfg.r1_gamma, cfg.r2_gamma) == (16, 32, 0.37, 0.37)
    trial = trial_config(space.fixed, {"r1_gamma": 2.5}, tmp_path, "train", space.tied)
    assert trial.r2_gamma == 2.5 and trial.arch == "resnet"
    assert all(c["r2_gamma"] == c["r1_gamma"] for c in corner_configs(space))
    assert isinstance(ARCH_SPACES["resnet"]["r1_gamma"], Range)
    # What the user gives wins: a fixed R2 is not tied, a fixed width is not searched; other archs get neither.
    own = build_space({"arch": "resnet", "r2_gamma": "0", "g_width": "48"})
    assert not own.tied and own.fixed["g_width"] == 48 and "d_width" in own.dims
    assert not build_space({"arch": "dcgan"}).tied and "g_width" not in build_space({"arch": "dcgan"}).dims
    assert "tied" not in space_to_json(build_space({}))  # older sweeps' descriptions (resume checks) unchanged


# ------------------------------------------------------------------------------ checkpoint, export, serving's loader
def test_a_resnet_checkpoint_exports_and_loads_as_the_ema_generator(tmp_path):
    """Through the same files as the other archs: a training checkpoint, `export` (safetensors + model.json with
    the widths), and `load_generator` (what `gan-ray sample`, `evaluate` and the Serve deployment load), which draws
    exactly the EMA generator's images, clamped to [0, 1]."""
    import json

    from gan_ray import load_generator
    from gan_ray.core import checkpoint as ckpt_io
    from gan_ray.core.model_dir import export
    from gan_ray.core.step import latent_for_seed

    torch.manual_seed(0)
    cfg = TrainConfig(arch="resnet", conditional=True, g_width=8, d_width=16, latent_dim=16, image_size=32,
                      loss="rpgan", r1_gamma=0.2, r2_gamma=0.2, beta1=0.0, beta2=0.9, name="tiny")
    state = build_state(cfg, spec_for(cfg, (3, 32, 32), 10), "cpu")
    for _ in range(3):
        train_step(state, torch.rand(4, 3, 32, 32), torch.arange(4) % 10)
    ckpt = tmp_path / "checkpoint_000003"
    ckpt_io.save(ckpt, state, epoch=3, config=cfg.to_dict(), metrics={"loss_d": 1.0})
    out = export(ckpt, tmp_path / "model")
    info = json.loads((out / "model.json").read_text())
    assert info["arch"] == "resnet" and info["image_shape"] == [3, 32, 32] and info["num_classes"] == 10
    gen = load_generator(out)
    images = gen.generate(6, labels=[3] * 6, seed=5)
    with torch.no_grad():
        expect = state.G_ema.eval()(latent_for_seed(6, 16, 5), torch.full((6,), 3))
    assert images.shape == (6, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    assert torch.allclose(images, expect, atol=1e-6)
