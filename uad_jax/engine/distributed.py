"""Multi-process (multi-host) start-up through `jax.distributed`.

Sources, first match wins: explicit flags (`--coordinator`, `--num_processes`, `--process_id`),
the `UAD_COORDINATOR`/`UAD_NUM_PROCESSES`/`UAD_PROCESS_ID` variables set by `launch/local.py`,
or SLURM (`SLURM_NTASKS > 1`; jax reads the SLURM variables itself). A single process needs none.
"""

import os

import jax


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Initialises `jax.distributed` when the run spans several processes; no-op otherwise."""
  coordinator = coordinator or os.environ.get("UAD_COORDINATOR")
  if num_processes is None and "UAD_NUM_PROCESSES" in os.environ:
    num_processes = int(os.environ["UAD_NUM_PROCESSES"])
  if process_id is None and "UAD_PROCESS_ID" in os.environ:
    process_id = int(os.environ["UAD_PROCESS_ID"])
  multi_process = bool(coordinator) or int(os.environ.get("SLURM_NTASKS", "1")) > 1
  if not multi_process:
    return
  # Cross-process collectives of the CPU backend need gloo; the setting is ignored on GPU/TPU.
  # It must be set (like `initialize`) before the first JAX computation, so no backend query here.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
  else:
    jax.distributed.initialize()
