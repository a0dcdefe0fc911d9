"""Held-out answer accuracy of a LLaVA run trained by `jaxtune train configs/llava_stage2.yaml`:
greedy answers (`jaxtune.load`, each image prefilled) to the visual questions of the recipes'
test.json (Fashion-MNIST t10k images, never trained on), exact match, by kind of question.

    python benchmarks/llava_run_accuracy.py runs/llava_stage2 [runs/fashion_llava]
"""

import collections
import json
import pathlib
import sys

import jaxtune
from jaxtune import generate
from jaxtune.data.formats import Message


def main() -> None:
  run = sys.argv[1]
  folder = pathlib.Path(sys.argv[2] if len(sys.argv) > 2 else "runs/fashion_llava")
  model = jaxtune.load(run)
  records = [
    r for r in json.loads((folder / "test.json").read_text()) if not r["id"].endswith(":caption")
  ]
  prompts, images = [], []
  for r in records:
    question = Message("user", r["conversations"][0]["value"])
    ids, pixels = model.image_prompt([question], [folder / r["image"]])
    prompts.append(ids)
    images.append(pixels)
  outs = model.generate(prompts, generate.Sampling(max_new_tokens=16), images=images, batch_size=64)
  hits = collections.defaultdict(list)
  for r, out in zip(records, outs, strict=True):
    ok = model.tokenizer.decode(out.ids).strip() == r["conversations"][1]["value"]
    hits[r["id"].split(":")[1]].append(ok)
    hits["all"].append(ok)
  for kind, values in hits.items():
    print(f"{kind}: {sum(values) / len(values):.3f} of {len(values)}")


if __name__ == "__main__":
  main()
