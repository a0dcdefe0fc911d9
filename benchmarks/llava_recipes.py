"""The LLaVA recipes' held-out answer accuracy, as the runs themselves measured it: each run's
held_out.json (greedy answers to the questions of data.eval_path, Fashion-MNIST test images no
part trains on, exact match, at the run's start and end), by kind of question.

    python -m jaxtune.data.fashion_mnist ../shared/data/fashion_mnist runs/fashion_llava
    python -m jaxtune.train.vision_pretrain configs/llava_stage1.yaml \\
      ../shared/data/fashion_mnist runs/fashion_vit
    jaxtune train configs/llava_text.yaml
    jaxtune train configs/llava_stage1.yaml
    jaxtune train configs/llava_stage2.yaml
    python benchmarks/llava_recipes.py [runs]      # results/llava_recipes.{md,json}
"""

from __future__ import annotations

import collections
import json
import pathlib
import re
import sys

import common

RUNS = {"text-only baseline": "llava_text", "after stage 1": "llava_stage1"}
RUNS["after stage 2"] = "llava_stage2"
KINDS = ("what", "footwear", "upper_body")


def by_kind(answers: list[dict], test: list[dict]) -> dict[str, float]:
  """Exact match of the final answers, over all and by the test record's kind (its id's
  suffix: `images/test-17.png:what`)."""
  hits = collections.defaultdict(list)
  for a in answers:
    index = int(re.search(r"record (\d+)$", a["where"]).group(1))
    ok = a["after"].strip() == a["reference"].strip()
    hits[test[index]["id"].rsplit(":", 1)[1]].append(ok)
    hits["all"].append(ok)
  return {k: sum(v) / len(v) for k, v in hits.items()}


def main() -> None:
  runs = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "runs")
  test = json.loads((runs / "fashion_llava" / "test.json").read_text())
  vit = json.loads((runs / "fashion_vit" / "pretrain.json").read_text())
  results, rows = {"vit": vit}, []
  for name, run in RUNS.items():
    held = json.loads((runs / run / "held_out.json").read_text())
    scores = by_kind(held["answers"], test)
    lines = (runs / run / "metrics.jsonl").read_text().splitlines()
    metrics = [json.loads(line) for line in lines if line.strip()]
    losses = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    results[run] = {"exact_match": scores, "eval_loss": [losses[0], losses[-1]]}
    rows.append(
      {
        "model": name,
        **{k: f"{scores[k]:.3f}" for k in ("all", *KINDS)},
        "held-out loss": f"{losses[0]:.3f} -> {losses[-1]:.3f}",
      }
    )
  table = common.markdown_table(rows, ["model", "all", *KINDS, "held-out loss"])
  common.write(
    "llava_recipes",
    results,
    f"""# The LLaVA recipes on Fashion-MNIST, as `jaxtune train` runs them

Held-out greedy answers (exact match) to {len(held["answers"])} questions about
{len(test) // len(KINDS)} Fashion-MNIST test images (t10k, never trained on), from each run's
held_out.json; the encoder (`vision.init_from`) pretrained by `jaxtune.train.vision_pretrain`
({vit["steps"]} steps, test accuracy {vit["test_accuracy"]:.3f}):

{table}
""",
  )
  print(table)


if __name__ == "__main__":
  main()
