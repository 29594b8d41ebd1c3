"""SFT entry point: `python train/sft.py --config configs/sft_synthetic_target.yaml [key=value ...]`.

The same command runs on CPU, GPU and TPU; on a multi-host slice set JAX_COORDINATOR_ADDRESS
(or DREAMR_MULTIHOST=1 where JAX detects the cluster) and run it on every worker.
"""

from dreamr_jax.training.sft import main

if __name__ == "__main__":
    main()
