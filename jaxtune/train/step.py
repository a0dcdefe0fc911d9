"""The train step: masked token-mean cross-entropy, one `jax.jit` with explicit shardings.

Shape letters: B batch, T length, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from jaxtune.model.transformer import Transformer


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def masked_xent(logits_btv: jax.Array, targets_bt: jax.Array, weights_bt: jax.Array) -> jax.Array:
  """Mean cross-entropy over the weighted (supervised) tokens of the whole batch."""
  logp_btv = jax.nn.log_softmax(logits_btv.astype(jnp.float32))
  nll_bt = -jnp.take_along_axis(logp_btv, targets_bt[..., None], axis=-1)[..., 0]
  return jnp.sum(nll_bt * weights_bt) / jnp.maximum(jnp.sum(weights_bt), 1.0)


def loss_fn(model: Transformer, params: Any, batch: dict[str, jax.Array], rng: jax.Array | None):
  logits = model.apply(
    {"params": params},
    batch["inputs"],
    segment_ids_bt=batch["segment_ids"],
    deterministic=rng is None,
    rngs=None if rng is None else {"dropout": rng},
  )
  return masked_xent(logits, batch["targets"], batch["weights"])


def make_train_step(
  model: Transformer, optimizer: optax.GradientTransformation, rng: jax.Array
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
  """`(state, batch) -> (state, metrics)`; dropout noise is `fold_in(rng, step)`."""

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    step_rng = jax.random.fold_in(rng, state.step)
    loss, grads = jax.value_and_grad(lambda p: loss_fn(model, p, batch, step_rng))(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return TrainState(state.step + 1, params, opt_state), metrics

  return train_step
