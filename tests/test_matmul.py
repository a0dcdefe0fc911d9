"""Projections as 2-D matmuls against numpy's einsum, values and kernel gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.model.matmul import matmul

PROJECTIONS = {  # The model's projection equations (attention q/k/v and o, MLP, LoRA's A).
  "btd,dnh->btnh": ((2, 3, 4), (4, 2, 5)),
  "btnh,nhd->btd": ((2, 3, 2, 5), (2, 5, 4)),
  "btd,df->btf": ((2, 3, 4), (4, 6)),
  "btnh,nhr->btr": ((2, 3, 2, 5), (2, 5, 3)),
}


@pytest.mark.parametrize("equation", PROJECTIONS)
def test_matmul_equals_einsum(equation):
  x_shape, kernel_shape = PROJECTIONS[equation]
  rng = np.random.default_rng(0)
  x = rng.standard_normal(x_shape).astype(np.float32)
  kernel = rng.standard_normal(kernel_shape).astype(np.float32)
  np.testing.assert_allclose(
    np.asarray(matmul(equation, jnp.asarray(x), jnp.asarray(kernel))),
    np.einsum(equation, x, kernel),
    rtol=1e-5,
    atol=1e-5,
  )
  # The kernel's gradient of sum(y * w) is einsum(x, w) over the leading axes.
  w = rng.standard_normal(np.einsum(equation, x, kernel).shape).astype(np.float32)
  grad = jax.grad(lambda k: jnp.sum(matmul(equation, jnp.asarray(x), k) * w))(jnp.asarray(kernel))
  inputs, out = equation.split("->")
  x_axes, kernel_axes = inputs.split(",")
  expected = np.einsum(f"{x_axes},{out}->{kernel_axes}", x, w)
  np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5, atol=1e-5)


NOT_PROJECTIONS = {  # The kernel's shared axis last; a kernel with a batch axis; output reordered.
  "btd,vd->btv": (5, 4),
  "btd,bdr->btr": (2, 4, 3),
  "btd,df->bft": (4, 6),
}


@pytest.mark.parametrize("equation", NOT_PROJECTIONS)
def test_matmul_rejects_what_is_not_a_projection(equation):
  x, kernel = jnp.ones((2, 3, 4)), jnp.ones(NOT_PROJECTIONS[equation])
  with pytest.raises(ValueError, match="not a projection"):
    matmul(equation, x, kernel)
