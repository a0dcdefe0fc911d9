"""A process's rows of the global batch, packed from its examples (`Batches`).

Row r of a batch of B rows is its own stream: the examples at source positions p with p % B = r,
shuffled by (seed, row, epoch), packed first-fit into rows of `length` tokens. The iterator's
state is the batch count, so a resumed run, on any mesh and any number of processes, sees the
batches it would have seen (`data/pipeline.py` builds the examples and the iterator).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence

import numpy as np

from jaxtune.data import packing
from jaxtune.data.packing import Batch, Example, Group
from jaxtune.errors import ConfigError, DataError
from jaxtune.sharding import BatchRows

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EpochPlan:
  """An epoch of a process's rows, planned without building a batch: the global batches until
  every row has used its examples once (`batches`), and the real tokens (`tokens`) over the slots
  of the batches each row needed (`slots`)."""

  batches: int
  tokens: int
  slots: int

  @property
  def efficiency(self) -> float:
    return self.tokens / max(self.slots, 1)


# How many examples a row may pass over, when packing, for later ones that fit (`_Row.take`).
LOOKAHEAD = 16


@dataclasses.dataclass
class _Row:
  """One row's stream: its examples, shuffled by (seed, row, epoch), one row of them per batch."""

  examples: list[Example]
  length: int
  pack: bool
  seed: tuple[int, int]  # (seed, row)
  shuffle: bool
  max_segments: int = 0  # Most segments (responses) in the row; 0: no bound.
  epoch: int = 0
  index: int = 0  # Into this epoch's order: the examples before it are placed or passed over.
  passed: list[int] = dataclasses.field(default_factory=list)  # Passed over, not yet placed.
  _order: tuple[int, np.ndarray] = (-1, np.zeros(0, np.int64))

  def __post_init__(self):
    self.sizes = [ex.pairs for ex in self.examples]
    self.segments = [len(ex.responses) for ex in self.examples]

  def order(self) -> np.ndarray:
    if self._order[0] != self.epoch:
      n = len(self.examples)
      rng = np.random.default_rng([*self.seed, self.epoch])
      self._order = (self.epoch, rng.permutation(n) if self.shuffle else np.arange(n))
    return self._order[1]

  def _pending(self) -> Iterator[int]:
    """The examples of this epoch not yet placed, in order: those passed over, then the rest."""
    yield from self.passed
    order = self.order()
    while self.index < len(order):
      self.index += 1
      yield int(order[self.index - 1])

  def take(self) -> list[Example]:
    """The next batch's examples of this row: the first pending one and, when packing, each
    later one that still fits, passing over up to LOOKAHEAD that do not (first fit within a
    window of the row's own order). Those passed over stay first in line, so an example waits
    at most as many batches as there are examples before it in line (one is placed per batch)."""
    taken, missed, space, seen = [], [], self.length, 0
    segments = self.max_segments or self.length
    for i in self._pending():
      seen += 1
      fits = self.sizes[i] <= space and self.segments[i] <= segments
      if fits and (self.pack or not taken):
        taken.append(i)
        space, segments = space - self.sizes[i], segments - self.segments[i]
      else:
        missed.append(i)
      if space == 0 or segments == 0 or (taken and not self.pack) or len(missed) >= LOOKAHEAD:
        break
    self.passed = missed + self.passed[seen:]
    if not self.passed and self.index >= len(self.examples):
      self.epoch, self.index = self.epoch + 1, 0
    return [self.examples[i] for i in taken]


class Batches(Iterator[Batch]):
  """Endless global batches of `batch_size` rows, epoch after epoch, of which this process builds
  the rows it holds (`rows`, from `sharding.batch_rows`; None: all of them).

  Row r is packed from its own stream alone: the examples whose source position p has
  p % batch_size == r (`positions`; None: their indices), in an order shuffled by (seed, r,
  epoch). So a process needs only its rows' examples, and the batches depend on neither the mesh
  nor the number of processes: stacked, the processes' rows are the batch one process builds.
  With `repeat=False` a row that has used its examples once stays empty (one pass, for
  evaluation; a row may then have none at all).

  The state is the number of batches given: a restored iterator replays that many plans (no
  batch is built), so it goes on exactly where it was, on any mesh and number of processes."""

  def __init__(
    self,
    data: Sequence[Example],
    batch_size: int,
    length: int,
    *,
    pack: bool,
    seed: int,
    shuffle: bool = True,
    positions: Sequence[int] | None = None,
    rows: BatchRows | None = None,
    repeat: bool = True,
    max_segments: int = 0,
  ):
    self.rows = rows or BatchRows(batch_size, tuple(range(batch_size)))
    if self.rows.batch_size != batch_size:
      raise ValueError(f"rows of a batch of {self.rows.batch_size}, not {batch_size}")
    self.length, self.pack, self.seed, self.shuffle, self.repeat = (
      length,
      pack,
      seed,
      shuffle,
      repeat,
    )
    positions = np.arange(len(data)) if positions is None else np.asarray(positions)
    self.streams: dict[int, list[Example]] = {r: [] for r in self.rows.mine}
    for example, p in zip(data, positions % batch_size, strict=True):
      if p in self.streams:
        self.streams[p].append(example)
    empty = [r for r, examples in self.streams.items() if not examples]
    if repeat and empty:
      raise DataError(
        f"row {empty[0]} of the batch",
        f"has no training example: {len(data)} examples for {batch_size} rows, each trained on "
        f"the examples at the source positions p with p % {batch_size} = its row; use more data "
        "or a smaller train.batch_size",
      )
    self.max_segments = max_segments
    if max_segments and (k := max((len(ex.responses) for ex in data), default=0)) > max_segments:
      raise ConfigError(
        f"data.max_segments={max_segments} is below the {k} responses of a prompt in the data, "
        "which share one row"
      )
    self.batches = 0
    self._rows = self._new_rows()

  def _new_rows(self) -> list[_Row]:
    return [
      _Row(examples, self.length, self.pack, (self.seed, r), self.shuffle, self.max_segments)
      for r, examples in self.streams.items()
    ]

  def _take(self, row: _Row) -> list[Example]:
    if not self.repeat and row.epoch > 0:
      return []
    return row.take()

  def __next__(self) -> Batch:
    return self.next_placed()[0]

  def next_placed(self) -> tuple[Batch, list[list[Example | Group]]]:
    """The next batch and the examples of each of its rows, in the order they are packed."""
    examples, placed = [], []
    for row in self._rows:
      taken = self._take(row)
      placed.append(list(range(len(examples), len(examples) + len(taken))))
      examples += taken
    self.batches += 1
    return self._make_batch(examples, placed), [[examples[i] for i in p] for p in placed]

  def _make_batch(self, examples: list[Example], placed: list[list[int]]) -> Batch:
    return packing.make_batch(examples, placed, self.length)

  @property
  def epoch(self) -> int:
    """The epoch that every one of this process's rows has reached."""
    return min(row.epoch for row in self._rows)

  def batches_per_epoch(self) -> EpochPlan:
    """Epoch 0 of this process's rows (a multi-process run agrees on the max of `batches`)."""
    counts, tokens = [], 0
    for row in self._new_rows():
      count = 0
      while row.epoch == 0:
        tokens += sum(ex.pairs for ex in row.take())
        count += 1
      counts.append(count)
    return EpochPlan(max(counts), tokens, sum(counts) * self.length)

  def state(self) -> dict[str, int]:
    return {"batches": self.batches}

  def restore(self, state: dict[str, int]) -> None:
    if "blocks" in state:  # Written when the rows of a block shared one stream.
      log.warning(
        "the checkpoint's batches came from an older data order (row blocks of the mesh's data "
        "axis): from here on the data order is today's after %d batches, not the saved run's",
        state["batches"],
      )
    self._rows = self._new_rows()
    for _ in range(state["batches"]):
      for row in self._rows:
        self._take(row)
    self.batches = state["batches"]
