"""`python infer/reason.py --config PAIR.yaml --question TEXT [--image IMG] [...]`: `dreamr reason`."""

import sys

from dreamr_jax.cli import launch

if __name__ == "__main__":
    sys.exit(launch("reason"))
