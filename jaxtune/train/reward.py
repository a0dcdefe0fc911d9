"""InstructGPT's reward model (Ouyang et al. 2022): a scalar head read at each response's last
token, trained on rankings of K responses to a prompt with the K-wise loss

  -1 / C(K, 2) * sum over the pairs (w better than l) of log sigmoid(r(x, y_w) - r(x, y_l) - m),

where each of the K responses is a segment of one row, forwarded once (not once per pair), and
the loss is a mean over prompts. `train.reward_margin` = m per rank apart is the optional margin
(Llama 2's, made of the ranks; 0 is InstructGPT's loss). The held-out metric is the pairwise
accuracy: the share of pairs whose better response scores higher.

After training, the head's offset is set so that the demonstrations (the best response of each
held-out prompt) score 0 on average (`RewardModel.finish`), as InstructGPT normalizes its reward.

The reward is read at the segment's last input token: a row holds next-token pairs, so it has
seen the whole response but its final token (the end-of-turn token under every template).

Shape letters: B batch, T length, S segments of a row.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxtune.config import TrainConfig
from jaxtune.model import transformer
from jaxtune.peft import partition
from jaxtune.train import preference

log = logging.getLogger(__name__)

HEAD = "score"  # The scalar head's parameters (`Transformer(..., scalar_head=True)`).
BIAS = "bias"  # Its offset (`scalar_bias=True`).


def scores(
  model: transformer.Transformer, params: Any, batch: preference.Batch, rng, segments: int | None
) -> jax.Array:
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
  score_bt = jnp.where(last_bt, score_bt, 0.0)
  return preference.segment_sums(score_bt, batch["segment_ids"], segments)


def kwise_losses(reward_bs: jax.Array, rank_bs: jax.Array, margin: float) -> jax.Array:
  """[B, S, S]: -log sigmoid(r_i - r_j - margin * (rank_j - rank_i)) for every i, j."""
  apart_bss = (rank_bs[:, None, :] - rank_bs[:, :, None]).astype(jnp.float32)
  return -jax.nn.log_sigmoid(preference.pairwise(reward_bs) - margin * apart_bss)


@dataclasses.dataclass(frozen=True)
class RewardModel:
  model: transformer.Transformer
  margin: float = 0.0
  segments: int | None = None  # A row's most segments (`train/preference.py`); None: T.

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
    return preference.groups(batch, self.segments)

  def loss(
    self, params: Any, batch: preference.Batch, rng: jax.Array | None
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    reward_bs = scores(self.model, params, batch, rng, self.segments)
    rank_bs = preference.segment_values(batch["ranks"], batch["segment_ids"], self.segments)
    w_bss = preference.pair_weights(batch, self.segments)
    loss = jnp.sum(w_bss * kwise_losses(reward_bs, rank_bs, self.margin))
    return loss, preference.pair_metrics(reward_bs, w_bss)

  def demonstrations(self, params: Any, batch: preference.Batch) -> tuple[jax.Array, jax.Array]:
    """(the sum of the best responses' rewards, their count) in the batch."""
    reward_bs = scores(self.model, params, batch, None, self.segments)
    group_bs = preference.segment_values(batch["groups"], batch["segment_ids"], self.segments)
    rank_bs = preference.segment_values(batch["ranks"], batch["segment_ids"], self.segments)
    best_bs = (group_bs > 0) & (rank_bs == 0)
    return jnp.sum(jnp.where(best_bs, reward_bs, 0.0)), jnp.sum(best_bs)

  def finish(self, trainable: Any, frozen: Any, batches: Sequence[preference.Batch]) -> Any:
    """The trained parameters with the offset moved so the demonstrations in `batches` score 0
    on average (the pairwise loss and accuracy do not change)."""
    step = jax.jit(lambda t, b: self.demonstrations(partition.combine(t, frozen), b))
    total, count = 0.0, 0
    for b in batches:
      s, n = step(trainable, b)
      total, count = total + float(s), count + int(n)
    if not count:
      return trainable
    mean = total / count
    log.info("reward offset: the %d demonstrations scored %.4f on average, now 0", count, mean)
    head = dict(trainable[HEAD], **{BIAS: trainable[HEAD][BIAS] - mean})
    return {**trainable, HEAD: head}
