"""Log-likelihoods of continuations given contexts, batched on the model's mesh.

Each request (context ids, continuation ids) becomes one row of next-token pairs whose loss
weights mark the continuation (`packing.make_batch`, one example per row, padding with segment
id 0), and its score is the sum of the continuation tokens' log-probabilities: the negated
`token_losses` of its row. Rows are sorted by length so that a batch's rows are of similar
lengths; row lengths are rounded up to a multiple of 64 to reuse compilations.

Shape letters: B batch, T length, V vocab.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from tqdm import tqdm

from jaxtune import sharding
from jaxtune.data import packing
from jaxtune.model import transformer
from jaxtune.train.sft import token_losses

_LENGTH_BUCKET = 64


@functools.cache
def _scorer(model: transformer.Transformer):
  def score(params, inputs_bt, targets_bt, weights_bt, segments_bt, positions_bt):
    logits_btv = model.apply({"params": params}, inputs_bt, positions_bt, segments_bt)
    row_nll = lambda l_tv, t_t, w_t: token_losses(l_tv[None], t_t[None], w_t[None])[1]  # noqa: E731
    nll_b = jax.vmap(row_nll)(logits_btv, targets_bt, weights_bt)
    return nn.with_logical_constraint(-nll_b, (None,))  # Replicated: every process reads all.

  return jax.jit(score)


def loglikelihoods(
  model: Any,
  requests: Sequence[tuple[Sequence[int], Sequence[int]]],
  batch_size: int = 8,
  progress: bool = True,
) -> np.ndarray:
  """log p(continuation | context) of each request, in order ([n] float64).

  `model` is a loaded handle (`.module`, `.params`, `.mesh`, `.rules`). A request longer than the
  model's positions plus one is a ValueError: fit the prompts first (`base.few_shot`).
  """
  max_seq_len = model.module.config.max_seq_len
  examples = []
  for context, continuation in requests:
    if not context or not continuation:
      raise ValueError("a request needs a context and a continuation of at least one token")
    ids = [*context, *continuation]
    if len(ids) - 1 > max_seq_len:
      raise ValueError(f"a request of {len(ids)} tokens does not fit {max_seq_len} positions")
    supervised = np.arange(len(ids)) >= len(context)
    examples.append(packing.Example(np.asarray(ids, np.int32), supervised))
  data = 1 if model.mesh is None else model.mesh.shape[sharding.DATA]
  rows = -(-min(batch_size, max(len(examples), 1)) // data) * data
  order = sorted(range(len(examples)), key=lambda i: -len(examples[i]))
  scores = np.zeros(len(examples), np.float64)
  score = _scorer(model.module)
  chief = jax.process_index() == 0
  with sharding.use(model.mesh, model.rules):
    for start in tqdm(
      range(0, len(order), rows), unit="batch", disable=not (progress and chief), leave=False
    ):
      chunk = order[start : start + rows]
      longest = len(examples[chunk[0]]) - 1
      length = min(-(-longest // _LENGTH_BUCKET) * _LENGTH_BUCKET, max_seq_len)
      placed = [[k] for k in range(len(chunk))] + [[]] * (rows - len(chunk))
      batch = packing.make_batch([examples[i] for i in chunk], placed, length)
      arrays = [
        sharding.put_global(getattr(batch, k), model.mesh, model.rules, ("act_batch", "act_seq"))
        for k in ("inputs", "targets", "weights", "segment_ids", "positions")
      ]
      scores[chunk] = np.asarray(score(model.params, *arrays))[: len(chunk)]
  return scores
