"""`python -m gan_ray.cli ...`: what a submitted Ray Job runs (the uploaded source tree's CLI)."""
import sys

from gan_ray.cli.parser import main

sys.exit(main())
