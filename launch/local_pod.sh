#!/usr/bin/env bash
# A pod on one machine: N jaxtune processes with M emulated CPU devices each, joined through a
# coordinator on localhost into one mesh of N*M devices (CPU collectives go through gloo), the way
# the hosts of a TPU pod slice run the same command.
#
# Usage: launch/local_pod.sh N M VERB [CONFIG] [section.key=value ...]
#   launch/local_pod.sh 2 4 train mesh.data=4 mesh.model=2 train.steps=20
#
# Process 0's output passes through unchanged (its progress bar and logs); the others log only
# warnings and errors, each line prefixed with "[i] ". The launcher waits for all of them; when one
# fails it stops the rest and exits with that process's status.
#
# Environment (optional):
#   JAXTUNE   the command each process runs (default: jaxtune), e.g. "python -m jaxtune.cli"
#   PORT      the coordinator's port on localhost (default: a free one)
#   LOG_DIR   also write each process's whole output to LOG_DIR/process_<i>.log
# Needs bash 5.1 or later.
set -euo pipefail

JAXTUNE=${JAXTUNE:-jaxtune}
PORT=${PORT:-}
LOG_DIR=${LOG_DIR:-}

usage() {
  sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}

free_port() { # A port that nothing on localhost accepts connections on.
  local port
  while :; do
    port=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return
    fi
  done
}

output() { # output I: the filter of process I's stdout (and, redirected, of its stderr).
  if [[ -n $LOG_DIR ]]; then tee -a "$LOG_DIR/process_$1.log"; else cat; fi |
    if (($1 == 0)); then cat; else sed -u "s/^/[$1] /"; fi
}

status_text() { # status_text CODE: "status 1", or "status 137 (killed by SIGKILL)".
  if (($1 > 128)); then echo "status $1 (killed by SIG$(kill -l $(($1 - 128))))"; else echo "status $1"; fi
}

((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] >= 501)) || { echo "local_pod: needs bash >= 5.1" >&2; exit 2; }
[[ $# -ge 3 && $1 =~ ^[1-9][0-9]*$ && $2 =~ ^[1-9][0-9]*$ ]] || usage
N=$1 M=$2
shift 2
PORT=${PORT:-$(free_port)}
if [[ -n $LOG_DIR ]]; then
  mkdir -p "$LOG_DIR"
  for ((i = 0; i < N; i++)); do : >"$LOG_DIR/process_$i.log"; done
fi
read -ra command <<<"$JAXTUNE"

declare -A process # pid -> process id, for the processes still running
stop_all() {
  ((${#process[@]} == 0)) || kill -TERM "${!process[@]}" 2>/dev/null || true
}
trap 'stop_all; exit 130' INT TERM

for ((i = 0; i < N; i++)); do
  JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=$M JAX_COORDINATOR_ADDRESS=localhost:$PORT \
    JAX_NUM_PROCESSES=$N JAX_PROCESS_ID=$i PYTHONUNBUFFERED=1 \
    "${command[@]}" "$@" > >(output "$i") 2> >(output "$i" >&2) &
  process[$!]=$i
done

while ((${#process[@]})); do
  code=0
  wait -n -p pid "${!process[@]}" || code=$?
  i=${process[$pid]}
  unset "process[$pid]"
  if ((code != 0)); then
    echo "local_pod: process $i exited with $(status_text "$code"); stopping the others" >&2
    stop_all
    wait
    exit "$code"
  fi
done
wait # The output filters.
