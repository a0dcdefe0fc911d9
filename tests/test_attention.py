"""Attention math against independent references: repeated-K/V attention in PyTorch (values,
and gradients by its autograd), interleaved RoPE in numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxtune.model import attention


def _reference_attention(q, k, v, mask):
  """Plain multi-head attention in PyTorch after repeating each KV head for its queries;
  tensors in, tensor out (numpy arrays in: a numpy array out)."""
  if isinstance(q, np.ndarray):
    q, k, v, mask = (torch.tensor(x) for x in (q, k, v, mask))
    return _reference_attention(q, k, v, mask).numpy()
  g = q.shape[2] // k.shape[2]
  k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
  scores = torch.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  scores = scores.masked_fill(~mask[:, None], -1e30)
  return torch.einsum("bnts,bsnh->btnh", torch.softmax(scores, -1), v)


@pytest.mark.parametrize("kv_heads", [8, 2, 1], ids=["mha", "gqa", "mqa"])
def test_grouped_attention_equals_repeated_kv(kv_heads, monkeypatch):
  rng = np.random.default_rng(0)
  b, t, n, h = 2, 7, 8, 16
  q = rng.standard_normal((b, t, n, h)).astype(np.float32)
  k = rng.standard_normal((b, t, kv_heads, h)).astype(np.float32)
  v = rng.standard_normal((b, t, kv_heads, h)).astype(np.float32)
  segments = np.array([[1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 1]])
  mask = np.asarray(attention.attention_mask(jnp.asarray(segments), jnp.asarray(segments)))
  k_bksh, v_bksh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # The cache's layout.
  out = np.asarray(attention.dot_product_attention(q, k_bksh, v_bksh, jnp.asarray(mask)))
  ref = _reference_attention(q, k, v, mask)
  real = segments != 0  # Padding queries see no key: zeros.
  np.testing.assert_allclose(out[real], ref[real], atol=1e-5, rtol=1e-5)
  assert np.all(out[~real] == 0)
  # One query a row, as a decoding step attends to the cache (keys-major scores for G > 1).
  step = jax.jit(attention.dot_product_attention)
  out_1 = np.concatenate(
    [np.asarray(step(q[:, i : i + 1], k_bksh, v_bksh, mask[:, i : i + 1])) for i in range(t)], 1
  )
  np.testing.assert_allclose(out_1[real], ref[real], atol=1e-5, rtol=1e-5)
  assert np.all(out_1[~real] == 0)
  # A prefill's queries run in blocks, one after the other: here 3, 3 and 1 (padded to 3).
  monkeypatch.setattr(attention, "PREFILL_BLOCK", 3)
  blocked = np.asarray(attention.dot_product_attention(q, k_bksh, v_bksh, jnp.asarray(mask)))
  np.testing.assert_allclose(blocked[real], ref[real], atol=1e-5, rtol=1e-5)
  assert np.all(blocked[~real] == 0)


@pytest.mark.parametrize(
  ("kv_heads", "t", "prefix"),
  [(8, 200, 0), (2, 200, 0), (1, 200, 0), (2, 130, 5), (2, 7, 0)],
  ids=["mha", "gqa", "mqa", "gqa-prefix", "one-block"],
)
def test_causal_attention_equals_reference_values_and_gradients(kv_heads, t, prefix):
  """Several query blocks (the last one short), packed segments, padding, prefix keys."""
  rng = np.random.default_rng(1)
  b, n, h = 2, 8, 16
  q = rng.standard_normal((b, t, n, h)).astype(np.float32)
  k = rng.standard_normal((b, prefix + t, kv_heads, h)).astype(np.float32)
  v = rng.standard_normal((b, prefix + t, kv_heads, h)).astype(np.float32)
  dout = rng.standard_normal((b, t, n, h)).astype(np.float32)
  segments = np.ones((b, t), np.int32)
  segments[0, t // 3 :] = 2
  segments[0, t - t // 5 :] = 0  # Padding at the end of row 0.
  mask = np.asarray(attention.attention_mask(jnp.asarray(segments), jnp.asarray(segments)))
  mask = np.concatenate([np.ones((b, t, prefix), bool), mask], axis=-1)
  real = segments != 0
  assert len(attention.query_blocks(t)) > 1 or t < 64

  def loss(q, k_bksh, v_bksh):
    out = attention.causal_attention(q, k_bksh, v_bksh, jnp.asarray(mask), prefix)
    return jnp.sum(out * (dout * real[..., None, None])), out

  k_bksh, v_bksh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k_bksh, v_bksh)
  np.testing.assert_allclose(
    np.asarray(out)[real], _reference_attention(q, k, v, mask)[real], atol=1e-5, rtol=1e-5
  )
  if not prefix:  # Padding queries see no key (with a prefix, they see its keys).
    assert np.all(np.asarray(out)[~real] == 0)

  tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
  ref = _reference_attention(tq, tk, tv, torch.tensor(mask))
  (ref * torch.tensor(dout * real[..., None, None])).sum().backward()
  dq, dk_bksh, dv_bksh = (np.asarray(x) for x in grads)
  np.testing.assert_allclose(dq, tq.grad.numpy(), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(dk_bksh.transpose(0, 2, 1, 3), tk.grad.numpy(), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(dv_bksh.transpose(0, 2, 1, 3), tv.grad.numpy(), atol=1e-4, rtol=1e-4)


def test_causal_attention_in_bfloat16_follows_float32():
  rng = np.random.default_rng(2)
  q, k, v = (
    jnp.asarray(rng.standard_normal(s), jnp.float32)
    for s in [(1, 150, 4, 32), (1, 2, 150, 32), (1, 2, 150, 32)]
  )
  segments = jnp.ones((1, 150), jnp.int32)
  mask = attention.attention_mask(segments, segments)

  def loss(q, k, v):
    return jnp.sum(attention.causal_attention(q, k, v, mask).astype(jnp.float32) ** 2)

  def grads(dtype):
    return jax.grad(loss, argnums=(0, 1, 2))(q.astype(dtype), k.astype(dtype), v.astype(dtype))

  for low, high in zip(grads(jnp.bfloat16), grads(jnp.float32), strict=True):
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(low, np.float32), high, atol=0.05, rtol=0.05)


def test_mask_is_causal_within_segments():
  segments = jnp.array([[1, 1, 2, 2, 0]])
  mask = np.asarray(attention.attention_mask(segments, segments))[0]
  expected = np.array(
    [
      [1, 0, 0, 0, 0],
      [1, 1, 0, 0, 0],
      [0, 0, 1, 0, 0],
      [0, 0, 1, 1, 0],
      [0, 0, 0, 0, 0],
    ],
    bool,
  )
  np.testing.assert_array_equal(mask, expected)


def test_mask_with_offset_for_cached_queries():
  kv_segments = jnp.array([[1, 1, 1, 0]])  # Three cached tokens, one empty slot.
  mask = np.asarray(attention.attention_mask(jnp.array([[1]]), kv_segments, q_offset=2))
  np.testing.assert_array_equal(mask[0], [[1, 1, 1, 0]])


def test_segment_positions_restart():
  segments = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(
    attention.segment_positions(segments),
    [[0, 1, 2, 0, 1, 0, 0, 0], [0, 1, 2, 3, 4, 5, 6, 7]],
  )


def _interleaved_rope(x, positions, theta):
  """Meta / llama2.c RoPE: dims (2i, 2i+1) rotate together by position * theta^(-2i/H)."""
  h = x.shape[-1]
  freqs = theta ** (-np.arange(0, h, 2) / h)
  angle = positions[..., None, None] * freqs  # [B, T, 1, H/2]
  x0, x1 = x[..., 0::2], x[..., 1::2]
  out = np.empty_like(x)
  out[..., 0::2] = x0 * np.cos(angle) - x1 * np.sin(angle)
  out[..., 1::2] = x1 * np.cos(angle) + x0 * np.sin(angle)
  return out


def test_rope_layouts_agree_up_to_the_import_permutation():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 5, 3, 16)).astype(np.float32)
  positions = np.array([[0, 1, 2, 3, 4], [7, 8, 0, 1, 2]])
  perm = attention.interleaved_to_half(16)
  half = np.asarray(attention.rope(jnp.asarray(x[..., perm]), jnp.asarray(positions), 10000.0))
  np.testing.assert_allclose(half, _interleaved_rope(x, positions, 10000.0)[..., perm], atol=1e-5)


def test_rope_scores_depend_on_relative_position_only():
  rng = np.random.default_rng(2)
  q = jnp.asarray(rng.standard_normal((1, 1, 1, 8)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((1, 1, 1, 8)), jnp.float32)

  def score(pq, pk):
    return float(
      jnp.sum(
        attention.rope(q, jnp.array([[pq]]), 100.0) * attention.rope(k, jnp.array([[pk]]), 100.0)
      )
    )

  assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-5)
  assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)
