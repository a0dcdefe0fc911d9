"""The train and eval steps: pure functions, jitted once by the loop with explicit shardings.

Loss: token-mean cross-entropy over the supervised tokens of the whole global batch (a sum over
tokens divided by the batch's supervised-token count, so k micro-batches accumulate to exactly
the loss of one batch), plus optional PaLM z-loss `z * log(Z)^2`. A step whose loss or gradient
is not finite leaves the state as it was (the loop stops or goes on, per `train.nonfinite`).

The state holds only the trainable parameters (all of them, or a PEFT method's: see
`peft/partition.py`); the frozen rest is a separate argument, so gradients and optimizer state
exist for the trainable part alone.

Shape letters: B batch, T length, V vocab, K micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from jaxtune.model.transformer import Transformer
from jaxtune.peft import partition

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # The trainable parameters only.
  opt_state: Any


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


def _forward(model: Transformer, params: Any, batch: Batch, rng: jax.Array | None, alpha: float):
  rngs = (
    None if rng is None else dict(zip(("dropout", "neftune"), jax.random.split(rng), strict=True))
  )
  return model.apply(
    {"params": params},
    batch["inputs"],
    batch["positions"],
    batch["segment_ids"],
    deterministic=rng is None,
    neftune_alpha=alpha,
    rngs=rngs,
  )


def _micro_batches(batch: Batch, k: int) -> Batch:
  """[B, ...] -> [K, B/K, ...]; micro-batch i takes rows i, i + K, ... (each device keeps its
  own rows)."""
  return {
    key: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1) for key, x in batch.items()
  }


def make_train_step(
  model: Transformer,
  optimizer: optax.GradientTransformation,
  rng: jax.Array,
  *,
  micro_batches: int = 1,
  z_loss: float = 0.0,
  neftune_alpha: float = 0.0,
) -> Callable[[TrainState, Any, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """`(state, frozen params, batch) -> (state, metrics)`. Noise (dropout, NEFTune) is
  `fold_in(rng, step)`."""

  def train_step(state: TrainState, frozen: Any, batch: Batch):
    step_rng = jax.random.fold_in(rng, state.step)
    total = jnp.maximum(jnp.sum(batch["weights"]), 1.0)

    def loss_share(trainable, micro, i):
      """A micro-batch's part of the batch's loss: its token sums over the batch's total (so
      the gradients come out scaled, with no pass over them to divide)."""
      params = partition.combine(trainable, frozen)
      logits = _forward(model, params, micro, jax.random.fold_in(step_rng, i), neftune_alpha)
      loss, nll = token_losses(logits, micro["targets"], micro["weights"], z_loss)
      return loss / total, nll / total

    grad_fn = jax.value_and_grad(loss_share, has_aux=True)
    if micro_batches == 1:
      (loss, nll), grads = grad_fn(state.params, batch, 0)
    else:

      def accumulate(acc, xs):
        (loss, nll), grads = grad_fn(state.params, *xs)
        return jax.tree.map(jnp.add, acc, (grads, loss, nll)), None

      zeros = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros(()), jnp.zeros(()))
      xs = (_micro_batches(batch, micro_batches), jnp.arange(micro_batches))
      (grads, loss, nll), _ = jax.lax.scan(accumulate, zeros, xs)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(state):
      updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
      return TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state)

    # A branch, not a select of old or new: then the update overwrites the parameters and
    # moments in place, with no copies of the old ones kept for the select.
    new_state = jax.lax.cond(finite, update, lambda s: s.replace(step=s.step + 1), state)
    metrics = {
      "loss": loss,
      "nll": nll,
      "grad_norm": grad_norm,
      "finite": finite,
      "supervised_tokens": jnp.sum(batch["weights"]),
      "tokens": jnp.sum(batch["segment_ids"] > 0),  # Real ones: the global batch's, not a host's.
    }
    return new_state, metrics

  return train_step


def make_eval_step(
  model: Transformer,
) -> Callable[[Any, Any, Batch], tuple[jax.Array, jax.Array]]:
  """`(trainable, frozen, batch) -> (sum of nll, supervised tokens)`; no dropout, no noise."""

  def eval_step(trainable: Any, frozen: Any, batch: Batch):
    logits = _forward(model, partition.combine(trainable, frozen), batch, None, 0.0)
    _, nll = token_losses(logits, batch["targets"], batch["weights"])
    return nll, jnp.sum(batch["weights"])

  return eval_step
