"""LoRA (Hu et al. 2021): the trainable low-rank update `(alpha / r) A B` beside a projection W.

Shape letters: R rank, M adapters in a bank; the others are the projection's own (see
`model/linear.py`). Every projection is an einsum whose kernel axes are its input axes then its
output axes (q: [D, N, H], o: [N, H, D], up: [D, F], ...), so A is [input axes..., R] and B is
[R, output axes...], each carrying its kernel's logical axis names (the adapters are sharded like
the weights they adapt; R is replicated).

A starts like PEFT's (uniform, bound 1 / sqrt(fan_in)) and B at zero, so at initialization the
model is exactly the base model. Dropout, when training, applies to the input of A only.

A bank of M adapters (`Lora.bank = M`) stacks them on a leading [M] axis; each row of a batch
then uses the adapter its `adapter_ids` entry names (serving many fine-tunes in one batch).
Folding the update into the kernel (merge, unmerge) is an operation on a parameter tree, in
`peft/lora.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.model.adapters import Lora
from jaxtune.model.matmul import matmul


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
  if lora.bank:
    if adapter_ids_b is None:
      raise ValueError(f"a bank of {lora.bank} LoRA adapters needs adapter_ids")
    a, b = a[adapter_ids_b], b[adapter_ids_b]
  if dropout_rng is not None and lora.dropout > 0:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - lora.dropout, x.shape)
    x = jnp.where(keep, x / (1.0 - lora.dropout), 0).astype(x.dtype)
  # A bank's A and B differ per row: batched einsums. One adapter's are projections.
  product = jnp.einsum if lora.bank else matmul
  h = product(eqs.down, x, a.astype(x.dtype))
  return product(eqs.up, h, b.astype(x.dtype)) * jnp.asarray(lora.scale, x.dtype)
