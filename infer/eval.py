"""`python infer/eval.py --config PAIR.yaml --data problems.jsonl [...]`: `dreamr eval`."""

import sys

from dreamr_jax.cli import launch

if __name__ == "__main__":
    sys.exit(launch("eval"))
