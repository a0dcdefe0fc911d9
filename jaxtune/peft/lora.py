"""LoRA on a parameter tree: fold the updates into their kernels (`W + scale A B`) and back.

The update itself, as the model computes it, is in `model/lora.py`; here the adapters are
arrays `lora_a` [..., input axes, R] and `lora_b` [..., R, output axes] beside each adapted
`kernel`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxtune.model.adapters import LORA_A, LORA_B
from jaxtune.peft import partition


def _delta(a: jax.Array, b: jax.Array, kernel_shape: tuple[int, ...]) -> jax.Array:
  """A B as a kernel: a [..., in axes, R], b [..., R, out axes] -> kernel_shape (float32)."""
  rank = a.shape[-1]
  lead = kernel_shape[: a.ndim - 1 - (len(kernel_shape) - (b.ndim - 1))]
  a2 = a.reshape(*lead, -1, rank).astype(jnp.float32)
  b2 = b.reshape(*lead, rank, -1).astype(jnp.float32)
  return jnp.matmul(a2, b2).reshape(kernel_shape)


def _fold(params: Any, scale: float, sign: float) -> Any:
  flat = traverse_util.flatten_dict(params)
  out = {}
  for path, value in flat.items():
    if path[-1] in (LORA_A, LORA_B):
      continue
    if path[-1] == "kernel" and path[:-1] + (LORA_A,) in flat:
      a, b = flat[path[:-1] + (LORA_A,)], flat[path[:-1] + (LORA_B,)]
      delta = _delta(a, b, value.shape)
      value = (value.astype(jnp.float32) + sign * scale * delta).astype(value.dtype)
    out[path] = value
  return traverse_util.unflatten_dict(out)


def merge(params: Any, scale: float) -> Any:
  """Base params with every LoRA update folded into its kernel (`W + scale A B`) and the
  adapters removed: the plain model that computes what the adapted one does."""
  return _fold(params, scale, 1.0)


def unmerge(merged: Any, adapters: Any, scale: float) -> Any:
  """Inverse of `merge`: the base kernels back (`W - scale A B`), and the adapters with them.

  `adapters` is the tree of LoRA parameters (the trainable part of `partition.split`).
  """
  combined = partition.combine(adapters, merged)
  unfolded = _fold(combined, scale, -1.0)
  return partition.combine(adapters, unfolded)
