"""Packed vs one-per-row log-likelihood requests (`jaxtune.eval.scoring.score`).

The requests are those of `jaxtune eval --tasks mmlu:SUBJECT` (the val questions, each of its
four choices " A".." D" after the question, k-shot from dev) and, for short requests, of
`--tasks strategyqa` zero-shot (" yes" / " no" after the question), scored by the real
stories260K model (512 positions) on one CPU device, with the same rows per forward pass
(`--rows`):

- one per row: each request alone in a row, a pass's rows as long as its longest request
  (rounded up to a multiple of 64, compiled once per length bucket);
- packed, rows of the longest: the same rows, requests placed first fit, longest first, several
  to a row (segment ids, no attention across them);
- packed, rows of 512: rows of the model's length, so more requests share a row.

All score the same numbers (checked here, and in tests/test_eval_requests.py). Reported: forward
passes, the fraction of computed positions that hold a real token, attention's share of the
forward FLOPs (4 T^2 D a layer for scores and values, against 2 FLOPs per parameter and
position; it grows with the row length T), seconds (a first run compiles every shape; then
`--runs` timed runs of each, taking turns; median) and the speed-up over one per row.

  python benchmarks/eval_packing.py [--quick] [--shots 0,1] [--subjects 12] [--runs 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import statistics
import time

import common
import jax
import numpy as np

import jaxtune
from jaxtune.data import packing
from jaxtune.eval import incontext, requests, scoring, tasks

DATA = pathlib.Path(
  os.environ.get("JAXTUNE_DATA_DIR", pathlib.Path(__file__).parents[1] / ".." / "shared" / "data")
)


def task_requests(model, task: tasks.Task, shots: int) -> list[tuple[list[int], list[int]]]:
  """The log-likelihood requests of a multiple-choice task, as `jaxtune eval --tasks` makes them."""
  questions, pool = incontext.split_docs(task, str(DATA))
  out = []
  for i, doc in enumerate(questions):
    ctx = incontext.context(task, incontext.exemplars(task, pool, shots, i), doc)
    out += [
      requests.encode_pair(model.tokenizer, ctx, task.target_delimiter + c) for c in doc.choices
    ]
  return out


def usage(reqs, rows: int, layout: tuple[bool, int], max_seq_len: int) -> dict[str, float]:
  """Forward passes, real tokens / computed positions and attention's share of the FLOPs (the
  score and value matmuls, 4 T^2 D a layer, against the weights' 2 P T) of scoring `reqs` as
  `score` places them."""
  pack, row_length = layout
  lengths = sorted((min(len(c) + len(x), max_seq_len + 1) - 1 for c, x in reqs), reverse=True)
  passes = slots = square = 0
  start = 0
  while start < len(lengths):
    length = max(-(-lengths[start] // 64) * 64, row_length if pack else 0)
    length = min(length, max_seq_len)
    placed = packing.assign_rows(lengths[start:], rows, length, pack)
    start += sum(map(len, placed))
    passes, slots, square = passes + 1, slots + rows * length, square + rows * length**2
  return {"passes": passes, "used": sum(lengths) / slots, "square": square, "slots": slots}


# (pack, least row length) -> name. The baseline: one request per row.
BASELINE = (False, 0)
LAYOUTS = {
  BASELINE: "one per row",
  (True, 0): "packed, rows of the longest",
  (True, 512): "packed, rows of 512",
}


def score(model, reqs, rows: int, layout: tuple[bool, int]) -> np.ndarray:
  pack, row_length = layout
  return scoring.score(model, reqs, rows, pack, progress=False, row_length=row_length).logprob


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="3 subjects, 1 timed run")
  parser.add_argument("--shots", default="0,1")
  parser.add_argument("--subjects", type=int, default=12, help="the first N subjects (0: all)")
  parser.add_argument(
    "--short", type=int, default=400, help="StrategyQA questions (short requests; 0: none)"
  )
  parser.add_argument("--rows", type=int, default=16)
  parser.add_argument("--runs", type=int, default=3)
  args = parser.parse_args()
  model = jaxtune.load(DATA / "models" / "stories260K" / "stories260K.bin")
  subjects = sorted(p.name.removesuffix("_val.csv") for p in (DATA / "mmlu/data/val").iterdir())
  subjects = subjects[: 3 if args.quick else args.subjects or len(subjects)]
  runs = 1 if args.quick else args.runs
  rows_out = []
  workloads = [
    (f"MMLU ({len(subjects)} subjects)", shots, [tasks.mmlu(s) for s in subjects])
    for shots in map(int, args.shots.split(","))
  ]
  if args.short:
    limit = 40 if args.quick else args.short
    workloads.append(
      ("StrategyQA", 0, [dataclasses.replace(tasks.find("strategyqa"), limit=limit)])
    )
  for name, shots, found in workloads:
    reqs = [r for task in found for r in task_requests(model, task, shots)]
    seconds = {layout: [] for layout in LAYOUTS}
    scores = {}
    for layout in LAYOUTS:  # Compiles every shape.
      scores[layout] = score(model, reqs, args.rows, layout)
      np.testing.assert_allclose(scores[layout], scores[BASELINE], atol=1e-4, rtol=0)
    for _ in range(runs):
      for layout in LAYOUTS:
        t0 = time.perf_counter()
        jax.block_until_ready(score(model, reqs, args.rows, layout))
        seconds[layout].append(time.perf_counter() - t0)
    params = sum(x.size for x in jax.tree.leaves(model.params))
    cfg = model.config
    for layout, layout_name in LAYOUTS.items():
      use = usage(reqs, args.rows, layout, cfg.max_seq_len)
      attention = 4 * cfg.num_layers * cfg.dim * use["square"]
      median = statistics.median(seconds[layout])
      rows_out.append(
        {
          "task": name,
          "shots": shots,
          "layout": layout_name,
          "requests": len(reqs),
          "mean tokens": float(np.mean([len(c) + len(x) - 1 for c, x in reqs])),
          "forward passes": use["passes"],
          "real / computed positions": use["used"],
          "attention share of FLOPs": attention / (attention + 2 * params * use["slots"]),
          "seconds": median,
          "requests/s": len(reqs) / median,
          "speed-up": statistics.median(seconds[BASELINE]) / median,
        }
      )
      print(rows_out[-1])
  columns = list(rows_out[0])
  markdown = (
    f"# Packed vs one-per-row requests (stories260K, MMLU val, StrategyQA; "
    f"{args.rows} rows per pass, one CPU device)\n\n" + common.markdown_table(rows_out, columns)
  )
  print(markdown)
  if not args.quick:
    common.write("eval_packing", {"rows": rows_out, "subjects": subjects}, markdown)


if __name__ == "__main__":
  main()
