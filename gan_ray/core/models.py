"""Generator and discriminator architectures, looked up by name.

Pure `nn.Module`s: no I/O, no DDP. Every generator maps (z, labels) to images in [0, 1]; every discriminator maps
(images, labels) to one logit per image. `labels` is ignored (and may be None) unless the model is conditional.

- `seed`: the seed article's networks exactly: G z->256->512->1024->C*H*W with ReLU and a sigmoid output, D
  C*H*W->512->256->1 with ReLU (its output sigmoid lives in the loss: `--loss mse` is the article's MSE on it).
- `mlp`: the same layer sizes with LeakyReLU(0.2), the usual GAN choice (D's gradients do not die on negative
  inputs). Both MLPs have a conditional variant: a learned label embedding concatenated to z (G) and to the
  flattened image (D).
- `dcgan`: strided (transposed) convolutions sized for 28, 32 or 64 pixels. `g_width`/`d_width` are the base
  channels of each (G's last layer, D's first; doubled at every step down in resolution; default 64): narrower
  is much faster on CPUs. D has no BatchNorm, so DDP's buffer
  broadcast has nothing to modify in place; conditional D is a projection discriminator (Miyato & Koyama 2018).
- `resnet`: R3GAN's modern baseline (`gan_ray.core.resnet`, where its choices are explained): residual blocks with
  grouped convolutions, fix-up initialisation and no normalisation, low-pass resampling; 28 pixels or any power of
  two from 32 to 256. `g_width`/`d_width` are the channels at full resolution (default 32).

`spectral_norm` wraps every linear and convolution layer of D in spectral normalisation (Miyato et al. 2018):
each layer's largest singular value is kept at 1, so D is 1-Lipschitz per layer and cannot sharpen without bound.
`aux_classifier` gives a conditional D a second head that classifies the image (AC-GAN, Odena et al. 2017):
`D(x, y, with_aux=True)` returns (logit, class logits); the step trains it on reals and makes G's images read as
the class they were asked for.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn

from gan_ray.core import resnet
from gan_ray.core.errors import UserError


@dataclass(frozen=True)
class ModelSpec:
    """What is needed to rebuild a generator/discriminator pair (saved in checkpoints and model.json)."""

    arch: str
    latent_dim: int
    image_shape: tuple[int, int, int]  # C, H, W
    num_classes: int = 0  # 0 = unconditional
    spectral_norm: bool = False  # D's layers spectrally normalised (D only: exported generators never have it)
    g_width: int = 0  # dcgan/resnet: G's channels at full resolution (0 = the architecture's default)
    d_width: int = 0  # dcgan/resnet: D's channels at full resolution
    aux_classifier: bool = False  # D has an auxiliary class head (AC-GAN; conditional only)
    clusters: int = 0  # self-conditioned on this many k-means clusters (gan_ray.core.clusters); unconditional to users

    @property
    def conditional(self) -> bool:
        """Takes class labels from its users (sampling, serving, written text)."""
        return self.num_classes > 0

    @property
    def condition_count(self) -> int:
        """How many values the networks' class input takes: the classes, or the clusters of a self-conditioned
        model (whose training step feeds cluster indices exactly where a conditional one feeds labels)."""
        return self.num_classes or self.clusters

    def to_dict(self) -> dict:
        return {"arch": self.arch, "latent_dim": self.latent_dim, "image_shape": list(self.image_shape),
                "num_classes": self.num_classes, "spectral_norm": self.spectral_norm, "g_width": self.g_width,
                "d_width": self.d_width, "aux_classifier": self.aux_classifier, "clusters": self.clusters}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        """A spec from model.json / checkpoint metadata, checked field by field: these files can be edited or
        corrupted, and a bad value must fail here as one UserError, not deep inside a model or an encoder."""
        if not isinstance(d, dict):
            raise UserError(f"a model spec must be a JSON object, got {type(d).__name__}")
        missing = [k for k in ("arch", "latent_dim", "image_shape") if k not in d]
        if missing:
            raise UserError(f"model spec lacks {', '.join(missing)}")
        arch, shape = d["arch"], d["image_shape"]
        if not isinstance(arch, str):
            raise UserError(f"arch must be a string, got {arch!r}")
        latent_dim = _positive_int(d["latent_dim"], "latent_dim")
        num_classes = d.get("num_classes", 0)
        if not _is_int(num_classes) or num_classes < 0:
            raise UserError(f"num_classes must be an integer >= 0 (0 = unconditional), got {num_classes!r}")
        if not isinstance(shape, (list, tuple)) or len(shape) != 3 or not all(_is_int(x) for x in shape):
            raise UserError(f"image_shape must be three integers [C, H, W], got {shape!r}")
        c, h, w = (_positive_int(x, "image_shape") for x in shape)
        if c not in (1, 3):
            raise UserError(f"image_shape must have 1 (grey) or 3 (RGB) channels, got {c}")
        spectral = d.get("spectral_norm", False)  # older files have none of the fields below: their defaults
        if not isinstance(spectral, bool):
            raise UserError(f"spectral_norm must be true or false, got {spectral!r}")
        widths = [d.get(k, 0) for k in ("g_width", "d_width")]
        if not all(_is_int(x) and x >= 0 for x in widths):
            raise UserError(f"g_width and d_width must be integers >= 0 (0 = default), got {widths}")
        aux = d.get("aux_classifier", False)
        if not isinstance(aux, bool):
            raise UserError(f"aux_classifier must be true or false, got {aux!r}")
        clusters = d.get("clusters", 0)
        if not _is_int(clusters) or clusters < 0 or clusters == 1 or (clusters and (num_classes or latent_dim < 2)):
            raise UserError(f"clusters must be 0 or an integer >= 2 (of an unconditional model whose z has at least "
                            f"2 coordinates), got {clusters!r}")
        return cls(arch, latent_dim, (c, h, w), num_classes, spectral, *widths, aux, clusters)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)  # JSON true is not a size


def _positive_int(x: object, name: str) -> int:
    if not _is_int(x) or x < 1:  # type: ignore[operator]
        raise UserError(f"{name} must hold positive integers, got {x!r}")
    return x  # type: ignore[return-value]


# Architecture name (`--arch`, ModelSpec.arch) -> the function that builds a fresh (G, D) pair for a spec.
ARCHITECTURES: dict[str, Callable[[ModelSpec], tuple[nn.Module, nn.Module]]] = {}
# Architecture name -> its rule for image sides (raises UserError for a side it cannot build); none = any side.
SIDE_RULES: dict[str, Callable[[int], object]] = {}


def architecture(name: str, sides: Callable[[int], object] | None = None):
    """Decorator: the function builds architecture `name`; `sides` refuses the image sides it cannot build."""
    def deco(fn):
        ARCHITECTURES[name] = fn
        if sides is not None:
            SIDE_RULES[name] = sides
        return fn
    return deco


def check_image_size(arch: str, side: int) -> None:
    """A UserError when `arch` cannot build images of this side (checked before any data or Ray is touched)."""
    if arch in SIDE_RULES:
        SIDE_RULES[arch](side)


def build(spec: ModelSpec) -> tuple[nn.Module, nn.Module]:
    """Fresh (generator, discriminator) for a spec."""
    if spec.arch not in ARCHITECTURES:
        raise UserError(f"unknown --arch {spec.arch!r}; choose one of {', '.join(sorted(ARCHITECTURES))}")
    if spec.clusters:  # conditional networks on the clusters; G's noise is z less the coordinate that picks one
        from gan_ray.core.clusters import ClusterConditioned

        inner = replace(spec, num_classes=spec.clusters, clusters=0, latent_dim=spec.latent_dim - 1)
        G, D = ARCHITECTURES[spec.arch](inner)
        G = ClusterConditioned(G, spec.clusters)
    else:
        G, D = ARCHITECTURES[spec.arch](spec)
    if spec.spectral_norm:
        apply_spectral_norm(D)
    return G, D


def apply_spectral_norm(module: nn.Module) -> nn.Module:
    """Spectral normalisation on every Linear and Conv2d inside `module` (one power iteration per forward)."""
    from torch.nn.utils.parametrizations import spectral_norm

    for name, child in list(module.named_modules()):
        if isinstance(child, (nn.Linear, nn.Conv2d)):
            parent = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
            setattr(parent, name.rsplit(".", 1)[-1], spectral_norm(child))
    return module


def build_generator(spec: ModelSpec) -> nn.Module:
    return build(spec)[0]


# ---------------------------------------------------------------------------------------------------------- mlp
def _activation(spec: ModelSpec) -> Callable[[], nn.Module]:
    """The seed article's ReLU for `seed`; LeakyReLU(0.2) for `mlp`."""
    return nn.ReLU if spec.arch == "seed" else (lambda: nn.LeakyReLU(0.2))


class MLPGenerator(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        c, h, w = spec.image_shape
        act = _activation(spec)
        self.image_shape = spec.image_shape
        self.embed = nn.Embedding(spec.num_classes, spec.num_classes) if spec.conditional else None
        in_dim = spec.latent_dim + (spec.num_classes if spec.conditional else 0)
        self.net = nn.Sequential(
            nn.Linear(in_dim, 256), act(),
            nn.Linear(256, 512), act(),
            nn.Linear(512, 1024), act(),
            nn.Linear(1024, c * h * w), nn.Sigmoid(),
        )

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(labels)], dim=1)
        return self.net(z).view(z.shape[0], *self.image_shape)


class MLPDiscriminator(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        c, h, w = spec.image_shape
        act = _activation(spec)
        self.embed = nn.Embedding(spec.num_classes, spec.num_classes) if spec.conditional else None
        in_dim = c * h * w + (spec.num_classes if spec.conditional else 0)
        self.features = nn.Sequential(nn.Linear(in_dim, 512), act(), nn.Linear(512, 256), act())
        self.head = nn.Linear(256, 1)  # a logit: the seed's final sigmoid lives inside the loss, for stability
        self.aux = nn.Linear(256, spec.num_classes) if spec.aux_classifier and spec.conditional else None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, with_aux: bool = False):
        x = x.flatten(1)
        if self.embed is not None:
            x = torch.cat([x, self.embed(labels)], dim=1)
        f = self.features(x)
        out = self.head(f).squeeze(1)
        return (out, self.aux(f)) if with_aux else out


@architecture("mlp")
@architecture("seed")
def _mlp(spec: ModelSpec) -> tuple[nn.Module, nn.Module]:
    return MLPGenerator(spec), MLPDiscriminator(spec)


# -------------------------------------------------------------------------------------------------------- dcgan
def _base_size(side: int) -> tuple[int, int]:
    """Starting side and number of 2x up/down-samplings for a supported resolution."""
    table = {28: (7, 2), 32: (4, 3), 64: (4, 4)}
    if side not in table:
        raise UserError(f"--arch dcgan supports 28, 32 or 64 pixel images, got {side} (set --image-size)")
    return table[side]


class DCGANGenerator(nn.Module):
    def __init__(self, spec: ModelSpec, width: int = 64):
        super().__init__()
        c, h, w = spec.image_shape
        if h != w:
            raise UserError(f"--arch dcgan needs square images, got {h}x{w}")
        base, n_up = _base_size(h)
        self.embed = nn.Embedding(spec.num_classes, 32) if spec.conditional else None
        in_dim = spec.latent_dim + (32 if spec.conditional else 0)
        ch = width * 2 ** (n_up - 1)
        self.base, self.ch0 = base, ch
        self.project = nn.Sequential(nn.Linear(in_dim, ch * base * base), nn.BatchNorm1d(ch * base * base), nn.ReLU())
        ups: list[nn.Module] = []
        for _ in range(n_up - 1):
            ups += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch // 2), nn.ReLU()]
            ch //= 2
        ups += [nn.ConvTranspose2d(ch, c, 4, 2, 1), nn.Sigmoid()]
        self.up = nn.Sequential(*ups)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(labels)], dim=1)
        x = self.project(z).view(z.shape[0], self.ch0, self.base, self.base)
        return self.up(x)


class DCGANDiscriminator(nn.Module):
    def __init__(self, spec: ModelSpec, width: int = 64):
        super().__init__()
        c, h, _ = spec.image_shape
        base, n_down = _base_size(h)
        layers: list[nn.Module] = []
        ch_in, ch = c, width
        for _ in range(n_down):
            layers += [nn.Conv2d(ch_in, ch, 4, 2, 1), nn.LeakyReLU(0.2)]
            ch_in, ch = ch, ch * 2
        self.features = nn.Sequential(*layers, nn.Flatten())
        feat = ch_in * base * base
        self.head = nn.Linear(feat, 1)
        self.embed = nn.Embedding(spec.num_classes, feat) if spec.conditional else None
        if self.embed is not None:
            # PyTorch's N(0, 1) would make the projection <embed(y), f> ~250x the head's output at the start
            # (std 6.9 vs 0.025 on MNIST): random class-dependent logits and a saturated loss from step 0.
            nn.init.normal_(self.embed.weight, std=0.02)
        self.aux = nn.Linear(feat, spec.num_classes) if spec.aux_classifier and spec.conditional else None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, with_aux: bool = False):
        f = self.features(x)
        out = self.head(f).squeeze(1)
        if self.embed is not None:  # projection: <embed(y), features>
            out = out + (self.embed(labels) * f).sum(1)
        return (out, self.aux(f)) if with_aux else out


@architecture("dcgan", sides=_base_size)
def _dcgan(spec: ModelSpec) -> tuple[nn.Module, nn.Module]:
    return DCGANGenerator(spec, spec.g_width or 64), DCGANDiscriminator(spec, spec.d_width or 64)


# ------------------------------------------------------------------------------------------------------- resnet
@architecture("resnet", sides=resnet.stage_plan)
def _resnet(spec: ModelSpec) -> tuple[nn.Module, nn.Module]:
    return resnet.ResNetGenerator(spec, spec.g_width), resnet.ResNetDiscriminator(spec, spec.d_width)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
