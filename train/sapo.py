"""`python train/sapo.py --config configs/sapo_synthetic.yaml [key=value ...]`: `dreamr train sapo`.

The same command runs on CPU, GPU and TPU. For several processes (TPU pod slices, several
GPU hosts) run it on every worker: with DREAMR_MULTIHOST=1 where JAX detects the cluster
(TPU pods, SLURM), or with JAX_COORDINATOR_ADDRESS + DREAMR_NUM_PROCESSES +
DREAMR_PROCESS_ID (or --coordinator / --num-processes / --process-id); each process then
trains on its own slice of every prompt batch. scripts/launch_tpu_pod.sh does the TPU case.
"""

import sys

from dreamr_jax.cli import launch

if __name__ == "__main__":
    sys.exit(launch("train", "sapo"))
