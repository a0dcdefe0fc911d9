"""Direct preference optimization and its family, on packed rows.

Each response's log-probability is the sum of its supervised tokens' log-probabilities over its
own segment (`train/preference.py`), so chosen and rejected responses pack into rows with other
pairs. For a pair (w better than l) with u = (log pi(w) - log ref(w)) - (log pi(l) - log ref(l)):

- `dpo` (Rafailov et al. 2023): -log sigmoid(beta u); with `train.label_smoothing` = e it is
  conservative DPO (Mitchell 2023): -(1 - e) log sigmoid(beta u) - e log sigmoid(-beta u);
- `ipo` (Azar et al. 2023): (u - 1 / (2 beta))^2, on summed log-probabilities as in the paper;
- `simpo` (Meng et al. 2024), reference-free: -log sigmoid(beta (a(w) - a(l)) - gamma), with
  a(y) = log pi(y) / |y|, the mean over the response's supervised tokens.

A ranking of K responses is C(K, 2) pairs, averaged per prompt; the loss is a mean over prompts.
The reference model is `train/reference.py`'s. Metrics: the better and worse responses' implicit
rewards beta (log pi - log ref) (SimPO's: beta a(y)), their margin, the preference accuracy and
`kl`, the KL from the policy to the reference per response (summed over its supervised tokens).
With a precomputed reference, which keeps only the reference's top-k next tokens at each
supervised token (`train.reference_top_k`), `kl` is the KL of the two distributions coarsened to
{those k ids, the rest of the vocabulary}: a lower bound of the token KL, exact when k is the
vocabulary (`preference.token_kl_top_k`).
Dropout applies to the policy only; NEFTune is not used.

Shape letters: B batch, T length, V vocab, S segments of a row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxtune.config import TrainConfig
from jaxtune.model import transformer
from jaxtune.train import preference, reference


def sigmoid_loss(u: jax.Array, beta: float, smoothing: float) -> jax.Array:
  return -(1 - smoothing) * jax.nn.log_sigmoid(beta * u) - smoothing * jax.nn.log_sigmoid(-beta * u)


def ipo_loss(u: jax.Array, beta: float) -> jax.Array:
  return jnp.square(u - 1 / (2 * beta))


def simpo_loss(u: jax.Array, beta: float, gamma: float) -> jax.Array:
  return -jax.nn.log_sigmoid(beta * u - gamma)


# Loss name -> (pairwise quantity u [B, S, S], the objective) -> losses [B, S, S].
LOSSES: dict[str, Callable[[jax.Array, DPO], jax.Array]] = {
  "dpo": lambda u, o: sigmoid_loss(u, o.beta, o.label_smoothing),
  "ipo": lambda u, o: ipo_loss(u, o.beta),
  "simpo": lambda u, o: simpo_loss(u, o.beta, o.simpo_gamma),
}
REFERENCE_FREE = ("simpo",)


@dataclasses.dataclass(frozen=True)
class DPO:
  model: transformer.Transformer
  kind: str = "dpo"  # A key of LOSSES.
  beta: float = 0.1
  label_smoothing: float = 0.0
  simpo_gamma: float = 0.5
  precomputed: bool = False  # The reference's log-probabilities come with the batch.
  segments: int | None = None  # A row's most segments (`train/preference.py`); None: T.

  eval_metric: ClassVar[str] = "loss"

  @property
  def batch_keys(self) -> tuple[str, ...]:
    keys = ("inputs", "targets", "weights", "positions", "segment_ids", "groups", "ranks")
    return (*keys, *preference.PRECOMPUTED) if self.precomputed else keys

  @classmethod
  def maker(cls, kind: str) -> Callable[[transformer.Transformer, TrainConfig], DPO]:
    def make(model: transformer.Transformer, train: TrainConfig) -> DPO:
      precomputed = train.reference == "precomputed" and kind not in REFERENCE_FREE
      beta, smoothing, gamma = train.preference_beta, train.label_smoothing, train.simpo_gamma
      return cls(model, kind, beta, smoothing, gamma, precomputed)

    return make

  @property
  def needs_reference(self) -> bool:
    """Whether the step runs a reference model (not when its log-probabilities are given)."""
    return self.kind not in REFERENCE_FREE and not self.precomputed

  def normalizer(self, batch: preference.Batch) -> jax.Array:
    return preference.groups(batch, self.segments)

  def _log_probs(self, logits_btv: jax.Array, batch: preference.Batch) -> jax.Array:
    """[B, S]: each segment's summed log-probability of its supervised tokens."""
    log_p_bt = preference.token_log_probs(logits_btv, batch["targets"]) * batch["weights"]
    return preference.segment_sums(log_p_bt, batch["segment_ids"], self.segments)

  def _kl(self, kl_bt: jax.Array, batch: preference.Batch) -> jax.Array:
    """The batch's KL sum (of responses per group, as the loss counts groups) from each token's."""
    kl_bt = jax.lax.stop_gradient(jnp.where(batch["weights"] > 0, kl_bt, 0.0))
    kl_bs = preference.segment_sums(kl_bt * batch["weights"], batch["segment_ids"], self.segments)
    k_bs = preference.group_sizes(batch, self.segments)
    return jnp.sum(jnp.where(k_bs > 1, kl_bs / jnp.maximum(k_bs, 1), 0.0))

  def loss(
    self, params: Any, batch: preference.Batch, rng: jax.Array | None
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    inputs = (batch["inputs"], batch["positions"], batch["segment_ids"])
    if self.needs_reference:
      params, ref_model, ref_params = reference.split(self.model, params)
    logits_btv = self.model.apply(
      {"params": params}, *inputs, deterministic=rng is None, rngs=transformer.training_rngs(rng)
    )
    log_p_bs = self._log_probs(logits_btv, batch)
    w_bss = preference.pair_weights(batch, self.segments)
    metrics = {}
    if self.precomputed:
      ref_bs = preference.segment_sums(batch["reference"], batch["segment_ids"], self.segments)
      ratio_bs = log_p_bs - ref_bs
      reward_bs = self.beta * ratio_bs
      u_bss = preference.pairwise(ratio_bs)
      tops = (batch["reference_ids"], batch["reference_top"], batch["reference_rest"])
      metrics["kl"] = self._kl(preference.token_kl_top_k(logits_btv, *tops), batch)
    elif self.needs_reference:
      ref_btv = jax.lax.stop_gradient(ref_model.apply({"params": ref_params}, *inputs))
      ratio_bs = log_p_bs - self._log_probs(ref_btv, batch)
      reward_bs = self.beta * ratio_bs
      u_bss = preference.pairwise(ratio_bs)
      metrics["kl"] = self._kl(preference.token_kl(logits_btv, ref_btv), batch)
    else:
      lengths_bs = preference.segment_sums(batch["weights"], batch["segment_ids"], self.segments)
      mean_bs = log_p_bs / jnp.maximum(lengths_bs, 1.0)
      reward_bs = self.beta * mean_bs
      u_bss = preference.pairwise(mean_bs)
    losses_bss = LOSSES[self.kind](u_bss, self)
    loss = jnp.sum(jnp.where(w_bss > 0, w_bss * losses_bss, 0.0))
    return loss, {**preference.pair_metrics(reward_bs, w_bss), **metrics}
