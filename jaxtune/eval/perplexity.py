"""Held-out loss and perplexity of an instruction dataset, on the supervised tokens only.

The data goes through the training pipeline (any format `data.format` reads, rendered with the
checkpoint's chat template unless `--template` says otherwise, loss masks on the responses,
examples longer than the model's positions truncated, packed rows), and through the training
eval step: perplexity = exp(sum of the supervised tokens' losses / their count).
"""

from __future__ import annotations

import math
from typing import Any

import jax
from tqdm import tqdm

from jaxtune import sharding
from jaxtune.config import DataConfig
from jaxtune.data import pipeline
from jaxtune.data.batches import Batches
from jaxtune.errors import DataError
from jaxtune.eval import base
from jaxtune.train.sft import SFT
from jaxtune.train.step import make_eval_step


def run(model: Any, options: base.Options) -> base.Result:
  template = options.template or model.template
  conversations, stats = base.conversations(options, "perplexity")
  cfg = DataConfig(template=template, max_length=model.config.max_seq_len, shuffle=False)
  examples = pipeline.examples(conversations, cfg, model.tokenizer, stats)
  if not examples:
    raise DataError(options.data, "no example with a supervised token")
  data = 1 if model.mesh is None else model.mesh.shape[sharding.DATA]
  rows = -(-options.batch_size // data) * data
  batches = Batches(examples, rows, cfg.max_length, pack=True, seed=0, shuffle=False, repeat=False)
  sft = SFT(model.module)
  eval_step = jax.jit(make_eval_step(sft))
  total = count = 0.0
  with sharding.use(model.mesh, model.rules):
    for _ in tqdm(
      range(batches.batches_per_epoch().batches), unit="batch", disable=jax.process_index() != 0
    ):
      arrays = {
        k: sharding.put_global(v, model.mesh, model.rules, ("act_batch", "act_seq"))
        for k, v in vars(next(batches)).items()
      }
      sums, n = eval_step(model.params, {}, arrays)
      total, count = total + float(sums[sft.eval_metric]), count + float(n)
  loss = total / count
  metrics = {
    "loss": loss,
    "perplexity": math.exp(loss),
    "supervised_tokens": int(count),
    "examples": len(examples),
    "truncated": stats.truncated,
    "dropped_unsupervised": stats.dropped_unsupervised,
  }
  return base.Result("perplexity", metrics)
