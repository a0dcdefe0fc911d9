#!/usr/bin/env bash
# A Cloud TPU VM pod slice, driven from your machine with gcloud: create it, put this checkout on
# every worker, run the same jaxtune command on all workers at once, collect their logs, delete
# it. On TPU VMs JAX finds the other workers itself (jaxtune's distributed.mode=auto), so there
# are no addresses to pass and no Pathways.
#
# Usage: launch/tpu_pod.sh STEP [ARGS]
#   create          create the slice
#   setup           copy the checkout's HEAD commit to every worker, install it with jax[tpu] in
#                   ~/jaxtune-venv (Python from uv), then run MOUNT_COMMAND on every worker
#   run VERB [CONFIG] [section.key=value ...]
#                   run `jaxtune VERB ...` on all workers (--worker=all); each also writes its
#                   output to ~/jaxtune.log there; only worker 0 logs below WARNING
#   logs [DIR]      copy each worker's ~/jaxtune.log to DIR/worker_<i>.log (default: logs/TPU_NAME)
#   delete          delete the slice
#   all VERB ...    create, setup, run, logs and delete (the slice is deleted even if the run fails)
#
#   TPU_NAME=tune ACCELERATOR_TYPE=v5litepod-16 RUNTIME_VERSION=v2-alpha-tpuv5-lite \
#     MOUNT_COMMAND='sudo mkdir -p /mnt/runs && sudo mount -t nfs 10.0.0.2:/runs /mnt/runs' \
#     launch/tpu_pod.sh all train configs/lima.yaml train.output_dir=/mnt/runs/lima
#
# train.output_dir must be a directory that every worker sees at the same path: the workers write
# each checkpoint together (orbax), worker 0 writes the metrics. A Filestore (NFS) share or a
# Cloud Storage bucket mounted with gcsfuse, mounted by MOUNT_COMMAND, does.
#
# Variables (set them in the environment; defaults as below):
#   TPU_NAME          jaxtune-pod
#   ZONE              us-central2-b
#   ACCELERATOR_TYPE  v4-32 (4 workers); v5litepod-16, v5p-32, v6e-16, ...
#   RUNTIME_VERSION   tpu-ubuntu2204-base (v4); v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv5 (v5p),
#                     v2-alpha-tpuv6e (v6e)
#   PROJECT           the Google Cloud project (default: gcloud's configured one)
#   SPOT              non-empty: a Spot (preemptible) slice
#   PYTHON_VERSION    3.12, the workers' Python for jaxtune
#   REMOTE_DIR        jaxtune, the checkout's folder under each worker's home
#   MOUNT_COMMAND     run on every worker at the end of setup (default: none)
set -euo pipefail

TPU_NAME=${TPU_NAME:-jaxtune-pod}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
PROJECT=${PROJECT:-}
SPOT=${SPOT:-}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
REMOTE_DIR=${REMOTE_DIR:-jaxtune}
MOUNT_COMMAND=${MOUNT_COMMAND:-}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}

tpu() { # tpu VERB ARGS: `gcloud compute tpus tpu-vm VERB ARGS` in ZONE (and PROJECT).
  local verb=$1
  shift
  gcloud compute tpus tpu-vm "$verb" "$@" --zone="$ZONE" ${PROJECT:+"--project=$PROJECT"}
}

on_all_workers() { # on_all_workers COMMAND: run the shell COMMAND on every worker at once.
  tpu ssh "$TPU_NAME" --worker=all --command="$1"
}

create() {
  tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" \
    ${SPOT:+--spot}
}

setup() {
  local archive
  archive=$(mktemp -d)/jaxtune.tar.gz
  git -C "$ROOT" archive --format=tar.gz --output="$archive" HEAD
  tpu scp "$archive" "$TPU_NAME:jaxtune.tar.gz" --worker=all
  on_all_workers "set -e
    rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar -xzf ~/jaxtune.tar.gz -C ~/$REMOTE_DIR
    python3 -m pip install --user --quiet uv
    ~/.local/bin/uv venv --quiet --allow-existing --python $PYTHON_VERSION ~/jaxtune-venv
    ~/.local/bin/uv pip install --quiet --python ~/jaxtune-venv/bin/python 'jax[tpu]' -e ~/$REMOTE_DIR"
  if [[ -n $MOUNT_COMMAND ]]; then on_all_workers "$MOUNT_COMMAND"; fi
}

run() { # run VERB ARGS: jaxtune on every worker; the status is that of gcloud ssh.
  (($# >= 1)) || usage
  on_all_workers "cd ~/$REMOTE_DIR && ~/jaxtune-venv/bin/jaxtune $(printf '%q ' "$@") 2>&1 |
    tee ~/jaxtune.log; exit \${PIPESTATUS[0]}"
}

logs() { # logs [DIR]
  local dir=${1:-logs/$TPU_NAME} workers
  workers=$(tpu describe "$TPU_NAME" --format='value(networkEndpoints.len())')
  [[ $workers =~ ^[0-9]+$ ]] || { echo "tpu_pod: cannot count the workers of $TPU_NAME" >&2; return 1; }
  mkdir -p "$dir"
  for ((w = 0; w < workers; w++)); do
    tpu scp "$TPU_NAME:jaxtune.log" "$dir/worker_$w.log" --worker="$w"
  done
  echo "tpu_pod: the logs of $workers workers are in $dir" >&2
}

delete() {
  tpu delete "$TPU_NAME" --quiet
}

all() {
  (($# >= 1)) || usage
  local status=0
  trap 'delete || true' EXIT # Never leave a slice running (and billing) behind.
  create
  setup
  run "$@" || status=$?
  logs || true
  exit "$status"
}

(($# >= 1)) || usage
step=$1
shift
case $step in
  create | setup | delete) (($# == 0)) || usage ;;
  run | logs | all) ;;
  *) usage ;;
esac
"$step" "$@"
