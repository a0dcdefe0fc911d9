"""GPT-3's evaluation of `tasks.Task`s: each task zero-, one- and few-shot from the same prompt
format, as one table with a column per shot count (Brown et al. 2020's layout), a JSON record
of every request's scores, and a plot of the headline metric against shots (SVG, no plotting
library needed).

A prompt is the k exemplars (each its prompt, the target delimiter and its answer), joined and
followed by the question's prompt with the few-shot delimiter. Multiple choice scores each choice
(the target delimiter, then the choice) by log-likelihood (`eval.choice`); exact match generates
greedily; bits per byte scores the target text alone, in windows. Requests longer than the
model's positions keep their last tokens, as lm-evaluation-harness does: they are counted
(`truncated`) and logged.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxtune.errors import ConfigError
from jaxtune.eval import choice, requests, scoring, tasks

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Cell:
  """One task at one shot count: its metrics and one record per question."""

  task: str
  shots: int
  metrics: dict[str, float]
  records: list[dict[str, Any]]


def parse_shots(text: str) -> list[str]:
  """`--shots 0,1,k`: counts, or "k" for each task's own few-shot k."""
  out = [s.strip() for s in text.split(",") if s.strip()]
  for s in out:
    if s != "k" and not (s.isdigit()):
      raise ConfigError(f"--shots {text}: each must be a count or k, got {s!r}")
  if not out:
    raise ConfigError("--shots: no shot counts")
  return out


def find_tasks(names: Sequence[str], limit: int = 0) -> list[tasks.Task]:
  """The tasks `names` (see `tasks.find`), each limited to `limit` questions if given."""
  found = [tasks.find(n) for n in names]
  return [dataclasses.replace(t, limit=limit) if limit else t for t in found]


def run_all(
  model: Any, found: Sequence[tasks.Task], shots: Sequence[str], data_dir: str, batch_size: int = 8
) -> list[Cell]:
  """Every task at every shot count of `shots` ("k": the task's own), each count once."""
  cells = []
  for task in found:
    counts = dict.fromkeys(task.shots if s == "k" else int(s) for s in shots)
    cells += [run(model, task, k, data_dir, batch_size) for k in counts]
  return cells


def record(cells: Sequence[Cell], shots: Sequence[str]) -> dict[str, Any]:
  """The JSON record of a run: the shots asked for, and every cell with every question's
  requests and scores."""
  return {"shots": list(shots), "results": [dataclasses.asdict(c) for c in cells]}


def split_docs(task: tasks.Task, data_dir: str) -> tuple[list[tasks.Doc], list[tasks.Doc]]:
  """(questions, exemplar pool) of `task`."""
  questions = tasks.docs(task, os.path.join(data_dir, task.data))
  if task.fewshot_data:
    pool = tasks.docs(task, os.path.join(data_dir, task.fewshot_data))
  else:
    pool, questions = questions[: task.fewshot_pool], questions[task.fewshot_pool :]
  return (questions[: task.limit] if task.limit else questions), pool


def exemplars(task: tasks.Task, pool: Sequence[tasks.Doc], k: int, index: int) -> list[tasks.Doc]:
  if k > len(pool):
    raise ConfigError(f"task {task.name}: {k} shots, but only {len(pool)} exemplars")
  if task.sampling == "first":
    return list(pool[:k])
  rng = np.random.default_rng([task.seed, index])
  return [pool[i] for i in rng.choice(len(pool), k, replace=False)]


def context(task: tasks.Task, shown: Sequence[tasks.Doc], doc: tasks.Doc) -> str:
  parts = [task.template.format(**e.fields) + task.target_delimiter + e.target for e in shown]
  return task.description + task.fewshot_delimiter.join(
    [*parts, task.template.format(**doc.fields)]
  )


def _choice_cell(model, task, contexts, questions, batch_size):
  tok, delim = model.tokenizer, task.target_delimiter
  pairs = [
    requests.encode_pair(tok, c, delim + x)
    for c, d in zip(contexts, questions, strict=True)
    for x in d.choices
  ]
  want_unc = "acc_mutual_info" in task.metrics
  # Each distinct choice once, unconditionally (yes/no tasks share theirs).
  unc_texts = list(dict.fromkeys(x for d in questions for x in d.choices)) if want_unc else []
  unc_pairs = [requests.encode_pair(tok, task.unconditional_context, delim + x) for x in unc_texts]
  scores = scoring.score(model, pairs + unc_pairs, batch_size)
  unc_of = dict(zip(unc_texts, scores.logprob[len(pairs) :].tolist(), strict=True))
  records, qs, k = [], [], 0
  for ctx, d in zip(contexts, questions, strict=True):
    n = len(d.choices)
    span = slice(k, k + n)
    q = choice.Question(
      logprob=scores.logprob[span],
      chars=np.asarray([len(delim + x) for x in d.choices]),
      tokens=np.asarray([len(p[1]) for p in pairs[span]]),
      answer=d.gold,
      unconditional=np.asarray([unc_of[x] for x in d.choices]) if want_unc else None,
    )
    qs.append(q)
    predicted = {m: choice.predict(q, m) for m in task.metrics}
    records.append(
      {
        "where": d.where,
        "context": ctx,
        "choices": list(d.choices),
        "gold": d.gold,
        "loglikelihood": q.logprob.tolist(),
        "is_greedy": scores.greedy[span].tolist(),
        "tokens": q.tokens.tolist(),
        **({"unconditional": q.unconditional.tolist()} if want_unc else {}),
        "predicted": predicted,
      }
    )
    k += n
  metrics = {m: choice.accuracy(qs, m) for m in task.metrics}
  cut = sum(len(c) + len(x) - 1 > model.config.max_seq_len for c, x in pairs)
  return metrics, records, cut


def _exact_match_cell(model, task, contexts, questions, batch_size):
  batch = [requests.Until(c, task.stop, task.max_new_tokens) for c in contexts]
  outputs = requests.generate_until(model, batch, batch_size)
  records = [
    {
      "where": d.where,
      "context": c,
      "output": o,
      "target": d.target,
      "exact_match": o.strip() == d.target.strip(),
    }
    for c, d, o in zip(contexts, questions, outputs, strict=True)
  ]
  room = model.config.max_seq_len - task.max_new_tokens
  cut = sum(len(requests.encode_text(model.tokenizer, c)) > room for c in contexts)
  return {"exact_match": float(np.mean([r["exact_match"] for r in records]))}, records, cut


def _bits_per_byte_cell(model, task, contexts, questions, batch_size):
  ids = [model.tokenizer.encode(d.target, first=True) for d in questions]
  logprob = requests.loglikelihood_rolling_ids(model, ids, batch_size)
  sizes = [len(d.target.encode("utf-8")) for d in questions]
  records = [
    {"where": d.where, "target": d.target, "loglikelihood": lp, "bytes": n}
    for d, lp, n in zip(questions, logprob.tolist(), sizes, strict=True)
  ]
  return {"bits_per_byte": -float(logprob.sum()) / math.log(2) / sum(sizes)}, records, 0


_KINDS = (
  (tuple(choice.METRICS), _choice_cell),
  (tasks.GENERATION_METRICS, _exact_match_cell),
  (tasks.ROLLING_METRICS, _bits_per_byte_cell),
)


def run(model: Any, task: tasks.Task, shots: int, data_dir: str, batch_size: int = 8) -> Cell:
  """`task` at `shots` exemplars on `model`."""
  questions, pool = split_docs(task, data_dir)
  contexts = [context(task, exemplars(task, pool, shots, i), d) for i, d in enumerate(questions)]
  metrics: dict[str, float] = {}
  records: list[dict[str, Any]] = [{} for _ in questions]
  truncated = 0
  max_seq_len = model.config.max_seq_len
  for names, cell in _KINDS:
    if not any(m in names for m in task.metrics):
      continue
    found, found_records, cut = cell(model, task, contexts, questions, batch_size)
    metrics.update(found)
    truncated += cut
    for r, extra in zip(records, found_records, strict=True):
      r.update(extra)
  if truncated:
    log.warning(
      "%s, %d-shot: %d requests cut to %d positions", task.name, shots, truncated, max_seq_len
    )
  metrics.update(questions=len(questions), truncated=truncated)
  return Cell(task.name, shots, metrics, records)


def table(cells: Sequence[Cell], columns: Sequence[str], ks: dict[str, int]) -> str:
  """One row per task and metric, one column per `--shots` entry (GPT-3's layout)."""
  heads = [f"{c}-shot" if c != "k" else "few-shot" for c in columns]
  by = {(c.task, c.shots): c for c in cells}
  names = list(dict.fromkeys(c.task for c in cells))
  rows = []
  for name in names:
    metric_names = [
      m
      for m in next(c for c in cells if c.task == name).metrics
      if m not in ("questions", "truncated")
    ]
    for metric in metric_names:
      values = []
      for col in columns:
        cell = by.get((name, ks[name] if col == "k" else int(col)))
        values.append(
          f"{100 * cell.metrics[metric]:.1f}"
          if metric.startswith("acc") or metric == "exact_match"
          else f"{cell.metrics[metric]:.4f}"
        )
      rows.append([name, metric, str(ks[name]), *values])
  header = ["task", "metric", "k", *heads]
  widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

  def line(r: list[str]) -> str:
    cells = zip(r, widths, strict=True)
    return "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(cells))

  return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def svg_plot(cells: Sequence[Cell], path: str, width: int = 480, height: int = 320) -> None:
  """Each task's headline metric against shots, as an SVG line chart."""
  series: dict[str, list[tuple[int, float]]] = {}
  for c in cells:
    metric = next(iter(c.metrics))
    series.setdefault(f"{c.task} ({metric})", []).append((c.shots, c.metrics[metric]))
  xs = sorted({x for pts in series.values() for x, _ in pts})
  ys = [y for pts in series.values() for _, y in pts]
  lo, hi = min(0.0, *ys), max(1.0, *ys)
  pad = 40
  sx = lambda x: pad + (xs.index(x) / max(len(xs) - 1, 1)) * (width - 2 * pad)  # noqa: E731
  sy = lambda y: height - pad - (y - lo) / (hi - lo) * (height - 2 * pad)  # noqa: E731
  colors = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")
  parts = [
    f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11">',
    f'<rect width="{width}" height="{height}" fill="white"/>',
    f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>',
    f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>',
    f'<text x="{width / 2}" y="{height - 8}" text-anchor="middle">shots</text>',
    f'<text x="4" y="{pad - 8}">{hi:.2f}</text><text x="4" y="{height - pad}">{lo:.2f}</text>',
  ]
  parts += [
    f'<text x="{sx(x)}" y="{height - pad + 14}" text-anchor="middle">{x}</text>' for x in xs
  ]
  for i, (label, pts) in enumerate(series.items()):
    color = colors[i % len(colors)]
    coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in sorted(pts))
    parts.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2"/>')
    parts.append(f'<text x="{pad + 8}" y="{pad + 14 * i}" fill="{color}">{label}</text>')
  parts.append("</svg>")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(parts) + "\n")
