"""Self-conditioning (`--clusters K`): an unconditional model trained as a conditional one on k-means clusters of
the training images, with no labels used anywhere.

Why: a generator maps one connected noise space onto images. When the data falls into separate modes (ten digits,
or a thousand Stacked-MNIST triples) the map must cross the gaps between them, so some of its samples are blends
that no reader can name: on MNIST, the best unconditional sweep drew a quarter of its digits that the project's
reader named with less than 90% confidence. Giving G and D a discrete cluster index as a class lets each cluster
own its own region of noise, so G jumps between modes instead of morphing through them (Liu et al., "Diverse
Image Generation via Self-Conditioned GANs", CVPR 2020, who cluster D's features; pixels suffice for digits).
Measured on MNIST (docs/sweeps.md): the same networks and budget went from classifier score 7.8 to over 9.

How: the training images are clustered once, before the first step, by scikit-learn's k-means on their pixels
(downsampled to at most 32 x 32, fitted on a sample of at most `FIT_SAMPLE` images); every image's cluster is its
nearest centre. The centres travel with the checkpoint, so a resumed run (or a lost worker's replacement) sees the
same clusters. The exported generator stays unconditional to its users: the last coordinate of z picks the
cluster, through the normal CDF, in proportion to the clusters' shares of the training data
(`ClusterConditioned`). So `generate(n, seed)`, serving and evaluation need no labels, and samples follow the
data's cluster frequencies.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

# k-means runs on a random sample of the images, larger ones downsampled: on MNIST with 50 clusters, 20,000 images
# take 4.6 s on one core and group digits as purely (81% of images share their cluster's digit) as all 60,000,
# which take 17 s (a worker that shares its node with another trial pays several times that).
FIT_SAMPLE = 20_000
FIT_SIDE = 32


def _flat(images: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] images (uint8 0..255 or float 0..1) as float32 rows in [0, 1], at most FIT_SIDE on a side."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    if x.shape[-1] > FIT_SIDE:
        x = nn.functional.adaptive_avg_pool2d(x, FIT_SIDE)
    return x.reshape(len(x), -1)


def fit_centres(images: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """k-means centres [k, D] of the images' (downsampled) pixels: deterministic for a seed."""
    from sklearn.cluster import KMeans

    if len(images) < k:
        from gan_ray.core.errors import UserError

        raise UserError(f"--clusters {k} needs at least {k} training images, the dataset has {len(images)}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(images), generator=g)[:FIT_SAMPLE] if len(images) > FIT_SAMPLE else None
    x = _flat(images[idx] if idx is not None else images).numpy()
    km = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(x)
    return torch.from_numpy(km.cluster_centers_.astype(np.float32))


def assign(images: torch.Tensor, centres: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Every image's nearest centre (int64 [N])."""
    out = [torch.cdist(_flat(images[i:i + chunk]), centres).argmin(1) for i in range(0, len(images), chunk)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


def shares_of(assignments: torch.Tensor, k: int) -> torch.Tensor:
    """Each cluster's share of the images (float32 [k], sums to 1)."""
    counts = torch.bincount(assignments, minlength=k).double()
    return (counts / counts.sum()).float()


class ClusterConditioned(nn.Module):
    """An unconditional generator made of a cluster-conditional one: `forward(z)` picks each row's cluster from
    z's last coordinate, with probability equal to the cluster's share (`shares`, a buffer set after clustering
    and saved with the weights), and feeds the other coordinates to the inner generator as its noise. Training
    passes the clusters explicitly (`forward(z, clusters)`), the last coordinate then unused."""

    def __init__(self, inner: nn.Module, clusters: int):
        super().__init__()
        self.inner = inner
        self.register_buffer("shares", torch.full((clusters,), 1.0 / clusters))

    def pick(self, z_last: torch.Tensor) -> torch.Tensor:
        """Cluster indices from standard-normal values: the normal CDF makes them uniform on (0, 1), and the
        shares' cumulative sums cut that interval into one piece per cluster."""
        u = 0.5 * (1.0 + torch.erf(z_last.float() / math.sqrt(2.0)))
        edges = torch.cumsum(self.shares.float(), 0)
        return torch.searchsorted(edges, u.contiguous()).clamp_(max=len(edges) - 1)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            labels = self.pick(z[:, -1])
        return self.inner(z[:, :-1], labels)
