"""A training run's folder (`train.output_dir`) and its keys: the one place that lays them out.

    RUN/config.yaml        the resolved config
    RUN/tokenizer/         the tokenizer the run trained with
    RUN/checkpoints/<N>/   orbax checkpoints (see `checkpoint.py`)
    RUN/metrics.jsonl      metric records, one JSON object a line
    RUN/tensorboard/       the same as TensorBoard events
    RUN/held_out.json      held-out exact match per task family, before and after training
    RUN/reference_log_probs.npz   a DPO run's precomputed reference (`train/precomputed.py`)

Training writes it, `jaxtune.load` and `jaxtune convert` read and write it.
"""

from __future__ import annotations

import pathlib

import jax

CONFIG, TOKENIZER, CHECKPOINTS = "config.yaml", "tokenizer", "checkpoints"
METRICS, TENSORBOARD = "metrics.jsonl", "tensorboard"
HELD_OUT = "held_out.json"  # Held-out exact match before and after training (`train/held_out.py`).
REFERENCE_LOG_PROBS = "reference_log_probs.npz"


def is_run(path: pathlib.Path) -> bool:
  return (path / CONFIG).is_file() and (path / CHECKPOINTS).is_dir()


def run_of_step(path: pathlib.Path) -> pathlib.Path | None:
  """The run folder of a `checkpoints/<step>` folder, else None."""
  run = path.parent.parent
  if path.name.isdigit() and path.parent.name == CHECKPOINTS and (run / CONFIG).is_file():
    return run
  return None


def run_and_step(path: pathlib.Path) -> tuple[pathlib.Path, int | None]:
  """The run folder and step (None: the latest) of a run or `checkpoints/<step>` path."""
  run = run_of_step(path)
  return (path, None) if run is None else (run, int(path.name))


def seed_rngs(seed: int) -> tuple[jax.Array, jax.Array]:
  """(the key of the parameters' initialization, the key of the steps' noise) of a run: a PEFT
  run's random base, when it had no `train.init_from`, is redrawn from its seed."""
  init_rng, step_rng = jax.random.split(jax.random.key(seed))
  return init_rng, step_rng
