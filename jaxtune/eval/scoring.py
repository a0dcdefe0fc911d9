"""Log-likelihoods of token continuations given token contexts, batched and sharded on the
model's mesh: the engine under every log-likelihood request (`eval.requests`).

Each request (context ids, continuation ids) is one example of next-token pairs whose loss
weights mark the continuation (`packing.Example`). Requests are sorted longest first; a forward
pass takes the next requests into `batch_size` rows as long as the longest of them, rounded up to
a multiple of 64 (to reuse compilations), or `row_length` if longer. With `pack` (the default) they
are placed first fit, several to a row, each with its own segment id and positions from 0
(`packing.make_batch`): no request attends to another, so each scores what it scores alone in a
row. Without `pack`, one request per row. Longer rows hold more requests but cost attention
FLOPs that grow with the row's length squared: worth it where the model's width dominates
(see benchmarks/eval_packing.py). The jitted scorer returns, for every
position, the target's log-probability and whether it is the argmax; the host sums each
request's continuation span and asks that every one of its tokens be the argmax (`is_greedy`,
as lm-evaluation-harness defines it).

A request longer than the model's positions plus one keeps its last tokens, as the harness does
(the continuation must fit whole).

Shape letters: B batch, T length, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxtune import sharding
from jaxtune.data import packing
from jaxtune.model import transformer

_LENGTH_BUCKET = 64


@dataclasses.dataclass(frozen=True)
class Scores:
  """Per request: log p(continuation | context) ([n] float64) and whether greedy decoding from
  the context gives the continuation ([n] bool)."""

  logprob: np.ndarray
  greedy: np.ndarray


@functools.cache
def _scorer(model: transformer.Transformer):
  def score(params, inputs_bt, targets_bt, segments_bt, positions_bt):
    logits_btv = model.apply({"params": params}, inputs_bt, positions_bt, segments_bt)
    logits_btv = logits_btv.astype(jnp.float32)
    log_z_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    target_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
    greedy_bt = jnp.argmax(logits_btv, axis=-1) == targets_bt
    # Replicated: every process reads all.
    return (
      nn.with_logical_constraint(target_bt - log_z_bt, (None, None)),
      nn.with_logical_constraint(greedy_bt, (None, None)),
    )

  return jax.jit(score)


def _example(context: Sequence[int], continuation: Sequence[int], max_seq_len: int):
  if not context or not continuation:
    raise ValueError("a request needs a context and a continuation of at least one token")
  if len(continuation) > max_seq_len:
    raise ValueError(
      f"a continuation of {len(continuation)} tokens does not fit {max_seq_len} positions"
    )
  ids = [*context, *continuation][-(max_seq_len + 1) :]
  supervised = np.arange(len(ids)) >= len(ids) - len(continuation)
  return packing.Example(np.asarray(ids, np.int32), supervised)


def score(
  model: Any,
  requests: Sequence[tuple[Sequence[int], Sequence[int]]],
  batch_size: int = 8,
  pack: bool = True,
  progress: bool = True,
  row_length: int = 0,
) -> Scores:
  """The `Scores` of (context ids, continuation ids) requests, in order.

  `model` is a loaded handle (`.module`, `.params`, `.mesh`, `.rules`); `batch_size` is rows per
  forward pass (rounded up to a multiple of the mesh's data axis); `row_length` the least row
  length when packing (capped at the model's positions).
  """
  max_seq_len = model.module.config.max_seq_len
  examples = [_example(c, x, max_seq_len) for c, x in requests]
  data = 1 if model.mesh is None else model.mesh.shape[sharding.DATA]
  rows = -(-min(batch_size, max(len(examples), 1)) // data) * data
  order = sorted(range(len(examples)), key=lambda i: -len(examples[i]))
  logprob = np.zeros(len(examples), np.float64)
  greedy = np.zeros(len(examples), bool)
  scorer = _scorer(model.module)
  chief = jax.process_index() == 0
  with (
    sharding.use(model.mesh, model.rules),
    tqdm(total=len(order), unit="request", disable=not (progress and chief), leave=False) as bar,
  ):
    start = 0
    while start < len(order):
      longest = len(examples[order[start]]) - 1
      length = max(-(-longest // _LENGTH_BUCKET) * _LENGTH_BUCKET, row_length if pack else 0)
      length = min(length, max_seq_len)
      pending = order[start:]
      placed = packing.assign_rows([len(examples[i]) - 1 for i in pending], rows, length, pack)
      chunk = pending[: sum(map(len, placed))]
      batch = packing.make_batch([examples[i] for i in chunk], placed, length)
      arrays = [
        sharding.put_global(getattr(batch, k), model.mesh, model.rules, ("act_batch", "act_seq"))
        for k in ("inputs", "targets", "segment_ids", "positions")
      ]
      logprob_bt, greedy_bt = (np.asarray(x) for x in scorer(model.params, *arrays))
      for r, indices in enumerate(placed):
        for segment, k in enumerate(indices, 1):
          span = (batch.segment_ids[r] == segment) & (batch.weights[r] > 0)
          logprob[chunk[k]] = logprob_bt[r, span].astype(np.float64).sum()
          greedy[chunk[k]] = bool(greedy_bt[r, span].all())
      start += len(chunk)
      bar.update(len(chunk))
  return Scores(logprob, greedy)


def loglikelihoods(
  model: Any,
  requests: Sequence[tuple[Sequence[int], Sequence[int]]],
  batch_size: int = 8,
  progress: bool = True,
) -> np.ndarray:
  """log p(continuation | context) of each request, in order ([n] float64); see `score`."""
  return score(model, requests, batch_size, progress=progress).logprob
