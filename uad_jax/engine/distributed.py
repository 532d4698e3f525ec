"""Multi-process (multi-host) start-up through `jax.distributed`.

Sources, first match wins: explicit flags (`--coordinator`, `--num_processes`, `--process_id`),
the `UAD_COORDINATOR`/`UAD_NUM_PROCESSES`/`UAD_PROCESS_ID` variables set by `launch/local.py`,
or SLURM (`SLURM_NTASKS > 1`; jax reads the SLURM variables itself). A single process needs none.
"""

import os

import jax
from absl import flags

# Shared by the command-line entry points (train, eval).
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-process)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "index of this process")


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


def initialize_from_flags() -> None:
  """`initialize` with the `--coordinator/--num_processes/--process_id` flags."""
  initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
