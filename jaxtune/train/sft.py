"""Supervised fine-tuning's objective: token-mean cross-entropy over the supervised tokens, plus
PaLM's optional z-loss `z * log(Z)^2`.

Shape letters: B batch, T length, V vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxtune.config import TrainConfig
from jaxtune.model import transformer


def token_losses(
  logits_btv: jax.Array, targets_bt: jax.Array, weights_bt: jax.Array, z_loss: float = 0.0
) -> tuple[jax.Array, jax.Array]:
  """(weighted sum of nll + z-loss, weighted sum of nll) over the batch, in float32."""
  logits_btv = logits_btv.astype(jnp.float32)
  log_z_bt = jax.nn.logsumexp(logits_btv, axis=-1)
  target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
  nll_bt = log_z_bt - target_logit_bt
  nll = jnp.sum(nll_bt * weights_bt)
  return nll + z_loss * jnp.sum(jnp.square(log_z_bt) * weights_bt), nll


@dataclasses.dataclass(frozen=True)
class SFT:
  """Next-token cross-entropy on the tokens whose `weights` are 1 (the responses), normalized by
  their count over the whole global batch; NEFTune's noise and dropout while training."""

  model: transformer.Transformer
  z_loss: float = 0.0
  neftune_alpha: float = 0.0

  batch_keys: ClassVar[tuple[str, ...]] = (
    "inputs",
    "targets",
    "weights",
    "positions",
    "segment_ids",
  )
  eval_metric: ClassVar[str] = "nll"  # The held-out loss: without the z-loss term.
  extra_inputs: ClassVar[tuple[str, ...]] = ()  # Batch keys passed on to the model by name.

  @classmethod
  def from_config(cls, model: transformer.Transformer, train: TrainConfig) -> SFT:
    return cls(model, train.z_loss, train.neftune_alpha)

  def normalizer(self, batch: dict[str, jax.Array]) -> jax.Array:
    return jnp.sum(batch["weights"])

  def loss(
    self, params: Any, batch: dict[str, jax.Array], rng: jax.Array | None
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    logits_btv = self.model.apply(
      {"params": params},
      batch["inputs"],
      batch["positions"],
      batch["segment_ids"],
      deterministic=rng is None,
      neftune_alpha=self.neftune_alpha,
      rngs=transformer.training_rngs(rng),
      **{key: batch[key] for key in self.extra_inputs},
    )
    loss, nll = token_losses(logits_btv, batch["targets"], batch["weights"], self.z_loss)
    return loss, {"nll": nll}
