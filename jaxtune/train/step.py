"""The train and eval steps: pure functions of an objective (`train/objective.py`), jitted once by
the loop with explicit shardings.

The step owns only what every objective shares: `fold_in` of the step for the noise, micro-batch
accumulation, gradient clipping (in the optimizer chain), the non-finite guard, the in-place
update and the token counts. The loss is the objective's sum over the global batch divided by its
normalizer over the whole global batch, so k micro-batches accumulate to exactly the loss of one
batch. A step whose loss or gradient is not finite leaves the state as it was (the loop stops or
goes on, per `train.nonfinite`); one whose update makes the parameters non-finite is reported as
such (`update_finite`), and the loop stops on it.

The state holds only the trainable parameters (all of them, or a PEFT method's: see
`peft/partition.py`); the frozen rest is a separate argument, so gradients and optimizer state
exist for the trainable part alone.

Shape letters: B batch, C micro-batches (chunks of the batch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from jaxtune.finite import all_finite
from jaxtune.peft import partition
from jaxtune.train.objective import Batch, Objective


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # The trainable parameters only.
  opt_state: Any


def _micro_batches(batch: Batch, c: int) -> Batch:
  """[B, ...] -> [C, B/C, ...]; micro-batch i takes rows i, i + C, ... (each device keeps its
  own rows)."""
  return {
    key: x.reshape(x.shape[0] // c, c, *x.shape[1:]).swapaxes(0, 1) for key, x in batch.items()
  }


def _counts(batch: Batch) -> dict[str, jax.Array]:
  """Token counts of the global batch (not a host's part), where the batch has them."""
  counts = {}
  if "segment_ids" in batch:
    counts["tokens"] = jnp.sum(batch["segment_ids"] > 0)  # Real ones, not padding.
  if "weights" in batch:
    counts["supervised_tokens"] = jnp.sum(batch["weights"])
  return counts


def make_train_step(
  objective: Objective,
  optimizer: optax.GradientTransformation,
  rng: jax.Array | None = None,
  *,
  micro_batches: int = 1,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """`(state, frozen params, batch) -> (state, metrics)`. Noise (dropout, NEFTune) is
  `fold_in(rng, step)`, then `fold_in` of the micro-batch. `rng` None: the step takes the key as
  a fourth argument instead of holding it as a constant, so that runs that differ only in their
  seed share one compiled program (`Bound` gives it back the three-argument form)."""

  def train_step(state: TrainState, frozen: Any, batch: Batch, step_key: jax.Array = rng):
    step_rng = jax.random.fold_in(step_key, state.step)
    total = jnp.maximum(objective.normalizer(batch), 1.0)

    def loss_share(trainable, micro, i):
      """A micro-batch's part of the batch's loss: its sums over the batch's normalizer (so the
      gradients come out scaled, with no pass over them to divide)."""
      params = partition.combine(trainable, frozen)
      loss, metrics = objective.loss(params, micro, jax.random.fold_in(step_rng, i))
      return loss / total, {k: v / total for k, v in metrics.items()}

    grad_fn = jax.value_and_grad(loss_share, has_aux=True)
    if micro_batches == 1:
      (loss, metrics), grads = grad_fn(state.params, batch, 0)
    else:

      def accumulate(acc, xs):
        return jax.tree.map(jnp.add, acc, grad_fn(state.params, *xs)), None

      shapes = jax.eval_shape(grad_fn, state.params, batch, 0)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
      xs = (_micro_batches(batch, micro_batches), jnp.arange(micro_batches))
      ((loss, metrics), grads), _ = jax.lax.scan(accumulate, zeros, xs)
    grad_norm = optax.tree.norm(grads)

    def update(state):
      updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      # Checked here, beside the update, so that XLA can fuse the reduction into it.
      return TrainState(state.step + 1, params, opt_state), all_finite(params)

    def skip(state):
      return state.replace(step=state.step + 1), jnp.bool_(True)

    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A branch, not a select of old or new: then the update overwrites the parameters and
    # moments in place, with no copies of the old ones kept for the select.
    # Finite inputs can still make a non-finite update (a learning rate of 1e38 overflows
    # float32): one reduction over the new parameters finds it. The moments need no check: they
    # average finite gradients and their squares, which a finite gradient norm bounds. Such an
    # update has overwritten the old state, so it cannot be skipped; the loop stops on it and no
    # checkpoint holds it (checking before the update would cost a second pass over the optimizer
    # state: 5% of a full fine-tuning step on a CPU).
    new_state, update_finite = jax.lax.cond(finite, update, skip, state)
    return new_state, {
      "loss": loss,
      **metrics,
      "grad_norm": grad_norm,
      "finite": finite & update_finite,
      "update_finite": update_finite,
      **_counts(batch),
    }

  return train_step


@dataclasses.dataclass(frozen=True)
class Bound:
  """A jitted step of `(state, frozen, batch, key)` with its run's key bound: called and lowered
  as a step of `(state, frozen, batch)`. The key stays an input of the program: a compiled
  `lower(...).compile()` is called with `key` as its fourth argument."""

  jitted: Any
  key: jax.Array

  def __call__(self, state: TrainState, frozen: Any, batch: Batch):
    return self.jitted(state, frozen, batch, self.key)

  def lower(self, state: TrainState, frozen: Any, batch: Batch):
    return self.jitted.lower(state, frozen, batch, self.key)


def make_eval_step(
  objective: Objective,
) -> Callable[[Any, Any, Batch], tuple[dict[str, jax.Array], jax.Array]]:
  """`(trainable, frozen, batch) -> (sums of the loss and metrics, normalizer)`; no noise."""

  def eval_step(trainable: Any, frozen: Any, batch: Batch):
    loss, metrics = objective.loss(partition.combine(trainable, frozen), batch, None)
    return {"loss": loss, **metrics}, objective.normalizer(batch)

  return eval_step
