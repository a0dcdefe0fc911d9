"""Packed ternary projections (`model.linear=bitnet158_packed`): b1.58 weights stored as 2 bits
each with their scales, for inference.

A projection's codes in {-1, 0, 1} are stored as Hugging Face's packed BitNet weights are, so its
checkpoints are read and written as they are: `packed` is uint8 [O / 4, I] for the nn.Linear view
[O, I] of the kernel (O = the product of the kernel's output axes, I of its input axes); byte r
holds rows r, r + O/4, r + 2 O/4, r + 3 O/4 (the quarters of O) as `value + 1` in bits 0-1, 2-3,
4-5, 6-7. `scale` [groups] holds the scales of the blocks of the kernel's split axis (as
`bitlinear.ternary_parts` computes them); the effective kernel is `codes * scale`, exactly what the
QAT model's fake quantization computes from its latent weights.

The packed weights are replicated: at 2 bits a weight, a device's copy of all of them is 1/16 of
the float32 weights; each device unpacks what it uses.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.model import bitlinear
from jaxtune.model.layers import dtypes
from jaxtune.model.matmul import matmul

VALUES_PER_BYTE = 4


def pack(codes_oi: np.ndarray) -> np.ndarray:
  """Codes [O, I] in {-1, 0, 1} -> uint8 [O / 4, I] (quarters of O, 2 bits each)."""
  o = codes_oi.shape[0]
  if o % VALUES_PER_BYTE:
    raise ValueError(f"cannot pack {o} rows: not a multiple of {VALUES_PER_BYTE}")
  unsigned = (np.asarray(codes_oi) + 1).astype(np.uint8)
  quarters = np.split(unsigned, VALUES_PER_BYTE, axis=0)
  return np.bitwise_or.reduce([q << (2 * k) for k, q in enumerate(quarters)]).astype(np.uint8)


def unpack(packed: jax.Array) -> jax.Array:
  """uint8 [O / 4, I] -> codes [O, I] as float32 in {-1, 0, 1}."""
  quarters = [(packed >> (2 * k)) & 3 for k in range(VALUES_PER_BYTE)]
  return jnp.concatenate(quarters, axis=0).astype(jnp.float32) - 1.0


def rows(kernel: np.ndarray, inputs: int) -> np.ndarray:
  """A kernel [input axes..., output axes...] as nn.Linear's [O, I]."""
  i = math.prod(kernel.shape[:inputs])
  return np.asarray(kernel).reshape(i, -1).T


def kernel_of(rows_oi: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """The inverse of `rows`: [O, I] -> the kernel of `shape`."""
  return rows_oi.T.reshape(shape)


def packed_ternary(module: nn.Module, projection: Any, x: jax.Array) -> jax.Array:
  """The product with the effective kernel `unpack(packed) * scale` and 8-bit activations."""
  cfg, p = module.config, projection
  dtype, _ = dtypes(cfg)
  layout = bitlinear.Layout.of(p.equation, p.names)
  inputs = len(layout.x_axes)  # The kernel's input axes: those x contracts.
  i = math.prod(p.shape[:inputs])
  o = math.prod(p.shape[inputs:])
  codes_init = lambda key, shape, dtype: jnp.full(shape, 0b01010101, dtype)  # noqa: E731 All 0.
  packed = module.param(
    "packed", nn.with_logical_partitioning(codes_init, (None, None)), (o // 4, i), jnp.uint8
  )
  init = nn.with_logical_partitioning(nn.initializers.ones, (None,))
  scale = module.param("scale", init, (cfg.groups,), jnp.float32)
  codes = kernel_of(unpack(packed), p.shape)
  kernel = bitlinear.scaled(codes, scale, layout.kernel_axis, cfg.groups)
  x_q = bitlinear.absmax8(x, axes=layout.x_axes, axis=layout.x_axis, groups=cfg.groups)
  return matmul(p.equation, x_q.astype(dtype), kernel.astype(dtype))
