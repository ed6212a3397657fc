"""`--arch resnet`: an R3GAN-style generator and discriminator (Huang et al., "The GAN is dead; long live the GAN!
A modern GAN baseline", NeurIPS 2024), written for this project from the paper and its public code
(github.com/brownvc/R3GAN, `R3GAN/Networks.py`). Pure `nn.Module`s, no I/O, no DDP.

R3GAN's claim is that a GAN needs no tricks once its loss is well behaved: the relativistic pairing loss
(`--loss rpgan`) with zero-centred gradient penalties on reals and fakes at equal weight (`--r1-gamma` =
`--r2-gamma`) converges locally, and then a plain modern ResNet trains without normalisation, minibatch
statistics, style modulation, noise inputs or progressive growing. The choices here, and why:

- **Residual blocks with an inverted bottleneck and grouped convolution** (ResNeXt / ConvNeXt style): 1x1 conv
  c -> 2c, leaky ReLU, 3x3 grouped conv 2c -> 2c (groups of `GROUP_WIDTH` = 16 channels, R3GAN's ratio), leaky
  ReLU, 1x1 conv 2c -> c, added to the input. Wide where it is cheap (the grouped 3x3), narrow on the skip path.
- **Fix-up initialisation instead of normalisation**: every conv and linear layer is He-initialised (N(0, gain^2 /
  fan_in), leaky ReLU's gain sqrt(2 / (1 + 0.2^2))), the two first convs of each residual branch are further scaled
  by L^(-1/(2m-2)) (L residual blocks in the network, m = 3 layers per branch: the Fixup rule that keeps the
  output's variance bounded however deep the network), and the last conv of every branch starts at zero, so every
  block starts as the identity and the network as a shallow one. No BatchNorm means no running statistics to
  drift apart between DDP ranks, no dependence of one image on its batch, and a D whose R1/R2 gradient is that of
  the image alone.
- **Bias-free convolutions, a learned bias inside each activation** (leaky ReLU 0.2), as R3GAN's `BiasedActivation`.
- **Resampling by a fixed low-pass filter**: up- and down-sampling by 2 with the [1, 3, 3, 1] binomial kernel
  (bilinear interpolation; before decimation, an anti-aliasing low pass), so neither network can produce or read
  the checkerboard aliasing that strided and transposed convolutions make. Channel changes are 1x1 convs beside
  the resampling (before upsampling in G, after downsampling in D: at the lower resolution, where they are cheap).
- **A learned constant basis**: G starts from a learned base x base image per channel, scaled per channel by a
  linear map of z (R3GAN's `GenerativeBasis`); D ends with a per-channel base x base (depthwise) conv to one value
  per channel and a linear layer (`DiscriminativeBasis`).
- **Class conditioning** by embedding: G concatenates a label embedding to z; D projects its features onto a label
  embedding (a projection discriminator, as R3GAN). An AC-GAN class head (`--aux-weight`) reads the same features.

At the edges, the [0, 1] images of this project meet R3GAN's [-1, 1]: D maps its input to [-1, 1] first (2x - 1), so
`--r1-gamma` is with respect to [0, 1] pixels (D's gradient there is twice that on [-1, 1], its square four times:
the paper's gamma on [-1, 1] images is four times the value here), and G's output is linear, as R3GAN's, then
shifted to [0, 1] (0.5 + 0.5 y). A sigmoid there, as the other generators here have, fails without their BatchNorm:
on MNIST's mostly-black pixels G drove its logits negative until the sigmoid saturated and its gradient vanished
(all-black samples within 50 steps, measured). So D trains on the raw output, and G clamps to [0, 1] only when
sampled (eval mode: the EMA generator, grids, evaluation, export, serving), where every consumer expects that range.

Sizes: 28 pixels (a 7x7 basis, two upsamplings) and every power of two from 32 to 256 (a 4x4 basis).
`--g-width`/`--d-width` W (a multiple of 8; default 32) are the channels at full resolution, doubled at every
halving of the resolution up to 8 W (R3GAN's FFHQ-256 shape: 96 channels at 256 pixels, 768 from 32 down), and
`BLOCKS_PER_STAGE` residual blocks at each resolution. R3GAN's own widths (768 channels, two blocks per stage) are
sized for 8 GPUs; the defaults here are for CPU workers.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from gan_ray.core.errors import UserError

GROUP_WIDTH = 16  # channels per group of the grouped 3x3 conv (R3GAN: 1536 channels in 96 groups)
EXPANSION = 2  # inverted bottleneck: the branch is this many times wider than the skip path
BLOCKS_PER_STAGE = 1  # residual blocks per resolution (R3GAN: 2; 1 keeps the CPU recipes inside their budget)
DEFAULT_WIDTH = 32  # channels at full resolution when --g-width/--d-width is 0
MAX_MULTIPLIER = 8  # channels stop doubling at 8x the full-resolution width
WIDTH_STEP = 8  # widths are multiples of this: the branch's 2W channels must split into groups of 16
LEAKY_SLOPE = 0.2
ACT_GAIN = math.sqrt(2 / (1 + LEAKY_SLOPE ** 2))
SIDES = (28, 32, 64, 128, 256)


def stage_plan(side: int) -> tuple[int, int]:
    """(basis side, number of 2x resamplings) for an image side; a UserError for any side not supported."""
    if side == 28:
        return 7, 2
    if side in SIDES:
        return 4, int(math.log2(side)) - 2
    raise UserError(f"--arch resnet supports 28 pixels or a power of two from 32 to 256, got {side} "
                    "(set --image-size)")


def check_width(width: int, flag: str) -> int:
    """The width to build with (0 = DEFAULT_WIDTH); a UserError for widths the blocks cannot be built from."""
    width = width or DEFAULT_WIDTH
    if width % WIDTH_STEP:
        raise UserError(f"{flag} {width}: --arch resnet needs a multiple of {WIDTH_STEP} (its residual branches "
                        f"split {EXPANSION}x the width into groups of {GROUP_WIDTH})")
    return width


def stage_widths(side: int, width: int) -> list[int]:
    """Channels per resolution, from the basis up to full resolution."""
    _, n = stage_plan(side)
    return [width * min(2 ** (n - i), MAX_MULTIPLIER) for i in range(n + 1)]


def he_init(layer: nn.Module, gain: float = 1.0) -> nn.Module:
    """N(0, gain^2 / fan_in) weights (gain 0: zeros), no bias: R3GAN's MSRInitializer."""
    w = layer.weight
    fan_in = w.shape[1] * w[0][0].numel()
    with torch.no_grad():
        if gain == 0:
            w.zero_()
        else:
            w.normal_(0.0, gain / math.sqrt(fan_in))
    return layer


def conv(c_in: int, c_out: int, kernel: int = 1, groups: int = 1, gain: float = 1.0) -> nn.Conv2d:
    return he_init(nn.Conv2d(c_in, c_out, kernel, padding=(kernel - 1) // 2, groups=groups, bias=False), gain)


class BiasedLeakyReLU(nn.Module):
    """x + b, then leaky ReLU(0.2): the network's only biases."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return F.leaky_relu(x + self.bias.view(shape), LEAKY_SLOPE)


class ResidualBlock(nn.Module):
    """x + conv1x1(act(grouped conv3x3(act(conv1x1(x))))), the last conv zero at the start (the block is the
    identity), the first two scaled by L^-1/4 (Fixup with m = 3 layers per branch: L^(-1/(2m-2)))."""

    def __init__(self, channels: int, total_blocks: int):
        super().__init__()
        wide = channels * EXPANSION
        gain = ACT_GAIN * total_blocks ** (-1 / (2 * 3 - 2))
        self.expand = conv(channels, wide, 1, gain=gain)
        self.act1 = BiasedLeakyReLU(wide)
        self.spatial = conv(wide, wide, 3, groups=wide // GROUP_WIDTH or 1, gain=gain)
        self.act2 = BiasedLeakyReLU(wide)
        self.project = conv(wide, channels, 1, gain=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.act2(self.spatial(self.act1(self.expand(x)))))


def _blur_pair(x: torch.Tensor) -> torch.Tensor:
    """[1, 2, 1] / 4 along the last axis, zero-padded."""
    p = F.pad(x, (1, 1))
    return (p[..., :-2] + 2 * p[..., 1:-1] + p[..., 2:]) * 0.25


def _upsample_axis(x: torch.Tensor) -> torch.Tensor:
    """x2 along the last axis through [1, 3, 3, 1] / 4 (zero-padded), computed at the low resolution in its two
    phases: out[2i] = (x[i-1] + 3 x[i]) / 4, out[2i+1] = (3 x[i] + x[i+1]) / 4."""
    p = F.pad(x, (1, 1))
    even = 0.25 * p[..., :-2] + 0.75 * p[..., 1:-1]
    odd = 0.75 * p[..., 1:-1] + 0.25 * p[..., 2:]
    return torch.stack([even, odd], dim=-1).flatten(-2)


class Resample(nn.Module):
    """Up- or down-sampling by 2 through the [1, 3, 3, 1] low-pass filter, zero-padded: R3GAN's interpolative
    resamplers, equal to its reference implementation to float precision (tests check it).

    Written as shifted sums (elementwise ops: fast on CPUs, where a depthwise convolution with a fixed kernel is
    slow, and twice differentiable anywhere, as R1 needs), one axis at a time (the filter is separable).
    Upsampling is bilinear interpolation, in two phases per axis; downsampling's [1, 3, 3, 1] / 8 before
    decimation is [1, 2, 1] / 4 then a 2x2 average ([1, 1] / 2 per axis)."""

    def __init__(self, up: bool):
        super().__init__()
        self.up = up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return _upsample_axis(_upsample_axis(x).transpose(-1, -2)).transpose(-1, -2)
        return F.avg_pool2d(_blur_pair(_blur_pair(x).transpose(-1, -2)).transpose(-1, -2), 2)


class GeneratorStage(nn.Module):
    """Upsample (1x1 channel change first, at the lower resolution), then residual blocks."""

    def __init__(self, c_in: int, c_out: int, blocks: int, total_blocks: int):
        super().__init__()
        self.channels = conv(c_in, c_out) if c_in != c_out else nn.Identity()
        self.resample = Resample(up=True)
        self.blocks = nn.Sequential(*(ResidualBlock(c_out, total_blocks) for _ in range(blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.resample(self.channels(x)))


class DiscriminatorStage(nn.Module):
    """Residual blocks, then downsample (1x1 channel change after, at the lower resolution)."""

    def __init__(self, c_in: int, c_out: int, blocks: int, total_blocks: int):
        super().__init__()
        self.blocks = nn.Sequential(*(ResidualBlock(c_in, total_blocks) for _ in range(blocks)))
        self.resample = Resample(up=False)
        self.channels = conv(c_in, c_out) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.channels(self.resample(self.blocks(x)))


def network_plan(spec, width: int, flag: str) -> tuple[int, int, list[int], int]:
    """(image channels, basis side, channels per resolution from the basis up, residual blocks in the network) of
    a network for `spec`'s square images; a UserError for shapes and widths it cannot be built for."""
    c, h, w = spec.image_shape
    if h != w:
        raise UserError(f"--arch resnet needs square images, got {h}x{w}")
    base, _ = stage_plan(h)
    widths = stage_widths(h, check_width(width, flag))
    return c, base, widths, BLOCKS_PER_STAGE * len(widths)


class ResNetGenerator(nn.Module):
    def __init__(self, spec, width: int = 0):
        super().__init__()
        c, base, widths, total = network_plan(spec, width, "--g-width")
        self.base = base
        self.embed = None
        in_dim = spec.latent_dim
        if spec.conditional:  # a linear map of the one-hot label, He-initialised (R3GAN: std 1/sqrt(classes))
            self.embed = nn.Embedding(spec.num_classes, spec.latent_dim)
            nn.init.normal_(self.embed.weight, std=1 / math.sqrt(spec.num_classes))
            in_dim += spec.latent_dim
        # The learned basis: one base x base image per channel, each scaled by a linear function of (z, label).
        self.basis = nn.Parameter(torch.randn(widths[0], base, base))
        self.basis_scale = he_init(nn.Linear(in_dim, widths[0], bias=False))
        self.first = nn.Sequential(*(ResidualBlock(widths[0], total) for _ in range(BLOCKS_PER_STAGE)))
        self.stages = nn.Sequential(*(GeneratorStage(a, b, BLOCKS_PER_STAGE, total)
                                      for a, b in zip(widths, widths[1:])))
        self.to_image = conv(widths[-1], c)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(labels)], dim=1)
        x = self.basis[None] * self.basis_scale(z)[:, :, None, None]
        # Linear, as R3GAN's (in [-1, 1] units: 0.5 + 0.5 y). D trains on the raw output; sampled (eval mode: EMA,
        # grids, evaluation, export, serving) it is clamped to [0, 1], the range every consumer expects.
        image = 0.5 + 0.5 * self.to_image(self.stages(self.first(x)))
        return image if self.training else image.clamp(0.0, 1.0)


class ResNetDiscriminator(nn.Module):
    def __init__(self, spec, width: int = 0):
        super().__init__()
        c, base, widths, total = network_plan(spec, width, "--d-width")
        widths = widths[::-1]  # full resolution first
        self.from_image = conv(c, widths[0])
        self.stages = nn.Sequential(*(DiscriminatorStage(a, b, BLOCKS_PER_STAGE, total)
                                      for a, b in zip(widths, widths[1:])))
        self.last = nn.Sequential(*(ResidualBlock(widths[-1], total) for _ in range(BLOCKS_PER_STAGE)))
        feat = widths[-1]
        # One value per channel from the base x base map (depthwise, no padding): R3GAN's DiscriminativeBasis.
        self.basis = he_init(nn.Conv2d(feat, feat, base, groups=feat, bias=False))
        self.embed = None
        if spec.conditional:  # projection: <W f, embed(y)>, the embedding's scale R3GAN's (1 / sqrt(dim))
            self.head = he_init(nn.Linear(feat, feat, bias=False))
            self.embed = nn.Embedding(spec.num_classes, feat)
            nn.init.normal_(self.embed.weight, std=1 / math.sqrt(feat) / math.sqrt(spec.num_classes))
        else:
            self.head = he_init(nn.Linear(feat, 1, bias=False))
        self.aux = nn.Linear(feat, spec.num_classes) if spec.aux_classifier and spec.conditional else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.from_image(x * 2 - 1)
        return self.basis(self.last(self.stages(x))).flatten(1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, with_aux: bool = False):
        f = self.features(x)
        out = self.head(f)
        out = (out * self.embed(labels)).sum(1) if self.embed is not None else out.squeeze(1)
        return (out, self.aux(f)) if with_aux else out
