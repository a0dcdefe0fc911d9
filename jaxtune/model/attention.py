"""Attention: RoPE, masks for packed and cached sequences, grouped-query attention, KV cache.

Shape letters: B batch, T query length, S key length (cache slots), D model dim, N query heads,
K KV heads, G queries per KV head (N = K * G), H head dim, L layers.

One implementation covers multi-head (K = N), grouped-query (1 < K < N) and multi-query (K = 1)
attention: queries are grouped as [K, G] so each KV head serves its G queries; K/V are never
repeated. Query head n uses KV head n // G, as in Hugging Face's `repeat_kv`. Keys and values
enter the attention as [B, K, S, H], the layout of the KV cache: a decoding step, bound by reading
the cache, then reads it once, as it is (see `KVCache`). Training and scoring attend with
`causal_attention` (only the keys each block of queries can see); decoding, over the cache, with
`dot_product_attention`; both run the same softmax (`_attend`).

RoPE here uses the rotate-half layout (Hugging Face): dimension i pairs with i + H/2. Checkpoints
in the interleaved layout (Meta, llama2.c: 2i pairs with 2i + 1) are converted at import by
permuting the rows of the q and k projections with `interleaved_to_half`.
"""

from __future__ import annotations

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jaxtune.config_model import ModelConfig
from jaxtune.model.adapters import NONE, Adapters
from jaxtune.model.bitlinear import SubNorm
from jaxtune.model.layers import constrain
from jaxtune.model.linear import Linear, Projection


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


def _heads_major(x_btnh: jax.Array, k: int) -> jax.Array:
  b, t, n, h = x_btnh.shape
  return x_btnh.reshape(b, t, k, n // k, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]


def _einsum_f32(equation: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """`einsum` of (possibly bfloat16) operands, accumulated and returned in float32.

  XLA:CPU has no BF16 x BF16 -> F32 dot (`UNIMPLEMENTED ... DotThunk`) and runs its bfloat16 dots
  in float32 anyway, so on CPU the operands are upcast first: the same result, since each product
  of two bfloat16 numbers is exact in float32. Accelerators multiply bfloat16 natively."""
  if jax.default_backend() == "cpu":
    return jnp.einsum(equation, a.astype(jnp.float32), b.astype(jnp.float32))
  return jnp.einsum(equation, a, b, preferred_element_type=jnp.float32)


def _tokens_major(x_bkgth: jax.Array) -> jax.Array:
  b, k, g, t, h = x_bkgth.shape
  return x_bkgth.transpose(0, 3, 1, 2, 4).reshape(b, t, k * g, h)


def _attend(
  q_bkgth: jax.Array,
  k_bksh: jax.Array,
  v_bksh: jax.Array,
  mask_bts: jax.Array,
  keys_major: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Softmax(q k^T / sqrt(H)) v for queries grouped over the KV heads, head-major, with a
  float32 softmax: (output [B, K, G, T, H] in float32, log-sum-exp of the scores [B, K, G, T]).
  Rows with no visible key (padding queries) give zeros.

  With `keys_major`, q k^T is computed as k [S, H] @ q^T [H, G*T], the keys' rows as they lie
  in the cache, then the (small) scores are transposed to [G*T, S] for the softmax. A decoding
  step of grouped queries (GQA, MQA) wants it: the product [G*T, H] @ k^T has XLA:CPU copy each
  layer's keys transposed first, and a softmax reduced over S as the major axis of the scores
  ran at a fraction of the speed of one over the minor axis (a quarter of the step).
  """
  scale = np.float32(1 / np.sqrt(q_bkgth.shape[-1]))
  mask_b11ts = mask_bts[:, None, None]
  if keys_major:
    scores_bksgt = _einsum_f32("bksh,bkgth->bksgt", k_bksh, q_bkgth)
    scores_bkgts = jnp.moveaxis(scores_bksgt, 2, -1) * scale
  else:
    scores_bkgts = _einsum_f32("bkgth,bksh->bkgts", q_bkgth, k_bksh) * scale
  lowest = jnp.finfo(jnp.float32).min
  scores_bkgts = jnp.where(mask_b11ts, scores_bkgts, lowest)
  max_bkgt1 = jnp.max(scores_bkgts, axis=-1, keepdims=True)
  # A masked score (`lowest`) less any finite max is below -1e38: its exp is exactly 0, so the
  # mask need not be applied again (a second pass over the scores). A row with no visible key
  # has max `lowest`; subtracting 0 instead gives it zeros too.
  exp_bkgts = jnp.exp(scores_bkgts - jnp.where(max_bkgt1 == lowest, 0.0, max_bkgt1))
  sum_bkgt1 = jnp.sum(exp_bkgts, axis=-1, keepdims=True)
  sum_bkgt1 = jnp.where(sum_bkgt1 == 0.0, 1.0, sum_bkgt1)  # Padding queries.
  out_bkgth = _einsum_f32(
    "bkgts,bksh->bkgth",
    exp_bkgts.astype(v_bksh.dtype),
    v_bksh,
  )
  return out_bkgth / sum_bkgt1, (max_bkgt1 + jnp.log(sum_bkgt1))[..., 0]


# Queries a block of a prefill's attention (`dot_product_attention`): small enough that a block's
# scores stay well below the cache, large enough that each block's products are matmuls.
PREFILL_BLOCK = 256


def dot_product_attention(
  q_btnh: jax.Array, k_bksh: jax.Array, v_bksh: jax.Array, mask_bts: jax.Array
) -> jax.Array:
  """Softmax(q k^T / sqrt(H)) v over every key, with queries grouped over the KV heads and a
  float32 softmax; any mask. Decoding uses it (queries against the cache); training uses
  `causal_attention`. Rows with no visible key (padding queries) give zeros. A decoding step
  of grouped queries (one query a row, G > 1: GQA, MQA) computes its scores keys-major (see
  `_attend`); with G = 1 (MHA) the query-major products are matrix-vector products, with no
  copy, and faster on XLA:CPU than keys-major.

  Many queries (a prefill: the prompt against the cache) run in blocks of at most
  `PREFILL_BLOCK`, one after the other in a loop, so that one block's scores, [B, N, block, S],
  are all that is live at once rather than [B, N, T, S] (8.7 GB a layer for 64 prompts of 2048
  tokens and 8 heads in float32; XLA kept every block's scores live when the blocks were
  separate ops). A query's softmax does not depend on the others', so the result is the same."""
  q_bkgth = _heads_major(q_btnh, k_bksh.shape[1])
  b, k, g, t, h = q_bkgth.shape
  if t <= PREFILL_BLOCK:
    keys_major = t == 1 and g > 1
    out_bkgth, _ = _attend(q_bkgth, k_bksh, v_bksh, mask_bts, keys_major)
    return _tokens_major(out_bkgth.astype(q_btnh.dtype))
  blocks = -(-t // PREFILL_BLOCK)
  pad = blocks * PREFILL_BLOCK - t  # Padding queries see no key: zeros, cut off below.
  q_nbkgqh = jnp.pad(q_bkgth, ((0, 0),) * 3 + ((0, pad), (0, 0)))
  q_nbkgqh = q_nbkgqh.reshape(b, k, g, blocks, PREFILL_BLOCK, h).transpose(3, 0, 1, 2, 4, 5)
  mask_nbqs = jnp.pad(mask_bts, ((0, 0), (0, pad), (0, 0))).reshape(b, blocks, PREFILL_BLOCK, -1)
  out_nbkgqh = jax.lax.map(
    lambda qm: _attend(qm[0], k_bksh, v_bksh, qm[1])[0], (q_nbkgqh, jnp.swapaxes(mask_nbqs, 0, 1))
  )
  out_bkgth = out_nbkgqh.transpose(1, 2, 3, 0, 4, 5).reshape(b, k, g, blocks * PREFILL_BLOCK, h)
  return _tokens_major(out_bkgth[:, :, :, :t].astype(q_btnh.dtype))


CONTEXT, CONTEXT_LSE = "context", "context_lse"  # The residuals of `causal_attention`.


def query_blocks(t: int) -> list[tuple[int, int]]:
  """The [start, end) query blocks of `causal_attention`: at most 16, of at least 64 queries."""
  size = max(64, -(-t // 16))
  return [(start, min(start + size, t)) for start in range(0, t, size)]


def keys_computed(t: int) -> float:
  """The mean number of keys per query whose products `causal_attention` computes, for T queries
  (and no prefix): T for a single block, about T/2 + T/32 for 16 blocks."""
  return sum((end - start) * end for start, end in query_blocks(t)) / t


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def causal_attention(
  q_btnh: jax.Array, k_bksh: jax.Array, v_bksh: jax.Array, mask_bts: jax.Array, prefix: int = 0
) -> jax.Array:
  """`dot_product_attention` for a causal mask, computing only the keys each query can see.

  The mask must hide key `prefix + s` from query t for s > t (true of `attention_mask(x, x)`; the
  first `prefix` keys, e.g. prefix tuning's, may be visible to all). Query block [t0, t1) (see
  `query_blocks`) then attends to keys [0, prefix + t1) only: with 8 blocks, 56% of the scores of
  the full [T, S] square. Its softmax is whole (every visible key is in the block), so no
  online rescaling is needed.

  The gradient is custom, as in FlashAttention (Dao et al., 2022): the forward pass keeps the
  output and the log-sum-exp of each query's scores, and the backward pass recomputes the
  probabilities block by block, so no [T, S] array outlives the layer. The backward products run
  key-major ([S, G*T] per (B, K)) so that the key and value gradients are plain matmuls, with no
  transposing copies of the scores. Padding queries (no visible key) give zeros.
  """
  return _causal_fwd(q_btnh, k_bksh, v_bksh, mask_bts, prefix)[0]


def _causal_fwd(q_btnh, k_bksh, v_bksh, mask_bts, prefix):
  q_bkgth = _heads_major(q_btnh, k_bksh.shape[1])
  outs, lses = [], []
  for t0, t1 in query_blocks(q_btnh.shape[1]):
    e = prefix + t1
    out_bkgth, lse_bkgt = _attend(
      q_bkgth[:, :, :, t0:t1], k_bksh[:, :, :e], v_bksh[:, :, :e], mask_bts[:, t0:t1, :e]
    )
    outs.append(out_bkgth)
    lses.append(lse_bkgt)
  out_bkgth = jnp.concatenate(outs, axis=3).astype(q_btnh.dtype)
  lse_bkgt = jnp.concatenate(lses, axis=3)
  out_btnh = _tokens_major(out_bkgth)
  # Named for the "minimal" remat policy, which saves them rather than rerun this pass.
  out_bkgth = checkpoint_name(out_bkgth, CONTEXT)
  lse_bkgt = checkpoint_name(lse_bkgt, CONTEXT_LSE)
  return out_btnh, (q_bkgth, k_bksh, v_bksh, mask_bts, out_bkgth, lse_bkgt)


def _causal_bwd(prefix, residuals, dout_btnh):
  q_bkgth, k_bksh, v_bksh, mask_bts, out_bkgth, lse_bkgt = residuals
  _, k, _, t, h = q_bkgth.shape
  scale = np.float32(1 / np.sqrt(h))
  dout_bkgth = _heads_major(dout_btnh, k)
  delta_bkgt = _einsum_f32("bkgth,bkgth->bkgt", dout_bkgth, out_bkgth)
  dk_bksh = jnp.zeros(k_bksh.shape, jnp.float32)
  dv_bksh = jnp.zeros(v_bksh.shape, jnp.float32)
  dq_blocks = []
  for t0, t1 in query_blocks(t):
    e = prefix + t1
    q_i, dout_i = q_bkgth[:, :, :, t0:t1], dout_bkgth[:, :, :, t0:t1]
    k_i, v_i = k_bksh[:, :, :e], v_bksh[:, :, :e]
    scores_bksgt = _einsum_f32("bksh,bkgth->bksgt", k_i, q_i)
    mask_b1s1t = jnp.swapaxes(mask_bts[:, t0:t1, :e], 1, 2)[:, None, :, None, :]
    lse_bk1gt = lse_bkgt[:, :, None, :, t0:t1]
    probs_bksgt = jnp.where(mask_b1s1t, jnp.exp(scores_bksgt * scale - lse_bk1gt), 0.0)
    dv_bksh = dv_bksh.at[:, :, :e].add(
      _einsum_f32(
        "bksgt,bkgth->bksh",
        probs_bksgt.astype(dout_i.dtype),
        dout_i,
      )
    )
    dprobs_bksgt = _einsum_f32("bksh,bkgth->bksgt", v_i, dout_i)
    dscores_bksgt = (
      probs_bksgt * (dprobs_bksgt - delta_bkgt[:, :, None, :, t0:t1]) * scale
    ).astype(q_i.dtype)
    dk_bksh = dk_bksh.at[:, :, :e].add(_einsum_f32("bksgt,bkgth->bksh", dscores_bksgt, q_i))
    # dq^T = k^T ds^T: contracts the keys, the major axis of both (no copy of the scores).
    dq_blocks.append(_einsum_f32("bksh,bksgt->bkhgt", k_i, dscores_bksgt))

  dq_bkgth = jnp.concatenate(dq_blocks, axis=-1).transpose(0, 1, 3, 4, 2)
  return (
    _tokens_major(dq_bkgth).astype(q_bkgth.dtype),
    dk_bksh.astype(k_bksh.dtype),
    dv_bksh.astype(v_bksh.dtype),
    None,
  )


causal_attention.defvjp(_causal_fwd, _causal_bwd)


# Logical axes of the cache arrays, as `transformer.Transformer` stores them: "key" and "value"
# hold one array per layer (a tuple of L), each with these axes, less the KV heads' for one KV
# head (see `KVCache`).
CACHE_AXES = {
  "key": ("act_batch", "act_kv_heads", "act_seq", "act_head_dim"),
  "value": ("act_batch", "act_kv_heads", "act_seq", "act_head_dim"),
  "segment_ids": ("act_batch", "act_seq"),
  "index": (),
}


@flax.struct.dataclass
class KVCache:
  """One layer's KV cache as its attention sees it: keys and values [B, K, S, H], the segment ids
  of all S slots (the new tokens' included) and the slot of the first new token.

  Each layer has arrays of its own (the layers run unrolled when decoding, see
  `transformer.Transformer.decode`): the T new keys and values are written into them in place and
  the attention reads them as they are. (One array stacked over the layers would have each
  layer's part sliced out before its products read it: a copy of the whole cache at every token,
  as XLA does not feed a slice into a matmul.)

  With one KV head (MQA) the arrays are stored [B, S, H], without the KV heads' axis: XLA drops
  a size-1 axis before a matmul (a bitcast), and fused the write into that bitcast as well as
  into the array kept, two writes of one buffer that cannot both be in place: it then copied the
  layer's cache four times a step. `keys_values` gives the [B, K, S, H] view either way.
  """

  key: jax.Array  # [B, K, S, H], or [B, S, H] for K = 1.
  value: jax.Array
  segment_ids_bs: jax.Array
  offset: jax.Array

  def write(self, k_btkh: jax.Array, v_btkh: jax.Array) -> KVCache:
    def put(cache, x_btkh):
      x_bkth = jnp.swapaxes(x_btkh, 1, 2).astype(cache.dtype)
      return jax.lax.dynamic_update_slice(
        cache,
        x_bkth.reshape(cache.shape[:-2] + x_bkth.shape[-2:]),
        (0,) * (cache.ndim - 2) + (self.offset, 0),
      )

    return self.replace(key=put(self.key, k_btkh), value=put(self.value, v_btkh))

  def keys_values(self) -> tuple[jax.Array, jax.Array]:
    """The keys and values [B, K, S, H]."""
    return tuple(x[:, None] if x.ndim == 3 else x for x in (self.key, self.value))


def cache_axes(name: str, ndim: int) -> tuple[str | None, ...]:
  """The logical axes of a cache array of `ndim` dims (a key or value array of one KV head has
  no KV heads' axis)."""
  names = CACHE_AXES[name]
  return tuple(n for n in names if n != "act_kv_heads") if len(names) > ndim else names


class Attention(nn.Module):
  """Self-attention with q/k/v/o projections, RoPE, packing and an optional KV cache.

  With a `cache` (this layer's), the keys and values of the T new tokens are written into it and
  the queries attend to everything cached so far: prefill (T = prompt length) and one-token
  steps are the same code. Returns the output and the cache (None without one).
  """

  config: ModelConfig
  adapters: Adapters = NONE
  deterministic: bool = True

  @nn.compact
  def __call__(
    self,
    x_btd: jax.Array,
    positions_bt: jax.Array,
    segment_ids_bt: jax.Array,
    *,
    prefix_kv: tuple[jax.Array, jax.Array] | None = None,
    adapter_ids_b: jax.Array | None = None,
    cache: KVCache | None = None,
  ) -> tuple[jax.Array, KVCache | None]:
    cfg = self.config
    d, n, k, h = cfg.dim, cfg.num_heads, cfg.kv_heads, cfg.head_size

    def linear(name, projection, x):
      module = Linear(projection, cfg, self.adapters.lora(name), self.deterministic, name=name)
      return module(x, adapter_ids_b)

    def proj(name, heads, heads_name):
      shape, names = (d, heads, h), ("embed", heads_name, "head_dim")
      qkv_bias = 2 if cfg.use_bias or cfg.qkv_bias else 0
      return linear(name, Projection("btd,dnh->btnh", shape, names, qkv_bias), x_btd)

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

    if cache is None:
      k_bksh, v_bksh = jnp.swapaxes(k_btkh, 1, 2), jnp.swapaxes(v_btkh, 1, 2)
      mask_bts = attention_mask(segment_ids_bt, segment_ids_bt)
    else:
      cache = cache.write(k_btkh, v_btkh)
      k_bksh, v_bksh = cache.keys_values()
      mask_bts = attention_mask(segment_ids_bt, cache.segment_ids_bs, cache.offset)
    if prefix_kv is not None:  # Prefix tuning: P more keys and values that every query sees.
      k_bkph, v_bkph = (jnp.swapaxes(x, 1, 2).astype(k_bksh.dtype) for x in prefix_kv)
      k_bksh = jnp.concatenate([k_bkph, k_bksh], axis=2)
      v_bksh = jnp.concatenate([v_bkph, v_bksh], axis=2)
      visible_btp = jnp.ones((*mask_bts.shape[:2], k_bkph.shape[2]), bool)
      mask_bts = jnp.concatenate([visible_btp, mask_bts], axis=-1)
    if cache is None:  # Self-attention over the tokens given: causal.
      prefix = 0 if prefix_kv is None else prefix_kv[0].shape[1]
      out_btnh = causal_attention(q_btnh, k_bksh, v_bksh, mask_bts, prefix)
    else:
      out_btnh = dot_product_attention(q_btnh, k_bksh, v_bksh, mask_bts)
    out_btnh = constrain(out_btnh, ("act_batch", "act_seq", "act_heads", "act_head_dim"))
    if cfg.sub_norm:  # HF BitNet's attn_sub_norm, over the N * H of each token.
      out_btnh = SubNorm(("q_heads", "head_dim"), (n, h), cfg, name="sub_norm")(out_btnh)
    o = Projection("btnh,nhd->btd", (n, h, d), ("q_heads", "head_dim", "embed"), int(cfg.use_bias))
    return linear("o", o, out_btnh), cache
