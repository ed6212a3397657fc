"""A process environment variable set for the length of a block, then put back as it was."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator


@contextlib.contextmanager
def scoped_env(name: str, value: str) -> Iterator[None]:
    """Set `name` to `value` inside the block; afterwards restore its previous value, or unset it. For passing a
    value to library code that reads the environment (Ray's job client, a searcher Tune restores) without leaving
    it behind for what runs next in this process."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old
