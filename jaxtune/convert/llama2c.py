"""llama2.c checkpoints ("legacy v0" `.bin`) and tokenizers (`tok*.bin`).

Model file: 7 little-endian int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
seq_len; a negative vocab_size means a separate output layer), then float32 arrays with matrices
stored [out, in]. RoPE is interleaved there; q/k rows are permuted to jaxtune's rotate-half layout.
"""

from __future__ import annotations

import functools
import json
import os
import re
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxtune.config import ModelConfig
from jaxtune.errors import CheckpointError
from jaxtune.model.attention import interleaved_to_half

_HEADER = struct.Struct("<7i")
TOKENIZER_FILE = "tokenizer.bin"


def load_model(path: str) -> tuple[ModelConfig, dict[str, Any]]:
  """Reads a llama2.c model file into a ModelConfig and a `{'params': ...}` tree of numpy arrays."""
  with open(path, "rb") as f:
    blob = f.read()
  if len(blob) < _HEADER.size:
    raise CheckpointError(f"{path}: {len(blob)} bytes is too short for a llama2.c header")
  if blob[:4] == b"ak42":
    raise CheckpointError(f"{path}: llama2.c versioned ('ak42') files are not supported; export v0")
  dim, hidden, layers, heads, kv_heads, vocab, seq_len = _HEADER.unpack_from(blob)
  if min(dim, hidden, layers, heads, kv_heads, seq_len) <= 0 or vocab == 0 or dim % heads:
    raise CheckpointError(f"{path}: implausible llama2.c header {_HEADER.unpack_from(blob)}")
  cfg = ModelConfig(
    vocab_size=abs(vocab),
    dim=dim,
    num_layers=layers,
    num_heads=heads,
    num_kv_heads=kv_heads,
    mlp_dim=hidden,
    max_seq_len=seq_len,
    tie_embeddings=vocab > 0,
    norm="rmsnorm",
    mlp="swiglu",
    position="rope",
    norm_eps=1e-5,
  )
  v, h, nl, f = abs(vocab), dim // heads, layers, hidden
  shapes = {
    "tok_emb": (v, dim),
    "rms_att": (nl, dim),
    "wq": (nl, heads * h, dim),
    "wk": (nl, kv_heads * h, dim),
    "wv": (nl, kv_heads * h, dim),
    "wo": (nl, dim, heads * h),
    "rms_ffn": (nl, dim),
    "w1": (nl, f, dim),
    "w2": (nl, dim, f),
    "w3": (nl, f, dim),
    "rms_final": (dim,),
    "freq_cis": (2, seq_len, h // 2),
  }
  if vocab < 0:
    shapes["wcls"] = (v, dim)
  expected = _HEADER.size + 4 * sum(int(np.prod(s)) for s in shapes.values())
  if len(blob) != expected:
    raise CheckpointError(
      f"{path}: {len(blob)} bytes, but its header {_HEADER.unpack_from(blob)} implies "
      f"{expected}; the file is truncated or not a llama2.c v0 checkpoint"
    )
  w, offset = {}, _HEADER.size
  for name, shape in shapes.items():
    count = int(np.prod(shape))
    w[name] = np.frombuffer(blob, "<f4", count, offset).reshape(shape)
    offset += 4 * count

  perm = interleaved_to_half(h)

  def heads_in(w_lod, n, permute):  # [L, n*H, D] -> [L, D, n, H]
    w_lnhd = w_lod.reshape(nl, n, h, dim)
    return (w_lnhd[:, :, perm] if permute else w_lnhd).transpose(0, 3, 1, 2)

  layer = {
    "attn_norm": {"scale": w["rms_att"]},
    "attn": {
      "q": {"kernel": heads_in(w["wq"], heads, True)},
      "k": {"kernel": heads_in(w["wk"], kv_heads, True)},
      "v": {"kernel": heads_in(w["wv"], kv_heads, False)},
      "o": {"kernel": w["wo"].reshape(nl, dim, heads, h).transpose(0, 2, 3, 1)},
    },
    "mlp_norm": {"scale": w["rms_ffn"]},
    "mlp": {
      "gate": {"kernel": w["w1"].transpose(0, 2, 1)},
      "up": {"kernel": w["w3"].transpose(0, 2, 1)},
      "down": {"kernel": w["w2"].transpose(0, 2, 1)},
    },
  }
  params = {
    "embed": {"embedding": w["tok_emb"]},
    "layers": layer,
    "final_norm": {"scale": w["rms_final"]},
  }
  if vocab < 0:
    params["lm_head"] = {"embedding": w["wcls"]}
  params = _copy_tree(params)
  return cfg, {"params": params}


def _copy_tree(tree: dict) -> dict:
  return {
    k: _copy_tree(v) if isinstance(v, dict) else np.ascontiguousarray(v) for k, v in tree.items()
  }


class Tokenizer:
  """A llama2.c tokenizer: pieces (bytes) with merge scores; BOS 1, EOS 2, bytes at 3..258.

  The same interface as `jaxtune.data.tokenizer.Tokenizer`: `encode(text, first)` adds the
  leading dummy space only for the first chunk of a text; special tokens can be added after the
  vocabulary.
  """

  def __init__(self, pieces: Sequence[bytes], scores: Sequence[float], added: Sequence[str] = ()):
    self.pieces, self.scores = tuple(pieces), tuple(scores)
    self.bos_id, self.eos_id, self.pad_id = 1, 2, 0
    self._lookup = {p: i for i, p in enumerate(self.pieces) if i > 258 or i < 3}
    self.added = {t: len(self.pieces) + i for i, t in enumerate(added)}
    self._added_by_id = {i: t for t, i in self.added.items()}
    self._encode_word = functools.lru_cache(maxsize=1 << 16)(self._bpe)

  @classmethod
  def load(cls, path: str) -> Tokenizer:
    with open(path, "rb") as f:
      blob = f.read()
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
      raise CheckpointError(f"{path}: corrupt llama2.c tokenizer at byte {offset}: {e}") from None
    if len(pieces) < 259:
      raise CheckpointError(f"{path}: {len(pieces)} tokens; a llama2.c tokenizer has at least 259")
    pieces[3:259] = [bytes([b]) for b in range(256)]  # Stored as text; they stand for raw bytes.
    added = []
    special = os.path.join(os.path.dirname(path), "special_tokens.json")
    if os.path.basename(path) == TOKENIZER_FILE and os.path.exists(special):
      with open(special) as f:
        added = json.load(f)
    return cls(pieces, scores, added)

  def save(self, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, TOKENIZER_FILE), "wb") as f:
      f.write(struct.pack("<i", max(map(len, self.pieces))))
      for i, (piece, score) in enumerate(zip(self.pieces, self.scores, strict=True)):
        piece = chr(i - 3).encode() if 3 <= i < 259 else piece
        f.write(struct.pack("<fi", score, len(piece)) + piece)
    with open(os.path.join(folder, "special_tokens.json"), "w") as f:
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
    out = bytearray()
    for k, t in enumerate(map(int, ids)):
      if t in self._added_by_id or t in (self.bos_id, self.eos_id):
        out += self.piece(t).encode() if show_special or t in self._added_by_id else b""
        continue
      piece = self.pieces[t]
      if (k == 0 or ids[k - 1] == self.bos_id) and piece.startswith(b" "):
        piece = piece[1:]  # The dummy prefix space of the first piece.
      out += piece
    return out.decode("utf-8", errors="replace")

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
