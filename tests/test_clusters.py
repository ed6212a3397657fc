"""Self-conditioning (`--clusters`, gan_ray.core.clusters), without Ray: the clusters it finds, how an exported
generator picks them, the spec and checkpoint that carry them, and the step that trains on them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gan_ray.core import checkpoint as ckpt_io
from gan_ray.core import clusters
from gan_ray.core.config import TrainConfig
from gan_ray.core.data import load_dataset
from gan_ray.core.errors import UserError
from gan_ray.core.models import ModelSpec, build, build_generator
from gan_ray.core.step import build_state, spec_for, train_step


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train", image_size=28)


def test_kmeans_clusters_of_digits_hold_mostly_one_digit_and_repeat_for_a_seed(digits):
    centres = clusters.fit_centres(digits.images, 20, seed=0)
    assert centres.shape == (20, 28 * 28)
    found = clusters.assign(digits.images, centres)
    labels = digits.labels.numpy()
    # purity: the share of images whose cluster's most common digit is their own (chance: about 0.1)
    purity = sum(np.bincount(labels[found.numpy() == j]).max() for j in range(20) if (found == j).any()) / len(labels)
    assert purity > 0.8, purity  # 0.86 measured (k-means++ from a seed)
    assert torch.equal(clusters.fit_centres(digits.images, 20, seed=0), centres)
    shares = clusters.shares_of(found, 20)
    assert shares.sum().item() == pytest.approx(1.0) and shares.min() > 0
    # assignment is the nearest centre: an image's own pixels as a centre claim it
    own = torch.cat([centres[:5], clusters._flat(digits.images[:1])])
    assert clusters.assign(digits.images[:1], own).item() == 5


def test_too_few_images_for_the_clusters_is_one_user_error(digits):
    with pytest.raises(UserError, match="--clusters 50 needs at least 50 training images, the dataset has 10"):
        clusters.fit_centres(digits.images[:10], 50, seed=0)


def test_an_exported_generator_picks_clusters_in_proportion_from_z_alone():
    spec = ModelSpec("dcgan", 8, (1, 28, 28), clusters=3, g_width=8, d_width=8)
    G = build_generator(spec).eval()
    assert not spec.conditional and spec.condition_count == 3  # unconditional to its users
    G.shares.copy_(torch.tensor([0.1, 0.6, 0.3]))
    z = torch.randn(30_000, 8, generator=torch.Generator().manual_seed(0))
    picked = np.bincount(G.pick(z[:, -1]).numpy(), minlength=3) / len(z)
    assert picked == pytest.approx([0.1, 0.6, 0.3], abs=0.01)
    with torch.no_grad():
        # given clusters (training), z's last coordinate is unused; without, it decides the cluster
        a, b = z[:4].clone(), z[:4].clone()
        b[:, -1] = -b[:, -1]
        labels = torch.tensor([0, 1, 2, 1])
        assert torch.equal(G(a, labels), G(b, labels))
        assert torch.equal(G(a), G(a, G.pick(a[:, -1])))
    # the networks are conditional on the clusters; G's noise is z less its last coordinate
    _, D = build(spec)
    assert D.embed.num_embeddings == 3 and G.inner.embed.num_embeddings == 3


def test_spec_round_trip_and_refusals():
    spec = ModelSpec("mlp", 32, (1, 28, 28), clusters=50)
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    older = {k: v for k, v in spec.to_dict().items() if k != "clusters"}  # model.json from before --clusters
    assert ModelSpec.from_dict(older).clusters == 0
    for bad in ({"clusters": 1}, {"clusters": -2}, {"clusters": "50"}, {"clusters": 10, "num_classes": 10},
                {"clusters": 10, "latent_dim": 1}):
        with pytest.raises(UserError, match="clusters must be 0 or an integer >= 2"):
            ModelSpec.from_dict({**spec.to_dict(), **bad})


def test_the_step_trains_on_cluster_indices_and_the_checkpoint_keeps_the_centres(digits):
    cfg = TrainConfig(arch="dcgan", g_width=8, d_width=8, latent_dim=8, clusters=10, loss="rpgan", r2_gamma=1.0,
                      batch_size=16)
    spec = spec_for(cfg, digits.shape, digits.num_classes)
    assert spec.clusters == 10 and spec.num_classes == 0
    state = build_state(cfg, spec, "cpu")
    real = digits.images[:16].float() / 255
    with pytest.raises(ValueError, match="cluster indices"):
        train_step(state, real, None)
    centres = clusters.fit_centres(digits.images, 10, seed=0)
    out = train_step(state, real, clusters.assign(digits.images[:16], centres))
    assert torch.isfinite(out["loss_d"]) and torch.isfinite(out["loss_g"])
    state.extra["cluster_centres"] = centres
    state.G.shares.copy_(clusters.shares_of(clusters.assign(digits.images, centres), 10))
    sd = ckpt_io.state_dict(state, epoch=1)
    fresh = build_state(cfg, spec, "cpu")
    ckpt_io.load_state_dict(fresh, sd)
    assert torch.equal(fresh.extra["cluster_centres"], centres)
    assert torch.equal(fresh.G.shares, state.G.shares)  # saved with G's weights: what export writes


def test_the_service_renders_a_self_conditioned_model_as_an_unconditional_one():
    """The serving path (gan_ray.serve.render, free of Ray) on a self-conditioned generator: no labels asked,
    labels refused, and a packed forward of several requests gives each the bytes it gets alone."""
    from gan_ray.core.generator import Generator
    from gan_ray.serve.render import Renderer
    from gan_ray.serve.schema import GenerateRequest

    spec = ModelSpec("dcgan", 8, (1, 28, 28), clusters=5, g_width=8, d_width=8)
    torch.manual_seed(0)
    net = build_generator(spec)
    net.shares.copy_(torch.tensor([0.4, 0.1, 0.2, 0.2, 0.1]))
    renderer = Renderer(Generator(net, spec, {}), merge_forwards=True)
    jobs = [renderer.job(GenerateRequest(n=n, seed=s, format="npz")) for n, s in ((3, 1), (5, 2))]
    assert all(bool((j.labels == -1).all()) for j in jobs)  # unconditional to the service
    packed = renderer.forward(jobs)
    alone = [renderer.forward([j])[0] for j in jobs]
    assert all(torch.equal(a, b) for a, b in zip(packed, alone)) and packed[1].shape == (5, 1, 28, 28)
    with pytest.raises(UserError, match="this model is unconditional"):
        renderer.job(GenerateRequest(n=2, labels=1))
    with pytest.raises(UserError):
        renderer.job(GenerateRequest(n=1, text="7"))


@pytest.mark.parametrize("arch, side", [("mlp", 28), ("seed", 28), ("dcgan", 32), ("resnet", 32)])
def test_every_architecture_builds_self_conditioned(arch, side):
    spec = ModelSpec(arch, 8, (1, side, side), clusters=7)
    G, D = build(spec)
    with torch.no_grad():
        images = G(torch.randn(3, 8))
        logits = D(images, G.pick(torch.randn(3)))
    assert images.shape == (3, 1, side, side) and logits.shape == (3,)
