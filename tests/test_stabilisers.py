"""Each stabiliser does what it says, on CPU, in a plain process and under DDP on two gloo processes:
R1/R2 equal their formula and join D's one backward (one all-reduce per step), spectral norm bounds D's layers,
augmentation reaches D for reals and fakes alike, the new losses and RMSprop are what they claim, and the seed
architecture is the article's."""
from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from gan_ray.core import losses
from gan_ray.core.augment import augment, parse_policy
from gan_ray.core.config import TrainConfig
from gan_ray.core.errors import UserError
from gan_ray.core.models import ModelSpec, build
from gan_ray.core.step import build_state, d_update, g_update, make_state, spec_for, train_step
from gan_ray.cluster.processes import free_port

SHAPE = (1, 28, 28)


def _state(spec: ModelSpec, **kw):
    torch.manual_seed(0)
    G, D = build(spec)
    return make_state(spec, G, D, lr_g=1e-3, lr_d=1e-3, beta1=0.5, **kw)


def _real(n: int = 8, seed: int = 1, shape=SHAPE) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------- R1 / R2
class LinearD(nn.Module):
    """D(x) = <w, x> + b: grad_x D = w for every x, so R1 = ||w||^2 exactly."""

    def __init__(self, dim: int):
        super().__init__()
        self.lin = nn.Linear(dim, 1)

    def forward(self, x, labels=None):
        return self.lin(x.flatten(1)).squeeze(1)


def test_gradient_penalty_equals_its_formula():
    torch.manual_seed(0)
    D = LinearD(784)
    x = _real()
    assert torch.allclose(losses.gradient_penalty(D, x, None), D.lin.weight.square().sum(), rtol=1e-5)
    # a nonlinear D against autograd's own Jacobian, image by image
    spec = ModelSpec("mlp", 16, SHAPE, 10)
    _, D = build(spec)
    labels = torch.arange(8) % 10
    grads = [torch.autograd.functional.jacobian(lambda im: D(im.unsqueeze(0), labels[i:i + 1]).sum(), x[i])
             for i in range(8)]
    expected = torch.stack([g.square().sum() for g in grads]).mean()
    assert torch.allclose(losses.gradient_penalty(D, x, labels), expected, rtol=1e-4)


def test_r1_joins_the_d_loss_with_gamma_over_2_times_the_interval():
    """D's gradient on a regularisation step = gradient of (D loss + gamma/2 * every * R1), nothing else."""
    spec = ModelSpec("mlp", 16, SHAPE)
    real = _real()
    gamma, every = 10.0, 4
    s = _state(spec, r1_gamma=gamma, reg_every=every)
    d = s.D
    grads = {}

    def capture():
        grads.update({n: p.grad.clone() for n, p in d.named_parameters()})

    s.opt_d.step = capture  # look at the gradient the optimiser would apply
    torch.manual_seed(5)
    out = d_update(s, real, None)
    assert "r1" in out
    # the same D loss by hand (same noise), plus the penalty term
    torch.manual_seed(5)
    z = torch.randn(8, 16)
    fake = s.G(z, None).detach()
    logits = d(torch.cat([real, fake]), None)
    expected_loss = losses.bce_d(logits[:8], logits[8:]) + gamma / 2 * every * losses.gradient_penalty(d, real, None)
    want = torch.autograd.grad(expected_loss, list(d.parameters()))
    for (name, _), g in zip(d.named_parameters(), want):
        assert torch.allclose(grads[name], g, atol=1e-6, rtol=1e-4), name


def test_r1_is_lazy_and_r2_penalises_fakes():
    spec = ModelSpec("mlp", 16, SHAPE)
    s = _state(spec, r1_gamma=1.0, r2_gamma=1.0, reg_every=3)
    reg_steps = []
    for i in range(7):
        out = train_step(s, _real(seed=i))
        if "r1" in out:
            assert "r2" in out and out["r2"] > 0 and out["r1"] > 0
            reg_steps.append(i)
    assert reg_steps == [0, 3, 6]


def test_conditional_r1_differentiates_the_image_only():
    spec = ModelSpec("dcgan", 16, SHAPE, 10, d_width=8, g_width=8)
    s = _state(spec, r1_gamma=10.0, reg_every=1)
    out = d_update(s, _real(), torch.arange(8) % 10)
    assert torch.isfinite(out["r1"]) and out["r1"] > 0


# ------------------------------------------------------------------------------------------- spectral norm
def test_spectral_norm_bounds_every_layer_of_d():
    for arch in ("mlp", "dcgan"):
        spec = ModelSpec(arch, 16, SHAPE, 10, spectral_norm=True, **({"d_width": 8, "g_width": 8}
                                                                       if arch == "dcgan" else {}))
        s = _state(spec)
        for i in range(20):  # training moves the weights; the power iteration follows
            train_step(s, _real(seed=i), torch.arange(8) % 10)
        layers = [m for m in s.D.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        assert layers and all(hasattr(m, "parametrizations") for m in layers), arch
        with torch.no_grad():
            for m in layers:
                m.parametrizations.weight.original.mul_(5.0)  # however large the raw weights grow...
            for _ in range(30):  # (power iterations, as training's forwards run them)
                s.D(_real(), torch.arange(8) % 10)
            for m in layers:  # ...the effective weight's largest singular value stays at 1
                sigma = float(torch.linalg.matrix_norm(m.weight.flatten(1), ord=2))
                assert 0.95 < sigma < 1.02, (arch, sigma)
                raw = float(torch.linalg.matrix_norm(m.parametrizations.weight.original.flatten(1), ord=2))
                assert raw > 2.0, (arch, raw)


def test_spectral_norm_is_recorded_in_the_spec_and_checkpoints(tmp_path):
    from gan_ray.core import checkpoint

    spec = ModelSpec("mlp", 16, SHAPE, spectral_norm=True)
    s = _state(spec)
    train_step(s, _real())
    d = checkpoint.save(tmp_path / "ck", s, epoch=1, config=TrainConfig(spectral_norm=True).to_dict())
    meta, sd = checkpoint.load(d)
    again = ModelSpec.from_dict(meta["spec"])
    assert again.spectral_norm
    fresh = _state(again)
    checkpoint.load_state_dict(fresh, sd)
    fresh.D.eval(), s.D.eval()  # eval: no power-iteration step, so the restored u, v decide the output
    with torch.no_grad():
        assert torch.equal(fresh.D(_real(), None), s.D(_real(), None))
    assert ModelSpec.from_dict({"arch": "mlp", "latent_dim": 4, "image_shape": [1, 28, 28]}).spectral_norm is False


# -------------------------------------------------------------------------------------------- augmentation
class RecordingD(nn.Module):
    """Wraps a D and keeps what it was shown."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.seen: list[torch.Tensor] = []

    def forward(self, x, labels=None):
        self.seen.append(x.detach().clone())
        return self.inner(x, labels)


def test_augmentation_reaches_d_for_reals_and_fakes_alike():
    """cutout zeroes a square in every image D sees: the reals and fakes of the D update, the fakes of the G
    update; with no policy nothing is zeroed (reals are all ones, fakes a sigmoid's output)."""
    spec = ModelSpec("mlp", 16, SHAPE)
    for policy, expect_holes in ((("cutout",), True), ((), False)):
        s = _state(spec, augment=policy)
        s.D = RecordingD(s.D)
        real = torch.ones(8, *SHAPE)
        d_update(s, real, None)
        g_update(s, real, None)
        d_batch, g_batch = s.D.seen
        assert d_batch.shape[0] == 16 and g_batch.shape[0] == 8
        for name, images in (("real", d_batch[:8]), ("fake", d_batch[8:]), ("G's fakes", g_batch)):
            zeros = (images == 0).flatten(1).sum(1)
            if expect_holes:
                assert (zeros >= 14 * 14 // 4).all(), (name, zeros)  # at least a corner of the 14x14 square
            else:
                assert (zeros == 0).all(), name


def test_augment_ops_and_policy_parsing():
    x = torch.ones(6, 3, 32, 32)
    torch.manual_seed(0)
    shifted = augment(x, ("translation",))
    assert shifted.shape == x.shape and (shifted == 0).any() and (shifted == 1).any()
    assert not torch.equal(augment(x, ("color",)), x)
    grad_in = torch.rand(2, 1, 28, 28, requires_grad=True)
    augment(grad_in, ("translation", "cutout", "color")).sum().backward()
    assert grad_in.grad is not None and grad_in.grad.abs().sum() > 0  # differentiable
    assert parse_policy("none") == () and parse_policy("translation+cutout") == ("translation", "cutout")
    with pytest.raises(ValueError, match="unknown --augment"):
        parse_policy("rotate")
    with pytest.raises(UserError, match="unknown --augment"):
        TrainConfig(augment="translation,flip")


# ---------------------------------------------------------------------------------------- losses, optimisers
def test_new_losses_are_their_formulas():
    r, f = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    sr, sf = torch.sigmoid(r), torch.sigmoid(f)
    assert torch.allclose(losses.mse_d(r, f), ((sr - 1) ** 2).mean() + (sf ** 2).mean())
    assert torch.allclose(losses.mse_g(f), ((sf - 1) ** 2).mean())
    assert torch.allclose(losses.lsgan_d(r, f), 0.5 * (((r - 1) ** 2).mean() + (f ** 2).mean()))
    assert torch.allclose(losses.rpgan_d(r, f), nn.functional.softplus(-(r - f)).mean())
    assert torch.allclose(losses.rpgan_g(f, r), nn.functional.softplus(-(f - r)).mean())
    with pytest.raises(ValueError):
        losses.rpgan_g(f, None)
    assert losses.get("rpgan").g_needs_real and not losses.get("bce").g_needs_real


@pytest.mark.parametrize("loss", ["mse", "lsgan", "rpgan", "hinge", "bce"])
def test_every_loss_trains_a_step_conditionally(loss):
    spec = ModelSpec("mlp", 16, SHAPE, 10)
    s = _state(spec, loss=loss)
    before = [p.clone() for p in s.G.parameters()]
    out = train_step(s, _real(), torch.arange(8) % 10)
    assert all(torch.isfinite(v) for v in out.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, s.G.parameters())), "G moved"


def test_rmsprop_and_separate_betas_per_network():
    cfg = TrainConfig(optimizer="rmsprop", beta1=0.0, beta2=0.99, beta1_d=0.5, beta2_d=0.9)
    s = build_state(cfg, spec_for(cfg, SHAPE, 10), "cpu")
    assert isinstance(s.opt_g, torch.optim.RMSprop) and isinstance(s.opt_d, torch.optim.RMSprop)
    (g,), (d,) = s.opt_g.param_groups, s.opt_d.param_groups
    assert (g["momentum"], g["alpha"]) == (0.0, 0.99) and (d["momentum"], d["alpha"]) == (0.5, 0.9)
    adam = build_state(TrainConfig(beta2_d=0.99), spec_for(TrainConfig(), SHAPE, 10), "cpu")
    assert adam.opt_g.param_groups[0]["betas"] == (0.5, 0.999) and adam.opt_d.param_groups[0]["betas"] == (0.5, 0.99)
    train_step(s, _real())


def test_the_seed_architecture_is_the_articles():
    G, D = build(ModelSpec("seed", 100, SHAPE))
    g_layers = [m for m in G.net]
    assert [(m.in_features, m.out_features) for m in g_layers if isinstance(m, nn.Linear)] == \
        [(100, 256), (256, 512), (512, 1024), (1024, 784)]
    assert [type(m) for m in g_layers if not isinstance(m, nn.Linear)] == [nn.ReLU, nn.ReLU, nn.ReLU, nn.Sigmoid]
    d_layers = [*D.features, D.head]
    assert [(m.in_features, m.out_features) for m in d_layers if isinstance(m, nn.Linear)] == \
        [(784, 512), (512, 256), (256, 1)]
    assert [type(m) for m in d_layers if not isinstance(m, nn.Linear)] == [nn.ReLU, nn.ReLU]
    assert any(isinstance(m, nn.LeakyReLU) for m in build(ModelSpec("mlp", 100, SHAPE))[0].net)  # mlp stays


def test_stabilisers_work_on_colour_32px_images():
    """CIFAR-10's shape: 3x32x32, dcgan, every stabiliser at once, conditional."""
    cfg = TrainConfig(arch="dcgan", conditional=True, g_width=8, d_width=8, spectral_norm=True, r1_gamma=1.0,
                      r2_gamma=1.0, r1_every=2, augment="translation,cutout,color", loss="rpgan")
    s = build_state(cfg, spec_for(cfg, (3, 32, 32), 10), "cpu")
    for i in range(4):
        out = train_step(s, _real(shape=(3, 32, 32), seed=i), torch.arange(8) % 10)
        assert all(torch.isfinite(v) for v in out.values())
    assert s.G(torch.randn(2, 100), torch.tensor([0, 1])).shape == (2, 3, 32, 32)


def test_the_cuda_graph_is_refused_with_a_stabiliser():
    with pytest.raises(UserError, match="--r1-gamma"):
        TrainConfig(r1_gamma=1, cuda_graph="on", gpus_per_worker=1, workers=1)
    from gan_ray.core.fast_step import resolve_for

    cfg = TrainConfig(augment="cutout", spectral_norm=True, r1_gamma=0, lr_final=0.5)
    assert cfg.eager_only_settings() == ("--augment", "--spectral-norm", "--lr-final")
    assert not resolve_for(cfg, "cpu", 1).cuda_graph


# ------------------------------------------------------------------------------------------ AC-GAN head
@pytest.mark.parametrize("arch", ["mlp", "dcgan"])
def test_aux_head_adds_its_cross_entropy_to_both_losses(arch):
    """D's loss adds w * CE(aux(real), y) (reals only); G's adds w * CE(aux(G(z, y')), y'): checked by replaying
    the step's random draws and recomputing both losses by hand."""
    cfg = TrainConfig(arch=arch, conditional=True, aux_weight=0.5, g_width=8 if arch == "dcgan" else 0,
                      d_width=8 if arch == "dcgan" else 0)
    spec = spec_for(cfg, SHAPE, 10)
    assert spec.aux_classifier and ModelSpec.from_dict(spec.to_dict()) == spec
    s = build_state(cfg, spec, "cpu")
    real, y = _real(), torch.arange(8) % 10
    D = s.D
    torch.manual_seed(5)
    z, fy = torch.randn(8, 100), torch.randint(0, 10, (8,))
    with torch.no_grad():
        fake = s.G(z, fy)
        logits, cls = D(torch.cat([real, fake]), torch.cat([y, fy]), with_aux=True)
        want_d = losses.get("bce").d(logits[:8], logits[8:]) + 0.5 * nn.functional.cross_entropy(cls[:8], y)
    torch.manual_seed(5)
    out = d_update(s, real, y)
    assert torch.allclose(out["loss_d"] + 0.5 * out["aux_d"], want_d, atol=1e-5)
    torch.manual_seed(7)
    z, fy = torch.randn(8, 100), torch.randint(0, 10, (8,))
    with torch.no_grad():
        logits, cls = D(s.G(z, fy), fy, with_aux=True)
        want_g = losses.get("bce").g(logits, None) + 0.5 * nn.functional.cross_entropy(cls, fy)
    torch.manual_seed(7)
    assert torch.allclose(g_update(s, real, y), want_g, atol=1e-5)


def test_aux_weight_needs_a_conditional_model_and_is_off_by_default():
    with pytest.raises(UserError, match="--aux-weight .* --conditional"):
        TrainConfig(aux_weight=0.2)
    with pytest.raises(UserError, match="--aux-weight must not be negative"):
        TrainConfig(aux_weight=-1, conditional=True)
    assert not spec_for(TrainConfig(conditional=True), SHAPE, 10).aux_classifier
    assert build(spec_for(TrainConfig(conditional=True), SHAPE, 10))[1].aux is None


# ------------------------------------------------------------------------------------ DDP on 2 gloo ranks
def _ddp_worker(rank: int, world: int, port: int, out_dir: str, reg: bool) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = TrainConfig(arch="dcgan", conditional=True, g_width=8, d_width=8, r1_gamma=10.0 if reg else 0.0,
                      r1_every=2, spectral_norm=reg, augment="translation,cutout" if reg else "none",
                      loss="rpgan" if reg else "bce", aux_weight=0.2 if reg else 0.0)
    calls = []

    def counting_hook(state, bucket):  # DDP's default all-reduce, counted
        calls.append(bucket.index())
        fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0] / world)

    def wrap(m):
        ddp = DDP(m, broadcast_buffers=False)
        ddp.register_comm_hook(None, counting_hook)
        return ddp

    state = build_state(cfg, spec_for(cfg, SHAPE, 10), "cpu", world, wrap)
    per_step = []
    for i in range(4):
        torch.manual_seed(100 * rank + i)  # each rank its own data and noise
        before = len(calls)
        out = train_step(state, _real(seed=10 * rank + i), torch.arange(8) % 10)
        per_step.append((len(calls) - before, "r1" in out))
    flat = torch.cat([p.detach().flatten() for p in list(state.G.parameters()) + list(state.D.parameters())])
    torch.save({"params": flat, "per_step": per_step}, os.path.join(out_dir, f"rank{rank}-{reg}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_stabilisers_under_ddp_keep_ranks_identical_and_all_reduce_once_per_update(tmp_path):
    """R1's double backward through the plain D, joined to the DDP-wrapped D's loss: on two gloo ranks with
    different data the weights stay bit-identical, and a regularised step all-reduces exactly as many buckets as
    a plain one (D's gradient once, G's once), not more."""
    for reg in (False, True):
        mp.start_processes(_ddp_worker, args=(2, free_port(), str(tmp_path), reg), nprocs=2, join=True,
                           start_method="spawn")
    plain0 = torch.load(tmp_path / "rank0-False.pt", weights_only=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}-True.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(r0["params"], r1["params"]), "DDP kept the ranks' weights identical"
    assert [flag for _, flag in r0["per_step"]] == [True, False, True, False]
    plain_calls = {c for c, _ in plain0["per_step"]}
    assert len(plain_calls) == 1, plain0["per_step"]
    assert {c for c, _ in r0["per_step"]} == plain_calls, (r0["per_step"], plain_calls)
