"""PPO-ptx as InstructGPT trains it (Ouyang et al. 2022; PPO: Schulman et al. 2017): the math of
scoring an iteration's rollouts and of one update. The driver (rollouts, epochs, minibatches) is
`train/ppo_run.py`.

A rollout is a row: a prompt and the policy's sampled response, left-aligned, with `weights` 1 on
the response's targets (its tokens and its stop token). `score` (one pass, compiled once per
rollout batch shape) reads the policy's log-probabilities and values and the reference's
log-probabilities of those targets, and turns the sequence reward into per-token rewards:

  r_t = -beta (log pi(y_t) - log ref(y_t))  [k1, the paper's],  + R(x, y) at its last token

then GAE (Schulman et al. 2016) with `gamma`, `lam` gives the advantages (whitened over the
iteration's tokens) and the value targets (returns = advantages + values, before whitening).
With `kl` = k3 the rewards carry no penalty; the loss adds beta times the k3 estimator
exp(ref - pi) - (ref - pi) - 1 per token instead.

The update (`PPO.loss`, an objective for the generic step, `train/step.py`) is a sum over the
response tokens, normalized by their count: the clipped surrogate
max(-A rho, -A clip(rho, 1 - clip, 1 + clip)) with rho = pi / pi_old, plus `value_coef` times the
clipped value loss 0.5 max((V - G)^2, (V_old + clip(V - V_old, +-value_clip) - G)^2), plus
`ptx_coef` times the mean next-token loss of the batch's ptx rows (the data's SFT batches), scaled
so that it is a mean over the ptx tokens.

The policy and the value share the trunk (and, under LoRA, the adapters): the value is the scalar
head (`model/heads.py`) on the policy's hidden states, started from the reward model's head.
The reference is `train/reference.py`'s (the base with the adapters off under LoRA: no copy).

Every log-probability (the policy's, old and new, and the reference's) is of the distribution the
rollouts were sampled from: the logits divided by `ppo.temperature` and with the ids past the
tokenizer's `vocab_size` removed, as `sampling.pick` draws them. Otherwise the ratio rho and the KL
would compare a distribution nothing was drawn from (TRL scales by the temperature likewise).
`top_k` is not applied: truncation has no log-probability for the ids it removes.

Shape letters: B rollouts (rows), T length, V vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxtune import sampling
from jaxtune.config_ppo import PpoConfig
from jaxtune.model import transformer
from jaxtune.train import preference, reference, sft

Batch = dict[str, jax.Array]

ROLLOUT_KEYS = ("inputs", "targets", "weights", "positions", "segment_ids")
SCORED_KEYS = ("old_log_probs", "reference_log_probs", "old_values", "advantages", "returns")
PTX_KEYS = tuple(f"ptx_{k}" for k in ROLLOUT_KEYS)


def gae(
  rewards_bt: jax.Array, values_bt: jax.Array, mask_bt: jax.Array, gamma: float, lam: float
) -> tuple[jax.Array, jax.Array]:
  """(advantages, returns) [B, T] of generalized advantage estimation over each row's masked
  (response) tokens, one contiguous run per row: the episode ends after the last one (its next
  value is 0). Zero where `mask` is 0."""

  def back(carry, xs):
    next_value_b, next_adv_b = carry
    r_b, v_b, m_b = xs
    delta_b = r_b + gamma * next_value_b - v_b
    adv_b = jnp.where(m_b, delta_b + gamma * lam * next_adv_b, 0.0)
    return (jnp.where(m_b, v_b, 0.0), adv_b), adv_b

  zeros_b = jnp.zeros(rewards_bt.shape[:1], jnp.float32)
  xs = (rewards_bt.T, values_bt.T, mask_bt.T > 0)
  _, adv_tb = jax.lax.scan(back, (zeros_b, zeros_b), xs, reverse=True)
  adv_bt = adv_tb.T
  return adv_bt, jnp.where(mask_bt > 0, adv_bt + values_bt, 0.0)


def last_response_token(mask_bt: jax.Array) -> jax.Array:
  """[B, T] bool: each row's last masked token (where the sequence reward is given)."""
  after_bt = jnp.pad(mask_bt[:, 1:], ((0, 0), (0, 1)))
  return (mask_bt > 0) & (after_bt == 0)


def whiten(x_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
  """`x` to mean 0 and variance 1 over the masked tokens of the whole batch."""
  n = jnp.maximum(jnp.sum(mask_bt), 1.0)
  mean = jnp.sum(x_bt * mask_bt) / n
  var = jnp.sum(jnp.square(x_bt - mean) * mask_bt) / n
  return jnp.where(mask_bt > 0, (x_bt - mean) * jax.lax.rsqrt(var + 1e-8), 0.0)


def k3(log_p_bt: jax.Array, ref_bt: jax.Array) -> jax.Array:
  """Schulman's k3 estimator of KL(pi || ref) per sampled token: unbiased and never negative."""
  log_ratio_bt = ref_bt - log_p_bt
  return jnp.exp(log_ratio_bt) - log_ratio_bt - 1.0


def adapt_kl_coef(beta: float, kl: float, rollouts: int, cfg: PpoConfig) -> float:
  """Ziegler et al. 2019's proportional controller: beta (1 + clip(KL / target - 1, +-0.2) n / H)
  after an iteration of n rollouts whose mean KL per response was `kl`."""
  if not cfg.adaptive_kl:
    return beta
  error = min(max(kl / cfg.kl_target - 1.0, -0.2), 0.2)
  return beta * (1.0 + error * rollouts / cfg.kl_horizon)


@dataclasses.dataclass(frozen=True)
class PPO:
  """The PPO-ptx update and the scoring of rollouts, for `model` (with a scalar head)."""

  model: transformer.Transformer
  cfg: PpoConfig = PpoConfig()
  vocab_size: int = 0  # The tokenizer's ids; 0: every id of the model's vocabulary.

  eval_metric: ClassVar[str] = "loss"
  needs_reference: ClassVar[bool] = True  # The loop attaches a frozen copy under full FT.

  @property
  def batch_keys(self) -> tuple[str, ...]:
    return (*ROLLOUT_KEYS, *SCORED_KEYS, *(PTX_KEYS if self.cfg.ptx_coef else ()))

  def normalizer(self, batch: Batch) -> jax.Array:
    return jnp.sum(batch["weights"])

  def _log_probs(self, logits_btv: jax.Array, targets_bt: jax.Array) -> jax.Array:
    """[B, T]: log-probabilities of `targets_bt` as the rollouts' sampler draws them."""
    logits_btv = logits_btv.astype(jnp.float32)
    if 0 < self.vocab_size < logits_btv.shape[-1]:
      logits_btv = sampling.known_only(logits_btv, self.vocab_size)
    if self.cfg.temperature > 0:
      logits_btv = logits_btv / self.cfg.temperature
    return preference.token_log_probs(logits_btv, targets_bt)

  def _forward(self, params: Any, batch: Batch, rng: jax.Array | None, prefix: str = ""):
    """(logits [B, T, V], values [B, T]) of the policy: one pass through the trunk."""
    h_btd = self.model.apply(
      {"params": params},
      batch[f"{prefix}inputs"],
      batch[f"{prefix}positions"],
      batch[f"{prefix}segment_ids"],
      head="hidden",
      deterministic=rng is None,
      rngs=transformer.training_rngs(rng),
    )
    logits_btv = self.model.apply({"params": params}, h_btd, method=transformer.Transformer.logits)
    values_bt = self.model.apply({"params": params}, h_btd, method=transformer.Transformer.score)
    return logits_btv, values_bt

  def score(self, params: Any, batch: Batch, rewards_b: jax.Array, beta: jax.Array):
    """The rollouts' `SCORED_KEYS` and statistics (means over the rollouts), given each
    rollout's sequence reward `rewards_b` [B] and the KL penalty's weight `beta`."""
    mask_bt = batch["weights"]
    policy, ref_model, ref_params = reference.split(self.model, params)
    logits_btv, values_bt = self._forward(policy, batch, None)
    log_p_bt = self._log_probs(logits_btv, batch["targets"]) * mask_bt
    inputs = (batch["inputs"], batch["positions"], batch["segment_ids"])
    ref_btv = ref_model.apply({"params": ref_params}, *inputs)
    ref_bt = self._log_probs(ref_btv, batch["targets"]) * mask_bt
    kl_bt = (log_p_bt - ref_bt) * mask_bt  # k1 per token: its sum is the response's log ratio.
    penalty_bt = -beta * kl_bt if self.cfg.kl == "k1" else jnp.zeros_like(kl_bt)
    token_rewards_bt = penalty_bt + rewards_b[:, None] * last_response_token(mask_bt)
    values_bt = values_bt * mask_bt
    adv_bt, returns_bt = gae(token_rewards_bt, values_bt, mask_bt, self.cfg.gamma, self.cfg.lam)
    if self.cfg.whiten:
      adv_bt = whiten(adv_bt, mask_bt)
    rows = rewards_b.shape[0]
    stats = {
      "reward": jnp.mean(rewards_b),
      "kl": jnp.sum(kl_bt) / rows,  # Per response: the mean of log pi(y) - log ref(y).
      "kl_k3": jnp.sum(k3(log_p_bt, ref_bt) * mask_bt) / rows,
      "response_tokens": jnp.sum(mask_bt) / rows,
      "value": jnp.sum(values_bt) / jnp.maximum(jnp.sum(mask_bt), 1.0),
    }
    scored = dict(zip(SCORED_KEYS, (log_p_bt, ref_bt, values_bt, adv_bt, returns_bt), strict=True))
    return scored, stats

  def loss(self, params: Any, batch: Batch, rng: jax.Array | None):
    cfg, mask_bt = self.cfg, batch["weights"]
    policy = reference.without_copy(params)
    logits_btv, values_bt = self._forward(policy, batch, rng)
    log_p_bt = self._log_probs(logits_btv, batch["targets"])
    ratio_bt = jnp.exp(log_p_bt - batch["old_log_probs"])
    adv_bt = batch["advantages"]
    clipped_bt = jnp.clip(ratio_bt, 1.0 - cfg.clip, 1.0 + cfg.clip)
    policy_bt = jnp.maximum(-adv_bt * ratio_bt, -adv_bt * clipped_bt)
    old_bt, returns_bt = batch["old_values"], batch["returns"]
    clipped_values_bt = old_bt + jnp.clip(values_bt - old_bt, -cfg.value_clip, cfg.value_clip)
    value_bt = 0.5 * jnp.maximum(
      jnp.square(values_bt - returns_bt), jnp.square(clipped_values_bt - returns_bt)
    )
    policy_loss, value_loss = jnp.sum(policy_bt * mask_bt), jnp.sum(value_bt * mask_bt)
    loss = policy_loss + cfg.value_coef * value_loss
    metrics = {
      "policy_loss": policy_loss,
      "value_loss": value_loss,
      "clip_fraction": jnp.sum((jnp.abs(ratio_bt - 1.0) > cfg.clip) * mask_bt),
      "approx_kl_old": jnp.sum((batch["old_log_probs"] - log_p_bt) * mask_bt),
    }
    if cfg.kl == "k3":
      k3_loss = jnp.sum(k3(log_p_bt, batch["reference_log_probs"]) * mask_bt)
      loss += cfg.kl_coef * k3_loss
      metrics["kl_k3"] = k3_loss
    if cfg.ptx_coef:
      # A mean over the ptx tokens, as a sum over this batch's response tokens (the normalizer).
      ptx_logits_btv, _ = self._forward(policy, batch, rng, prefix="ptx_")
      _, nll = sft.token_losses(ptx_logits_btv, batch["ptx_targets"], batch["ptx_weights"])
      scale = jnp.sum(mask_bt) / jnp.maximum(jnp.sum(batch["ptx_weights"]), 1.0)
      loss += cfg.ptx_coef * nll * scale
      metrics["ptx_nll"] = nll * scale
    return loss, metrics
