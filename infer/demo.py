"""`python infer/demo.py [--count 100] [--out out/demo] [...]`: `dreamr demo` (what `make demo` runs)."""

import sys

from dreamr_jax.cli import launch

if __name__ == "__main__":
    sys.exit(launch("demo"))
