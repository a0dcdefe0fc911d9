"""Building blocks: logical constraints, projections, norms, MLPs, embeddings and dropout.

Shape letters: B batch, T length, D model dim, F mlp dim, V vocab.
Weights are created in `param_dtype` and computed in `dtype`; norms compute in float32.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtune.config import ModelConfig, PeftConfig
from jaxtune.model.matmul import matmul
from jaxtune.peft import lora as lora_lib
from jaxtune.sharding import LOGICAL_NAMES

INIT_STDDEV = 0.02


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
  """Annotates an activation with logical axis names (a no-op outside a mesh)."""
  unknown = set(names) - LOGICAL_NAMES - {None}
  if unknown:  # Unknown names would silently replicate.
    raise ValueError(f"unknown logical axis names {sorted(unknown)}")
  return nn.with_logical_constraint(x, names)


def weight(
  module: nn.Module, name: str, init: Any, shape: tuple[int, ...], names: tuple[str, ...], dtype
) -> jax.Array:
  """The parameter `name` of `module`, its axes carrying the logical `names`, laid out for compute
  as the rules say: where `fsdp` stores it split further (`sharding.weight_spec`), this gathers
  the extra split at use, as FSDP does, instead of leaving XLA to reshard the activations (LoRA's
  adapters left to XLA made a LoRA step on 4x2 ~25% slower)."""
  value = module.param(name, nn.with_logical_partitioning(init, names), shape, dtype)
  return constrain(value, names)


def dtypes(config: ModelConfig) -> tuple[Any, Any]:
  """(compute dtype, parameter dtype) of a model."""
  return jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)


def dropout(x: jax.Array, rate: jax.Array | float, rng: jax.Array) -> jax.Array:
  """Inverted dropout whose `rate` may be traced (a per-layer rate under `nn.scan`)."""
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Einsum(nn.Module):
  """`einsum(equation, x, kernel) (+ bias) (+ LoRA update)`; the kernel's axes carry logical names.

  The bias, if any, spans the kernel's last `bias_axes` axes (the output axes). With `lora`, the
  projection also holds LoRA's A and B (see `peft/lora.py`), named like the kernel's axes.
  """

  equation: str
  shape: tuple[int, ...]
  names: tuple[str, ...]
  use_bias: bool
  bias_axes: int
  config: ModelConfig
  lora: lora_lib.Lora | None = None
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, adapter_ids_b: jax.Array | None = None) -> jax.Array:
    dtype, param_dtype = dtypes(self.config)
    # The kernel is read as stored, not through `weight`: inside the layer scan a constrained
    # kernel is a new value, which the backward would keep per layer (a second copy of the
    # stacked kernels: +2.1 GB a device for llama2-7b on 8). XLA gathers a kernel that `fsdp`
    # stores split further (a head or vocabulary axis the rules replicate) where it is used.
    init = nn.with_logical_partitioning(nn.initializers.normal(INIT_STDDEV), self.names)
    kernel = self.param("kernel", init, self.shape, param_dtype)
    x = x.astype(dtype)
    y = matmul(self.equation, x, kernel.astype(dtype))
    if self.use_bias:
      bias_names, bias_shape = self.names[-self.bias_axes :], self.shape[-self.bias_axes :]
      bias = weight(self, "bias", nn.initializers.zeros, bias_shape, bias_names, param_dtype)
      y = y + bias.astype(dtype)
    if self.lora is not None:
      y = y + self._lora(x, adapter_ids_b)
    return y

  def _lora(self, x: jax.Array, adapter_ids_b: jax.Array | None) -> jax.Array:
    lora = self.lora
    eqs = lora_lib.equations(self.equation, bank=bool(lora.adapters))
    i, r = eqs.inputs, lora.rank
    bank_shape, bank_names = ((lora.adapters,), ("adapters",)) if lora.adapters else ((), ())
    a_init = functools.partial(lora_lib.init_a, inputs=i)
    a = weight(
      self,
      lora_lib.A,
      a_init,
      (*bank_shape, *self.shape[:i], r),
      (*bank_names, *self.names[:i], "lora_rank"),
      dtypes(self.config)[1],
    )
    b = weight(
      self,
      lora_lib.B,
      nn.initializers.zeros,
      (*bank_shape, r, *self.shape[i:]),
      (*bank_names, "lora_rank", *self.names[i:]),
      dtypes(self.config)[1],
    )
    rng = None if self.deterministic or lora.dropout == 0 else self.make_rng("dropout")
    return lora_lib.update(x, a, b, eqs, lora, adapter_ids_b, rng)


class Norm(nn.Module):
  """RMSNorm or LayerNorm over the last axis, computed in float32."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_btd: jax.Array) -> jax.Array:
    cfg = self.config
    dtype, param_dtype = dtypes(cfg)
    scale = weight(self, "scale", nn.initializers.ones, (cfg.dim,), ("embed",), param_dtype)
    x = x_btd.astype(jnp.float32)
    if cfg.norm == "layernorm":
      x = x - jnp.mean(x, axis=-1, keepdims=True)
    y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + cfg.norm_eps)
    y = y * scale.astype(jnp.float32)
    if cfg.norm == "layernorm" and cfg.use_bias:
      bias = weight(self, "bias", nn.initializers.zeros, (cfg.dim,), ("embed",), param_dtype)
      y = y + bias.astype(jnp.float32)
    return y.astype(dtype)


_ACTIVATIONS = {
  "swiglu": jax.nn.silu,
  "geglu": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu": lambda x: jax.nn.gelu(x, approximate=True),
}


class Mlp(nn.Module):
  """SwiGLU / GeGLU (`down(act(gate x) * up x)`) or plain GELU (`down(gelu(up x))`)."""

  config: ModelConfig
  peft: PeftConfig = PeftConfig()
  adapters: int = 0  # LoRA bank size (0: one adapter).
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_btd: jax.Array, adapter_ids_b: jax.Array | None = None) -> jax.Array:
    cfg = self.config
    d, f = cfg.dim, cfg.mlp_dim

    def proj(name, eqn, shape, names):
      lora = lora_lib.spec(self.peft, name, self.adapters)
      module = Einsum(eqn, shape, names, cfg.use_bias, 1, cfg, lora, self.deterministic, name=name)
      return lambda x: module(x, adapter_ids_b)

    act = _ACTIVATIONS[cfg.mlp]
    h_btf = act(
      proj("up" if cfg.mlp == "gelu" else "gate", "btd,df->btf", (d, f), ("embed", "mlp"))(x_btd)
    )
    if cfg.mlp != "gelu":
      h_btf = h_btf * proj("up", "btd,df->btf", (d, f), ("embed", "mlp"))(x_btd)
    h_btf = constrain(h_btf, ("act_batch", "act_seq", "act_mlp"))
    return proj("down", "btf,fd->btd", (f, d), ("mlp", "embed"))(h_btf)


class Embed(nn.Module):
  """Token embedding table [V, D]; `attend` gives logits against it (tied output layer)."""

  num: int
  config: ModelConfig
  names: tuple[str, str] = ("vocab", "embed")

  def setup(self) -> None:
    _, param_dtype = dtypes(self.config)
    init = nn.initializers.normal(INIT_STDDEV)
    shape = (self.num, self.config.dim)
    self.embedding = weight(self, "embedding", init, shape, self.names, param_dtype)

  def __call__(self, ids_bt: jax.Array) -> jax.Array:
    dtype, _ = dtypes(self.config)
    return jnp.take(self.embedding, ids_bt, axis=0).astype(dtype)

  def attend(self, x_btd: jax.Array) -> jax.Array:
    dtype, _ = dtypes(self.config)
    return jnp.einsum("btd,vd->btv", x_btd.astype(dtype), self.embedding.astype(dtype))
