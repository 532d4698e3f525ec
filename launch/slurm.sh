#!/bin/bash
# Multi-node / multi-GPU training with SLURM: one process per GPU, jax.distributed initialised
# from the SLURM variables (uad_jax.engine.distributed). Submit from the repository root:
#   sbatch launch/slurm.sh configs/andi.py runs/andi_t1 [--config.key=value ...]
#SBATCH --job-name=uad_jax
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail
CONFIG=${1:?usage: sbatch launch/slurm.sh CONFIG WORKDIR [overrides...]}
WORKDIR=${2:?usage: sbatch launch/slurm.sh CONFIG WORKDIR [overrides...]}
shift 2
source .venv/bin/activate
# Re-submitting the same command resumes from the newest checkpoint in WORKDIR.
srun python -m uad_jax.train --config "$CONFIG" --workdir "$WORKDIR" "$@"
