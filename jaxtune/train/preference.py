"""The math preference objectives share, on packed rows: per-segment sums, each response's
log-probability, and the pairs of responses that compete.

A batch of preference data (`data/packing.py`) has each response as a segment of a row, with its
group (the responses to one prompt, all in that row) and rank (lower is better) on every token.
Per-segment values are [B, S] arrays, S = segments + 1 (0 is padding): `segments` is a static
bound on a row's segments (`pipeline.max_segments`, from the data or `data.max_segments`), else
T (every pair its own segment). The pair matrix costs B * S^2, so the bound keeps it small: a row
of T = 4096 with at most 32 responses holds 33^2 pairs, not 4097^2.
The pairs are a weight matrix [B, S, S]: w[b, i, j] = 1 / C(K, 2) where segments i and j of row b
answer the same prompt and i is ranked better, so a group's pairs weigh 1 in all, and the number
of groups (the normalizer) is the weights' sum.

Shape letters: B batch, T length, V vocab, S segments of a row (and padding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Batch = dict[str, jax.Array]
# The batch keys of a precomputed reference (`train/precomputed.py`): each pair's log-probability
# [B, T], and at supervised pairs the top-k ids and log-probabilities [B, T, k] and rest [B, T].
PRECOMPUTED = ("reference", "reference_ids", "reference_top", "reference_rest")


def _count(segment_ids_bt: jax.Array, segments: int | None) -> int:
  """S: the segment ids a row can have, 0 (padding) included."""
  return (segments or segment_ids_bt.shape[1]) + 1


def segment_sums(x_bt: jax.Array, segment_ids_bt: jax.Array, segments: int | None) -> jax.Array:
  """[B, S]: the sum of `x` over each segment of each row (index 0: padding)."""
  num = _count(segment_ids_bt, segments)
  return jax.vmap(lambda x, s: jax.ops.segment_sum(x, s, num_segments=num))(x_bt, segment_ids_bt)


def segment_values(x_bt: jax.Array, segment_ids_bt: jax.Array, segments: int | None) -> jax.Array:
  """[B, S]: a per-token value that is constant over each segment (its group, its rank), read
  once per segment; 0 for segments that do not occur."""
  num = _count(segment_ids_bt, segments)
  most = jax.vmap(lambda x, s: jax.ops.segment_max(x, s, num_segments=num))(x_bt, segment_ids_bt)
  return jnp.maximum(most, 0)


def last_tokens(segment_ids_bt: jax.Array) -> jax.Array:
  """[B, T] bool: the last token of each segment (where a reward model reads its score)."""
  after_bt = jnp.pad(segment_ids_bt[:, 1:], ((0, 0), (0, 1)))
  return (segment_ids_bt > 0) & (segment_ids_bt != after_bt)


def pair_weights(batch: Batch, segments: int | None) -> jax.Array:
  """[B, S, S]: 1 / C(K, 2) where segment i is ranked better than segment j of its group of K."""
  group_bs = segment_values(batch["groups"], batch["segment_ids"], segments)
  rank_bs = segment_values(batch["ranks"], batch["segment_ids"], segments)
  same_bss = (group_bs[:, :, None] == group_bs[:, None, :]) & (group_bs[:, :, None] > 0)
  k_bs = jnp.sum(same_bss, axis=-1).astype(jnp.float32)
  pairs_bs = jnp.maximum(k_bs * (k_bs - 1) / 2, 1.0)
  better_bss = same_bss & (rank_bs[:, :, None] < rank_bs[:, None, :])
  return better_bss / pairs_bs[:, :, None]


def group_sizes(batch: Batch, segments: int | None) -> jax.Array:
  """[B, S]: how many responses each segment's group has (0 for padding)."""
  group_bs = segment_values(batch["groups"], batch["segment_ids"], segments)
  same_bss = (group_bs[:, :, None] == group_bs[:, None, :]) & (group_bs[:, :, None] > 0)
  return jnp.sum(same_bss, axis=-1)


def groups(batch: Batch, segments: int | None) -> jax.Array:
  """The number of groups (prompts with ranked responses) in the batch: the normalizer."""
  return jnp.sum(pair_weights(batch, segments))


def token_log_probs(logits_btv: jax.Array, targets_bt: jax.Array) -> jax.Array:
  """[B, T] float32: log p(target) at each position."""
  log_p_btv = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(log_p_btv, targets_bt[..., None], axis=-1)[..., 0]


def token_kl(logits_btv: jax.Array, reference_btv: jax.Array) -> jax.Array:
  """[B, T]: KL(policy || reference) of the next-token distributions at each position."""
  log_p_btv = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
  log_q_btv = jax.nn.log_softmax(reference_btv.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.exp(log_p_btv) * (log_p_btv - log_q_btv), axis=-1)


def _outside(log_p_btv: jax.Array, ids_btk: jax.Array) -> jax.Array:
  """[B, T]: log of the probability mass outside the ids (-inf where they cover the vocabulary)."""
  b, t, _ = ids_btk.shape
  inside_btv = (
    jnp.zeros(log_p_btv.shape, bool)
    .at[jnp.arange(b)[:, None, None], jnp.arange(t)[None, :, None], ids_btk]
    .set(True)
  )
  return jax.nn.logsumexp(jnp.where(inside_btv, -jnp.inf, log_p_btv), axis=-1)


def top_k(logits_btv: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The k most likely next tokens at each position: ids [B, T, k] int32, their
  log-probabilities [B, T, k] and the log of the rest of the mass [B, T] (float32)."""
  log_p_btv = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
  log_p_btk, ids_btk = jax.lax.top_k(log_p_btv, k)
  return ids_btk.astype(jnp.int32), log_p_btk, _outside(log_p_btv, ids_btk)


def token_kl_top_k(
  logits_btv: jax.Array, ids_btk: jax.Array, ref_btk: jax.Array, ref_rest_bt: jax.Array
) -> jax.Array:
  """[B, T]: KL(policy || reference) of the next-token distributions coarsened to the
  reference's top-k ids and one outcome for the rest of the vocabulary (`top_k`'s three arrays).

  Coarsening never increases a KL (the log-sum inequality), so this is a lower bound of
  `token_kl`, exact when the k ids cover the vocabulary (both rests are then empty)."""
  log_p_btv = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
  log_p_btk = jnp.take_along_axis(log_p_btv, ids_btk, axis=-1)
  rest_bt = _outside(log_p_btv, ids_btk)
  inside_bt = jnp.sum(jnp.exp(log_p_btk) * (log_p_btk - ref_btk), axis=-1)
  has_rest_bt = rest_bt > -jnp.inf
  safe_rest_bt = jnp.where(has_rest_bt, rest_bt, 0.0)
  outside_bt = jnp.exp(safe_rest_bt) * (safe_rest_bt - jnp.where(has_rest_bt, ref_rest_bt, 0.0))
  return inside_bt + jnp.where(has_rest_bt, outside_bt, 0.0)


def pairwise(x_bs: jax.Array) -> jax.Array:
  """[B, S, S]: x_i - x_j (the better response's value minus the worse one's, where w > 0)."""
  return x_bs[:, :, None] - x_bs[:, None, :]


def pair_metrics(reward_bs: jax.Array, w_bss: jax.Array) -> dict[str, jax.Array]:
  """Sums over the pairs, weighted as the loss is (so / groups they are means per pair): the
  better and worse responses' rewards, their margin and whether the better one scores higher."""
  margin_bss = pairwise(reward_bs)
  return {
    "rewards_chosen": jnp.sum(w_bss * reward_bs[:, :, None]),
    "rewards_rejected": jnp.sum(w_bss * reward_bs[:, None, :]),
    "margin": jnp.sum(w_bss * margin_bss),
    "accuracy": jnp.sum(w_bss * (margin_bss > 0)),
  }
