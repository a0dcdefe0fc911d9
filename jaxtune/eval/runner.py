"""The task registry, and a result as a table on screen and as JSON on disk."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from typing import Any

from jaxtune.eval import base, bbh, gsm8k, mmlu, perplexity, responses

TASKS: dict[str, Callable[[Any, base.Options], base.Result]] = {
  "perplexity": perplexity.run,
  "mmlu": mmlu.run,
  "gsm8k": gsm8k.run,
  "bbh": bbh.run,
  "generation-stats": responses.run,
}


def evaluate(model: Any, task: str, options: base.Options) -> base.Result:
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
  options.validate()
  return TASKS[task](model, options)


def _cell(value: Any) -> str:
  if isinstance(value, float):
    return "nan" if math.isnan(value) else f"{value:.4f}"
  return str(value)


def table(result: base.Result) -> str:
  """The headline metrics, then one row per group (subject or task) if there are several."""
  width = max(map(len, result.metrics)) + 2
  lines = [f"{result.task}"] + [f"  {k:<{width}}{_cell(v)}" for k, v in result.metrics.items()]
  if len(result.groups) > 1:
    columns = list(next(iter(result.groups.values())))
    name_width = max(map(len, result.groups)) + 2
    lines += ["", f"  {'':<{name_width}}" + "".join(f"{c:>14}" for c in columns)]
    for name, values in result.groups.items():
      lines.append(f"  {name:<{name_width}}" + "".join(f"{_cell(values[c]):>14}" for c in columns))
  return "\n".join(lines)


def _finite(value: Any) -> Any:
  """NaN and infinities as null: they are not JSON."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: _finite(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_finite(v) for v in value]
  return value


def save(result: base.Result, path: str, **about: Any) -> None:
  """Writes the result (with `about`: the checkpoint, the options) as JSON."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  record = {**about, **dataclasses.asdict(result)}
  with open(path, "w", encoding="utf-8") as f:
    json.dump(_finite(record), f, indent=2, ensure_ascii=False)
    f.write("\n")
