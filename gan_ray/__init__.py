"""gan-ray: GANs trained, swept and served on Ray.

The top-level package stays light (no Ray, no torchvision): `import gan_ray` then `gan_ray.load_generator(DIR)`.
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["load_generator", "Generator", "UserError", "__version__"]

from gan_ray.core.errors import UserError


def __getattr__(name: str):
    if name == "load_generator":
        from gan_ray.core.model_dir import load_generator

        return load_generator
    if name == "Generator":
        from gan_ray.core.generator import Generator

        return Generator
    raise AttributeError(name)
