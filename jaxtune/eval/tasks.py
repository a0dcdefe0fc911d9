"""In-context evaluation tasks as data: a `Task` is a small frozen dataclass (or a YAML file of the
same keys), not a Python module. `BUILTIN` registers the tasks jaxtune knows; `find(name)` also
reads a YAML file.

A task says:
- its data: `data` (a file under the data folder; `.tsv`/`.csv` without a header, fields named
  by `columns`, or `.jsonl`), `unescape` (fields holding literal "\\n" get newlines);
- few-shot exemplars: `fewshot_data` (another file), else the first `fewshot_pool` records of
  `data`, which are then not evaluated; `sampling` "first" (the first k) or "seeded" (k drawn per
  question with `seed` and the question's index, never the question itself);
- the prompt: `description` (text before the exemplars, as the harness's: MMLU's subject line),
  `template` (a `str.format` string over the record's fields), the `target_delimiter` between
  prompt and answer (" "), the `fewshot_delimiter` between exemplars ("\\n\\n");
- the answer: `target` (a format string); for multiple choice, `choices` (format strings, or
  literals such as "yes") or `choices_from` (a parser of `PARSERS`: the choices listed in a field,
  as Flan's "Options:\\n- a\\n- b" questions list them), the gold being the choice equal to the
  target (or whose label is);
- `metrics`: `choice.METRICS` (acc, acc_norm by characters, acc_norm_tokens, acc_mutual_info, its
  `unconditional_context` "" as the harness's), "exact_match" (greedy generation up to
  `max_new_tokens` or a `stop` string, compared stripped) or "bits_per_byte" (rolling
  log-likelihood of the `target` text); the first is the headline.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
from collections.abc import Callable
from typing import Any

import yaml

from jaxtune.errors import ConfigError, DataError
from jaxtune.eval import choice
from jaxtune.eval import mmlu as mmlu_benchmark

GENERATION_METRICS = ("exact_match",)
ROLLING_METRICS = ("bits_per_byte",)
SAMPLINGS = ("first", "seeded")


Parsed = tuple[dict[str, str], list[str], list[str]]


def _flan_options(record: dict[str, str], where: str) -> Parsed:
  """Flan CoT's "QUESTION\\nOptions:\\n- (A) x\\n- (B) y": the record with `stem` (the question
  alone) and `options` (the list as written), the choice texts and their labels ("(A)", or the
  texts themselves when unlabelled)."""
  stem, sep, listed = record["question"].partition("\nOptions:\n")
  if not sep:
    raise DataError(where, "field 'question': no 'Options:' list")
  texts, labels = [], []
  for line in listed.split("\n"):
    m = re.fullmatch(r"- (\([A-Z]\) )?(.*)", line.strip())
    if not m:
      raise DataError(where, f"field 'question': option line {line!r} is not '- TEXT'")
    texts.append(m.group(2).strip())
    labels.append(m.group(1).strip() if m.group(1) else m.group(2).strip())
  return {**record, "stem": stem, "options": listed}, texts, labels


def _flan_yes_no(record: dict[str, str], where: str) -> Parsed:
  """A Flan yes/no question, its "Options:\\n- yes\\n- no" list written out or not: `stem`, and
  the choices yes and no."""
  stem = record["question"].partition("\nOptions:\n")[0]
  return {**record, "stem": stem}, ["yes", "no"], ["yes", "no"]


# Name -> the record with derived fields, the choices and their labels (what an answer names).
PARSERS: dict[str, Callable[[dict[str, str], str], Parsed]] = {
  "flan_options": _flan_options,
  "flan_yes_no": _flan_yes_no,
}


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  data: str
  template: str
  target: str
  metrics: tuple[str, ...] = ("acc",)
  columns: tuple[str, ...] = ()
  unescape: bool = False
  choices: tuple[str, ...] = ()
  choices_from: str = ""
  description: str = ""
  target_delimiter: str = " "
  fewshot_delimiter: str = "\n\n"
  fewshot_data: str = ""
  fewshot_pool: int = 0
  shots: int = 5  # The "k" of `--shots 0,1,k`.
  sampling: str = "first"
  seed: int = 1234
  unconditional_context: str = ""
  max_new_tokens: int = 32
  stop: tuple[str, ...] = ("\n",)
  limit: int = 0  # Questions evaluated (0: all).

  def validate(self) -> None:
    known = (*choice.METRICS, *GENERATION_METRICS, *ROLLING_METRICS)
    checks = (
      (bool(self.metrics), "metrics", "must name at least one metric"),
      (all(m in known for m in self.metrics), "metrics", f"known: {', '.join(known)}"),
      (not (self.choices and self.choices_from), "choices", "choices or choices_from, not both"),
      (not self.choices_from or self.choices_from in PARSERS, "choices_from", f"known: {PARSERS}"),
      (self.sampling in SAMPLINGS, "sampling", f"must be one of {', '.join(SAMPLINGS)}"),
      (self.shots >= 0 and self.fewshot_pool >= 0 and self.limit >= 0, "shots", "not negative"),
      (self.max_new_tokens > 0, "max_new_tokens", "must be positive"),
    )
    for ok, key, message in checks:
      if not ok:
        raise ConfigError(f"task {self.name}: {key}={getattr(self, key)!r}: {message}")
    is_choice = any(m in choice.METRICS for m in self.metrics)
    if is_choice and not (self.choices or self.choices_from):
      raise ConfigError(f"task {self.name}: a multiple-choice metric needs choices")

  @classmethod
  def from_dict(cls, values: dict[str, Any], where: str) -> Task:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
      raise ConfigError(f"{where}: unknown task keys {', '.join(unknown)}; known: {list(fields)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    task = cls(**values)
    task.validate()
    return task


@dataclasses.dataclass(frozen=True)
class Doc:
  """One record, ready to prompt: its fields, choices (empty if not multiple choice), the gold
  choice's index (-1 if none) and target text."""

  fields: dict[str, str]
  choices: tuple[str, ...]
  gold: int
  target: str
  where: str


def _read_records(path: str, columns: tuple[str, ...]) -> list[tuple[dict[str, str], str]]:
  try:
    with open(path, encoding="utf-8", newline="") as f:
      text = f.read()
  except OSError as e:
    raise DataError(path, f"cannot read: {e.strerror}") from None
  if path.endswith(".jsonl"):
    out = []
    for n, line in enumerate(text.splitlines(), 1):
      if line.strip():
        try:
          out.append((json.loads(line), f"{path}:{n}"))
        except json.JSONDecodeError as e:
          raise DataError(f"{path}:{n}", f"invalid JSON: {e.msg}") from None
    return out
  dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if path.endswith(".tsv") else {}
  out = []
  for n, row in enumerate(csv.reader(io.StringIO(text), **dialect), 1):
    if not row:
      continue
    if len(row) != len(columns):
      raise DataError(f"{path}:{n}", f"{len(row)} columns, expected {len(columns)}: {columns}")
    out.append((dict(zip(columns, row, strict=True)), f"{path}:{n}"))
  return out


def _format(template: str, fields: dict[str, str], where: str, key: str) -> str:
  try:
    return template.format(**fields)
  except (KeyError, IndexError) as e:
    raise DataError(where, f"task {key} {template!r} names a field the record lacks: {e}") from None


def docs(task: Task, path: str) -> list[Doc]:
  """The records of `path` as `Doc`s."""
  out = []
  for record, where in _read_records(path, task.columns):
    fields = {k: str(v) for k, v in record.items()}
    if task.unescape:
      fields = {k: v.replace("\\n", "\n") for k, v in fields.items()}
    labels: list[str] = []
    choices: list[str] = [_format(c, fields, where, "choice") for c in task.choices]
    if task.choices_from:
      fields, choices, labels = PARSERS[task.choices_from](fields, where)
    target = _format(task.target, fields, where, "target")
    gold = -1
    if choices:
      keys = labels or choices
      if target not in keys:
        raise DataError(where, f"the answer {target!r} is not one of the choices {keys}")
      gold = keys.index(target)
      target = choices[gold]
    out.append(Doc(fields, tuple(choices), gold, target, where))
  if not out:
    raise DataError(path, "no records")
  return out


def mmlu(subject: str) -> Task:
  """MMLU (Hendrycks et al. 2021) as data: a subject's val questions, its dev exemplars, the
  letter scored after "Answer:", the prompt that of `jaxtune eval --task mmlu` (`eval/mmlu.py`)."""
  return Task(
    name=f"mmlu:{subject}",
    description=mmlu_benchmark.header(subject),
    data=f"mmlu/data/val/{subject}_val.csv",
    fewshot_data=f"mmlu/data/dev/{subject}_dev.csv",
    columns=("question", "A", "B", "C", "D", "answer"),
    choices=("A", "B", "C", "D"),
    template="{question}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\nAnswer:",
    target="{answer}",
    metrics=("acc",),
    shots=5,
  )


def find(name: str) -> Task:
  """A built-in task by name (`mmlu:SUBJECT` for an MMLU subject), or a task YAML file."""
  if name in BUILTIN:
    return BUILTIN[name]
  if name.startswith("mmlu:"):
    return mmlu(name.removeprefix("mmlu:"))
  if name.endswith((".yaml", ".yml")) and os.path.isfile(name):
    with open(name, encoding="utf-8") as f:
      values = yaml.safe_load(f)
    if not isinstance(values, dict):
      raise ConfigError(f"{name}: a task file holds a mapping of task keys")
    return Task.from_dict({"name": os.path.basename(name).rsplit(".", 1)[0], **values}, name)
  raise ConfigError(
    f"unknown task {name!r}: known: {', '.join(BUILTIN)}, mmlu:SUBJECT, or a task .yaml file"
  )


_FLAN = "flan/cot_data"


def _flan(name: str, template: str, metrics: tuple[str, ...] = ("acc",), **choices) -> Task:
  """One of Flan's CoT sources as an evaluation set: the first 64 records are the exemplars."""
  return Task(
    name=name,
    data=f"{_FLAN}/{name}_train.tsv",
    columns=("question", "answer", "rationale"),
    unescape=True,
    template=template,
    target="{answer}",
    metrics=metrics,
    fewshot_pool=64,
    shots=8,
    **choices,
  )


_MULTIPLE_CHOICE = ("acc", "acc_norm", "acc_mutual_info")
BUILTIN: dict[str, Task] = {
  t.name: t
  for t in (
    _flan("ecqa", "Question: {stem}\nAnswer:", _MULTIPLE_CHOICE, choices_from="flan_options"),
    _flan("qasc", "Question: {stem}\nAnswer:", _MULTIPLE_CHOICE, choices_from="flan_options"),
    _flan("strategyqa", "Question: {question}\nAnswer (yes or no):", choices=("yes", "no")),
    _flan("creak", "{stem}\nAnswer:", choices_from="flan_yes_no"),
    Task(
      name="gsm8k_answer",
      data="gsm8k/train.jsonl",
      template="Question: {question}\nAnswer:",
      target="{answer}",
      metrics=("bits_per_byte",),
      fewshot_pool=64,
      shots=0,
    ),
  )
}
