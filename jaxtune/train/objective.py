"""Objectives: what a train step minimizes, as small objects the generic step calls.

An objective says which batch keys it reads (`batch_keys`), its normalizer (what the loss is a
mean over: supervised tokens for SFT, pairs for a pairwise loss), and `loss(params, batch, rng)`:
the *sum* of its loss over the batch's rows and a dict of metric sums (rng None: no noise, as in
evaluation). Sums divided by the whole global batch's normalizer make k micro-batches add up to
exactly the loss of one batch. `eval_metric` names the held-out loss (a metric, or "loss").

A new objective is a file of its own and one line in `OBJECTIVES` (`train.objective` chooses).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax

from jaxtune.config import TrainConfig
from jaxtune.data.packing import Group
from jaxtune.errors import ConfigError
from jaxtune.model import transformer
from jaxtune.peft.partition import Predicate
from jaxtune.train import dpo, llava_sft, reward, sft

Batch = dict[str, jax.Array]


class Objective(Protocol):
  batch_keys: tuple[str, ...]
  eval_metric: str

  def normalizer(self, batch: Batch) -> jax.Array: ...

  def loss(
    self, params: Any, batch: Batch, rng: jax.Array | None
  ) -> tuple[jax.Array, dict[str, jax.Array]]: ...


# train.objective -> (model, train config) -> the objective.
OBJECTIVES: dict[str, Callable[[transformer.Transformer, TrainConfig], Objective]] = {
  "sft": sft.SFT.from_config,
  "dpo": dpo.DPO.maker("dpo"),  # With train.label_smoothing > 0: conservative DPO.
  "ipo": dpo.DPO.maker("ipo"),
  "simpo": dpo.DPO.maker("simpo"),
  "reward": reward.RewardModel.from_config,
  "llava_sft": llava_sft.LlavaSFT.from_config,
}
# Objectives whose model has the scalar head (`model/heads.py`), which always trains: a reward
# model's, PPO's value (`train/ppo.py`, which `train/ppo_run.py` builds: not in OBJECTIVES).
SCALAR_HEAD = ("reward", "ppo")
SCORES_ONLY = ("reward",)  # Objectives whose model generates nothing.


def model_options(train: TrainConfig) -> dict[str, Any]:
  """What the model of `train.objective` is built with besides its config and adapters."""
  return {"scalar_head": True, "scalar_bias": True} if train.objective in SCALAR_HEAD else {}


def trains(train: TrainConfig, method_trains: Predicate) -> Predicate:
  """Which parameters train: the PEFT method's, and the objective's scalar head."""
  if train.objective not in SCALAR_HEAD:
    return method_trains
  return lambda path: path[0] == reward.HEAD or method_trains(path)


def check_data(train: TrainConfig, goal: Objective, examples: Sequence[Any]) -> None:
  """Preference objectives (their batches have `groups`) train on preference data only, and the
  others never on it (SFT would learn the rejected responses too)."""
  wants = "groups" in goal.batch_keys
  has = any(isinstance(ex, Group) for ex in examples)
  if wants and not has:
    raise ConfigError(
      f"train.objective={train.objective} needs preference data (pairs or rankings: "
      "data.format pairwise or ranked, see jaxtune/data/preference.py); the data has none"
    )
  if has and not wants:
    raise ConfigError(
      f"the data are preferences, which train.objective={train.objective} cannot train on; "
      f"choose one of {sorted(k for k in OBJECTIVES if k != 'sft')}"
    )


def make(
  model: transformer.Transformer, train: TrainConfig, segments: int | None = None
) -> Objective:
  """The objective `train.objective` names, for `model`; `segments` bounds the segments of a row
  for the objectives that compare them (a `segments` field: `train/preference.py`)."""
  if train.objective not in OBJECTIVES:
    raise ConfigError(f"train.objective={train.objective!r}: choose among {sorted(OBJECTIVES)}")
  goal = OBJECTIVES[train.objective](model, train)
  if segments and hasattr(goal, "segments"):
    goal = dataclasses.replace(goal, segments=segments)
  return goal
