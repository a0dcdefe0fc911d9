"""Optimizers and learning-rate schedules from optax, chosen by name in `TrainConfig`.

Schedules (warmup is linear from 0 over `warmup_steps`):
- `constant`;
- `cosine`: cosine decay to `end_learning_rate`;
- `linear`: linear decay to `end_learning_rate` (LIMA: 1e-5 to 1e-6 with no warmup);
- `rsqrt`: PaLM's reciprocal square root after a linear warmup,
  lr * min(step / warmup, sqrt(warmup / step)) (step counted from 1).

Weight decay leaves norms and biases alone: only kernels and embedding tables (2+ dims per
layer) decay.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxtune.config import TrainConfig


def _warmup(cfg: TrainConfig, after: optax.Schedule) -> optax.Schedule:
  if cfg.warmup_steps == 0:
    return after
  ramp = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
  return optax.join_schedules([ramp, after], [cfg.warmup_steps])


def _rsqrt(cfg: TrainConfig, steps: int) -> optax.Schedule:
  del steps  # The decay does not depend on the run's length.
  warmup = max(cfg.warmup_steps, 1)

  def lr(step):
    step = jnp.maximum(step, 1)
    return cfg.learning_rate * jnp.minimum(step / warmup, jnp.sqrt(warmup / step))

  return lr


_SCHEDULES: dict[str, Callable[[TrainConfig, int], optax.Schedule]] = {
  "constant": lambda cfg, steps: _warmup(cfg, optax.constant_schedule(cfg.learning_rate)),
  "cosine": lambda cfg, steps: _warmup(
    cfg,
    optax.cosine_decay_schedule(
      cfg.learning_rate, max(steps - cfg.warmup_steps, 1), cfg.end_learning_rate / cfg.learning_rate
    ),
  ),
  "linear": lambda cfg, steps: _warmup(
    cfg,
    optax.linear_schedule(
      cfg.learning_rate, cfg.end_learning_rate, max(steps - cfg.warmup_steps, 1)
    ),
  ),
  "rsqrt": _rsqrt,
}


def schedule(cfg: TrainConfig, steps: int) -> optax.Schedule:
  """The learning rate at each step of a run of `steps` steps."""
  return _SCHEDULES[cfg.schedule](cfg, steps)


def decay_mask(params: Any) -> Any:
  """True for weights that decay: kernels and embeddings, not norm scales or biases."""

  def decays(path, _):
    name = path[-1].key
    return name in ("kernel", "embedding")

  return jax.tree_util.tree_map_with_path(decays, params)


def optimizer(cfg: TrainConfig, steps: int) -> optax.GradientTransformation:
  """The configured optimizer, with gradient clipping by global norm first."""
  lr = schedule(cfg, steps)
  if cfg.optimizer == "adamw":
    opt = optax.adamw(
      lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask
    )
  else:  # Adafactor (Shazeer & Stern 2018), PaLM's and Flan's choice; factored second moments.
    opt = optax.adafactor(
      lr, weight_decay_rate=cfg.weight_decay or None, weight_decay_mask=decay_mask
    )
  if cfg.clip_norm > 0:
    opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
  return opt


def state_shardings(
  optimizer: optax.GradientTransformation, params: Any, param_shardings: Any, replicated: Any
) -> Any:
  """The shardings of `optimizer.init(params)`: a moment of a parameter's shape is sharded as the
  parameter is; the rest (step counts, Adafactor's factored moments) is `replicated`. Left to
  XLA, the moments (zeros that depend on no input) would be replicated on every device."""

  def like(moment, param, param_sharding):
    return param_sharding if moment.shape == param.shape else replicated

  return optax.tree_utils.tree_map_params(
    optimizer,
    like,
    jax.eval_shape(optimizer.init, params),
    params,
    param_shardings,
    transform_non_params=lambda _: replicated,
  )
