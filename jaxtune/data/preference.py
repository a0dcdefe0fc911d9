"""Preference records -> `Preference`s -> tokenized `Group`s, for DPO and reward models.

Two formats (`data.format`, or detected by their fields):

- `pairwise`: `prompt` / `chosen` / `rejected`. Each is plain text (a user prompt, assistant
  responses) or a list of `{"role", "content"}` messages (TRL's conversational preference format).
  Without `prompt`, `chosen` and `rejected` are whole conversations that differ only in their last
  assistant turn: message lists (TRL's implicit prompt), or Anthropic HH-RLHF transcripts
  ("\\n\\nHuman: ... \\n\\nAssistant: ...").
- `ranked` (InstructGPT's form): a `prompt` and K = 2..9 `responses` with their `ranks` (lower is
  better) or `scores` (higher is better).

Each response becomes the whole conversation it ends (prompt, then response) under the data's
template, so its loss mask is SFT's. A record is bad (a DataError naming file:line:field, or
counted and skipped with `data.on_bad_record=skip`) when two responses are identical, two ranks or
scores tie, or a response is truncated to nothing. A group's responses share one row of
`data.max_length` slots: when they do not fit, each is cut to the same longest length that fits
(`truncation: truncate`), or the group is dropped (`drop`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jaxtune.data import formats, packing, templates
from jaxtune.data.formats import ROLES, Conversation, Message
from jaxtune.data.packing import Example, Group, Stats, TokenizerLike
from jaxtune.data.sources import Record
from jaxtune.errors import DataError

MAX_RESPONSES = 9  # InstructGPT ranks K = 4..9 responses per prompt.
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclasses.dataclass(frozen=True)
class Preference:
  """K >= 2 conversations (one prompt, then each response) and their ranks (0 is the best)."""

  conversations: tuple[Conversation, ...]
  ranks: tuple[int, ...]
  fields: tuple[str, ...]  # Each response's field, for errors.
  where: str

  @property
  def best(self) -> Conversation:
    """The best response's conversation: the prompt and its reference answer."""
    return self.conversations[self.ranks.index(0)]


def _messages(value: Any, field: str, where: str, role: str) -> list[Message]:
  """Text (one `role` message), a list of {role, content} messages, or an HH-RLHF transcript."""
  if isinstance(value, str):
    if _HH_TURN.search(value):
      parts = _HH_TURN.split(value)
      if parts[0].strip():
        raise DataError(where, f"field {field!r}: text before the first Human/Assistant turn")
      turns = zip(parts[1::2], parts[2::2], strict=True)
      return [Message(_HH_ROLES[r], c.strip()) for r, c in turns]
    return [Message(role, value)]
  if not isinstance(value, list) or not value:
    raise DataError(where, f"field {field!r}: expected text or a non-empty list of messages")
  out = []
  for i, m in enumerate(value):
    if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
      raise DataError(
        where, f"field {field!r}: message {i} must be {{role: one of {list(ROLES)}, content: text}}"
      )
    out.append(Message(m["role"], m["content"]))
  return out


def _get(record: Record, names: Mapping[str, str], name: str, required: bool = True) -> Any:
  key = names.get(name, name)
  if key not in record.fields or record.fields[key] is None:
    if required:
      raise DataError(record.where, f"field {key!r}: missing")
    return None
  return record.fields[key]


def _conversation(
  prompt: list[Message], response: list[Message], field: str, where: str, system: str | None
) -> Conversation:
  """The prompt then the response, checked as SFT checks a conversation (formats.py)."""
  if not response or response[-1].role != "assistant" or not response[-1].content.strip():
    raise DataError(
      where, f"field {field!r}: the response must end with a non-empty assistant turn"
    )
  fields = {"messages": [{"role": m.role, "content": m.content} for m in prompt + response]}
  try:
    return formats.to_conversation(Record(fields, where), "messages", {}, system)
  except DataError as e:
    raise DataError(where, f"field {field!r}: {e.reason}") from None


def _split_prompt(chosen: list[Message], rejected: list[Message], names, where: str):
  """TRL's implicit prompt: the two conversations' shared turns before the last one."""
  if chosen[:-1] != rejected[:-1]:
    raise DataError(
      where,
      f"field {names.get('rejected', 'rejected')!r}: without a prompt field, the conversation "
      "must equal the chosen one up to its last turn",
    )
  return chosen[:-1], [chosen[-1]], [rejected[-1]]


def _pairwise(record: Record, names: Mapping[str, str], system: str | None) -> Preference:
  where = record.where
  keys = {n: names.get(n, n) for n in ("prompt", "chosen", "rejected")}
  prompt_value = _get(record, names, "prompt", required=False)
  chosen = _messages(_get(record, names, "chosen"), keys["chosen"], where, "assistant")
  rejected = _messages(_get(record, names, "rejected"), keys["rejected"], where, "assistant")
  if prompt_value is None:
    prompt, chosen, rejected = _split_prompt(chosen, rejected, names, where)
  else:
    prompt = _messages(prompt_value, keys["prompt"], where, "user")
  return _ranked_preference(
    prompt, [chosen, rejected], [0, 1], [keys["chosen"], keys["rejected"]], where, system
  )


def _ranks(record: Record, names: Mapping[str, str], k: int) -> list[int]:
  """Ranks 0..K-1 (0 the best) from `ranks` (lower is better) or `scores` (higher is better)."""
  key = next((n for n in ("ranks", "scores") if names.get(n, n) in record.fields), None)
  if key is None:
    raise DataError(record.where, "field 'ranks' (or 'scores'): missing")
  field = names.get(key, key)
  values = record.fields[field]
  kinds = (int,) if key == "ranks" else (int, float)
  if not (
    isinstance(values, list)
    and len(values) == k
    and all(isinstance(v, kinds) and not isinstance(v, bool) for v in values)
  ):
    kind = "integers" if key == "ranks" else "numbers"
    raise DataError(record.where, f"field {field!r}: expected a list of {k} {kind}, one a response")
  order = sorted(range(k), key=lambda i: values[i] if key == "ranks" else -values[i])
  for a, b in zip(order, order[1:], strict=False):
    if values[a] == values[b]:
      raise DataError(
        record.where,
        f"field {field!r}: responses {a} and {b} tie at {values[a]}; a strict order is needed",
      )
  ranks = [0] * k
  for rank, i in enumerate(order):
    ranks[i] = rank
  return ranks


def _ranked(record: Record, names: Mapping[str, str], system: str | None) -> Preference:
  where, key = record.where, names.get("responses", "responses")
  prompt = _messages(_get(record, names, "prompt"), names.get("prompt", "prompt"), where, "user")
  values = _get(record, names, "responses")
  if not isinstance(values, list) or not 2 <= len(values) <= MAX_RESPONSES:
    raise DataError(where, f"field {key!r}: expected a list of 2 to {MAX_RESPONSES} responses")
  fields = [f"{key}[{i}]" for i in range(len(values))]
  responses = [_messages(v, f, where, "assistant") for v, f in zip(values, fields, strict=True)]
  ranks = _ranks(record, names, len(values))
  return _ranked_preference(prompt, responses, ranks, fields, where, system)


def _ranked_preference(
  prompt: list[Message],
  responses: Sequence[list[Message]],
  ranks: Sequence[int],
  fields: Sequence[str],
  where: str,
  system: str | None,
) -> Preference:
  convs = [
    _conversation(prompt, r, f, where, system) for r, f in zip(responses, fields, strict=True)
  ]
  seen: dict[tuple[Message, ...], str] = {}
  for conv, field in zip(convs, fields, strict=True):
    if conv.messages in seen:
      raise DataError(where, f"field {field!r}: identical to {seen[conv.messages]!r}")
    seen[conv.messages] = field
  return Preference(tuple(convs), tuple(ranks), tuple(fields), where)


FORMATS: dict[str, Callable[[Record, Mapping[str, str], str | None], Preference]] = {
  "pairwise": _pairwise,
  "ranked": _ranked,
}
_SIGNATURES = (("pairwise", {"chosen", "rejected"}), ("ranked", {"prompt", "responses"}))


def detect(record: Record, names: Mapping[str, str]) -> str | None:
  """The preference format whose fields the record has, if any."""
  keys = set(record.fields)
  return next((fmt for fmt, sig in _SIGNATURES if {names.get(k, k) for k in sig} <= keys), None)


def to_preference(
  record: Record, fmt: str, names: Mapping[str, str], system_prompt: str | None = None
) -> Preference:
  return FORMATS[fmt](record, names, system_prompt)


def _cap(sizes: Sequence[int], length: int) -> int:
  """The largest c with sum(min(size, c)) <= length: every response cut to at most c."""
  lo, hi = 0, max(sizes)
  while lo < hi:
    mid = (lo + hi + 1) // 2
    lo, hi = (mid, hi) if sum(min(s, mid) for s in sizes) <= length else (lo, mid - 1)
  return lo


def tokenize(
  pref: Preference,
  template: str,
  tokenizer: TokenizerLike,
  train_on_prompt: bool,
  max_length: int,
  truncation: str,
  stats: Stats,
) -> Group | None:
  """The group of the preference's responses, fitted into one row of `max_length` slots (None:
  dropped as too long, with `truncation: drop`)."""
  examples = [
    packing.tokenize(templates.render(c, template), tokenizer, train_on_prompt)
    for c in pref.conversations
  ]
  sizes = [ex.pairs for ex in examples]
  if sum(sizes) > max_length:
    if truncation == "drop":
      stats.dropped_too_long += 1
      return None
    stats.truncated += 1
    cap = _cap(sizes, max_length) + 1
    examples = [Example(ex.ids[:cap], ex.supervised[:cap]) for ex in examples]
  for ex, field in zip(examples, pref.fields, strict=True):
    if not ex.supervised[1:].any():
      raise DataError(
        pref.where,
        f"field {field!r}: the response is truncated to nothing (the group's {len(examples)} "
        f"responses share data.max_length={max_length} slots)",
      )
  for ex in examples:
    stats.add(ex)
  return Group(tuple(examples), pref.ranks)
