"""Hugging Face `tokenizer.json` tokenizers (the `tokenizers` library: byte-level BPE as in GPT-2,
Llama 3 and Qwen2, or SentencePiece-style Metaspace BPE), behind the interface of
`jaxtune.data.tokenizer.Tokenizer`.

As there: `encode(text, first=False)` adds no leading space, so a rendered conversation encoded
chunk by chunk decodes back to exactly the rendered string (for SentencePiece-style tokenizers the
prefix space is turned off in a second copy of the tokenizer, and so is the decoder's stripping of
it). `prepend_scheme` says where `packing.tokenize` asks for that space: "always" where the spec
adds it to every text between special tokens (Metaspace "always", the Prepend normalizer of legacy
Llama tokenizer.json files, ByteLevel's add_prefix_space), else "first". Text never turns into
special tokens, which only templates insert; tokens a template needs and the tokenizer lacks are
added after its vocabulary (`special_tokens.json`). BOS and EOS come from tokenizer_config.json or
special_tokens_map.json beside tokenizer.json (-1: none).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

from jaxtune.data.tokenizer import decode_pieces
from jaxtune.errors import DataError

TOKENIZER_JSON = "tokenizer.json"
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
SPECIAL_TOKENS_FILE = "special_tokens.json"


class HFTokenizer:
  """A `tokenizer.json` (its text `spec`) with its BOS / EOS tokens and added special tokens."""

  def __init__(
    self,
    spec: str,
    bos: str | None = None,
    eos: str | None = None,
    pad: str | None = None,
    added: Sequence[str] = (),
  ):
    import tokenizers  # Only where a tokenizer.json is used.

    self.spec, self.bos, self.eos, self.pad = spec, bos, eos, pad
    parsed = json.loads(spec)
    self._outer = tokenizers.Tokenizer.from_str(spec)
    self._inner = tokenizers.Tokenizer.from_str(json.dumps(_without_prefix_space(parsed)))
    for tk in (self._outer, self._inner):
      tk.encode_special_tokens = True  # "<|im_end|>" in a user's text is text.
    self.prepend_scheme = "always" if _prefixes_every_text(parsed) else "first"
    self._specials = {t["content"]: t["id"] for t in parsed.get("added_tokens", ()) if t["special"]}
    self._special_ids = set(self._specials.values())
    base = self._outer.get_vocab_size(with_added_tokens=True)
    self.added = {token: base + i for i, token in enumerate(added)}
    self._added_by_id = {i: t for t, i in self.added.items()}

  @classmethod
  def load(cls, path: str) -> HFTokenizer:
    """A tokenizer.json file, or a folder holding it (and its config, special_tokens.json)."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    spec_path = os.path.join(path, TOKENIZER_JSON) if os.path.isdir(path) else path
    try:
      with open(spec_path) as f:
        spec = f.read()
      names = {}
      for name in reversed(CONFIG_FILES):  # tokenizer_config.json wins.
        config_path = os.path.join(folder, name)
        if os.path.exists(config_path):
          with open(config_path) as f:
            names |= {k: _content(v) for k, v in json.load(f).items() if k.endswith("_token")}
      added = []
      if os.path.exists(os.path.join(folder, SPECIAL_TOKENS_FILE)):
        with open(os.path.join(folder, SPECIAL_TOKENS_FILE)) as f:
          added = json.load(f)
      return cls(
        spec, names.get("bos_token"), names.get("eos_token"), names.get("pad_token"), added
      )
    except OSError as e:
      raise DataError(spec_path, f"cannot read tokenizer: {e.strerror}") from None
    except Exception as e:  # The tokenizers library's parse errors.
      raise DataError(spec_path, f"not a Hugging Face tokenizer: {e}") from None

  def save(self, folder: str) -> None:
    """tokenizer.json, tokenizer_config.json (transformers reads them with the added tokens as
    special tokens) and special_tokens.json (jaxtune's added tokens)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, TOKENIZER_JSON), "w") as f:
      f.write(self.spec)
    config: dict[str, Any] = dict(
      tokenizer_class="PreTrainedTokenizerFast",
      added_tokens_decoder={
        str(i): dict(content=t, special=True, lstrip=False, rstrip=False, normalized=False)
        for t, i in self.added.items()
      },
    )
    for name, token in (("bos_token", self.bos), ("eos_token", self.eos), ("pad_token", self.pad)):
      if token is not None:
        config[name] = token
    with open(os.path.join(folder, CONFIG_FILES[0]), "w") as f:
      json.dump(config, f, indent=2)
    with open(os.path.join(folder, SPECIAL_TOKENS_FILE), "w") as f:
      json.dump(list(self.added), f)

  @property
  def vocab_size(self) -> int:
    return self._outer.get_vocab_size(with_added_tokens=True) + len(self.added)

  @property
  def bos_id(self) -> int:
    return self._id(self.bos)

  @property
  def eos_id(self) -> int:
    return self._id(self.eos)

  @property
  def pad_id(self) -> int:
    return max(self._id(self.pad), 0)  # Padding is masked by segment ids; the id only fills.

  def _id(self, token: str | None) -> int:
    found = None if token is None else self._outer.token_to_id(token)
    return -1 if found is None else found

  def special_id(self, token: str) -> int | None:
    """The id of a special token: added here, or special in tokenizer.json."""
    return self.added.get(token, self._specials.get(token))

  def with_special_tokens(self, tokens: Iterable[str]) -> HFTokenizer:
    """This tokenizer, with the `tokens` it lacks added after its vocabulary."""
    missing = [t for t in tokens if self.special_id(t) is None]
    if not missing:
      return self
    return HFTokenizer(self.spec, self.bos, self.eos, self.pad, [*self.added, *missing])

  def encode(self, text: str, first: bool = False) -> list[int]:
    """Token ids of `text` (no BOS/EOS); `first` adds the tokenizer's leading space, if any."""
    return (self._outer if first else self._inner).encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int], show_special: bool = False) -> str:
    """Text of `ids`; a leading space is dropped where `encode` adds the prefix space.
    With `show_special`, tokenizer.json's special tokens (BOS, EOS, ...) appear as text."""
    return decode_pieces(
      ids,
      lambda i: i in self._added_by_id or (show_special and i in self._special_ids),
      self.piece,
      lambda run, first: (self._outer if first else self._inner).decode(
        run, skip_special_tokens=True
      ),
      self.bos_id,
      self.prepend_scheme,
    )

  def piece(self, i: int) -> str:
    return self._added_by_id.get(i) or self._outer.id_to_token(int(i))


def _content(token: Any) -> str | None:
  """A token of tokenizer_config.json: a string, or an AddedToken as a dict."""
  return token.get("content") if isinstance(token, dict) else token


def _prefixes_every_text(node: Any) -> bool:
  """Whether the spec adds its leading space to every text between special tokens, not only to
  the text at the start (Metaspace's prepend_scheme "first")."""
  if isinstance(node, list):
    return any(map(_prefixes_every_text, node))
  if not isinstance(node, dict):
    return False
  kind = node.get("type")
  if kind == "Metaspace":  # Files older than prepend_scheme have add_prefix_space alone.
    default = "always" if node.get("add_prefix_space", True) else "never"
    return node.get("prepend_scheme", default) == "always"
  if kind == "ByteLevel" and node.get("add_prefix_space"):
    return True
  return kind == "Prepend" or any(
    _prefixes_every_text(node.get(k))
    for k in ("normalizer", "normalizers", "pre_tokenizer", "pretokenizers")
  )


def _without_prefix_space(node: Any) -> Any:
  """The spec with no step that adds a leading space (Metaspace's prepend, a normalizer's
  Prepend, ByteLevel's add_prefix_space) and no decoder step that strips one."""
  if isinstance(node, list):
    return [_without_prefix_space(x) for x in node if not _adds_or_strips_space(x)]
  if not isinstance(node, dict):
    return node
  node = {k: _without_prefix_space(v) for k, v in node.items()}
  if node.get("type") == "Metaspace":
    node.update(prepend_scheme="never", add_prefix_space=False)
  if node.get("type") == "ByteLevel" and "add_prefix_space" in node:
    node["add_prefix_space"] = False
  for key in ("normalizer", "decoder"):
    if isinstance(node.get(key), dict) and _adds_or_strips_space(node[key]):
      node[key] = None
  return node


def _adds_or_strips_space(node: Any) -> bool:
  return isinstance(node, dict) and (
    node.get("type") == "Prepend" or (node.get("type") == "Strip" and node.get("start", 0) > 0)
  )
