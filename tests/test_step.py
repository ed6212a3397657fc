"""The pure-PyTorch core: models, losses, the adversarial step, EMA, data sharding. No Ray."""
from __future__ import annotations


import pytest
import torch
from torch import nn

from gan_ray.core import losses
from gan_ray.core.data import load_dataset, shard_order
from gan_ray.core.models import ModelSpec, build, count_params
from gan_ray.core.step import make_state, train_step


# ------------------------------------------------------------------------------------------ the 2-D mixture
MODES = torch.tensor([[1.5, 1.5], [-1.5, 1.5], [-1.5, -1.5], [1.5, -1.5]])
MODE_STD = 0.25


def mixture(n: int, gen: torch.Generator) -> torch.Tensor:
    """Balanced batches of the four-Gaussian mixture (each mode equally often)."""
    return MODES[torch.arange(n) % len(MODES)] + MODE_STD * torch.randn(n, 2, generator=gen)


class TinyG(nn.Module):
    def __init__(self, latent: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent, 128), nn.LeakyReLU(0.2), nn.Linear(128, 128), nn.LeakyReLU(0.2),
                                 nn.Linear(128, 2))

    def forward(self, z, labels=None):
        return self.net(z)


class TinyD(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 128), nn.LeakyReLU(0.2), nn.Linear(128, 128), nn.LeakyReLU(0.2),
                                 nn.Linear(128, 1))

    def forward(self, x, labels=None):
        return self.net(x).squeeze(1)


@pytest.mark.parametrize("loss", ["bce", "hinge"])
def test_step_learns_a_2d_gaussian_mixture(loss):
    torch.manual_seed(0)
    spec = ModelSpec("toy", latent_dim=2, image_shape=(1, 1, 2))
    state = make_state(spec, TinyG(2), TinyD(), lr_g=5e-4, lr_d=5e-4, beta1=0.5, loss=loss, ema=True,
                       ema_halflife_kimg=2.0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(1000):
        train_step(state, mixture(128, gen))
    with torch.no_grad():
        samples = state.sampler(torch.randn(4000, 2))
    dist = torch.cdist(samples, MODES)
    nearest = dist.argmin(1)
    close = dist.min(1).values < 3 * MODE_STD
    assert close.float().mean() > 0.8, "most samples should sit on a mode"
    shares = torch.bincount(nearest[close], minlength=4).float() / close.sum()
    assert shares.min() > 0.15, f"every mode must be covered about equally, got shares {shares.tolist()}"
    # within a mode the spread is the data's, neither collapsed to a point nor smeared out
    spread = (samples[close] - MODES[nearest[close]]).std(0)
    assert ((spread > 0.4 * MODE_STD) & (spread < 2 * MODE_STD)).all(), spread.tolist()


def test_d_steps_updates_generator_every_k_steps():
    torch.manual_seed(0)
    spec = ModelSpec("toy", 8, (1, 1, 2))
    state = make_state(spec, TinyG(8), TinyD(), lr_g=1e-3, lr_d=1e-3, beta1=0.5, d_steps=3)
    snapshots = [[p.clone() for p in state.G.parameters()]]
    outs = []
    for _ in range(3):
        outs.append(train_step(state, torch.randn(16, 2)))
        snapshots.append([p.clone() for p in state.G.parameters()])
    assert ["loss_g" in o for o in outs] == [False, False, True]
    unchanged = [all(torch.equal(a, b) for a, b in zip(snapshots[0], snap)) for snap in snapshots[1:]]
    assert unchanged == [True, True, False]  # G moves on the third step only
    assert state.step == 3 and state.images_seen == 48


def test_generator_update_leaves_discriminator_untouched():
    """A step with a G update leaves D exactly where D's own update of that step put it (and unfrozen)."""
    import copy

    from gan_ray.core.step import d_update

    torch.manual_seed(0)
    spec = ModelSpec("toy", 8, (1, 1, 2))
    state = make_state(spec, TinyG(8), TinyD(), lr_g=1e-3, lr_d=1e-3, beta1=0.5, d_steps=2)
    train_step(state, torch.randn(16, 2))  # D update only
    d_only = copy.deepcopy(state)
    real = torch.randn(16, 2)
    torch.manual_seed(7)
    out = train_step(state, real)  # D update + G update
    torch.manual_seed(7)
    d_update(d_only, real, None)  # the same D update alone: same noise, same batch
    assert "loss_g" in out
    assert all(torch.equal(a, b) for a, b in zip(state.D.parameters(), d_only.D.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(state.opt_d.state_dict()["state"][0].values(),
                                                 d_only.opt_d.state_dict()["state"][0].values()))
    assert not all(torch.equal(a, b) for a, b in zip(state.G.parameters(), d_only.G.parameters()))  # G did move
    assert all(p.requires_grad for p in state.D.parameters()), "D must be unfrozen after the G step"


def test_losses_match_their_definitions():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    bce = nn.functional.binary_cross_entropy_with_logits
    assert torch.allclose(losses.bce_d(real, fake), bce(real, torch.ones(2)) + bce(fake, torch.zeros(2)))
    assert torch.allclose(losses.bce_g(fake), bce(fake, torch.ones(2)))
    assert torch.allclose(losses.hinge_d(real, fake), torch.relu(1 - real).mean() + torch.relu(1 + fake).mean())
    assert torch.allclose(losses.hinge_g(fake), -fake.mean())


def test_ema_follows_generator_with_half_life():
    """With the ramp-up off, one G update of 64 images moves the EMA toward G by 1 - 0.5 ** (64 / half-life)."""
    torch.manual_seed(0)
    spec = ModelSpec("toy", 8, (1, 1, 2))
    state = make_state(spec, TinyG(8), TinyD(), lr_g=1e-2, lr_d=1e-3, beta1=0.5, ema_halflife_kimg=0.1)
    state.ema_rampup = 0.0
    before = [p.clone() for p in state.G_ema.parameters()]
    train_step(state, torch.randn(64, 2))
    weight = 1 - 0.5 ** (64 / 100)
    for e0, g1, e1 in zip(before, state.G.parameters(), state.G_ema.parameters()):
        assert torch.allclose(e1, e0 + weight * (g1 - e0), atol=1e-6)
    for _ in range(50):
        train_step(state, torch.randn(64, 2))
    g = torch.cat([p.flatten() for p in state.G.parameters()])
    e = torch.cat([p.flatten() for p in state.G_ema.parameters()])
    assert not torch.equal(g, e), "EMA lags the live generator"
    assert (g - e).norm() < 0.5 * g.norm()


# ------------------------------------------------------------------------------------------------ models
def test_mlp_is_exactly_the_seed_network():
    G, D = build(ModelSpec("mlp", 100, (1, 28, 28)))
    g_linear = [(m.in_features, m.out_features) for m in G.modules() if isinstance(m, nn.Linear)]
    d_linear = [(m.in_features, m.out_features) for m in D.modules() if isinstance(m, nn.Linear)]
    assert g_linear == [(100, 256), (256, 512), (512, 1024), (1024, 784)]
    assert d_linear == [(784, 512), (512, 256), (256, 1)]
    assert isinstance(list(G.modules())[-1], nn.Sigmoid)
    out = G(torch.randn(5, 100))
    assert out.shape == (5, 1, 28, 28) and out.min() >= 0 and out.max() <= 1
    assert D(out).shape == (5,)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 64, 64)])
@pytest.mark.parametrize("classes", [0, 10])
def test_dcgan_sizes_itself_to_the_resolution(shape, classes):
    G, D = build(ModelSpec("dcgan", 64, shape, classes))
    labels = torch.randint(0, 10, (3,)) if classes else None
    out = G(torch.randn(3, 64), labels)
    assert out.shape == (3, *shape) and 0 <= out.min() and out.max() <= 1
    assert D(out, labels).shape == (3,)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in D.modules()), "no BatchNorm in D (DDP)"


def test_conditional_generator_depends_on_the_label():
    torch.manual_seed(0)
    G, _ = build(ModelSpec("mlp", 16, (1, 28, 28), 10))
    z = torch.randn(1, 16).repeat(2, 1)
    out = G(z, torch.tensor([3, 7]))
    assert not torch.allclose(out[0], out[1])
    assert count_params(G) > 0


# -------------------------------------------------------------------------------------------------- data
def test_digits_are_upsampled_with_a_fixed_heldout_split():
    train, held = load_dataset("digits", "train"), load_dataset("digits", "heldout")
    assert train.shape == (1, 28, 28) and held.shape == (1, 28, 28)
    assert len(train) + len(held) == 1797 and len(held) == 270
    assert train.num_classes == 10 and set(train.labels.tolist()) == set(range(10))
    assert 0 <= train.images.min() and train.images.max() <= 1
    assert train.images[:, :, :2].abs().max() == 0, "MNIST-like empty border"
    # held-out never overlaps training data
    flat_t = {tuple(x) for x in train.images.flatten(1)[:, ::7].tolist()}
    assert not any(tuple(x) in flat_t for x in held.images.flatten(1)[:, ::7].tolist())
    assert torch.equal(load_dataset("digits", "heldout").images, held.images)


def test_each_rank_sees_a_distinct_shard_every_epoch():
    n, world = 103, 4
    for epoch in (1, 2):
        shards = [shard_order(n, epoch=epoch, rank=r, world_size=world, seed=0) for r in range(world)]
        assert len({len(s) for s in shards}) == 1 and len(shards[0]) == n // world
        flat = torch.cat(shards)
        assert len(set(flat.tolist())) == len(flat), "shards overlap"
    e1 = shard_order(n, epoch=1, rank=0, world_size=world, seed=0)
    e2 = shard_order(n, epoch=2, rank=0, world_size=world, seed=0)
    assert not torch.equal(e1, e2), "a new order each epoch"


def test_a_long_epoch_prints_progress_lines_and_a_short_one_none(monkeypatch):
    """ProgressLine: nothing before its interval (short epochs stay quiet), then the step, the share, the rate and
    the time left, from the clock alone."""
    from gan_ray.core import epoch as epoch_module

    clock = iter([0.0, 10.0, 31.0, 45.0, 62.0, 120.0, 240.0])
    monkeypatch.setattr(epoch_module.time, "perf_counter", lambda: next(clock))
    lines: list[str] = []
    progress = epoch_module.ProgressLine(2, 4, steps=1000, images_per_step=64, interval_s=30, write=lines.append)
    for done in (100, 310, 450, 620):  # at 10 s (too soon), 31 s, 45 s (14 s after the last line), 62 s
        progress(done)
    assert lines == ["epoch 2/4: step 310/1000 (31%), 640 img/s, about 1 min left in the epoch",
                     "epoch 2/4: step 620/1000 (62%), 640 img/s, under a minute left"]
    streamed = epoch_module.ProgressLine(1, 1, steps=None, images_per_step=64, interval_s=30, write=lines.append)
    streamed(600)  # 120 s after its start: a stream's step count is not known ahead
    assert lines[-1] == "epoch 1/1: step 600, 320 img/s"


def test_the_learning_rate_schedule_runs_a_half_cosine_from_the_base_to_lr_final():
    """--lr-final f: epoch 1 trains at the base rates, the last at f times them, the middle at (1 + f) / 2, falling
    all the way; f = 1 (the default) and one-epoch runs keep the rates constant; --lr-decay-epochs N holds the rates
    until the last N epochs."""
    from gan_ray.core.config import TrainConfig
    from gan_ray.core.step import build_state, lr_factor, set_learning_rates, spec_for

    factors = [lr_factor(e, 9, 0.2) for e in range(1, 10)]
    assert factors[0] == 1 and factors[-1] == pytest.approx(0.2) and factors[4] == pytest.approx(0.6)
    assert factors[2] == pytest.approx(0.2 + 0.4 * (1 + 2 ** -0.5))  # a quarter of the way: the cosine, not a line
    assert all(a > b for a, b in zip(factors, factors[1:]))
    assert lr_factor(12, 9, 0.2) == pytest.approx(0.2)  # past the end (a resumed run's extra epochs): held
    assert {lr_factor(e, 9, 1.0) for e in range(1, 10)} == {1.0} and lr_factor(1, 1, 0.2) == 1.0
    # --lr-decay-epochs 5: constant until the last 5 epochs, which run the same cosine (here of 9 epochs' span 5)
    assert [lr_factor(e, 9, 0.2, span=5) for e in range(1, 10)] == pytest.approx(
        [1, 1, 1, 1, 1, 0.2 + 0.4 * (1 + 2 ** -0.5), 0.6, 0.2 + 0.4 * (1 - 2 ** -0.5), 0.2])
    assert lr_factor(5, 9, 0.2, span=20) == lr_factor(5, 9, 0.2)  # a span past the run's start: the whole run
    cfg = TrainConfig(arch="mlp", lr_g=3e-4, lr_d=1e-4, lr_final=0.5, epochs=3)
    state = build_state(cfg, spec_for(cfg, (1, 8, 8), 0), "cpu")
    state.opt_d.add_param_group({"params": [torch.zeros(1, requires_grad=True)]})
    set_learning_rates(state, cfg, 3)
    assert [g["lr"] for g in state.opt_g.param_groups] == [1.5e-4]
    assert [g["lr"] for g in state.opt_d.param_groups] == [5e-5, 5e-5]
