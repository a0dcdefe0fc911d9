#!/usr/bin/env bash
# Creates the peers' environments for benchmarks/train_vs_peers.py, apart from jaxtune's:
#   benchmarks/.envs/tunix   google-tunix (brings its own jax, flax nnx, optax, qwix)
#   benchmarks/.envs/torch   torch (CPU) + transformers + peft
#   benchmarks/.envs/maxtext maxtext[tpu] 0.2.5: needs Python 3.12+ ($MAXTEXT_PYTHON, else the first
#                            of python3.13 / python3.12 that runs; none: skipped, and
#                            train_vs_peers.py says so). Its TPU extra is the one that brings jax,
#                            flax and the rest (~230 packages, libtpu among them: the runner keeps
#                            JAX on the CPU). SLOW: ~47 minutes to resolve and install on a 2-core
#                            machine under load (pip backtracks through its pins).
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
# The first of $MAXTEXT_PYTHON, the existing maxtext environment's, python3.13, python3.12 and
# $PYTHON that runs and is 3.12+.
for candidate in "${MAXTEXT_PYTHON:-}" "$ENVS/maxtext/bin/python" python3.13 python3.12 "$PYTHON"; do
  MAXTEXT_PYTHON=""
  if [[ -n "$candidate" ]] \
    && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
    MAXTEXT_PYTHON=$candidate
    break
  fi
done
if [[ -n "$MAXTEXT_PYTHON" ]]; then
  echo "== maxtext: with $MAXTEXT_PYTHON; the first install takes ~47 minutes"
  PYTHON=$MAXTEXT_PYTHON make_env maxtext "maxtext[tpu]==0.2.5"
else
  echo "== maxtext: skipped (no python3.12+; set MAXTEXT_PYTHON to one: maxtext 0.2.5 needs it)"
fi
