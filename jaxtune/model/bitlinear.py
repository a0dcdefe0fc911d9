"""BitNet projections: 1-bit (Wang et al. 2023) and ternary "b1.58" (Ma et al. 2024) weights with
8-bit activations, trained quantization-aware on full-precision latent weights.

The quantizers are pure functions of float32 arrays returning the *effective* (fake-quantized)
values, which a matmul in the compute dtype then uses:

- `ternary`: `RoundClip(W / m, -1, 1) * m` with `m = max(mean|W|, EPS)` (b1.58). The paper writes
  `W / (mean|W| + eps)`; the clamp is the form of the authors' released training code and of
  transformers' `AutoBitLinear`, whose checkpoints must load with the same logits (the two differ
  only when mean|W| < EPS).
- `binary`: `sign(W - mean W) * mean|W|` (BitNet), `sign(0) = -1` as the paper's `Sign` defines.
- `absmax8`: per-token `round(x * (127 / a)).clip(-128, 127) * (a / 127)`, `a = max(max|x|, EPS)`,
  the max taken over the axes the projection contracts (a token's input vector).

Each is written with one division per scale and no quotient of quotients: transformers' `q / s`
with `s = 127 / a` is what XLA's simplifier rewrites (`q * a / 127`), so its float bits would
depend on the compiler; these forms are computed as written, which a NumPy reference reproduces
bit for bit. Against transformers they differ by at most an ulp of the effective values.

Rounding is half to even (NumPy's, PyTorch's and XLA's `round`), so 0.5 goes to 0 and 1.5 to 2
(then clipped to 1); an all-zero weight or token gives zeros.

Group quantization (BitNet section 2.1): with `groups` = G > 1 the weight's split axis (heads or
mlp, the axis the `model` mesh axis shards) is cut into G equal blocks and each block gets its own
scale; an activation contracted over that axis (the inputs of o and down) gets one absmax per
block. Each device of a `model` axis of G then computes its scales from its own shard, with no
collective. G = 1 is the ungrouped math. This is about the `model` axis (tensor parallelism):
`fsdp` also stores a kernel's input dimension split over `data`, and a scale, a mean over that
whole dimension, then sums the shards' parts with an all-reduce over `data` (a float per group,
the price of quantizing where the weights are stored rather than gathering float32 latents; see
README's BitNet section and `tests/test_bitnet_sharding.py`).

Training uses the straight-through estimator: the forward pass is the quantizer, the backward
pass the identity, so the gradient reaches the latent float weights (and the activations) as if
there were no quantization (`straight_through`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtune.config_model import ModelConfig
from jaxtune.model.layers import dtypes, weight

EPS = 1e-5
ACT_MAX = 127  # 8-bit activations: [-128, 127].
# Logical names of a kernel's split axis (one scale per block of it with groups > 1).
SPLIT_AXES = ("q_heads", "kv_heads", "mlp")


def _blocks(x: jax.Array, axis: int | None, groups: int) -> tuple[jax.Array, tuple[int, ...]]:
  """`x` with `axis` cut into [groups, size / groups] (at `axis`, `axis + 1`) and the axes a
  block's statistic reduces: all but the groups axis (`axis` None: x as is, all axes)."""
  if axis is None:
    return x, tuple(range(x.ndim))
  size = x.shape[axis]
  blocked = x.reshape(*x.shape[:axis], groups, size // groups, *x.shape[axis + 1 :])
  return blocked, tuple(a for a in range(blocked.ndim) if a != axis)


def ternary_parts(
  w: jax.Array, axis: int | None = None, groups: int = 1
) -> tuple[jax.Array, jax.Array]:
  """b1.58's codes `RoundClip(W / m, -1, 1)` (float32, shaped as `w`) and scales `m` [groups]."""
  blocked, reduce = _blocks(w.astype(jnp.float32), axis, groups)
  m = jnp.maximum(jnp.mean(jnp.abs(blocked), axis=reduce, keepdims=True), EPS)
  return jnp.clip(jnp.round(blocked / m), -1, 1).reshape(w.shape), m.reshape(-1)


def scaled(codes: jax.Array, scales: jax.Array, axis: int | None, groups: int) -> jax.Array:
  """`codes` (float32) times one scale of `scales` [groups] per block of `axis`."""
  blocked, _ = _blocks(codes, axis, groups)
  shape = [1] * blocked.ndim
  if axis is not None:
    shape[axis] = groups
  return (blocked * scales.astype(jnp.float32).reshape(shape)).reshape(codes.shape)


def ternary(w: jax.Array, axis: int | None = None, groups: int = 1) -> jax.Array:
  """b1.58 weights: `RoundClip(W / m, -1, 1) * m`, one `m = mean|W|` per block of `axis`."""
  return scaled(*ternary_parts(w, axis, groups), axis, groups)


def binary(w: jax.Array, axis: int | None = None, groups: int = 1) -> jax.Array:
  """1-bit weights: `sign(W - mean W) * mean|W|` (sign(0) = -1), per block of `axis`."""
  blocked, reduce = _blocks(w.astype(jnp.float32), axis, groups)
  alpha = jnp.mean(blocked, axis=reduce, keepdims=True)
  beta = jnp.mean(jnp.abs(blocked), axis=reduce, keepdims=True)
  return (jnp.where(blocked - alpha > 0, 1.0, -1.0) * beta).reshape(w.shape)


def absmax8(
  x: jax.Array, axes: tuple[int, ...], axis: int | None = None, groups: int = 1
) -> jax.Array:
  """Per-token 8-bit activations: the absmax over `axes` (a token's inputs), per block of
  `axis` (one of `axes`) with `groups` > 1."""
  x = x.astype(jnp.float32)
  if axis is None or groups == 1:
    blocked, reduce = x, axes
  else:
    blocked = x.reshape(*x.shape[:axis], groups, x.shape[axis] // groups, *x.shape[axis + 1 :])
    reduce = tuple(a + (a >= axis) for a in axes)  # The groups axis `axis` is kept.
  top = jnp.maximum(jnp.max(jnp.abs(blocked), axis=reduce, keepdims=True), EPS)
  q = jnp.clip(jnp.round(blocked * (ACT_MAX / top)), -ACT_MAX - 1, ACT_MAX)
  return (q * (top / ACT_MAX)).reshape(x.shape)


def straight_through(quantize: Callable[[jax.Array], jax.Array]) -> Callable:
  """`quantize` in the forward pass, the identity in the backward pass (the STE): the cotangent
  passes to the input unchanged, cast to its dtype."""

  @jax.custom_vjp
  def f(x):
    return quantize(x)

  def fwd(x):
    return quantize(x), jnp.zeros((), x.dtype)

  def bwd(like, g):
    return (g.astype(like.dtype),)

  f.defvjp(fwd, bwd)
  return f


WEIGHT_QUANTIZERS: dict[str, Callable[..., jax.Array]] = {"bitnet": binary, "bitnet158": ternary}


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a projection's scales are taken: the kernel's split axis (None: no axis is split), the
  axes of x it contracts, and x's split axis when it contracts the kernel's (o, down)."""

  kernel_axis: int | None
  x_axes: tuple[int, ...]
  x_axis: int | None

  @classmethod
  def of(cls, equation: str, names: tuple[str, ...]) -> Layout:
    x_spec, kernel_spec = equation.split("->")[0].split(",")
    x_axes = tuple(i for i, c in enumerate(x_spec) if c in kernel_spec)
    kernel_axis = next((i for i, n in enumerate(names) if n in SPLIT_AXES), None)
    letter = kernel_spec[kernel_axis] if kernel_axis is not None else ""
    return cls(kernel_axis, x_axes, x_spec.index(letter) if letter in x_spec else None)


def quantize_pair(
  linear: str, equation: str, names: tuple[str, ...], groups: int
) -> tuple[Callable, Callable]:
  """(weight quantizer, activation quantizer) of one projection, both straight-through."""
  layout = Layout.of(equation, names)
  weight = functools.partial(WEIGHT_QUANTIZERS[linear], axis=layout.kernel_axis, groups=groups)
  act = functools.partial(absmax8, axes=layout.x_axes, axis=layout.x_axis, groups=groups)
  return straight_through(weight), straight_through(act)


def sub_norm(x: jax.Array, scale: jax.Array, axes: int, eps: float, groups: int = 1) -> jax.Array:
  """RMSNorm over the last `axes` axes of `x` (HF BitNet's attn_sub_norm over N*H, ffn_sub_norm
  over F), in float32, times `scale`; with `groups` > 1 one RMS per block of the first of those
  axes (the split one: BitNet's group normalization, no collective)."""
  xf = x.astype(jnp.float32)
  axis = x.ndim - axes
  blocked = xf.reshape(*x.shape[:axis], groups, x.shape[axis] // groups, *x.shape[axis + 1 :])
  reduce = tuple(range(axis + 1, blocked.ndim))
  rms = jax.lax.rsqrt(jnp.mean(jnp.square(blocked), axis=reduce, keepdims=True) + eps)
  return (blocked * rms).reshape(x.shape) * scale.astype(jnp.float32)


class SubNorm(nn.Module):
  """The RMSNorm that HF's BitNet places before o_proj and down_proj (`model.sub_norm`), over
  the trailing axes `names` of its input, grouped as the projections' scales are."""

  names: tuple[str, ...]
  shape: tuple[int, ...]
  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    dtype, param_dtype = dtypes(cfg)
    scale = weight(self, "scale", nn.initializers.ones, self.shape, self.names, param_dtype)
    return sub_norm(x, scale, len(self.shape), cfg.norm_eps, cfg.groups).astype(dtype)
