"""`python scripts/quantize.py SRC DST [--group-size 128] [--calib ...]`: `dreamr quantize`, for old command lines."""
import sys
from dreamr_jax.cli import launch
if __name__ == "__main__":
    sys.exit(launch("quantize"))
