#!/usr/bin/env bash
# Multi-node GPU runs under SLURM: one jaxtune process per GPU on every node, started by srun.
# JAX reads the process count, each process's id and GPU, and the coordinator (the first node)
# from SLURM's variables (jaxtune's distributed.mode=auto), so there is nothing else to pass.
#
# Usage: sbatch [sbatch options] launch/slurm_gpu.sh VERB [CONFIG] [section.key=value ...]
#   sbatch --nodes=4 launch/slurm_gpu.sh train configs/lima.yaml train.output_dir=/shared/runs/lima
#
# train.output_dir must be on a filesystem that every node sees at the same path: the processes
# write each checkpoint together (orbax), process 0 writes the metrics. If a process exits with an
# error, srun stops the others (--kill-on-bad-exit); if a node dies, JAX stops the others after
# distributed.heartbeat_timeout_s. A restart with train.resume=true continues from the last
# checkpoint.
#
# Variables (environment):
#   JAXTUNE               the command (default: jaxtune), e.g. "$HOME/jaxtune/.venv/bin/jaxtune"
#   JAX_COORDINATOR_PORT  the coordinator's port on the first node (default: from the job id)
# The #SBATCH lines below are defaults; options given to sbatch override them.
#SBATCH --job-name=jaxtune
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=jaxtune-%j.log
set -euo pipefail

JAXTUNE=${JAXTUNE:-jaxtune}

if (($# < 1)); then
  echo "usage: sbatch [sbatch options] launch/slurm_gpu.sh VERB [CONFIG] [section.key=value ...]" >&2
  exit 2
fi
read -ra command <<<"$JAXTUNE"

echo "slurm_gpu: job $SLURM_JOB_ID, $SLURM_NTASKS processes on $SLURM_JOB_NUM_NODES nodes" >&2
# --label prefixes each line with the process id; the processes of ids > 0 log warnings only.
srun --kill-on-bad-exit=1 --label "${command[@]}" "$@"
