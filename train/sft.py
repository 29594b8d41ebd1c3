"""`python train/sft.py --config configs/sft_synthetic_target.yaml [key=value ...]`: `dreamr train sft`.

The same command runs on CPU, GPU and TPU. On several hosts run it on every worker with
DREAMR_MULTIHOST=1 (JAX detects the cluster: TPU pods, SLURM), or JAX_COORDINATOR_ADDRESS +
DREAMR_NUM_PROCESSES + DREAMR_PROCESS_ID (or --coordinator / --num-processes / --process-id).
"""

import sys

from dreamr_jax.cli import launch

if __name__ == "__main__":
    sys.exit(launch("train", "sft"))
