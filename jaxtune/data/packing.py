"""Tokenized examples, loss masks, truncation and packing into rows with segment ids.

An `Example` is a token sequence with a supervised flag per token. It is trained on as
next-token pairs (inputs = ids[:-1], targets = ids[1:], weights = supervised[1:]), so a row of
length T holds examples of up to T + 1 tokens.

Truncation policy (`data.truncation`): `truncate` keeps the first max_length + 1 tokens of a long
example (the prompt and the start of the response) and drops it only if no supervised token is
left; `drop` drops every long example. Both are counted in `Stats`.

Packing puts whole examples into rows, first fit within the rows of one batch, each with its own
segment id (1, 2, ...; 0 is padding), so attention never crosses examples and positions restart.

Preference data packs `Group`s: the K responses to one prompt (each the prompt and its response,
an `Example` of its own), with their ranks. A group is placed whole in one row, each response a
segment, and the batch's `groups` and `ranks` say which responses compete and which is better, so
an objective finds every response's segment (see `train/preference.py`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from jaxtune.data import templates
from jaxtune.data.formats import Conversation
from jaxtune.data.templates import BOS, EOS, Chunk


class TokenizerLike(Protocol):
  bos_id: int
  eos_id: int
  prepend_scheme: str  # "first" or "always": where `encode(text, first=True)` is used.

  def encode(self, text: str, first: bool = False) -> list[int]: ...

  def special_id(self, token: str) -> int | None: ...


@dataclasses.dataclass(frozen=True)
class TopK:
  """A reference model's k most likely next tokens at each of a response's s supervised pairs
  (`train/precomputed.py`): their ids int32 [s, k] and log-probabilities float32 [s, k], and the
  log of the rest of the probability mass float32 [s] (-inf when k is the vocabulary)."""

  ids: np.ndarray
  log_probs: np.ndarray
  rest: np.ndarray


@dataclasses.dataclass(frozen=True)
class Example:
  ids: np.ndarray  # int32 [n]
  supervised: np.ndarray  # bool [n]
  # A reference model's log p(ids[i + 1] | ids[: i + 1]) of each next-token pair, float32 [n - 1],
  # times its supervision (`train/precomputed.py`); None: not computed.
  reference: np.ndarray | None = dataclasses.field(default=None, compare=False)
  # Its top-k next-token distribution at each supervised pair; None: not computed.
  reference_top: TopK | None = dataclasses.field(default=None, compare=False)

  def __len__(self) -> int:
    return len(self.ids)

  @property
  def pairs(self) -> int:
    """Next-token pairs: the slots it takes in a row."""
    return len(self.ids) - 1

  @property
  def responses(self) -> tuple[Example, ...]:
    return (self,)

  @property
  def ranks(self) -> tuple[int, ...]:
    return (0,)


@dataclasses.dataclass(frozen=True)
class Group:
  """The K >= 2 responses to one prompt, each a whole example (prompt and response), ranked: a
  lower rank is a better response, and no two ranks are equal."""

  responses: tuple[Example, ...]
  ranks: tuple[int, ...]

  @property
  def pairs(self) -> int:
    return sum(r.pairs for r in self.responses)


def tokenize(chunks: Sequence[Chunk], tokenizer: TokenizerLike, train_on_prompt: bool) -> Example:
  """Encodes rendered chunks; assistant chunks (or, with `train_on_prompt`, all) supervised.

  The ids are those of Hugging Face's tokenizer on the rendered text (`templates.to_text`) with
  its leading BOS left to `add_special_tokens`: adjacent text chunks of one supervision are
  encoded as one text, and a text gets the leading dummy-prefix space (SentencePiece's "▁") where
  that tokenizer adds it: at the start of the sequence, after its BOS or not ("Once" after BOS is
  "▁Once", as SentencePiece, llama2.c and transformers encode it), and after a special token only
  with the tokenizer's `prepend_scheme` "always" (with "first", "<|im_start|>user" and Llama 2's
  "</s><s>[INST]" have no space before "user" and "[")."""
  ids: list[int] = []
  supervised: list[bool] = []
  after_special = False
  for chunk in _join_text(chunks, train_on_prompt):
    if chunk.special:
      special = {BOS: tokenizer.bos_id, EOS: tokenizer.eos_id}.get(chunk.text)
      piece = [special if special is not None else tokenizer.special_id(chunk.text)]
      if piece[0] is None:
        raise ValueError(f"the tokenizer has no special token {chunk.text!r}; add it first")
    else:
      at_start = all(i == tokenizer.bos_id for i in ids)
      always = after_special and tokenizer.prepend_scheme == "always"
      piece = tokenizer.encode(chunk.text, first=at_start or always)
    ids += piece
    supervised += [chunk.supervised] * len(piece)
    after_special = chunk.special
  return Example(np.asarray(ids, np.int32), np.asarray(supervised, bool))


def _join_text(chunks: Sequence[Chunk], train_on_prompt: bool) -> list[Chunk]:
  """The chunks with `train_on_prompt` applied and adjacent text chunks of one supervision joined:
  BPE merges across their border ("USER: " + "Hi" is "▁USER", ":", "▁Hi", not "▁", "Hi")."""
  joined: list[Chunk] = []
  for chunk in chunks:
    chunk = dataclasses.replace(chunk, supervised=chunk.supervised or train_on_prompt)
    last = joined[-1] if joined else None
    if last and not (last.special or chunk.special) and last.supervised == chunk.supervised:
      joined[-1] = dataclasses.replace(last, text=last.text + chunk.text, content=False)
    else:
      joined.append(chunk)
  return joined


def prompt_ids(conversation: Conversation, template: str, tokenizer: TokenizerLike) -> list[int]:
  """The conversation rendered by `template` and tokenized, ending where the next assistant turn
  begins: what a model continues to answer it."""
  return tokenize(templates.render(conversation, template), tokenizer, False).ids.tolist()


@dataclasses.dataclass
class Stats:
  """What happened to the data, for `data inspect` and the training log."""

  records: int = 0
  skipped: int = 0
  skipped_reasons: dict[str, int] = dataclasses.field(default_factory=dict)
  examples: int = 0
  truncated: int = 0
  dropped_too_long: int = 0
  dropped_unsupervised: int = 0
  tokens: int = 0
  supervised_tokens: int = 0
  max_tokens: int = 0

  def add(self, example: Example) -> None:
    self.examples += 1
    self.tokens += len(example)
    self.supervised_tokens += int(example.supervised[1:].sum())
    self.max_tokens = max(self.max_tokens, len(example))

  @property
  def supervised_fraction(self) -> float:
    return self.supervised_tokens / max(self.tokens, 1)


def fit(example: Example, max_length: int, policy: str, stats: Stats) -> Example | None:
  """Applies the truncation policy to an example of next-token pairs; None if it is dropped."""
  if len(example) - 1 > max_length:
    if policy == "drop":
      stats.dropped_too_long += 1
      return None
    stats.truncated += 1
    example = Example(example.ids[: max_length + 1], example.supervised[: max_length + 1])
  if not example.supervised[1:].any():
    stats.dropped_unsupervised += 1
    return None
  stats.add(example)
  return example


@dataclasses.dataclass(frozen=True)
class Batch:
  """Rows [B, T]: inputs, next-token targets, loss weights, segment ids (0 = padding) and
  positions restarting at each segment; for preference data, each token's group in its row
  (1, 2, ...; the responses to one prompt; 0 = padding) and its response's rank in the group
  (an example alone is a group of one, of rank 0); each pair's precomputed reference
  log-probability where the examples have one (else 0), and at supervised pairs the reference's
  top-k ids, log-probabilities [B, T, k] and rest mass [B, T] (k = 0 without them; else 0)."""

  inputs: np.ndarray
  targets: np.ndarray
  weights: np.ndarray
  segment_ids: np.ndarray
  positions: np.ndarray
  groups: np.ndarray
  ranks: np.ndarray
  reference: np.ndarray
  reference_ids: np.ndarray
  reference_top: np.ndarray
  reference_rest: np.ndarray


def assign_rows(lengths: Sequence[int], rows: int, length: int, pack: bool) -> list[list[int]]:
  """Places examples (their pair counts, in order) into `rows` rows: first fit when packing, one
  per row otherwise. Stops at the first example that fits nowhere; returns the indices per row."""
  fill = [0] * rows
  placed: list[list[int]] = [[] for _ in range(rows)]
  for i, n in enumerate(lengths):
    row = next((r for r in range(rows) if fill[r] + n <= length and (pack or not placed[r])), None)
    if row is None:
      break
    placed[row].append(i)
    fill[row] += n
  return placed


def make_batch(examples: Sequence[Example | Group], placed: list[list[int]], length: int) -> Batch:
  """Rows of the examples (or groups: each response its own segment) placed in each row."""
  rows = len(placed)
  keys = ("inputs", "targets", "segment_ids", "positions", "groups", "ranks")
  arrays = {k: np.zeros((rows, length), np.int32) for k in keys}
  weights = np.zeros((rows, length), np.float32)
  reference = np.zeros((rows, length), np.float32)
  tops = [ex.reference_top for item in examples for ex in item.responses if ex.reference_top]
  k = tops[0].ids.shape[1] if tops else 0
  top = {
    "reference_ids": np.zeros((rows, length, k), np.int32),
    "reference_top": np.zeros((rows, length, k), np.float32),
    "reference_rest": np.zeros((rows, length), np.float32),
  }
  for r, indices in enumerate(placed):
    start, segment = 0, 0
    for group, i in enumerate(indices, 1):
      item = examples[i]
      for ex, rank in zip(item.responses, item.ranks, strict=True):
        segment += 1
        span = slice(start, start + ex.pairs)
        arrays["inputs"][r, span] = ex.ids[:-1]
        arrays["targets"][r, span] = ex.ids[1:]
        arrays["segment_ids"][r, span] = segment
        arrays["positions"][r, span] = np.arange(ex.pairs)
        arrays["groups"][r, span] = group
        arrays["ranks"][r, span] = rank
        weights[r, span] = ex.supervised[1:]
        if ex.reference is not None:
          reference[r, span] = ex.reference
        if ex.reference_top is not None:
          at = start + np.flatnonzero(ex.supervised[1:])
          top["reference_ids"][r, at] = ex.reference_top.ids
          top["reference_top"][r, at] = ex.reference_top.log_probs
          top["reference_rest"][r, at] = ex.reference_top.rest
        start += ex.pairs
  return Batch(weights=weights, reference=reference, **top, **arrays)
