"""Chat templates as data: each is a few strings with placeholders, rendered into chunks.

Placeholders: `{content}`, `{input}`, `{system}` take the conversation's text; `{bos}` and
`{eos}` are the tokenizer's special tokens; a template's `special_tokens` (e.g. "<|im_end|>",
"<EOT>") are literal strings that become single tokens, added to the vocabulary if missing.
Special tokens are recognized only in template text, never inside user content.

The assistant's header belongs to `user`, so rendering up to the last user turn is the prompt for
generation. Only `assistant` chunks are supervised by default.
"""

from __future__ import annotations

import dataclasses
import re

from jaxtune.data.formats import Conversation
from jaxtune.errors import DataError

BOS, EOS = "{bos}", "{eos}"


@dataclasses.dataclass(frozen=True)
class Template:
  begin: str = BOS
  system: str = ""  # With {system}; "" means no system slot (unless `first_user` has one).
  default_system: str = ""
  first_user: str = ""  # With {system} and {content}: the first user turn carries the system.
  user: str = "{content}"
  user_with_input: str = (
    ""  # With {input}; "" means the input joins the content after a blank line.
  )
  assistant: str = "{content}" + EOS
  after_assistant: str = ""
  special_tokens: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Chunk:
  """A run of text. `special`: a single special token ("{bos}", "{eos}" or a literal one);
  `content`: the conversation's own text (never scanned for special tokens)."""

  text: str
  supervised: bool
  special: bool = False
  content: bool = False


_ALPACA_HEAD = "Below is an instruction that describes a task"
_ALPACA_TAIL = " Write a response that appropriately completes the request.\n\n### Instruction:\n"

TEMPLATES: dict[str, Template] = {
  # Stanford Alpaca (Taori et al. 2023), with and without input.
  "alpaca": Template(
    user=_ALPACA_HEAD + "." + _ALPACA_TAIL + "{content}\n\n### Response:",
    user_with_input=_ALPACA_HEAD
    + ", paired with an input that provides further context."
    + _ALPACA_TAIL
    + "{content}\n\n### Input:\n{input}\n\n### Response:",
  ),
  # Vicuna v1.1 (FastChat).
  "vicuna": Template(
    system="{system} ",
    default_system="A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    user="USER: {content} ASSISTANT:",
    assistant=" {content}" + EOS,
  ),
  # LIMA (Zhou et al. 2023): an end-of-turn token after every utterance.
  "lima": Template(user="{content}<EOT>", assistant="{content}<EOT>", special_tokens=("<EOT>",)),
  # Llama-2 chat (Touvron et al. 2023): each exchange is BOS [INST] ... [/INST] ... EOS.
  "llama2": Template(
    begin="",
    first_user=BOS + "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{content} [/INST]",
    user=BOS + "[INST] {content} [/INST]",
    assistant=" {content} " + EOS,
  ),
  # ChatML.
  "chatml": Template(
    begin="",
    system="<|im_start|>system\n{system}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
    assistant="{content}<|im_end|>",
    after_assistant="\n",
    special_tokens=("<|im_start|>", "<|im_end|>"),
  ),
  # Plain concatenation: prompt, then response and EOS.
  "raw": Template(),
}

_PLACEHOLDER = re.compile(r"(\{(?:bos|eos|content|input|system)\})")


def _fill(pattern: str, template: Template, supervised: bool, **text: str) -> list[Chunk]:
  chunks = []
  specials = [re.escape(s) for s in template.special_tokens]
  for part in _PLACEHOLDER.split(pattern):
    if not part:
      continue
    if part in (BOS, EOS):
      chunks.append(Chunk(part, supervised, special=True))
    elif _PLACEHOLDER.fullmatch(part):
      value = text[part[1:-1]]
      if value:
        chunks.append(Chunk(value, supervised, content=True))
    else:
      for piece in re.split(f"({'|'.join(specials)})", part) if specials else [part]:
        if piece:
          chunks.append(Chunk(piece, supervised, special=piece in template.special_tokens))
  return chunks


def render(conversation: Conversation, name: str) -> list[Chunk]:
  """The conversation under template `name`, as chunks; assistant turns supervised."""
  template = TEMPLATES[name]
  messages = conversation.messages
  system = next((m.content for m in messages if m.role == "system"), template.default_system)
  chunks = _fill(template.begin, template, False)
  if system and not template.first_user:
    if not template.system:
      raise DataError(conversation.where, f"template {name!r} has no place for a system prompt")
    chunks += _fill(template.system, template, False, system=system)
  first = True
  for m in messages:
    if m.role == "user":
      content, pattern = m.content, template.user
      if m.input and template.user_with_input:
        pattern = template.user_with_input
      elif m.input:
        content = f"{content}\n\n{m.input}"
      if first and system and template.first_user:
        pattern = template.first_user
      chunks += _fill(pattern, template, False, content=content, input=m.input, system=system)
      first = False
    elif m.role == "assistant":
      chunks += _fill(template.assistant, template, True, content=m.content)
      chunks += _fill(template.after_assistant, template, False)
  return chunks


def to_text(chunks: list[Chunk], bos: str = "<s>", eos: str = "</s>") -> str:
  """The rendered string, with BOS and EOS written as `bos` and `eos`."""
  return "".join({BOS: bos, EOS: eos}.get(c.text, c.text) if c.special else c.text for c in chunks)
