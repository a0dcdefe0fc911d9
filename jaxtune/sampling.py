"""How each new token is chosen from the logits: the `Sampling` settings and the pure transforms
on logits [B, V] that `generate`'s compiled loop applies.

Ids past the tokenizer's vocabulary (a model's embedding table may be padded past it, for
sharding or to a round size) are never chosen: their logits are -inf before anything else, so
that every token sampled can be decoded to text. Then repetition penalty (CTRL, Keskar et al.
2019, as Hugging Face applies it: on every token of the prompt and of the output so far, positive
logits are divided by the penalty, negative ones multiplied), then greedy (temperature 0), or
temperature, top-k and top-p (nucleus, Holtzman et al. 2020) sampling.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxtune.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How each new token is chosen. `temperature` 0 is greedy; `top_k` 0 and `top_p` 1 are off;
  `repetition_penalty` 1 is off (the NEFTune paper evaluates greedy with 1.2). `vocab_size`: the
  tokenizer's, ids at or past it are never chosen (0: any id of the model's output; `generate`
  sets it from its `vocab_size` argument)."""

  max_new_tokens: int = 256
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  repetition_penalty: float = 1.0
  vocab_size: int = 0

  def validate(self) -> None:
    checks = (
      (self.max_new_tokens > 0, "max_new_tokens must be positive"),
      (
        all(map(math.isfinite, (self.temperature, self.top_p, self.repetition_penalty))),
        "temperature, top_p and repetition_penalty must be finite",
      ),
      (self.temperature >= 0, "temperature must not be negative"),
      (self.top_k >= 0, "top_k must not be negative"),
      (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
      (self.repetition_penalty > 0, "repetition_penalty must be positive"),
      (self.vocab_size >= 0, "vocab_size must not be negative"),
    )
    for ok, message in checks:
      if not ok:
        raise ConfigError(f"sampling: {message}, got {self}")


def known_only(logits_bv: jax.Array, vocab_size: int) -> jax.Array:
  """-inf logits for the ids at or past `vocab_size` (ids no tokenizer text decodes to)."""
  known_v = jnp.arange(logits_bv.shape[-1]) < vocab_size
  return jnp.where(known_v, logits_bv, -jnp.inf)


def penalize_repetition(logits_bv: jax.Array, seen_bv: jax.Array, penalty: float) -> jax.Array:
  """CTRL's penalty on the tokens `seen`: positive logits / penalty, negative ones * penalty."""
  penalized_bv = jnp.where(logits_bv > 0, logits_bv / penalty, logits_bv * penalty)
  return jnp.where(seen_bv, penalized_bv, logits_bv)


def top_k_filter(logits_bv: jax.Array, k: int) -> jax.Array:
  """Keeps the k largest logits of each row (and any tied with the k-th); the rest -inf."""
  kth_b1 = jax.lax.top_k(logits_bv, k)[0][:, -1:]
  return jnp.where(logits_bv < kth_b1, -jnp.inf, logits_bv)


def top_p_filter(logits_bv: jax.Array, p: float) -> jax.Array:
  """Keeps the smallest set of most likely tokens whose probability reaches p: a token stays if
  the tokens more likely than it hold less than p (so the most likely one always stays)."""
  sorted_bv = -jnp.sort(-logits_bv, axis=-1)
  probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
  before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
  kept_b1 = jnp.sum(before_bv < p, axis=-1, keepdims=True)
  threshold_b1 = jnp.take_along_axis(sorted_bv, kept_b1 - 1, axis=-1)
  return jnp.where(logits_bv < threshold_b1, -jnp.inf, logits_bv)


def pick(
  logits_bv: jax.Array, seen_bv: jax.Array | None, sampling: Sampling, keys_b: jax.Array
) -> jax.Array:
  """The next token of each row: unknown ids masked, penalty, then argmax or temperature / top-k
  / top-p sampling."""
  logits_bv = logits_bv.astype(jnp.float32)
  if 0 < sampling.vocab_size < logits_bv.shape[-1]:
    logits_bv = known_only(logits_bv, sampling.vocab_size)
  if sampling.repetition_penalty != 1.0:
    logits_bv = penalize_repetition(logits_bv, seen_bv, sampling.repetition_penalty)
  if sampling.temperature == 0.0:
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  logits_bv = logits_bv / sampling.temperature
  if sampling.top_k:
    logits_bv = top_k_filter(logits_bv, min(sampling.top_k, logits_bv.shape[-1]))
  if sampling.top_p < 1.0:
    logits_bv = top_p_filter(logits_bv, sampling.top_p)
  return jax.vmap(jax.random.categorical)(keys_b, logits_bv).astype(jnp.int32)
