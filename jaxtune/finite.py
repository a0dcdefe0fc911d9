"""Whether a tree of arrays is finite, in one reduction: the train step's check of an update (a
learning rate can overflow it) and the checkpoints' guard (never save or load non-finite values)
share it."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def all_finite(tree: Any) -> jax.Array:
  """Whether every floating-point value of `tree` is finite: one reduction."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves])) if leaves else jnp.bool_(True)
