#!/usr/bin/env bash
# Creates the peers' environments for benchmarks/train_vs_peers.py, apart from jaxtune's:
#   benchmarks/.envs/tunix   google-tunix (brings its own jax, flax nnx, optax, qwix)
#   benchmarks/.envs/torch   torch (CPU) + transformers + peft
#   benchmarks/.envs/maxtext maxtext[tpu] 0.2.5 (needs Python 3.12+: $MAXTEXT_PYTHON, else
#                            skipped; its TPU extra is the one that brings jax, flax and the rest)
# Idempotent: an environment that already has its pinned packages is left as it is.
# Usage: bash benchmarks/setup_peers.sh [python]   (default: python3; needs 3.11+)
set -euo pipefail

PYTHON=${1:-python3}
ENVS="$(cd "$(dirname "$0")" && pwd)/.envs"
TUNIX=(google-tunix==0.1.7)
TORCH=(torch==2.13.0 transformers==5.23.0 peft==0.21.2)

# make_env NAME PACKAGE...: a venv at $ENVS/NAME with the packages installed.
make_env() {
  local name=$1 env="$ENVS/$1"
  shift
  if [[ ! -x "$env/bin/python" ]]; then
    "$PYTHON" -m venv "$env"
  fi
  echo "== $name: pip install $* (a no-op when already installed)"
  "$env/bin/python" -m pip install -q "$@"
  echo "== $name ($env):"
  "$env/bin/python" -m pip list 2>/dev/null \
    | grep -i -E "^(google-tunix|maxtext|jax|jaxlib|flax|optax|qwix|torch|transformers|peft) " \
    | sed 's/^/   /'
}

make_env tunix "${TUNIX[@]}"
make_env torch "${TORCH[@]}"
if [[ -n "${MAXTEXT_PYTHON:-}" ]]; then
  PYTHON=$MAXTEXT_PYTHON make_env maxtext "maxtext[tpu]==0.2.5"
else
  echo "== maxtext: skipped (set MAXTEXT_PYTHON to a Python 3.12+; maxtext 0.2.5 needs it)"
fi
