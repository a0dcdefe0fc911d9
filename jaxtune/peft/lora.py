"""LoRA (Hu et al. 2021): a frozen projection W plus a trainable low-rank update `(alpha / r) A B`.

Shape letters: R rank, M adapters in a bank, L layers; the others are the projection's own (see
`model/layers.py`). Every projection here is an einsum whose kernel axes are its input axes then
its output axes (q: [D, N, H], o: [N, H, D], up: [D, F], ...), so A is [input axes..., R] and B is
[R, output axes...], each carrying its kernel's logical axis names (the adapters are sharded like
the weights they adapt; R is replicated).

A starts like PEFT's (uniform, bound 1 / sqrt(fan_in)) and B at zero, so at initialization the
model is exactly the base model. Dropout, when training, applies to the input of A only.

A bank of M adapters (`Lora.adapters = M`) stacks them on a leading [M] axis; each row of a batch
then uses the adapter its `adapter_ids` entry names (serving many fine-tunes in one batch).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxtune.config import PeftConfig
from jaxtune.model.matmul import matmul
from jaxtune.peft import partition

A, B = partition.LORA_A, partition.LORA_B


@dataclasses.dataclass(frozen=True)
class Lora:
  """The LoRA update of one projection."""

  rank: int
  scale: float  # alpha / rank.
  dropout: float
  adapters: int = 0  # 0: one adapter; M > 0: a bank of M, chosen per row.


def spec(peft: PeftConfig, name: str, adapters: int = 0) -> Lora | None:
  """The LoRA update of the projection called `name`, or None if it has none."""
  if peft.method != "lora" or name not in peft.lora_targets:
    return None
  return Lora(peft.lora_rank, peft.lora_scale, peft.lora_dropout, adapters)


@dataclasses.dataclass(frozen=True)
class Equations:
  """The einsums of `x A` and `(x A) B` for a projection `einsum(equation, x, kernel)`."""

  down: str  # x, A -> [batch axes..., R]
  up: str  # [batch axes..., R], B -> y
  inputs: int  # Number of kernel axes contracted with x.


def equations(equation: str, bank: bool) -> Equations:
  """Splits a projection's einsum (e.g. "btd,dnh->btnh") into the two LoRA einsums.

  With `bank`, A and B carry a leading row axis 'b' (gathered per row of the batch).
  """
  inputs, out = equation.split("->")
  x, kernel = inputs.split(",")
  if "r" in equation or not x.startswith("b"):
    raise ValueError(f"cannot add LoRA to einsum {equation!r}")
  contracted = "".join(c for c in kernel if c in x)
  if kernel[: len(contracted)] != contracted:
    raise ValueError(f"einsum {equation!r}: the kernel's input axes must come first")
  produced = kernel[len(contracted) :]
  rows = "b" if bank else ""
  batch = "".join(c for c in x if c not in kernel)
  return Equations(
    f"{x},{rows}{contracted}r->{batch}r", f"{batch}r,{rows}r{produced}->{out}", len(contracted)
  )


def init_a(rng: jax.Array, shape: tuple[int, ...], dtype: Any, inputs: int) -> jax.Array:
  """PEFT's default for A: uniform in +-1/sqrt(fan_in); fan_in = product of the input axes."""
  fan_in = int(np.prod(shape[-1 - inputs : -1]))
  bound = 1.0 / np.sqrt(fan_in)
  return jax.random.uniform(rng, shape, jnp.float32, -bound, bound).astype(dtype)


def update(
  x: jax.Array,
  a: jax.Array,
  b: jax.Array,
  eqs: Equations,
  lora: Lora,
  adapter_ids_b: jax.Array | None,
  dropout_rng: jax.Array | None,
) -> jax.Array:
  """`scale * (dropout(x) A) B`, with A and B gathered per row for a bank."""
  if lora.adapters:
    if adapter_ids_b is None:
      raise ValueError(f"a bank of {lora.adapters} LoRA adapters needs adapter_ids")
    a, b = a[adapter_ids_b], b[adapter_ids_b]
  if dropout_rng is not None and lora.dropout > 0:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - lora.dropout, x.shape)
    x = jnp.where(keep, x / (1.0 - lora.dropout), 0).astype(x.dtype)
  # A bank's A and B differ per row: batched einsums. One adapter's are projections.
  product = jnp.einsum if lora.adapters else matmul
  h = product(eqs.down, x, a.astype(x.dtype))
  return product(eqs.up, h, b.astype(x.dtype)) * jnp.asarray(lora.scale, x.dtype)


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
    if path[-1] in (A, B):
      continue
    if path[-1] == "kernel" and path[:-1] + (A,) in flat:
      a, b = flat[path[:-1] + (A,)], flat[path[:-1] + (B,)]
      delta = _delta(a, b, value.shape)
      value = (value.astype(jnp.float32) + sign * scale * delta).astype(value.dtype)
    out[path] = value
  return traverse_util.unflatten_dict(out)


def merge(params: Any, peft: PeftConfig) -> Any:
  """Base params with every LoRA update folded into its kernel (`W + scale A B`) and the
  adapters removed: the plain model that computes what the adapted one does."""
  return _fold(params, peft.lora_scale, 1.0)


def unmerge(merged: Any, adapters: Any, peft: PeftConfig) -> Any:
  """Inverse of `merge`: the base kernels back (`W - scale A B`), and the adapters with them.

  `adapters` is the tree of LoRA parameters (the trainable part of `partition.split`).
  """
  combined = partition.combine(adapters, merged)
  unfolded = _fold(combined, peft.lora_scale, -1.0)
  return partition.combine(adapters, unfolded)
