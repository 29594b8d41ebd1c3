"""Joining a multi-process JAX run (several hosts, a TPU pod slice, or local CPU processes).

Every job that may run as one process of several (`dreamr train sft`, `dreamr train sapo`, and
any launcher that wants it) calls `initialize_distributed` first, before anything touches a JAX
backend: `jax.distributed.initialize` refuses to run once one has started.
"""

from __future__ import annotations

import os

# The environment a cluster script sets instead of passing flags.
ENV_MULTIHOST = "DREAMR_MULTIHOST"  # 1: JAX detects the cluster itself (TPU pod slices, SLURM, ...)
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"  # host:port of process 0
ENV_NUM_PROCESSES = "DREAMR_NUM_PROCESSES"
ENV_PROCESS_ID = "DREAMR_PROCESS_ID"


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, cpu_collectives: str | None = None) -> bool:
    """`jax.distributed.initialize()` when this is one process of several: explicit arguments,
    JAX_COORDINATOR_ADDRESS (+ DREAMR_NUM_PROCESSES / DREAMR_PROCESS_ID), or DREAMR_MULTIHOST=1
    where JAX detects the cluster itself (TPU pod slices, SLURM, ...). Returns whether it did;
    a lone process (none of these given) is left alone."""
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR)
    if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
        num_processes = int(os.environ[ENV_NUM_PROCESSES])
    if process_id is None and os.environ.get(ENV_PROCESS_ID):
        process_id = int(os.environ[ENV_PROCESS_ID])
    if not (coordinator or num_processes or os.environ.get(ENV_MULTIHOST)):
        return False
    import jax

    if cpu_collectives:  # CPU-only runs (tests): cross-process collectives over gloo or MPI
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    return True


def add_distributed_arguments(parser) -> None:
    """The flags of `initialize_distributed` on an argparse parser (each falls back to its
    environment variable)."""
    group = parser.add_argument_group("several processes (default: the environment, else one process)")
    group.add_argument("--coordinator", help=f"host:port of process 0 (else ${ENV_COORDINATOR}; "
                                             f"${ENV_MULTIHOST}=1 lets JAX find the cluster itself)")
    group.add_argument("--num-processes", type=int, help=f"processes in the run (else ${ENV_NUM_PROCESSES})")
    group.add_argument("--process-id", type=int, help=f"this process's index (else ${ENV_PROCESS_ID})")
    group.add_argument("--cpu-collectives", choices=("gloo", "mpi"), help="CPU collectives for multi-process CPU runs")
