"""BitNet's quantizers against a NumPy reference (bit for bit, ties and all-zero blocks
included), the straight-through gradient, and the projections in a model.

The weights are multiples of 1/16 (or exact sums), so every mean is exact in float32 and NumPy's
and XLA's summation orders cannot differ: equality is bit for bit.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.config_model import ModelConfig
from jaxtune.errors import ConfigError
from jaxtune.model import bitlinear

EPS = np.float32(1e-5)


# NumPy references, one block at a time (explicit slices, no reshapes).


def _blocks(shape, axis, groups):
  """Index tuples of the blocks of `axis` cut into `groups`."""
  if axis is None:
    return [tuple(slice(None) for _ in shape)]
  size = shape[axis] // groups
  return [
    tuple(slice(g * size, (g + 1) * size) if a == axis else slice(None) for a in range(len(shape)))
    for g in range(groups)
  ]


def np_ternary(w, axis=None, groups=1):
  out = np.empty_like(w)
  for block in _blocks(w.shape, axis, groups):
    m = max(np.mean(np.abs(w[block]), dtype=np.float32), EPS)
    out[block] = np.clip(np.round(w[block] / m), -1, 1) * m
  return out


def np_binary(w, axis=None, groups=1):
  out = np.empty_like(w)
  for block in _blocks(w.shape, axis, groups):
    alpha = np.mean(w[block], dtype=np.float32)
    beta = np.mean(np.abs(w[block]), dtype=np.float32)
    out[block] = np.where(w[block] - alpha > 0, np.float32(1), np.float32(-1)) * beta
  return out


def np_absmax8(x_btd, groups=1):
  """Per token, per block of the last axis."""
  out = np.empty_like(x_btd)
  for block in _blocks(x_btd.shape, 2, groups):
    top = np.maximum(np.max(np.abs(x_btd[block]), axis=-1, keepdims=True), EPS)
    q = np.clip(np.round(x_btd[block] * (np.float32(127) / top)), -128, 127)
    out[block] = q * (top / np.float32(127))
  return out


def _dyadic(rng, shape):
  return (rng.integers(-24, 25, shape) / 16).astype(np.float32)


def _bits(x):
  return np.asarray(x).view(np.uint32)


TIES = np.array([0.5, -0.5, 1.5, -1.5, 0.25, -0.25, 1.75, -1.75], np.float32)  # mean|w| = 1.


@pytest.mark.parametrize("groups", [1, 4])
def test_weight_quantizers_equal_numpy_bit_for_bit(groups):
  rng = np.random.default_rng(0)
  w_dnh = _dyadic(rng, (8, 4, 8))
  w_dnh[:, 0, :] = TIES  # Ties at +-0.5 (to 0) and +-1.5 (to 2, clipped to 1).
  w_dnh[:, 1, :] = 0.0  # An all-zero block (groups 4).
  w_dnh[:, 3, :] = np.float32(0.25)  # Every weight equal to the block's mean (binary: -1).
  for quantize, reference in ((bitlinear.ternary, np_ternary), (bitlinear.binary, np_binary)):
    got = quantize(jnp.asarray(w_dnh), axis=1, groups=groups)
    np.testing.assert_array_equal(_bits(got), _bits(reference(w_dnh, 1, groups)))
  np.testing.assert_array_equal(
    _bits(bitlinear.ternary(jnp.asarray(TIES))), _bits(np.float32([0, -0.0, 1, -1, 0, -0.0, 1, -1]))
  )
  np.testing.assert_array_equal(bitlinear.ternary(jnp.zeros((4, 4))), np.zeros((4, 4)))
  np.testing.assert_array_equal(bitlinear.binary(jnp.zeros((4, 4))), np.zeros((4, 4)))


@pytest.mark.parametrize("groups", [1, 2])
def test_activation_quantizer_equals_numpy_bit_for_bit(groups):
  rng = np.random.default_rng(1)
  x_btd = rng.normal(size=(2, 5, 8)).astype(np.float32)
  x_btd[0, 0] = [127, 0.5, -0.5, 1.5, -2.5, 126.5, 0, 3]  # Scale 1: ties round to even.
  x_btd[0, 1] = 0.0  # An all-zero token.
  x_btd[1, 0, :4] = 0.0  # An all-zero block (groups 2).
  got = bitlinear.absmax8(
    jnp.asarray(x_btd), axes=(2,), axis=2 if groups > 1 else None, groups=groups
  )
  np.testing.assert_array_equal(_bits(got), _bits(np_absmax8(x_btd, groups)))
  if groups == 1:
    np.testing.assert_array_equal(np.asarray(got)[0, 0], [127, 0, 0, 2, -2, 126, 0, 3])


def test_ternary_takes_three_values_times_the_scale():
  w_dnh = jax.random.normal(jax.random.key(0), (16, 4, 8)) * 0.02
  for groups in (1, 4):
    q_dnh = np.asarray(bitlinear.ternary(w_dnh, axis=1, groups=groups))
    for block in _blocks(q_dnh.shape, 1, groups):
      scale = np.mean(np.abs(np.asarray(w_dnh)[block]))
      units = np.unique(np.round(q_dnh[block] / scale, 5))
      assert set(units) <= {-1.0, 0.0, 1.0} and len(units) == 3


def test_straight_through_gradient_is_the_identity():
  w = jax.random.normal(jax.random.key(1), (8, 16))
  cotangent = jax.random.normal(jax.random.key(2), (8, 16))
  for quantize in (bitlinear.ternary, bitlinear.binary):
    ste = bitlinear.straight_through(quantize)
    grad = jax.grad(lambda w, ste=ste: jnp.sum(ste(w) * cotangent))(w)
    np.testing.assert_array_equal(grad, cotangent)
    np.testing.assert_array_equal(ste(w), quantize(w))
  # Through a projection: the latent kernel's gradient is that of the product at the quantized
  # weights and activations.
  x_btd = jax.random.normal(jax.random.key(3), (2, 3, 8))
  quantize_w, quantize_x = bitlinear.quantize_pair("bitnet158", "btd,df->btf", ("embed", "mlp"), 1)
  wq, xq = bitlinear.ternary(w), bitlinear.absmax8(x_btd, axes=(2,))
  got = jax.grad(lambda w: jnp.sum(jnp.einsum("btd,df->btf", quantize_x(x_btd), quantize_w(w))))(w)
  want = jax.grad(lambda v: jnp.sum(jnp.einsum("btd,df->btf", xq, v)))(wq)
  np.testing.assert_array_equal(got, want)


def test_groups_must_divide_the_split_axes():
  cfg = ModelConfig(num_heads=4, num_kv_heads=2, mlp_dim=64, linear="bitnet158", bitnet_groups=4)
  with pytest.raises(ConfigError, match="bitnet_groups=4 does not divide model.num_kv_heads=2"):
    cfg.validate()
