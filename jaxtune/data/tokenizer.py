"""SentencePiece tokenizers: load any `.model`, train a small one, add special tokens explicitly.

Special tokens a template needs but the model lacks (LIMA's "<EOT>", ChatML's "<|im_end|>") are
added after the SentencePiece vocabulary, ids `sp_vocab_size, sp_vocab_size + 1, ...`; the model's
embedding must then grow to `vocab_size` (see `transformer.grow_vocab`). They are saved beside the
model as `special_tokens.json`.

`encode(text, first=False)` encodes without SentencePiece's dummy-prefix space, so that chunks of
a rendered conversation encoded one by one decode back to exactly the rendered string. Where the
prefix goes is the tokenizer's `prepend_scheme`, as Hugging Face's Metaspace names it (see
`packing.tokenize`): "first", only on the text that starts a sequence (after its BOS, if any), as
transformers' LlamaTokenizer does (legacy=False, its default since transformers 5); "always", also
on the text after every special token (legacy Llama tokenizers; SentencePiece's own `encode` of
each piece of a conversation, as Meta's Llama 2 chat code does).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterable, Sequence

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from jaxtune.errors import DataError

SPECIAL_TOKENS_FILE = "special_tokens.json"
MODEL_FILE = "tokenizer.model"


class Tokenizer:
  """A SentencePiece model plus explicitly added special tokens."""

  # Where the dummy prefix goes (see the module docstring); `--to hf` writes it as legacy=False.
  prepend_scheme = "first"

  def __init__(self, proto: bytes, added: Sequence[str] = ()):
    self.proto = proto
    self._sp = spm.SentencePieceProcessor(model_proto=proto)
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(proto)
    kinds = (model.SentencePiece.CONTROL, model.SentencePiece.USER_DEFINED)
    self._specials = {p.piece: i for i, p in enumerate(model.pieces) if p.type in kinds}
    model.normalizer_spec.add_dummy_prefix = False
    self._sp_inner = spm.SentencePieceProcessor(model_proto=model.SerializeToString())
    base = self._sp.vocab_size()
    self.added = {token: base + i for i, token in enumerate(added)}
    self._added_by_id = {i: t for t, i in self.added.items()}

  @classmethod
  def load(cls, path: str) -> Tokenizer:
    """A `.model` file, or a directory holding `tokenizer.model` (and `special_tokens.json`)."""
    folder, model_path = (
      (path, os.path.join(path, MODEL_FILE)) if os.path.isdir(path) else ("", path)
    )
    try:
      with open(model_path, "rb") as f:
        proto = f.read()
      added = []
      if folder and os.path.exists(os.path.join(folder, SPECIAL_TOKENS_FILE)):
        with open(os.path.join(folder, SPECIAL_TOKENS_FILE)) as f:
          added = json.load(f)
      return cls(proto, added)
    except OSError as e:
      raise DataError(model_path, f"cannot read tokenizer: {e.strerror}") from None
    except RuntimeError as e:  # SentencePiece's parse error.
      raise DataError(model_path, f"not a SentencePiece model: {e}") from None

  def save(self, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, MODEL_FILE), "wb") as f:
      f.write(self.proto)
    with open(os.path.join(folder, SPECIAL_TOKENS_FILE), "w") as f:
      json.dump(list(self.added), f)

  @property
  def vocab_size(self) -> int:
    return self._sp.vocab_size() + len(self.added)

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def pad_id(self) -> int:
    return max(self._sp.pad_id(), 0)  # Padding is masked by segment ids; the id only fills.

  def special_id(self, token: str) -> int | None:
    """The id of a special token: added here, or a control / user-defined piece of the model."""
    return self.added.get(token, self._specials.get(token))

  def with_special_tokens(self, tokens: Iterable[str]) -> Tokenizer:
    """This tokenizer, with the `tokens` it lacks added after its vocabulary."""
    missing = [t for t in tokens if self.special_id(t) is None]
    return Tokenizer(self.proto, [*self.added, *missing]) if missing else self

  def encode(self, text: str, first: bool = False) -> list[int]:
    """Token ids of `text` (no BOS/EOS); `first` adds SentencePiece's leading dummy space."""
    return (self._sp if first else self._sp_inner).encode(text)

  def decode(self, ids: Sequence[int], show_special: bool = False) -> str:
    """Text of `ids`; a leading space is dropped where `encode` adds the dummy prefix (see
    `decode_pieces`). With `show_special`, BOS/EOS and other control tokens appear as their
    pieces."""
    return decode_pieces(
      ids,
      lambda i: (
        i in self._added_by_id
        or (show_special and i < self._sp.vocab_size() and self._sp.is_control(i))
      ),
      self.piece,
      lambda run, first: (self._sp if first else self._sp_inner).decode(run),
      self.bos_id,
      self.prepend_scheme,
    )

  def piece(self, i: int) -> str:
    return self._added_by_id.get(i) or self._sp.id_to_piece(int(i))


def decode_pieces(
  ids: Sequence[int],
  whole: Callable[[int], bool],
  piece: Callable[[int], str],
  decode_run: Callable[[list[int], bool], str],
  bos_id: int,
  prepend_scheme: str,
) -> str:
  """Text of `ids`: tokens for which `whole` holds (added and shown special tokens) as their
  `piece`, the runs between them through `decode_run(run, first)`. `first` (drop a leading
  dummy-prefix space) holds where `packing.tokenize` adds one: for the run that starts the
  sequence, after nothing but BOS, and with the "always" scheme for every run after a token."""
  out: list[str] = []
  run: list[int] = []
  leading = True  # Every id so far is BOS.
  first = True  # Whether the next run starts where a dummy prefix was added.
  for i in map(int, ids):
    if whole(i):
      if run:
        out.append(decode_run(run, first))
        run = []
      out.append(piece(i))
      first = (leading and i == bos_id) or prepend_scheme == "always"
    else:
      run.append(i)
    leading = leading and i == bos_id
  if run:
    out.append(decode_run(run, first))
  return "".join(out)


def train(texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = ()) -> Tokenizer:
  """Trains a byte-fallback BPE SentencePiece model (BOS 1, EOS 2, UNK 0; no PAD) on `texts`."""
  proto = io.BytesIO()
  try:
    _train(texts, vocab_size, special_tokens, proto)
  except RuntimeError as e:  # SentencePiece says why, e.g. a vocabulary too large for the data.
    raise DataError("data.tokenizer_vocab_size", f"cannot train a tokenizer: {e}") from None
  return Tokenizer(proto.getvalue())


def _train(texts, vocab_size, special_tokens, proto):
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(texts),
    model_writer=proto,
    vocab_size=vocab_size,
    model_type="bpe",
    normalization_rule_name="identity",  # Keep newlines and spacing as written.
    byte_fallback=True,
    character_coverage=1.0,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    user_defined_symbols=list(special_tokens),
    split_digits=True,
    num_threads=1,
    remove_extra_whitespaces=False,
    max_sentence_length=1 << 16,
    minloglevel=2,
  )
