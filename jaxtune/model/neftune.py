"""NEFTune (Jain et al. 2023): uniform noise on the input embeddings during training.

Noise ~ U(-1, 1) * alpha / sqrt(L * d), where d is the model width and L the length of the
example the token belongs to. Implementations that take L from the padded or packed row shrink
the noise of every example in a packed row; here each segment of a packed row gets its own
`alpha / sqrt(L_segment * d)` and padding (segment 0) gets none.

Shape letters: B batch, T length, D model dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_lengths(segment_ids_bt: jax.Array) -> jax.Array:
  """[B, T]: the length of the segment each token belongs to (0 for padding)."""
  b, t = segment_ids_bt.shape
  flat = (segment_ids_bt + jnp.arange(b)[:, None] * (t + 1)).reshape(-1)
  counts = jax.ops.segment_sum(jnp.ones_like(flat), flat, num_segments=b * (t + 1))
  return jnp.where(segment_ids_bt != 0, counts[flat].reshape(b, t), 0)


def noise(rng: jax.Array, segment_ids_bt: jax.Array, dim: int, alpha: float) -> jax.Array:
  """NEFTune noise [B, T, D] (float32) for a batch of (possibly packed) rows."""
  lengths_bt = segment_lengths(segment_ids_bt).astype(jnp.float32)
  scale_bt = jnp.where(lengths_bt > 0, alpha / jnp.sqrt(jnp.maximum(lengths_bt, 1.0) * dim), 0.0)
  u_btd = jax.random.uniform(rng, (*segment_ids_bt.shape, dim), jnp.float32, -1.0, 1.0)
  return u_btd * scale_bt[..., None]
