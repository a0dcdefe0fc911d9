"""A run's data on its way to the step: this process's rows read and tokenized, the training and
held-out batches planned, and the run's length in steps agreed by every process.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax

from jaxtune import distributed, runs, sharding
from jaxtune.config import Config
from jaxtune.data import pipeline
from jaxtune.data.batches import Batches
from jaxtune.errors import ConfigError
from jaxtune.train import llava_run

log = logging.getLogger(__name__)


def with_saved_tokenizer(cfg: Config) -> Config:
  """A resumed run keeps the tokenizer it trained, rather than training it again."""
  saved = os.path.join(cfg.train.output_dir, runs.TOKENIZER)
  if cfg.train.resume and not cfg.data.tokenizer and os.path.isdir(saved):
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=saved))
  return cfg


def check_fits(cfg: Config, vocab_size: int, mesh: jax.sharding.Mesh) -> None:
  """Fails before compiling on a configuration that cannot work."""
  if cfg.model.vocab_size < vocab_size:
    raise ConfigError(
      f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {vocab_size} tokens"
    )
  if cfg.data.max_length > cfg.model.max_seq_len:
    raise ConfigError(
      f"data.max_length={cfg.data.max_length} is longer than the model's "
      f"positions (model.max_seq_len={cfg.model.max_seq_len})"
    )
  sharding.check_batch(cfg.train.batch_size // cfg.train.micro_batches, mesh)


def held_out_batches(data: pipeline.Data, cfg: Config, rows) -> Batches:
  """One pass over the held-out examples of this process's rows; without held-out data, over
  the first batch of training examples (source positions below the batch size)."""
  examples, positions = data.eval, data.eval_positions
  if not data.held_out:
    first = data.positions < cfg.train.batch_size
    examples, positions = (
      [ex for ex, f in zip(data.train, first, strict=True) if f],
      data.positions[first],
    )
  return in_order(data, examples, positions, cfg, rows)


def in_order(data: pipeline.Data, examples, positions, cfg: Config, rows) -> Batches:
  """One pass over `examples` of this process's rows, in their order, planned as training plans
  its batches (the data's own batch type: with images for a LLaVA run)."""
  return (data.batches or Batches)(
    examples,
    cfg.train.batch_size,
    cfg.data.max_length,
    pack=cfg.data.pack,
    seed=0,
    shuffle=False,
    positions=positions,
    rows=rows,
    repeat=False,
    max_segments=cfg.data.max_segments,
  )


@dataclasses.dataclass
class Feed:
  """This process's data, its training and held-out batches, and the run's length in steps."""

  data: pipeline.Data
  batches: Batches
  held_out: Batches
  held_out_batches: int  # Held-out batches per pass, agreed by every process.
  steps: int
  segments: int  # The most segments a row can have, agreed (`pipeline.max_segments`).


def make_feed(cfg: Config, mesh: jax.sharding.Mesh) -> Feed:
  """Reads and tokenizes this process's rows of the data and plans the batches."""
  rows = sharding.batch_rows(mesh, cfg.train.batch_size)  # This process's part of each batch.
  data = llava_run.load_data(cfg, cfg.train.seed, rows)
  check_fits(cfg, data.tokenizer.vocab_size, mesh)
  stats = data.stats
  log.info(
    "data%s: %d examples, %d tokens, %.1f%% supervised, %d truncated, %d dropped",
    f" (this process's {rows})" if jax.process_count() > 1 else "",
    stats.examples,
    stats.tokens,
    100 * stats.supervised_fraction,
    stats.truncated,
    stats.dropped_too_long + stats.dropped_unsupervised,
  )
  batches = pipeline.training_batches(data, cfg, rows)
  held_out = held_out_batches(data, cfg, rows)
  epoch, eval_epoch = batches.batches_per_epoch(), held_out.batches_per_epoch()
  # The processes agree on the counts: each one has planned its own rows only.
  segments = pipeline.max_segments(data, cfg.data)
  agreed = distributed.gather(
    [epoch.batches, epoch.tokens, epoch.slots, eval_epoch.batches, segments]
  )
  per_epoch = int(agreed[:, 0].max())
  steps = cfg.train.epochs * per_epoch if cfg.train.epochs else cfg.train.steps
  log.info(
    "%d steps (%d batches per epoch, packing efficiency %.1f%%)",
    steps,
    per_epoch,
    100 * agreed[:, 1].sum() / max(agreed[:, 2].sum(), 1),
  )
  return Feed(data, batches, held_out, int(agreed[:, 3].max()), steps, int(agreed[:, 4].max()))
