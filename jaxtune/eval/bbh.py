"""BIG-Bench Hard (Suzgun et al. 2022): the three-shot chain-of-thought prompts, exact match.

Data: a task file `TASK.json` (`{"examples": [{"input", "target"}, ...]}`) or a folder of them,
and `--exemplars`, the folder of the CoT prompts `TASK.txt` (default: `cot-prompts` beside the
tasks' folder, as BBH is laid out). A prompt file is a canary line, "-----", a task description
and exemplars "Q: ...\\nA: Let's think step by step.\\n... So the answer is X."; `--shots` below 3
keeps the first ones. The question follows as "\\n\\nQ: INPUT\\nA: Let's think step by step.";
greedy decoding stops at the next "\\n\\nQ:". The prediction is the text after the last "the
answer is" (up to the line's end, without a final period); it must equal the target exactly.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from jaxtune.errors import DataError
from jaxtune.eval import base

DEFAULT_SHOTS = 3
STOP = ("\n\nQ:",)
_SEPARATOR = "-----\n"


def read_examples(path: str) -> list[tuple[str, str, str]]:
  """(input, target, "file:line") of each example of a BBH task file."""
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except OSError as e:
    raise DataError(path, f"cannot read: {e.strerror}") from None
  except UnicodeDecodeError as e:
    raise DataError(path, f"invalid UTF-8 at byte {e.start}") from None
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}:{e.lineno}", f"invalid JSON: {e.msg}") from None
  if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
    raise DataError(path, 'expected an object with a list "examples"')
  items, examples = data["examples"], []
  lines = _item_lines(path, text, "examples")
  if len(lines) != len(items):  # The key also names a nested array, earlier in the file.
    lines = [f"{path}: examples[{i}]" for i in range(len(items))]
  for item, where in zip(items, lines, strict=True):
    if not isinstance(item, dict):
      raise DataError(where, f"expected an object, got {type(item).__name__}")
    for key in ("input", "target"):
      if not isinstance(item.get(key), str) or not item[key].strip():
        raise DataError(where, f"field {key!r}: missing, empty or not a string")
    examples.append((item["input"], item["target"].strip(), where))
  if not examples:
    raise DataError(path, "no examples")
  return examples


def _item_lines(path: str, text: str, key: str) -> list[str]:
  """ "file:line" of each item of the top-level array `key` (parsed already, so well-formed)."""
  start = re.search(rf'"{re.escape(key)}"\s*:\s*\[', text)
  decoder, where = json.JSONDecoder(), []
  position, line = start.end(), text.count("\n", 0, start.end()) + 1
  while True:
    item_start = re.compile(r"[\s,]*").match(text, position).end()
    if text[item_start] == "]":
      return where
    line += text.count("\n", position, item_start)
    where.append(f"{path}:{line}")
    _, end = decoder.raw_decode(text, item_start)
    line += text.count("\n", item_start, end)
    position = end


def read_prompt(path: str) -> tuple[str, list[str]]:
  """(description, exemplars) of a BBH CoT prompt file."""
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except OSError as e:
    raise DataError(path, f"cannot read the CoT prompt: {e.strerror}") from None
  _, separator, body = text.partition(_SEPARATOR)
  if not separator:
    raise DataError(path, f"no {_SEPARATOR.strip()!r} line after the canary")
  parts = re.split(r"\n\n(?=Q: )", body.strip("\n"))
  description, exemplars = ("", parts) if parts[0].startswith("Q: ") else (parts[0], parts[1:])
  if not exemplars:
    raise DataError(path, "no exemplars ('Q: ...' after a blank line)")
  return description, exemplars


def extract_answer(text: str) -> str:
  """What follows the last "the answer is", to the end of its line, without a final period."""
  found = list(re.finditer(r"the answer is ", text, flags=re.IGNORECASE))
  if not found:
    return ""
  return text[found[-1].end() :].split("\n", 1)[0].strip().removesuffix(".").strip()


def _tasks(data: str) -> list[str]:
  if os.path.isfile(data):
    return [data]
  if not os.path.isdir(data):
    raise DataError(data, "no such BBH task file or folder")
  found = sorted(os.path.join(data, f) for f in os.listdir(data) if f.endswith(".json"))
  if not found:
    raise DataError(data, "no BBH task files (*.json)")
  return found


def run(model: Any, options: base.Options) -> base.Result:
  bench = base.Benchmark.of(options, DEFAULT_SHOTS)
  shots, template = bench.shots, bench.template
  paths = _tasks(options.data)
  names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  base.chosen(names, options, "BBH task")
  folder = os.path.dirname(os.path.abspath(paths[0]))
  prompt_dir = options.exemplars or os.path.join(os.path.dirname(folder), "cot-prompts")
  prompts, items = [], []
  for path, name in zip(paths, names, strict=True):
    if options.subjects and name not in options.subjects:
      continue
    description, exemplars = read_prompt(os.path.join(prompt_dir, f"{name}.txt"))
    if len(exemplars) < shots:
      raise DataError(prompt_dir, f"{name}.txt has {len(exemplars)} exemplars, fewer than {shots}")
    head = f"{description}\n\n" if description else ""
    texts = [f"{e}\n\n" for e in exemplars[:shots]]
    for question, target, where in base.limited(read_examples(path), options.limit):
      query = f"Q: {question}\nA: Let's think step by step."
      prompts.append(base.few_shot(model, template, head, texts, query, options.max_new_tokens - 1))
      items.append((name, target, where))
  outputs = base.complete(model, [p.ids for p in prompts], options, template, STOP)
  groups: dict[str, dict[str, float]] = {}
  examples = []
  for (name, target, where), prompt, output in zip(items, prompts, outputs, strict=True):
    predicted = extract_answer(output)
    group = groups.setdefault(name, {"questions": 0, "correct": 0})
    group["questions"] += 1
    group["correct"] += predicted == target
    examples.append(
      {
        "where": where,
        "task": name,
        "shots": prompt.shots,
        "output": output,
        "predicted": predicted,
        "target": target,
        "correct": predicted == target,
      }
    )
  for group in groups.values():
    group["exact_match"] = group["correct"] / group["questions"]
  metrics = {
    "exact_match_macro": sum(g["exact_match"] for g in groups.values()) / len(groups),
    "exact_match_micro": sum(g["correct"] for g in groups.values()) / len(examples),
    "questions": len(examples),
    "tasks": len(groups),
    "shots": shots,
    **base.report_fit(prompts, shots, model.config.max_seq_len),
  }
  return base.Result("bbh", metrics, groups, examples)
