"""In-context learning (GPT-3, Brown et al. 2020): accuracy against the number of exemplars in
the prompt, with jaxtune's evaluation.

1. The default model, trained by `jaxtune train` as configured (the embedded mixture, whose
   training examples carry 0 or 1 exemplar), answers held-out records of every embedded task in
   their held-out wording (templates never trained on) with k = 0, 1, 2, 4 exemplars of the same
   task and wording before the question, in the mixture's few-shot format, inside the run's chat
   template; greedy answers scored by exact match (`train/held_out.py`, the scoring of
   `jaxtune train`'s held-out answers). Exemplars are drawn by seed: three draws.
2. stories260K (pretrained on TinyStories) on MMLU val with 0, 1 and 5 dev exemplars
   (`eval.incontext`, what `jaxtune eval stories260K.bin --tasks mmlu:SUBJECT --shots 0,1,k`
   runs), log-likelihood of the answer letter.

  python benchmarks/claims/in_context.py [--quick] [--seeds 3]
"""

from __future__ import annotations

import pathlib
import tempfile
from collections.abc import Sequence
from typing import Any

import claimlib
import numpy as np

from jaxtune import api, config
from jaxtune.data import mixtures, synthetic
from jaxtune.data.formats import Conversation, Message
from jaxtune.eval import incontext
from jaxtune.train import held_out

NAME = "in_context"
SHOTS = (0, 1, 2, 4)
MMLU_SHOTS = ("0", "1", "k")  # k: MMLU's 5.


def few_shot(task: mixtures.Task, index: int, k: int, rng: np.random.Generator) -> Conversation:
  """Record `index` of `task` in its held-out wording, after `k` other records of the task in
  the same wording, as `mixtures.render_task` writes few-shot prompts ("prompt\\nresponse\\n\\n"
  per exemplar)."""
  template = task.eval_templates[0]
  prompt, response = template.render(task.records[index])
  others = [j for j in rng.permutation(len(task.records)) if j != index][:k]
  shots = [template.render(task.records[j]) for j in others]
  prompt = "".join(f"{p}\n{r}\n\n" for p, r in shots) + prompt
  return Conversation(
    (Message("user", prompt), Message("assistant", response)), f"{task.name}[{index}]"
  )


def embedded(model: api.Model, per_task: int, shots: Sequence[int], seeds: int) -> dict:
  """Exact match per shot count (over all tasks, and per task), each exemplar draw a seed."""
  found = synthetic.tasks(12345, max(per_task * 4, 16))  # Records no run trains on.
  out: dict[str, Any] = {}
  for k in shots:
    draws = []
    for seed in range(seeds if k else 1):  # Zero-shot draws nothing.
      rng = np.random.default_rng([seed, k])
      convs = [few_shot(t, i, k, rng) for t in found for i in range(per_task)]
      prompts = held_out.select(
        convs, model.tokenizer, model.template, model.config.max_seq_len, per_task
      )
      scores, _ = held_out.evaluate(
        model.module, model.params, prompts, model.tokenizer, model.template, None, None
      )
      draws.append(
        {
          **scores,
          "prompt_tokens": float(np.mean([len(p) for p in prompts.ids])),
        }
      )
    out[str(k)] = {
      "exact_match": claimlib.spread([d["exact_match_all"] for d in draws]),
      "per_task": {
        name: claimlib.spread([d["exact_match"][name] for d in draws])
        for name in draws[0]["exact_match"]
      },
      "prompt_tokens": draws[0]["prompt_tokens"],
      "prompts": sum(draws[0]["prompts"].values()),
    }
  return out


def mmlu(limit: int, subjects: Sequence[str]) -> dict[str, Any]:
  """stories260K's MMLU accuracy per shot count, over `subjects` (`limit` questions each)."""
  data = claimlib.data_dir()
  model = api.load(data / "models" / "stories260K" / "stories260K.bin")
  found = incontext.find_tasks([f"mmlu:{s}" for s in subjects], limit)
  cells = incontext.run_all(model, found, MMLU_SHOTS, str(data))
  out: dict[str, Any] = {}
  for k in dict.fromkeys(c.shots for c in cells):
    mine = [c for c in cells if c.shots == k]
    n = sum(int(c.metrics["questions"]) for c in mine)
    right = sum(c.metrics["acc"] * c.metrics["questions"] for c in mine)
    acc = right / n
    out[str(k)] = {
      "acc": acc,
      "stderr": float(np.sqrt(acc * (1 - acc) / n)),
      "questions": n,
      "truncated": sum(int(c.metrics["truncated"]) for c in mine),
    }
  return out


def plot(result: dict[str, Any], path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  emb, mm = result["embedded"], result["mmlu"]
  ax = axes[0]
  ks = [int(k) for k in emb]
  ax.errorbar(
    ks,
    [100 * emb[str(k)]["exact_match"]["mean"] for k in ks],
    yerr=[100 * emb[str(k)]["exact_match"]["std"] for k in ks],
    fmt="o-",
    color="black",
    lw=2,
    label="all tasks",
  )
  for name in emb[str(ks[0])]["per_task"]:
    ax.plot(ks, [100 * emb[str(k)]["per_task"][name]["mean"] for k in ks], alpha=0.6, label=name)
  ax.set_xticks(ks)
  ax.set_xlabel("exemplars in the prompt")
  ax.set_ylabel("held-out exact match (%)")
  ax.set_ylim(-2, 102)
  ax.set_title("default model, embedded tasks (held-out wording)", fontsize=10)
  ax.legend(fontsize=8)
  ax = axes[1]
  ks = [int(k) for k in mm]
  ax.errorbar(
    ks,
    [100 * mm[str(k)]["acc"] for k in ks],
    yerr=[100 * mm[str(k)]["stderr"] for k in ks],
    fmt="o-",
  )
  ax.axhline(25, color="gray", ls="--", label="chance")
  ax.set_xticks(ks)
  ax.set_xlabel("exemplars (MMLU dev)")
  ax.set_ylabel("accuracy (%)")
  ax.set_title(
    f"stories260K, MMLU val ({mm[str(ks[0])]['questions']} questions, "
    f"{result['mmlu_subjects']} subjects)",
    fontsize=10,
  )
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=90)


def verdict(result: dict[str, Any]) -> tuple[str, str, str]:
  """(our figure, holds, why)."""
  emb, mm = result["embedded"], result["mmlu"]
  ks = sorted(int(k) for k in emb)
  em = {k: emb[str(k)]["exact_match"] for k in ks}
  ours = (
    "default model, held-out exact match: "
    + ", ".join(f"{k}-shot {100 * em[k]['mean']:.1f}±{100 * em[k]['std']:.1f}%" for k in ks)
    + "; stories260K MMLU: "
    + ", ".join(f"{k}-shot {100 * v['acc']:.1f}±{100 * v['stderr']:.1f}%" for k, v in mm.items())
  )
  best_few = max(em[k]["mean"] for k in ks if k > 0)
  rises = best_few > em[0]["mean"] + 2 * max(em[k]["std"] for k in ks) + 1e-9
  mmlu_rises = max(v["acc"] for k, v in mm.items() if k != "0") > mm["0"]["acc"] + 2 * max(
    v["stderr"] for v in mm.values()
  )
  holds = "yes" if rises and mmlu_rises else "partly" if rises or mmlu_rises else "no"
  why = []
  if not rises:
    most = max(ks)
    falls = em[most]["mean"] < em[0]["mean"] - 2 * max(em[k]["std"] for k in ks)
    shots = result["trained_few_shot"]
    why.append(
      f"the default model's accuracy {'falls' if falls else 'does not rise'} with exemplars "
      f"({100 * em[0]['mean']:.0f}% at 0, {100 * em[most]['mean']:.0f}% at {most}): it was "
      + (f"trained with up to {shots} exemplars" if shots else "trained zero-shot only")
      + f" (data.few_shot={shots}) on {result['trained_row_length']}-token rows ({most}-shot "
      f"prompts are {emb[str(most)]['prompt_tokens']:.0f} tokens), so exemplars are text it "
      "never learned to use, and in-context learning emerges with scale (GPT-3's few-shot "
      "gains grow with model size, Fig. 1.2)"
    )
  if not mmlu_rises:
    why.append(
      "stories260K (260K parameters, children's stories only, 512 positions: 5-shot prompts are "
      "cut) is at chance on MMLU with any number of shots, as GPT-3 up to 13B is (Hendrycks et "
      "al. 2021: 26.0% few-shot at 13B, 43.9% at 175B)"
    )
  return ours, holds, "; ".join(why)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = claimlib.arguments(__doc__, argv)
  commit = claimlib.commit()  # Before the runs: the code they run.
  default = config.load([], [])
  tmp = pathlib.Path(tempfile.mkdtemp(prefix="claim_in_context_"))
  quick = [*claimlib.QUICK, "train.steps=2"] if args.quick else []
  steps = 2 if args.quick else default.train.steps  # The default run, all of it.
  run = claimlib.train(
    [], [*quick, f"train.steps={steps}", "train.held_out_prompts=0"], tmp / "default"
  )
  model = api.load(tmp / "default")
  shots = SHOTS[:2] if args.quick else SHOTS
  # Every 6th subject (10 of 57), for time.
  subjects = ["abstract_algebra"] if args.quick else sorted(_subjects())[::6]
  result: dict[str, Any] = {
    "commit": commit,
    "default_model": {k: getattr(default.model, k) for k in ("dim", "num_layers", "num_heads")},
    "trained_steps": run["steps"],
    "trained_eval_loss": run["eval_loss_end"],
    "trained_row_length": default.data.max_length,
    "trained_few_shot": default.data.few_shot,
    "embedded": embedded(model, 2 if args.quick else 20, shots, args.seeds),
    "mmlu": mmlu(2 if args.quick else 6, subjects),
    "mmlu_subjects": len(subjects),
  }
  ours, holds, why = verdict(result)
  result.update(
    claim="In-context learning: accuracy grows with shots (GPT-3, Brown et al. 2020)",
    paper=(
      "175B: few-shot beats one-shot beats zero-shot on most tasks (e.g. TriviaQA 64.3 / 68.0 / "
      "71.2%), with the gap growing with model size (Fig. 1.2, 1.3)"
    ),
    setting=(
      f"default model ({default.model.dim} wide, {default.model.num_layers} layers, "
      f"{run['steps']} steps of jaxtune train) on {2 if args.quick else 20} held-out records "
      f"x 5 embedded tasks, held-out wording, k = {', '.join(map(str, shots))}, {args.seeds} "
      f"exemplar draws; stories260K on MMLU val ({len(subjects)} subjects, up to 6 questions "
      "each), 0/1/5-shot"
    ),
    ours=ours,
    holds=holds,
    why=why,
  )
  claimlib.write(args, NAME, result)
  plot(result, args.out / f"claim_{NAME}.png")
  return result


def _subjects() -> list[str]:
  folder = claimlib.data_dir() / "mmlu" / "data" / "val"
  return [p.name.removesuffix("_val.csv") for p in folder.glob("*_val.csv")]


if __name__ == "__main__":
  main()
