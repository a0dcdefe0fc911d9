"""The model's projections: a kernel product chosen by `model.linear` from a table, a bias, and
a LoRA update where the adapters name the projection.

Shape letters are each projection's own, in its einsum (see `attention.py`, `mlp.py`).

Every projection of the decoder (q, k, v, o, gate, up, down) is a `Linear` holding the kernel
(and bias) of one `Projection`. What product the kernel computes is `KERNELS[config.linear]`: a
function of the module, the projection and the input that creates the kernel's parameters on the
module and returns the product. A new kind of layer (a quantized one) is one function and one
line in that table; LoRA, biases and sharding come with it unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import flax.linen as nn
import jax

from jaxtune.config_model import ModelConfig
from jaxtune.model import bitlinear as bitlinear_lib
from jaxtune.model import lora as lora_lib
from jaxtune.model import packed
from jaxtune.model.adapters import LORA_A, LORA_B, Lora
from jaxtune.model.layers import INIT_STDDEV, dtypes, weight
from jaxtune.model.matmul import matmul


@dataclasses.dataclass(frozen=True)
class Projection:
  """`einsum(equation, x, kernel)`, the kernel's axes carrying the logical `names`; a bias, if
  `bias_axes` > 0, spans the kernel's last `bias_axes` axes (the output axes)."""

  equation: str
  shape: tuple[int, ...]
  names: tuple[str, ...]
  bias_axes: int = 0


def dense(module: nn.Module, projection: Projection, x: jax.Array) -> jax.Array:
  """The full-precision product with a `kernel` in the parameter dtype, computed in `dtype`.

  The kernel is read as stored, not through `weight`: inside the layer scan a constrained kernel
  is a new value, which the backward would keep per layer (a second copy of the stacked kernels:
  +2.1 GB a device for llama2-7b on 8). XLA gathers a kernel that `fsdp` stores split further
  (a head or vocabulary axis the rules replicate) where it is used.
  """
  dtype, param_dtype = dtypes(module.config)
  init = nn.with_logical_partitioning(nn.initializers.normal(INIT_STDDEV), projection.names)
  kernel = module.param("kernel", init, projection.shape, param_dtype)
  return matmul(projection.equation, x.astype(dtype), kernel.astype(dtype))


def bitlinear(linear: str, module: nn.Module, projection: Projection, x: jax.Array) -> jax.Array:
  """BitNet's product (`bitlinear.py`): the float `kernel` (the latent weights, initialized and
  stored as `dense`'s) and the input fake-quantized, straight-through, then multiplied in
  `dtype`."""
  cfg = module.config
  dtype, param_dtype = dtypes(cfg)
  init = nn.with_logical_partitioning(nn.initializers.normal(INIT_STDDEV), projection.names)
  kernel = module.param("kernel", init, projection.shape, param_dtype)
  quantize_w, quantize_x = bitlinear_lib.quantize_pair(
    linear, projection.equation, projection.names, cfg.groups
  )
  return matmul(projection.equation, quantize_x(x).astype(dtype), quantize_w(kernel).astype(dtype))


# model.linear -> (module, projection, x) -> the kernel's product.
KERNELS: dict[str, Callable[[nn.Module, Projection, jax.Array], jax.Array]] = {
  "dense": dense,
  "bitnet": functools.partial(bitlinear, "bitnet"),
  "bitnet158": functools.partial(bitlinear, "bitnet158"),
  "bitnet158_packed": packed.packed_ternary,
}


class Linear(nn.Module):
  """One projection: `KERNELS[config.linear]` (+ bias) (+ LoRA update, with `lora`)."""

  projection: Projection
  config: ModelConfig
  lora: Lora | None = None
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, adapter_ids_b: jax.Array | None = None) -> jax.Array:
    p = self.projection
    dtype, param_dtype = dtypes(self.config)
    y = KERNELS[self.config.linear](self, p, x)
    if p.bias_axes:
      names, shape = p.names[-p.bias_axes :], p.shape[-p.bias_axes :]
      y = y + weight(self, "bias", nn.initializers.zeros, shape, names, param_dtype).astype(dtype)
    if self.lora is not None:
      y = y + self._lora(x.astype(dtype), adapter_ids_b)
    return y

  def _lora(self, x: jax.Array, adapter_ids_b: jax.Array | None) -> jax.Array:
    p, lora = self.projection, self.lora
    eqs = lora_lib.equations(p.equation, bank=bool(lora.bank))
    i, r = eqs.inputs, lora.rank
    bank_shape, bank_names = ((lora.bank,), ("adapters",)) if lora.bank else ((), ())
    param_dtype = dtypes(self.config)[1]
    a_init = functools.partial(lora_lib.init_a, inputs=i)
    a_shape, a_names = (*bank_shape, *p.shape[:i], r), (*bank_names, *p.names[:i], "lora_rank")
    b_shape, b_names = (*bank_shape, r, *p.shape[i:]), (*bank_names, "lora_rank", *p.names[i:])
    a = weight(self, LORA_A, a_init, a_shape, a_names, param_dtype)
    b = weight(self, LORA_B, nn.initializers.zeros, b_shape, b_names, param_dtype)
    rng = None if self.deterministic or lora.dropout == 0 else self.make_rng("dropout")
    return lora_lib.update(x, a, b, eqs, lora, adapter_ids_b, rng)
