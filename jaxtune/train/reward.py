"""InstructGPT's reward model (Ouyang et al. 2022): a scalar head read at each response's last
token, trained on rankings of K responses to a prompt with the K-wise loss

  -1 / C(K, 2) * sum over the pairs (w better than l) of log sigmoid(r(x, y_w) - r(x, y_l) - m),

where each of the K responses is a segment of one row, forwarded once (not once per pair), and
the loss is a mean over prompts. `train.reward_margin` = m per rank apart is the optional margin
(Llama 2's, made of the ranks; 0 is InstructGPT's loss). The held-out metric is the pairwise
accuracy: the share of pairs whose better response scores higher.

The reward is read at the segment's last input token: a row holds next-token pairs, so it has
seen the whole response but its final token (the end-of-turn token under every template).

Shape letters: B batch, T length, S segments of a row.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxtune.config import TrainConfig
from jaxtune.model import transformer
from jaxtune.train import preference

HEAD = "score"  # The scalar head's parameters (`Transformer(..., scalar_head=True)`).


def scores(model: transformer.Transformer, params: Any, batch: preference.Batch, rng) -> jax.Array:
  """[B, S]: each segment's reward, its score at its last token."""
  score_bt = model.apply(
    {"params": params},
    batch["inputs"],
    batch["positions"],
    batch["segment_ids"],
    head="score",
    deterministic=rng is None,
    rngs=transformer.training_rngs(rng),
  )
  last_bt = preference.last_tokens(batch["segment_ids"])
  return preference.segment_sums(jnp.where(last_bt, score_bt, 0.0), batch["segment_ids"])


def kwise_losses(reward_bs: jax.Array, rank_bs: jax.Array, margin: float) -> jax.Array:
  """[B, S, S]: -log sigmoid(r_i - r_j - margin * (rank_j - rank_i)) for every i, j."""
  apart_bss = (rank_bs[:, None, :] - rank_bs[:, :, None]).astype(jnp.float32)
  return -jax.nn.log_sigmoid(preference.pairwise(reward_bs) - margin * apart_bss)


@dataclasses.dataclass(frozen=True)
class RewardModel:
  model: transformer.Transformer
  margin: float = 0.0

  batch_keys: ClassVar[tuple[str, ...]] = (
    "inputs",
    "positions",
    "segment_ids",
    "groups",
    "ranks",
  )
  eval_metric: ClassVar[str] = "accuracy"

  @classmethod
  def from_config(cls, model: transformer.Transformer, train: TrainConfig) -> RewardModel:
    return cls(model, train.reward_margin)

  def normalizer(self, batch: preference.Batch) -> jax.Array:
    return preference.groups(batch)

  def loss(
    self, params: Any, batch: preference.Batch, rng: jax.Array | None
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    reward_bs = scores(self.model, params, batch, rng)
    rank_bs = preference.segment_values(batch["ranks"], batch["segment_ids"])
    w_bss = preference.pair_weights(batch)
    loss = jnp.sum(w_bss * kwise_losses(reward_bs, rank_bs, self.margin))
    return loss, preference.pair_metrics(reward_bs, w_bss)
