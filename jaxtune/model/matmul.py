"""Projections computed as 2-D matmuls.

A projection `einsum("btd,dnh->btnh", x, kernel)` (x's leading axes, then the axes it shares with
the kernel; the kernel's shared axes, then its own) is the matmul [B*T, D] @ [D, N*H], reshaped
back. The product is the same; what changes is its gradient: XLA on CPU compiles the kernel's
gradient of a 2-D matmul ([B*T, D]^T @ [B*T, N*H]) as it is, but puts transposing copies of the
incoming gradient around that of the N-D einsum (which contracts both B and T). On the Llama
model of `benchmarks/train_vs_peers.py`, on one CPU core, that was ~8% of a full fine-tuning
step, and 15% of a LoRA step more for the products of LoRA's A and B.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def matmul(equation: str, x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`einsum(equation, x, kernel)` as one 2-D matmul; `equation` must have the form above."""
  inputs, out = equation.split("->")
  x_axes, kernel_axes = inputs.split(",")
  shared = "".join(c for c in kernel_axes if c in x_axes)
  lead = x_axes[: len(x_axes) - len(shared)]
  if (
    x_axes != lead + shared
    or not kernel_axes.startswith(shared)
    or out != lead + kernel_axes[len(shared) :]
  ):
    raise ValueError(
      f"einsum {equation!r} is not a projection: x must be its leading axes then the "
      "kernel's first axes, and the output its leading axes then the kernel's others"
    )
  lead_shape = x.shape[: len(lead)]
  inner = math.prod(x.shape[len(lead) :])
  x_2d = x.reshape(math.prod(lead_shape), inner)
  y_2d = jnp.dot(x_2d, kernel.reshape(inner, math.prod(kernel.shape[len(shared) :])))
  return y_2d.reshape(*lead_shape, *kernel.shape[len(shared) :])
