"""The embedded default dataset: small instruction tasks generated from a seed, byte-tokenized.

No downloads: every example is made here (arithmetic, sorting, reversing, casing, counting), so
`jaxtune train` runs anywhere. Responses are short and exactly learnable, so a falling held-out
loss means the model learned the tasks, not the noise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_OFFSET = 3  # Token id of byte b is b + 3.
VOCAB_SIZE = 256 + BYTE_OFFSET

_WORDS = (
  "apple river stone cloud garden window purple rocket silver candle forest planet mirror "
  "ladder pencil orange summer winter button castle dragon marble pepper rabbit tunnel"
).split()

TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"


def _tasks(rng: np.random.Generator) -> tuple[str, str]:
  kind = rng.integers(5)
  if kind == 0:
    a, b = rng.integers(0, 100, 2)
    return f"Add {a} and {b}.", str(a + b)
  if kind == 1:
    xs = rng.integers(0, 10, rng.integers(3, 7))
    return f"Sort these digits: {' '.join(map(str, xs))}", " ".join(map(str, sorted(xs)))
  word = _WORDS[rng.integers(len(_WORDS))]
  if kind == 2:
    return f"Reverse the word {word}.", word[::-1]
  if kind == 3:
    return f"Write {word} in capital letters.", word.upper()
  return f"How many letters are in {word}?", str(len(word))


def encode(text: str) -> list[int]:
  return [b + BYTE_OFFSET for b in text.encode("utf-8")]


def decode(ids: list[int]) -> str:
  return bytes(i - BYTE_OFFSET for i in ids if i >= BYTE_OFFSET).decode("utf-8", "replace")


def examples(seed: int) -> Iterator[tuple[list[int], list[bool]]]:
  """Endless (tokens, supervised) pairs: BOS prompt response EOS, supervising response and EOS."""
  rng = np.random.default_rng(seed)
  while True:
    instruction, response = _tasks(rng)
    prompt = [BOS_ID] + encode(TEMPLATE.format(instruction=instruction))
    answer = encode(response) + [EOS_ID]
    yield prompt + answer, [False] * len(prompt) + [True] * len(answer)


@dataclasses.dataclass(frozen=True)
class Batch:
  """Packed rows [B, T]: inputs, next-token targets, loss weights, segment ids (0 = padding)."""

  inputs: np.ndarray
  targets: np.ndarray
  weights: np.ndarray
  segment_ids: np.ndarray


def packed_batches(seed: int, batch_size: int, length: int) -> Iterator[Batch]:
  """Greedily packs whole examples into rows of `length` next-token pairs."""
  source = examples(seed)
  pending = None
  while True:
    rows = {
      k: np.zeros((batch_size, length), np.int32) for k in ("inputs", "targets", "segment_ids")
    }
    weights = np.zeros((batch_size, length), np.float32)
    for r in range(batch_size):
      fill, segment = 0, 1
      while True:
        tokens, supervised = pending or next(source)
        n = len(tokens) - 1
        if n > length:
          raise ValueError(f"a synthetic example of {n + 1} tokens exceeds the row length {length}")
        if fill + n > length:
          pending = (tokens, supervised)
          break
        pending = None
        span = slice(fill, fill + n)
        rows["inputs"][r, span] = tokens[:-1]
        rows["targets"][r, span] = tokens[1:]
        rows["segment_ids"][r, span] = segment
        weights[r, span] = supervised[1:]
        fill, segment = fill + n, segment + 1
    yield Batch(weights=weights, **rows)
