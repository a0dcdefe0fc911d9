"""Attention: RoPE, masks for packed and cached sequences, grouped-query attention, KV cache.

Shape letters: B batch, T query length, S key length, D model dim, N query heads, K KV heads,
G queries per KV head (N = K * G), H head dim, M = G * T (a KV head's queries, head-major).

One implementation covers multi-head (K = N), grouped-query (1 < K < N) and multi-query (K = 1)
attention: queries are grouped as [K, G] so each KV head serves its G queries; K/V are never
repeated. Query head n uses KV head n // G, as in Hugging Face's `repeat_kv`.

RoPE here uses the rotate-half layout (Hugging Face): dimension i pairs with i + H/2. Checkpoints
in the interleaved layout (Meta, llama2.c: 2i pairs with 2i + 1) are converted at import by
permuting the rows of the q and k projections with `interleaved_to_half`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.config import ModelConfig, PeftConfig
from jaxtune.model.layers import Einsum, constrain
from jaxtune.peft import lora as lora_lib


def rope(x_btnh: jax.Array, positions_bt: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding, rotate-half layout, computed in float32."""
  h = x_btnh.shape[-1]
  inv_freq = 1.0 / theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h)  # [H/2]
  angles_bth = positions_bt[..., None].astype(jnp.float32) * inv_freq
  sin, cos = jnp.sin(angles_bth)[:, :, None, :], jnp.cos(angles_bth)[:, :, None, :]
  x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_btnh.dtype)


def interleaved_to_half(head_dim: int) -> np.ndarray:
  """Permutation of a head's dims taking the interleaved RoPE layout to rotate-half.

  `w_half = w_interleaved[..., perm, :]` on each head's output rows of the q and k projections.
  """
  return np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])


def segment_positions(segment_ids_bt: jax.Array) -> jax.Array:
  """Positions that restart at 0 at the start of each packed segment (padding: 0)."""
  t = segment_ids_bt.shape[-1]
  idx = jnp.arange(t)
  starts = jnp.concatenate(
    [jnp.ones_like(segment_ids_bt[:, :1], bool), segment_ids_bt[:, 1:] != segment_ids_bt[:, :-1]],
    axis=1,
  )
  start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
  return jnp.where(segment_ids_bt != 0, idx - start_idx, 0).astype(jnp.int32)


SHARED_SEGMENT = -1


def attention_mask(
  q_segments_bt: jax.Array, kv_segments_bs: jax.Array, q_offset: jax.Array | int = 0
) -> jax.Array:
  """[B, T, S] mask: causal, same segment, no padding (segment 0).

  Query t sits at absolute slot `q_offset + t`; key s at slot s. Keys of `SHARED_SEGMENT` (a
  soft prompt before the packed segments of a row) are visible to every later query.
  """
  t, s = q_segments_bt.shape[1], kv_segments_bs.shape[1]
  causal_ts = (q_offset + jnp.arange(t))[:, None] >= jnp.arange(s)[None, :]
  same_bts = q_segments_bt[:, :, None] == kv_segments_bs[:, None, :]
  shared_bs = kv_segments_bs == SHARED_SEGMENT
  return causal_ts[None] & (same_bts | shared_bs[:, None, :]) & (kv_segments_bs[:, None, :] != 0)


def dot_product_attention(
  q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array, mask_bts: jax.Array
) -> jax.Array:
  """Softmax(q k^T / sqrt(H)) v with queries grouped over the KV heads; float32 softmax.

  The products run head-major, as batched matmuls of M = G*T queries by S keys per (B, K):
  then XLA needs no transposing copies of the [T, S] scores, which cost ~10% of a training step
  on CPU when the einsums were written token-major. Rows with no visible key (padding queries)
  give finite, meaningless outputs.
  """
  b, t, n, h = q_btnh.shape
  k = k_bskh.shape[2]
  g = n // k
  q_bkmh = q_btnh.reshape(b, t, k, g, h).transpose(0, 2, 3, 1, 4).reshape(b, k, g * t, h)
  k_bksh, v_bksh = k_bskh.transpose(0, 2, 1, 3), v_bskh.transpose(0, 2, 1, 3)
  scores_bkms = jnp.einsum(
    "bkmh,bksh->bkms", q_bkmh, k_bksh, preferred_element_type=jnp.float32
  ) / np.sqrt(h).astype(np.float32)
  scores_bkgts = scores_bkms.reshape(b, k, g, t, -1)
  scores_bkgts = jnp.where(mask_bts[:, None, None], scores_bkgts, jnp.finfo(jnp.float32).min)
  probs_bkms = jax.nn.softmax(scores_bkgts, axis=-1).astype(v_bskh.dtype).reshape(b, k, g * t, -1)
  out_bkmh = jnp.einsum("bkms,bksh->bkmh", probs_bkms, v_bksh)
  return out_bkmh.reshape(b, k, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


class Attention(nn.Module):
  """Self-attention with q/k/v/o projections, RoPE, packing and an optional KV cache.

  With `decode=True` the keys and values of the T new tokens are written into the 'cache'
  collection at its current index and the queries attend to everything cached so far: prefill
  (T = prompt length) and one-token steps are the same code. The cache is created, sized by its
  first input, when the module is initialized with `decode=True` (see `transformer.init_cache`).
  """

  config: ModelConfig
  decode: bool = False
  peft: PeftConfig = PeftConfig()
  adapters: int = 0  # LoRA bank size (0: one adapter).
  deterministic: bool = True

  @nn.compact
  def __call__(
    self,
    x_btd: jax.Array,
    positions_bt: jax.Array,
    segment_ids_bt: jax.Array,
    prefix_kv: tuple[jax.Array, jax.Array] | None = None,
    adapter_ids_b: jax.Array | None = None,
  ) -> jax.Array:
    cfg = self.config
    d, n, k, h = cfg.dim, cfg.num_heads, cfg.kv_heads, cfg.head_size
    qkv_bias = cfg.use_bias or cfg.qkv_bias

    def einsum(name, eqn, shape, names, bias, bias_axes):
      lora = lora_lib.spec(self.peft, name, self.adapters)
      module = Einsum(eqn, shape, names, bias, bias_axes, cfg, lora, self.deterministic, name=name)
      return lambda x: module(x, adapter_ids_b)

    def proj(name, heads, heads_name):
      shape, names = (d, heads, h), ("embed", heads_name, "head_dim")
      return einsum(name, "btd,dnh->btnh", shape, names, qkv_bias, 2)(x_btd)

    q_btnh = proj("q", n, "q_heads")
    k_btkh = proj("k", k, "kv_heads")
    v_btkh = proj("v", k, "kv_heads")
    if cfg.position == "rope":
      q_btnh = rope(q_btnh, positions_bt, cfg.rope_theta)
      k_btkh = rope(k_btkh, positions_bt, cfg.rope_theta)
    q_btnh = constrain(q_btnh, ("act_batch", "act_seq", "act_heads", "act_head_dim"))
    k_btkh = constrain(k_btkh, ("act_batch", "act_seq", "act_kv_heads", "act_head_dim"))
    v_btkh = constrain(v_btkh, ("act_batch", "act_seq", "act_kv_heads", "act_head_dim"))
    self.sow("intermediates", "kv", (k_btkh, v_btkh))  # For prefixes from real activations.

    if self.decode:
      k_bskh, v_bskh, kv_segments_bs, offset = self._update_cache(k_btkh, v_btkh, segment_ids_bt)
    else:
      k_bskh, v_bskh, kv_segments_bs, offset = k_btkh, v_btkh, segment_ids_bt, 0
    mask_bts = attention_mask(segment_ids_bt, kv_segments_bs, offset)
    if prefix_kv is not None:  # Prefix tuning: P more keys and values that every query sees.
      k_bpkh, v_bpkh = prefix_kv
      k_bskh = jnp.concatenate([k_bpkh.astype(k_bskh.dtype), k_bskh], axis=1)
      v_bskh = jnp.concatenate([v_bpkh.astype(v_bskh.dtype), v_bskh], axis=1)
      visible_btp = jnp.ones((*mask_bts.shape[:2], k_bpkh.shape[1]), bool)
      mask_bts = jnp.concatenate([visible_btp, mask_bts], axis=-1)
    out_btnh = dot_product_attention(q_btnh, k_bskh, v_bskh, mask_bts)
    out_btnh = constrain(out_btnh, ("act_batch", "act_seq", "act_heads", "act_head_dim"))
    o = einsum("o", "btnh,nhd->btd", (n, h, d), ("q_heads", "head_dim", "embed"), cfg.use_bias, 1)
    return o(out_btnh)

  def _update_cache(self, k_btkh, v_btkh, segment_ids_bt):
    """Writes the new keys/values at the cache index; returns the whole cache and the offset."""
    initialized = self.has_variable("cache", "key")
    key = self.variable("cache", "key", jnp.zeros, k_btkh.shape, k_btkh.dtype)
    value = self.variable("cache", "value", jnp.zeros, v_btkh.shape, v_btkh.dtype)
    segments = self.variable("cache", "segment_ids", jnp.zeros, segment_ids_bt.shape, jnp.int32)
    index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    if not initialized:  # Creating the cache: its size is that of this first input.
      return k_btkh, v_btkh, segment_ids_bt, 0
    offset = index.value
    key.value = jax.lax.dynamic_update_slice(
      key.value, k_btkh.astype(key.value.dtype), (0, offset, 0, 0)
    )
    value.value = jax.lax.dynamic_update_slice(
      value.value, v_btkh.astype(value.value.dtype), (0, offset, 0, 0)
    )
    segments.value = jax.lax.dynamic_update_slice(
      segments.value, segment_ids_bt.astype(jnp.int32), (0, offset)
    )
    index.value = offset + k_btkh.shape[1]
    return key.value, value.value, segments.value, offset
