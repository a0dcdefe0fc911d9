"""Record formats -> conversations: Alpaca / LIMA (LLaMA-Factory), ShareGPT, OpenAI messages,
Dolly, GSM8K, Flan CoT and prompt/completion.

Every format becomes a `Conversation`: an optional system prompt, then user and assistant turns,
ending with an assistant turn. Field names can be remapped (`data.fields`, e.g.
"instruction=query,output=response"). A missing, mistyped or empty field raises a DataError naming
the record's file and line and the field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from jaxtune.data.sources import Record
from jaxtune.errors import DataError

ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class Message:
  role: str  # One of ROLES.
  content: str
  input: str = ""  # Alpaca's optional input beside a user instruction.


@dataclasses.dataclass(frozen=True)
class Conversation:
  messages: tuple[Message, ...]
  where: str = ""


class _Fields:
  """Typed access to a record's fields under the configured names."""

  def __init__(self, record: Record, names: Mapping[str, str]):
    self.record, self.names = record, names

  def get(self, name: str, kind: type = str, required: bool = True, nonempty: bool = False) -> Any:
    key = self.names.get(name, name)
    value = self.record.fields.get(key)
    if value is None:
      if required:
        raise DataError(self.record.where, f"field {key!r}: missing")
      return kind()
    if not isinstance(value, kind):
      raise DataError(
        self.record.where, f"field {key!r}: expected {kind.__name__}, got {type(value).__name__}"
      )
    if nonempty and not value.strip():
      raise DataError(self.record.where, f"field {key!r}: empty")
    return value

  def fail(self, name: str, reason: str) -> DataError:
    return DataError(self.record.where, f"field {self.names.get(name, name)!r}: {reason}")


def _alpaca(f: _Fields) -> list[Message]:
  """Alpaca and LLaMA-Factory (LIMA): instruction, input, output, optional history and system."""
  messages = []
  for i, turn in enumerate(f.get("history", list, required=False)):
    if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
      raise f.fail("history", f"turn {i} must be a [user, assistant] pair of strings")
    messages += [Message("user", turn[0]), Message("assistant", turn[1])]
  return messages + [
    Message("user", f.get("instruction", nonempty=True), f.get("input", required=False)),
    Message("assistant", f.get("output", nonempty=True)),
  ]


def _dolly(f: _Fields) -> list[Message]:
  return [
    Message("user", f.get("instruction", nonempty=True), f.get("context", required=False)),
    Message("assistant", f.get("response", nonempty=True)),
  ]


def _turns(
  f: _Fields, name: str, role_key: str, content_key: str, roles: Mapping[str, str]
) -> list[Message]:
  messages = []
  for i, turn in enumerate(f.get(name, list)):
    if not isinstance(turn, dict):
      raise f.fail(name, f"turn {i} must be an object")
    role, content = turn.get(role_key), turn.get(content_key)
    if role not in roles:
      raise f.fail(name, f"turn {i}: unknown role {role!r}; expected one of {sorted(roles)}")
    if not isinstance(content, str):
      raise f.fail(name, f"turn {i}: {content_key!r} must be a string")
    messages.append(Message(roles[role], content))
  return messages


def _sharegpt(f: _Fields) -> list[Message]:
  roles = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
  }
  return _turns(f, "conversations", "from", "value", roles)


def _messages(f: _Fields) -> list[Message]:
  return _turns(f, "messages", "role", "content", {r: r for r in ROLES})


def _pair(question: str, answer: str) -> Callable[[_Fields], list[Message]]:
  def convert(f: _Fields) -> list[Message]:
    return [
      Message("user", f.get(question, nonempty=True)),
      Message("assistant", f.get(answer, nonempty=True)),
    ]

  return convert


def _flan_cot(f: _Fields) -> list[Message]:
  """Flan CoT: the rationale before the answer."""
  rationale, answer = f.get("rationale", nonempty=True), f.get("answer", nonempty=True)
  return [
    Message("user", f.get("question", nonempty=True)),
    Message("assistant", f"{rationale} So the answer is {answer}."),
  ]


FORMATS: dict[str, Callable[[_Fields], list[Message]]] = {
  "alpaca": _alpaca,
  "sharegpt": _sharegpt,
  "messages": _messages,
  "dolly": _dolly,
  "gsm8k": _pair("question", "answer"),
  "flan_cot": _flan_cot,
  "prompt_completion": _pair("prompt", "completion"),
}

# Fields that identify a format, most specific first.
_SIGNATURES = (
  ("messages", {"messages"}),
  ("sharegpt", {"conversations"}),
  ("alpaca", {"instruction", "output"}),
  ("dolly", {"instruction", "response"}),
  ("flan_cot", {"question", "answer", "rationale"}),
  ("gsm8k", {"question", "answer"}),
  ("prompt_completion", {"prompt", "completion"}),
)

FLAN_COT_COLUMNS = ("question", "answer", "rationale")


def parse_field_map(text: str) -> dict[str, str]:
  """ "instruction=query,output=response" -> {"instruction": "query", "output": "response"}."""
  mapping = {}
  for item in filter(None, (s.strip() for s in text.split(","))):
    name, sep, actual = item.partition("=")
    if not sep or not name.strip() or not actual.strip():
      raise DataError("data.fields", f"{item!r} is not of the form name=field")
    mapping[name.strip()] = actual.strip()
  return mapping


def detect(record: Record, names: Mapping[str, str]) -> str:
  keys = set(record.fields)
  for fmt, signature in _SIGNATURES:
    if {names.get(k, k) for k in signature} <= keys:
      return fmt
  raise DataError(
    record.where, f"cannot tell the format from fields {sorted(keys)}; set data.format"
  )


def to_conversation(
  record: Record, fmt: str, names: Mapping[str, str], system_prompt: str | None = None
) -> Conversation:
  """Converts one record: system messages first, then turns that alternate from a user turn to
  a non-empty assistant turn."""
  f = _Fields(record, names)
  messages = FORMATS[fmt](f)
  system = f.get("system", required=False) or system_prompt
  if system and not any(m.role == "system" for m in messages):
    messages.insert(0, Message("system", system))
  turns = [m for m in messages if m.role != "system"]
  first_turn = next((i for i, m in enumerate(messages) if m.role != "system"), len(messages))
  if any(m.role == "system" for m in messages[first_turn:]):
    raise DataError(record.where, "a system message must come first, before every turn")
  if turns and turns[0].role != "user":
    raise DataError(record.where, "the conversation does not start with a user turn")
  if not turns or turns[-1].role != "assistant":
    raise DataError(record.where, "the conversation does not end with an assistant turn")
  if any(m.role == "assistant" and not m.content.strip() for m in turns):
    raise DataError(record.where, "empty assistant response")
  if any(a.role == b.role for a, b in zip(turns, turns[1:], strict=False)):
    raise DataError(record.where, "user and assistant turns do not alternate")
  return Conversation(tuple(messages), record.where)
