"""Greedy decoding with the KV cache: a jitted prefill, then one jitted step per token."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxtune.model import transformer


@functools.cache
def _step(model: transformer.Transformer):
  def step(params, cache, tokens_bt, positions_bt):
    logits_btv, mutated = model.apply(
      {"params": params, "cache": cache}, tokens_bt, positions_bt, decode=True, mutable=["cache"]
    )
    return jnp.argmax(logits_btv[:, -1], axis=-1), mutated["cache"]

  return jax.jit(step)


def greedy(
  model: transformer.Transformer,
  params: Any,
  prompt: Sequence[int],
  max_new_tokens: int,
  stop_ids: Sequence[int] = (),
) -> list[int]:
  """The greedy continuation of `prompt` (ids), up to `max_new_tokens` or a stop id (kept)."""
  if len(prompt) >= model.config.max_seq_len:
    raise ValueError(
      f"a prompt of {len(prompt)} tokens leaves no room in the model's "
      f"{model.config.max_seq_len} positions"
    )
  length = min(len(prompt) + max_new_tokens, model.config.max_seq_len)
  cache = transformer.init_cache(model, 1, length)
  step = _step(model)
  token, cache = step(params, cache, jnp.asarray([prompt]), jnp.arange(len(prompt))[None])
  out = [int(token[0])]
  for position in range(len(prompt), length - 1):
    if out[-1] in stop_ids:
      break
    token, cache = step(params, cache, token[:, None], jnp.asarray([[position]]))
    out.append(int(token[0]))
  return out
