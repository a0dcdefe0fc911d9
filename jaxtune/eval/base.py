"""What the evaluation tasks share: their options and result, and the way text becomes prompts
(k-shot, fitted to the model's positions) and completions on the evaluated model.

The evaluated model is the handle `jaxtune.load` returns: `.module`, `.params`, `.config`,
`.tokenizer`, `.template`, `.mesh` and `.rules`. Prompts are rendered as one user turn through a
chat template (`raw` for the benchmarks unless `--template` says otherwise, so a k-shot prompt is
plain text after BOS), and every forward pass runs on the model's mesh.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any

from jaxtune import generate
from jaxtune.config import DataConfig
from jaxtune.data import packing, pipeline
from jaxtune.data.formats import Conversation, Message
from jaxtune.data.packing import Stats
from jaxtune.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Options:
  """Everything a task may read; each task says which it uses."""

  data: str  # The task's data: a file or a folder.
  format: str = "auto"  # Instruction data (perplexity, generation-stats): as `data.format`.
  fields: str = ""  # and `data.fields`.
  exemplars: str = ""  # Few-shot exemplars: GSM8K's train file, BBH's cot-prompts folder.
  shots: int | None = None  # None: the task's default.
  limit: int = 0  # Questions per subject or task (0: all).
  batch_size: int = 8
  max_new_tokens: int = 256
  template: str | None = None  # None: the task's default.
  split: str = "test"  # MMLU's evaluation split (its exemplars come from "dev").
  subjects: tuple[str, ...] = ()  # MMLU subjects or BBH tasks (empty: all).
  repetition_penalty: float = 1.0  # Generation: 1.2 is the NEFTune paper's setting.
  generator: str = ""  # The evaluated model's name, in generated records (AlpacaEval's field).

  def validate(self) -> None:
    checks = (
      (self.shots is None or self.shots >= 0, "shots", "must not be negative"),
      (self.limit >= 0, "limit", "must not be negative (0: all)"),
      (self.batch_size > 0, "batch_size", "must be positive"),
      (self.max_new_tokens > 0, "max_new_tokens", "must be positive"),
      (
        math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
        "repetition_penalty",
        "must be positive",
      ),
    )
    for ok, name, message in checks:
      if not ok:
        raise ConfigError(f"eval option {name}={getattr(self, name)} {message}")


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """A k-shot benchmark's settings from the options: k (the task's default unless `--shots`) and
  the template (`raw` unless `--template`)."""

  shots: int
  template: str

  @classmethod
  def of(cls, options: Options, default_shots: int) -> Benchmark:
    shots = default_shots if options.shots is None else options.shots
    return cls(shots, options.template or "raw")


def chosen(names: Sequence[str], options: Options, kind: str) -> list[str]:
  """The `names` (MMLU subjects, BBH tasks) that `--subjects` picks, all when it names none; a
  name not among them is an error."""
  unknown = sorted(set(options.subjects) - set(names))
  if unknown:
    raise DataError(options.data, f"no {kind} {', '.join(unknown)}; known: {', '.join(names)}")
  return [n for n in names if not options.subjects or n in options.subjects]


def conversations(options: Options, task: str, **data: Any) -> tuple[list[Conversation], Stats]:
  """The first `--limit` conversations of an instruction data file (`--data`, read as training
  reads it with `--format` and `--fields`, and `data` for the other `DataConfig` keys)."""
  if not options.data:
    raise DataError("--data", f"{task} needs an instruction data file")
  cfg = DataConfig(path=options.data, format=options.format, fields=options.fields, **data)
  stats = Stats()
  found = pipeline.conversations(cfg, 0, stats).train
  return limited(found, options.limit), stats


@dataclasses.dataclass
class Result:
  """`metrics`: the headline numbers; `groups`: the same per subject or task; `examples`: one
  record per question (prompt size, output, target, score) for the JSON file."""

  task: str
  metrics: dict[str, float]
  groups: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
  examples: list[dict[str, Any]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Prompt:
  ids: list[int]
  shots: int  # Exemplars that fit.
  truncated: bool  # Even with none, the prompt did not fit: its first tokens were dropped.


def prompt_ids(model: Any, text: str, template: str) -> list[int]:
  """`text` as the user turn of `template`, tokenized (ending where the answer begins)."""
  return packing.prompt_ids(Conversation((Message("user", text),)), template, model.tokenizer)


def few_shot(
  model: Any,
  template: str,
  head: str,
  exemplars: Sequence[str],
  query: str,
  room: int,
) -> Prompt:
  """`head`, the first k `exemplars` and `query` as one prompt, with the largest k that leaves
  `room` of the model's positions free (as Hendrycks et al. fit MMLU prompts). If even k = 0 does
  not fit, the prompt keeps its last tokens."""
  limit = model.config.max_seq_len - room
  if limit <= 0:
    raise ValueError(f"the model's {model.config.max_seq_len} positions leave no room for a prompt")
  for k in range(len(exemplars), -1, -1):
    ids = prompt_ids(model, head + "".join(exemplars[:k]) + query, template)
    if len(ids) <= limit:
      return Prompt(ids, k, False)
  return Prompt(ids[-limit:], 0, True)


def report_fit(prompts: Sequence[Prompt], shots: int, max_seq_len: int) -> dict[str, float]:
  """Counts of prompts shortened to fit, logged and returned for the result."""
  fewer = sum(p.shots < shots for p in prompts)
  truncated = sum(p.truncated for p in prompts)
  if fewer or truncated:
    log.warning(
      "%d of %d prompts have fewer than %d exemplars and %d were cut to fit %d positions",
      fewer,
      len(prompts),
      shots,
      truncated,
      max_seq_len,
    )
  return {"prompts_with_fewer_shots": fewer, "prompts_truncated": truncated}


def complete(
  model: Any,
  prompts: Sequence[Sequence[int]],
  options: Options,
  template: str,
  stop_strings: Sequence[str] = (),
) -> list[str]:
  """Greedy completions (with the options' repetition penalty), decoded and cut at the first stop
  string; each ends at EOS or the template's end-of-turn token."""
  sampling = generate.Sampling(
    max_new_tokens=options.max_new_tokens, repetition_penalty=options.repetition_penalty
  )
  outs = generate.generate(
    model.module,
    model.params,
    prompts,
    sampling,
    stop_ids=generate.template_stop_ids(model.tokenizer, template),
    batch_size=options.batch_size,
    mesh=model.mesh,
    rules=model.rules,
    progress=True,
    vocab_size=model.tokenizer.vocab_size,
  )
  return [generate.cut_at_stop(model.tokenizer.decode(o.ids), stop_strings)[0] for o in outs]


def limited(items: list, limit: int) -> list:
  return items[:limit] if limit else items
