"""From `DataConfig` to batches: source -> conversations -> template -> tokens -> packed rows.

`load` reads and tokenizes everything once (with statistics); `Batches` iterates over the
examples deterministically: shuffled by (seed, epoch), host h of N taking every N-th example, with
a small state (epoch, index) that can be saved and restored so that a resumed run sees exactly the
batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence

import numpy as np

from jaxtune.config import Config, DataConfig
from jaxtune.convert import llama2c
from jaxtune.data import formats, hf_tokenizer, mixtures, packing, synthetic, templates
from jaxtune.data import tokenizer as tokenizer_lib
from jaxtune.data.formats import Conversation
from jaxtune.data.packing import Batch, Example, Stats
from jaxtune.data.sources import BadRecords, DataError, Record, read_records

log = logging.getLogger(__name__)

Tokenizer = tokenizer_lib.Tokenizer | llama2c.Tokenizer | hf_tokenizer.HFTokenizer


@dataclasses.dataclass
class Data:
  tokenizer: tokenizer_lib.Tokenizer
  train: list[Example]
  eval: list[Example]
  stats: Stats
  conversations: list[Conversation]  # Training conversations, in source order.
  held_out: list[Conversation]


def _records(path: str, cfg: DataConfig, bad: BadRecords | None) -> list[Record]:
  if os.path.isdir(path):
    from jaxtune.data import tfds  # TFDS-prepared datasets; imported only when used.

    return [Record(r, f"{path}[{i}]") for i, r in enumerate(tfds.load(path))]
  return read_records(path, cfg.tsv_columns.split(","), bad)


def _conversations(path: str, cfg: DataConfig, stats: Stats) -> list[Conversation]:
  bad = BadRecords() if cfg.on_bad_record == "skip" else None
  records = _records(path, cfg, bad)
  stats.records += len(records) + (bad.count if bad else 0)  # Unreadable ones count as records.
  names = formats.parse_field_map(cfg.fields)
  out = []
  for record in records:
    try:
      fmt = formats.detect(record, names) if cfg.format == "auto" else cfg.format
      out.append(formats.to_conversation(record, fmt, names, cfg.system_prompt))
    except DataError as e:
      if bad is None:
        raise
      bad.add(e)
  if bad is not None and bad.count:
    stats.skipped += bad.count
    for reason, n in bad.reasons.items():
      stats.skipped_reasons[reason] = stats.skipped_reasons.get(reason, 0) + n
    log.warning("%s: skipped %d bad records: %s", path, bad.count, bad.reasons)
  return out


def _is_flan_folder(path: str) -> bool:
  return os.path.isdir(path) and any(f.endswith(".tsv") for f in os.listdir(path))


def conversations(cfg: DataConfig, seed: int, stats: Stats) -> tuple[list, list]:
  """(train, eval) conversations of the configured source."""
  if not cfg.path:
    tasks = synthetic.tasks(seed, cfg.synthetic_examples)
    stats.records = sum(len(t.records) for t in tasks)
    held_out = synthetic.tasks(seed + 1, max(cfg.synthetic_examples // 20, 8))
    return (
      mixtures.mix(tasks, seed, cfg.mixture_cap, cfg.few_shot),
      mixtures.mix(held_out, seed, cfg.mixture_cap, 0, held_out=True),
    )
  if _is_flan_folder(cfg.path):
    tasks = mixtures.flan_cot_tasks(cfg.path)
    stats.records = sum(len(t.records) for t in tasks)
    return mixtures.mix(tasks, seed, cfg.mixture_cap, cfg.few_shot), []
  train = _conversations(cfg.path, cfg, stats)
  if cfg.eval_path:
    return train, _conversations(cfg.eval_path, cfg, Stats())
  if cfg.eval_size:
    if cfg.eval_size >= len(train):
      raise DataError(cfg.path, f"data.eval_size={cfg.eval_size} leaves no training records")
    order = np.random.default_rng(seed).permutation(len(train))
    held = set(order[: cfg.eval_size].tolist())
    return (
      [c for i, c in enumerate(train) if i not in held],
      [c for i, c in enumerate(train) if i in held],
    )
  return train, []


def load_tokenizer(path: str) -> Tokenizer:
  """A saved tokenizer: a llama2.c `.bin` (stories260K's tok512.bin), a SentencePiece `.model`,
  a Hugging Face `tokenizer.json`, or a folder holding one (as a run's `tokenizer/` does; a
  SentencePiece model first)."""
  if os.path.isdir(path):
    saved = {name: os.path.join(path, name) for name in os.listdir(path)}
    if llama2c.TOKENIZER_FILE in saved:
      return llama2c.Tokenizer.load(saved[llama2c.TOKENIZER_FILE])
    if hf_tokenizer.TOKENIZER_JSON in saved and tokenizer_lib.MODEL_FILE not in saved:
      return hf_tokenizer.HFTokenizer.load(path)
  elif path.endswith(".bin"):
    return llama2c.Tokenizer.load(path)
  elif path.endswith(".json"):
    return hf_tokenizer.HFTokenizer.load(path)
  return tokenizer_lib.Tokenizer.load(path)


def make_tokenizer(cfg: DataConfig, train: Sequence[Conversation]) -> Tokenizer:
  specials = templates.TEMPLATES[cfg.template].special_tokens
  if cfg.tokenizer:
    tok = load_tokenizer(cfg.tokenizer)
  else:  # Trained on the rendered training text, so template words become pieces.
    texts = (templates.to_text(templates.render(c, cfg.template), "", "") for c in train)
    tok = tokenizer_lib.train(texts, cfg.tokenizer_vocab_size, specials)
  return tok.with_special_tokens(specials)


def examples(
  convs: Sequence[Conversation], cfg: DataConfig, tok: tokenizer_lib.Tokenizer, stats: Stats
) -> list[Example]:
  out = []
  for c in convs:
    ex = packing.tokenize(templates.render(c, cfg.template), tok, cfg.train_on_prompt)
    ex = packing.fit(ex, cfg.max_length, cfg.truncation, stats)
    if ex is not None:
      out.append(ex)
  return out


def load(cfg: DataConfig, seed: int) -> Data:
  stats = Stats()
  train, held_out = conversations(cfg, seed, stats)
  tok = make_tokenizer(cfg, train)
  train_examples = examples(train, cfg, tok, stats)
  if not train_examples:
    raise DataError(
      cfg.path or "embedded data",
      f"no training example is left: {stats.dropped_too_long} too long and "
      f"{stats.dropped_unsupervised} with nothing supervised within data.max_length="
      f"{cfg.max_length}",
    )
  eval_examples = examples(held_out, cfg, tok, Stats())
  return Data(tok, train_examples, eval_examples, stats, train, held_out)


class Batches(Iterator[Batch]):
  """Endless batches of this host's rows (`batch_size // process_count`), epoch after epoch."""

  def __init__(
    self,
    data: Sequence[Example],
    batch_size: int,
    length: int,
    pack: bool,
    seed: int,
    shuffle: bool = True,
    process_index: int = 0,
    process_count: int = 1,
  ):
    if batch_size % process_count:
      raise DataError("train.batch_size", f"{batch_size} is not divisible by {process_count} hosts")
    self.data, self.rows, self.length, self.pack = data, batch_size // process_count, length, pack
    self.seed, self.shuffle = seed, shuffle
    self.process_index, self.process_count = process_index, process_count
    self.epoch, self.index, self.batches = 0, 0, 0
    self._order_epoch, self._order = -1, np.zeros(0, np.int64)

  def order(self, epoch: int) -> np.ndarray:
    """This host's example indices for `epoch`."""
    if epoch != self._order_epoch:
      n = len(self.data)
      perm = (
        np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
      )
      self._order_epoch, self._order = epoch, perm[self.process_index :: self.process_count]
    return self._order

  def _plan(self, order: np.ndarray, index: int) -> list[list[int]]:
    budget, lengths = self.rows * self.length, []
    for i in order[index:]:
      lengths.append(len(self.data[i]) - 1)
      budget -= lengths[-1]
      if budget < 0:
        break
    return packing.assign_rows(lengths, self.rows, self.length, self.pack)

  def __next__(self) -> Batch:
    order = self.order(self.epoch)
    placed = self._plan(order, self.index)
    picked = order[self.index :]
    batch = packing.make_batch(
      [self.data[i] for i in picked[: sum(map(len, placed))]], placed, self.length
    )
    self.index += sum(map(len, placed))
    if self.index >= len(order):
      self.epoch, self.index = self.epoch + 1, 0
    self.batches += 1
    if not batch.weights.any():
      raise DataError(
        f"batch {self.batches}", "supervises no token; check the loss mask and template"
      )
    return batch

  def batches_per_epoch(self) -> tuple[int, float]:
    """(batches in epoch 0 on this host, packing efficiency) without building the batches."""
    order, index, count, used = self.order(0), 0, 0, 0
    while index < len(order):
      placed = self._plan(order, index)
      used += sum(len(self.data[order[index + k]]) - 1 for k in range(sum(map(len, placed))))
      index += sum(map(len, placed))
      count += 1
    return count, used / max(count * self.rows * self.length, 1)

  def state(self) -> dict[str, int]:
    return {"epoch": self.epoch, "index": self.index, "batches": self.batches}

  def restore(self, state: dict[str, int]) -> None:
    self.epoch, self.index, self.batches = state["epoch"], state["index"], state["batches"]


def training_batches(
  examples: Sequence[Example], cfg: Config, process_index: int = 0, process_count: int = 1
) -> Batches:
  """The training iterator as `cfg` (data and train sections) configures it."""
  return Batches(
    examples,
    cfg.train.batch_size,
    cfg.data.max_length,
    cfg.data.pack,
    cfg.train.seed,
    cfg.data.shuffle,
    process_index,
    process_count,
  )
