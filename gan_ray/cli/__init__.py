"""The `gan-ray` command line: the only place that parses argv. One module per command, `flags` for what they
share, `parser` for the whole parser and `main` (the console script's entry point, also `python -m gan_ray.cli`,
which Ray Jobs run)."""
from gan_ray.cli.parser import build_parser, main

__all__ = ["build_parser", "main"]
