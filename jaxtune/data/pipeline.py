"""From `DataConfig` to batches: source -> conversations -> template -> tokens -> packed rows.

Data is sharded by the row blocks of the global batch (`sharding.batch_blocks`: one block per
position on the mesh's data axis): the example at position p of its source belongs to shard
p % blocks, and block k of every batch is packed from shard k alone. `load` reads and tokenizes
only this process's shards (with statistics); `Batches` iterates over them deterministically,
shuffled by (seed, epoch, shard), with a state (the batch count) that can be saved and restored so
that a resumed run, on any number of processes, sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence

import numpy as np

from jaxtune.config import Config, DataConfig
from jaxtune.data import formats, hf_tokenizer, mixtures, packing, synthetic, templates
from jaxtune.data import llama2c_tokenizer as llama2c
from jaxtune.data import tokenizer as tokenizer_lib
from jaxtune.data.formats import Conversation
from jaxtune.data.packing import Batch, Example, Stats
from jaxtune.data.sources import BadRecords, Record, Source, open_source
from jaxtune.errors import DataError
from jaxtune.sharding import BatchBlocks

log = logging.getLogger(__name__)

Tokenizer = tokenizer_lib.Tokenizer | llama2c.Tokenizer | hf_tokenizer.HFTokenizer


@dataclasses.dataclass
class Data:
  """A process's data. Every example keeps its position in its source (`positions`,
  `eval_positions`), which names its data shard (`BatchBlocks.keeps`): the row block of the
  global batch that trains on it."""

  tokenizer: Tokenizer
  train: list[Example]
  positions: np.ndarray
  eval: list[Example]
  eval_positions: np.ndarray
  stats: Stats  # Of this process's training shards.
  held_out: list[Conversation]  # All of them, on every process.


@dataclasses.dataclass
class Conversations:
  train: list[Conversation]
  positions: list[int]  # Each training conversation's position in its source.
  held_out: list[Conversation]

  def sharded(self, blocks: BatchBlocks | None) -> Conversations:
    """The training conversations in the data shards of `blocks` (None: all)."""
    if blocks is None:
      return self
    kept = [(c, p) for c, p in zip(self.train, self.positions, strict=True) if blocks.keeps(p)]
    return Conversations([c for c, _ in kept], [p for _, p in kept], self.held_out)


def _source(path: str, cfg: DataConfig) -> Source:
  if os.path.isdir(path):
    from jaxtune.data import tfds  # TFDS-prepared datasets; imported only when used.

    records = tfds.load(path)
    return Source(path, range(len(records)), lambda i: Record(records[i], f"{path}[{i}]"))
  return open_source(path, cfg.tsv_columns.split(","))


def _conversations(
  source: Source, positions: Sequence[int], cfg: DataConfig, stats: Stats
) -> tuple[list[Conversation], list[int]]:
  """The conversations of the records at `positions` that are well-formed (all must be, unless
  `data.on_bad_record=skip`), with their positions."""
  bad = BadRecords() if cfg.on_bad_record == "skip" else None
  names = formats.parse_field_map(cfg.fields)
  out, kept = [], []
  for i in positions:
    try:
      for record in source.read([i]):
        fmt = formats.detect(record, names) if cfg.format == "auto" else cfg.format
        out.append(formats.to_conversation(record, fmt, names, cfg.system_prompt))
        kept.append(i)
    except DataError as e:
      if bad is None:
        raise
      bad.add(e)
  stats.records += len(positions)  # Unreadable ones count as records.
  if bad is not None and bad.count:
    stats.skipped += bad.count
    for reason, n in bad.reasons.items():
      stats.skipped_reasons[reason] = stats.skipped_reasons.get(reason, 0) + n
    log.warning("%s: skipped %d bad records: %s", source.path, bad.count, bad.reasons)
  return out, kept


def _is_flan_folder(path: str) -> bool:
  return os.path.isdir(path) and any(f.endswith(".tsv") for f in os.listdir(path))


def conversations(
  cfg: DataConfig, seed: int, stats: Stats, blocks: BatchBlocks | None = None
) -> Conversations:
  """The training conversations of the configured source in the data shards of `blocks` (None:
  all; a data file is read only there), and all of its held-out ones."""
  if not cfg.path or _is_flan_folder(cfg.path):  # Mixtures: made whole, then sharded.
    if not cfg.path:
      tasks = synthetic.tasks(seed, cfg.synthetic_examples)
      held_out_tasks = synthetic.tasks(seed + 1, max(cfg.synthetic_examples // 20, 8))
      held_out = mixtures.mix(held_out_tasks, seed, cfg.mixture_cap, 0, held_out=True)
    else:
      tasks, held_out = mixtures.flan_cot_tasks(cfg.path), []
    stats.records = sum(len(t.records) for t in tasks)
    train = mixtures.mix(tasks, seed, cfg.mixture_cap, cfg.few_shot)
    return Conversations(train, list(range(len(train))), held_out).sharded(blocks)
  source = _source(cfg.path, cfg)
  held: set[int] = set()
  if cfg.eval_size:
    if cfg.eval_size >= len(source):
      raise DataError(cfg.path, f"data.eval_size={cfg.eval_size} leaves no training records")
    held = set(np.random.default_rng(seed).permutation(len(source))[: cfg.eval_size].tolist())
  positions = [i for i in range(len(source)) if i not in held and (not blocks or blocks.keeps(i))]
  train, positions = _conversations(source, positions, cfg, stats)
  if cfg.eval_path:
    eval_source = _source(cfg.eval_path, cfg)
    held_out, _ = _conversations(eval_source, range(len(eval_source)), cfg, Stats())
  else:
    held_out, _ = _conversations(source, sorted(held), cfg, Stats())
  return Conversations(train, positions, held_out)


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


def _example(c: Conversation, cfg: DataConfig, tok: Tokenizer, stats: Stats) -> Example | None:
  ex = packing.tokenize(templates.render(c, cfg.template), tok, cfg.train_on_prompt)
  return packing.fit(ex, cfg.max_length, cfg.truncation, stats)


def examples(
  convs: Sequence[Conversation], cfg: DataConfig, tok: Tokenizer, stats: Stats
) -> list[Example]:
  """The conversations rendered, tokenized and fitted to `data.max_length` (see `packing.fit`)."""
  return [ex for c in convs if (ex := _example(c, cfg, tok, stats)) is not None]


def _positioned_examples(
  convs: Sequence[Conversation], positions: Sequence[int], cfg: DataConfig, tok, stats: Stats
) -> tuple[list[Example], np.ndarray]:
  pairs = [
    (ex, p) for c, p in zip(convs, positions, strict=True) if (ex := _example(c, cfg, tok, stats))
  ]
  return [ex for ex, _ in pairs], np.asarray([p for _, p in pairs], np.int64)


def _in_shards(blocks: BatchBlocks | None) -> str:
  return f" in data shards {list(blocks.mine)} of {blocks.count}" if blocks else ""


def load(cfg: DataConfig, seed: int, blocks: BatchBlocks | None = None) -> Data:
  """This process's data: the training and held-out examples in the data shards of `blocks`
  (`sharding.batch_blocks`; None: all), tokenized. Training a tokenizer (no `data.tokenizer`)
  reads every record, on every process, since the tokenizer is trained on all of them."""
  stats = Stats()
  train_tokenizer = not cfg.tokenizer
  convs = conversations(cfg, seed, stats, None if train_tokenizer else blocks)
  tok = make_tokenizer(cfg, convs.train)
  if train_tokenizer:  # Read whole for the tokenizer; this process keeps its shards.
    convs = convs.sharded(blocks)
  train, positions = _positioned_examples(convs.train, convs.positions, cfg, tok, stats)
  if not train:
    raise DataError(
      cfg.path or "embedded data",
      f"no training example is left{_in_shards(blocks)}: "
      f"{stats.dropped_too_long} too long and {stats.dropped_unsupervised} with nothing "
      f"supervised within data.max_length={cfg.max_length}",
    )
  held = [(c, i) for i, c in enumerate(convs.held_out) if not blocks or blocks.keeps(i)]
  evals, eval_positions = _positioned_examples(
    [c for c, _ in held], [i for _, i in held], cfg, tok, Stats()
  )
  return Data(tok, train, positions, evals, eval_positions, stats, convs.held_out)


@dataclasses.dataclass(frozen=True)
class EpochPlan:
  """An epoch of a process's blocks, planned without building a batch: the global batches until
  every block has used its shard once (`batches`), and the real tokens (`tokens`) over the row
  slots those blocks' batches give (`slots`)."""

  batches: int
  tokens: int
  slots: int

  @property
  def efficiency(self) -> float:
    return self.tokens / max(self.slots, 1)


@dataclasses.dataclass
class _Stream:
  """One row block's examples, shuffled by (seed, epoch, block), packed into its rows."""

  examples: list[Example]
  rows: int
  length: int
  pack: bool
  seed: tuple[int, int]  # (seed, block)
  shuffle: bool
  epoch: int = 0
  index: int = 0
  _order: tuple[int, np.ndarray] = (-1, np.zeros(0, np.int64))

  def order(self) -> np.ndarray:
    if self._order[0] != self.epoch:
      n = len(self.examples)
      rng = np.random.default_rng([*self.seed, self.epoch])
      self._order = (self.epoch, rng.permutation(n) if self.shuffle else np.arange(n))
    return self._order[1]

  def take(self) -> tuple[list[Example], list[list[int]]]:
    """The next batch's examples of this block and their rows (`packing.assign_rows`)."""
    order = self.order()
    budget, lengths = self.rows * self.length, []
    for i in order[self.index :]:
      lengths.append(len(self.examples[i]) - 1)
      budget -= lengths[-1]
      if budget < 0:
        break
    placed = packing.assign_rows(lengths, self.rows, self.length, self.pack)
    taken = order[self.index : self.index + sum(map(len, placed))]
    self.index += len(taken)
    if self.index >= len(order):
      self.epoch, self.index = self.epoch + 1, 0
    return [self.examples[i] for i in taken], placed


class Batches(Iterator[Batch]):
  """Endless global batches of `batch_size` rows, epoch after epoch, of which this process builds
  the row blocks it holds (`blocks`, from `sharding.batch_blocks`; None: one block, all rows).

  Block k packs its rows from shard k of the data alone: the examples whose source position p has
  p % blocks.count == k (`positions`; None: their indices), in an order shuffled by (seed, epoch,
  k). A process therefore needs only its own shards, and the batches depend on the mesh's data
  axis but not on how many processes share it: stacked, the processes' rows are the batch one
  process builds on the same mesh. With `repeat=False` a block that has used its shard once
  gives empty rows (one pass, for evaluation).

  The state is the number of batches given: a restored iterator replays that many plans (no
  batch is built), so it goes on exactly where it was, on any number of processes."""

  def __init__(
    self,
    data: Sequence[Example],
    batch_size: int,
    length: int,
    pack: bool,
    seed: int,
    shuffle: bool = True,
    positions: Sequence[int] | None = None,
    blocks: BatchBlocks | None = None,
    repeat: bool = True,
  ):
    self.blocks = blocks or BatchBlocks(1, (0,), batch_size)
    self.length, self.pack, self.seed, self.shuffle, self.repeat = (
      length,
      pack,
      seed,
      shuffle,
      repeat,
    )
    positions = np.arange(len(data)) if positions is None else np.asarray(positions)
    self.shards = {
      k: [data[i] for i in np.flatnonzero(positions % self.blocks.count == k)]
      for k in self.blocks.mine
    }
    if repeat:
      for k, shard in self.shards.items():
        if not shard:
          raise DataError(
            f"data shard {k} of {self.blocks.count}",
            f"has no training example: {len(data)} examples among {self.blocks.count} row "
            "blocks of the batch (the mesh's data axis); use more data or a smaller mesh.data",
          )
    self.batches = 0
    self._streams = self._new_streams()

  def _new_streams(self) -> list[_Stream]:
    return [
      _Stream(shard, self.blocks.rows, self.length, self.pack, (self.seed, k), self.shuffle)
      for k, shard in self.shards.items()
    ]

  def _take(self, stream: _Stream) -> tuple[list[Example], list[list[int]]]:
    if not self.repeat and stream.epoch > 0:
      return [], [[] for _ in range(stream.rows)]
    return stream.take()

  def __next__(self) -> Batch:
    parts = [packing.make_batch(*self._take(s), self.length) for s in self._streams]
    self.batches += 1
    return Batch(**{k: np.concatenate([vars(p)[k] for p in parts]) for k in vars(parts[0])})

  @property
  def epoch(self) -> int:
    """The epoch that every one of this process's blocks has reached."""
    return min(s.epoch for s in self._streams)

  def batches_per_epoch(self) -> EpochPlan:
    """Epoch 0 of this process's blocks (a multi-process run agrees on the max of `batches`)."""
    counts, tokens = [], 0
    for stream in self._new_streams():
      count = 0
      while stream.epoch == 0:
        taken, _ = stream.take()
        tokens += sum(len(ex) - 1 for ex in taken)
        count += 1
      counts.append(count)
    return EpochPlan(max(counts), tokens, sum(counts) * self.blocks.rows * self.length)

  def state(self) -> dict[str, int]:
    return {"batches": self.batches, "blocks": self.blocks.count}

  def restore(self, state: dict[str, int]) -> None:
    saved = state.get("blocks", self.blocks.count)
    if saved != self.blocks.count:
      log.warning(
        "the checkpoint's batches came from %d data shards, this mesh makes %d: from here on "
        "the data order is the one this mesh gives after %d batches, not the saved run's",
        saved,
        self.blocks.count,
        state["batches"],
      )
    self._streams = self._new_streams()
    for _ in range(state["batches"]):
      for stream in self._streams:
        self._take(stream)
    self.batches = state["batches"]


def training_batches(data: Data, cfg: Config, blocks: BatchBlocks | None = None) -> Batches:
  """The training iterator as `cfg` (data and train sections) configures it; this process builds
  the rows of `blocks` (None: all)."""
  return Batches(
    data.train,
    cfg.train.batch_size,
    cfg.data.max_length,
    cfg.data.pack,
    cfg.train.seed,
    cfg.data.shuffle,
    data.positions,
    blocks,
  )
