"""llama2.c tokenizers (`tok*.bin`, e.g. stories260K's tok512.bin): byte-fallback BPE pieces with
merge scores, as llama2.c's `run.c` encodes them.

File: int32 max_token_length, then for each token float32 score, int32 byte length, the bytes.
Token 0 is UNK, 1 BOS, 2 EOS, 3..258 the raw bytes `<0x00>`..`<0xFF>`; the pieces after them are
text with real spaces (SentencePiece's "▁" written as " ").

The interface is `jaxtune.data.tokenizer.Tokenizer`'s: `encode(text, first)` adds the leading
dummy space only where `first` says (see `packing.tokenize`); special tokens can be added after
the vocabulary (saved beside it as `special_tokens.json`).
"""

from __future__ import annotations

import functools
import json
import os
import re
import struct
from collections.abc import Sequence

import numpy as np

from jaxtune.data.sources import DataError
from jaxtune.data.tokenizer import decode_pieces

TOKENIZER_FILE = "tokenizer.bin"
SPECIAL_TOKENS_FILE = "special_tokens.json"
BYTES = range(3, 259)  # Token ids of the raw bytes 0..255.


class Tokenizer:
  """A llama2.c tokenizer: pieces (bytes) with merge scores; BOS 1, EOS 2, bytes at 3..258."""

  # The dummy prefix only where a sequence starts: run.c encodes a prompt once, with one prefix.
  prepend_scheme = "first"

  def __init__(self, pieces: Sequence[bytes], scores: Sequence[float], added: Sequence[str] = ()):
    self.pieces, self.scores = tuple(pieces), tuple(scores)
    self.bos_id, self.eos_id, self.pad_id = 1, 2, 0
    self._lookup = {p: i for i, p in enumerate(self.pieces) if i not in BYTES}
    self.added = {t: len(self.pieces) + i for i, t in enumerate(added)}
    self._added_by_id = {i: t for t, i in self.added.items()}
    self._encode_word = functools.lru_cache(maxsize=1 << 16)(self._bpe)

  @classmethod
  def load(cls, path: str) -> Tokenizer:
    """A `tok*.bin` file; a `tokenizer.bin` (as `save` writes) with its special_tokens.json."""
    try:
      with open(path, "rb") as f:
        blob = f.read()
    except OSError as e:
      raise DataError(path, f"cannot read tokenizer: {e.strerror}") from None
    pieces, scores, offset = [], [], 4
    try:
      while offset < len(blob):
        score, length = struct.unpack_from("<fi", blob, offset)
        offset += 8
        if length < 0 or offset + length > len(blob):
          raise struct.error("piece runs past the end")
        pieces.append(blob[offset : offset + length])
        scores.append(score)
        offset += length
    except struct.error as e:
      raise DataError(path, f"corrupt llama2.c tokenizer at byte {offset}: {e}") from None
    if len(pieces) < 259:
      raise DataError(path, f"{len(pieces)} tokens; a llama2.c tokenizer has at least 259")
    pieces[3:259] = [bytes([b]) for b in range(256)]  # Stored as text; they stand for raw bytes.
    added = []
    special = os.path.join(os.path.dirname(path), SPECIAL_TOKENS_FILE)
    if os.path.basename(path) == TOKENIZER_FILE and os.path.exists(special):
      with open(special) as f:
        added = json.load(f)
    return cls(pieces, scores, added)

  def save(self, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, TOKENIZER_FILE), "wb") as f:
      f.write(struct.pack("<i", max(map(len, self.pieces))))
      for i, (piece, score) in enumerate(zip(self.pieces, self.scores, strict=True)):
        piece = chr(i - 3).encode() if i in BYTES else piece
        f.write(struct.pack("<fi", score, len(piece)) + piece)
    with open(os.path.join(folder, SPECIAL_TOKENS_FILE), "w") as f:
      json.dump(list(self.added), f)

  @property
  def vocab_size(self) -> int:
    return len(self.pieces) + len(self.added)

  def special_id(self, token: str) -> int | None:
    return self.added.get(token, {"<s>": self.bos_id, "</s>": self.eos_id}.get(token))

  def with_special_tokens(self, tokens: Sequence[str]) -> Tokenizer:
    missing = [t for t in tokens if self.special_id(t) is None]
    return Tokenizer(self.pieces, self.scores, [*self.added, *missing]) if missing else self

  def piece(self, i: int) -> str:
    if i in self._added_by_id:
      return self._added_by_id[i]
    return {self.bos_id: "<s>", self.eos_id: "</s>"}.get(i) or self.pieces[i].decode(
      "utf-8", "replace"
    )

  def decode(self, ids: Sequence[int], show_special: bool = False) -> str:
    """Text of `ids`; a leading space is dropped where `encode` adds the dummy prefix (see
    `tokenizer.decode_pieces`). With `show_special`, BOS and EOS appear as "<s>" and "</s>"."""
    specials = (self.bos_id, self.eos_id)
    return decode_pieces(
      ids,
      lambda i: i in self._added_by_id or (show_special and i in specials),
      self.piece,
      lambda run, first: self._decode_run([i for i in run if i not in specials], first),
      self.bos_id,
      self.prepend_scheme,
    )

  def _decode_run(self, run: list[int], first: bool) -> str:
    out = b"".join(self.pieces[i] for i in run)
    return (out[1:] if first and out.startswith(b" ") else out).decode("utf-8", errors="replace")

  def encode(self, text: str, first: bool = False) -> list[int]:
    """Byte-fallback BPE as in llama2.c (no BOS/EOS). Pieces never hold a space past their
    first byte, so each space-led word is merged on its own (and cached)."""
    text = " " + text if first and text else text
    words = re.findall(r" ?[^ ]+| +(?= [^ ])| +$", text) if text else []
    return [i for word in words for i in self._encode_word(word)]

  def _bpe(self, word: str) -> tuple[int, ...]:
    ids = []
    for ch in word:
      b = ch.encode("utf-8")
      ids.extend([self._lookup[b]] if b in self._lookup else [x + 3 for x in b])
    while True:
      best, best_score = None, -np.inf
      for j in range(len(ids) - 1):
        merged = self._lookup.get(self.pieces[ids[j]] + self.pieces[ids[j + 1]])
        if merged is not None and self.scores[merged] > best_score:
          best, best_score = (j, merged), self.scores[merged]
      if best is None:
        return tuple(ids)
      j, merged = best
      ids[j : j + 2] = [merged]
