"""InstructGPT's pipeline on data no one made up for the test: the default run's SFT model, a
reward model on rankings of its own samples, and PPO-ptx with the tasks' own checker as reward.

1. SFT: the embedded default run (`jaxtune train` with no config), unless `--sft` names one.
2. Rankings: the SFT model samples `--k` answers (temperature 1) to each of `--rm-prompts`
   held-out prompts of the embedded tasks (none of those the exact match below scores); the
   task's checker ranks them: an exact answer scores 1, a wrong one its similarity to the
   reference (difflib's ratio) times 0.9; duplicates and ties are dropped, groups of 2..k kept.
   A reward model (LoRA rank 8 and the scalar head over the SFT model, `train.objective=reward`)
   trains on them; its held-out pairwise accuracy is measured on `data.eval_size` groups.
3. PPO-ptx (`configs/ppo.yaml`: exact match as the reward, k1 KL penalty beta 0.02, ptx 1.0) from
   the SFT model for `--ppo-steps` updates; held-out exact match (greedy, 16 prompts per task)
   before and after, the rollouts' reward and KL per iteration.
4. Memory: per-device bytes of the compiled PPO step against the SFT step of the same model and
   batch, both under LoRA (XLA's memory analysis, nothing allocated).
DPO's numbers (same recipe: the default run's SFT model against its own mistakes) are read from
`benchmarks/results/dpo_embedded.json` (`benchmarks/dpo_embedded.py`, a separate SFT run).

Run: `python benchmarks/ppo_embedded.py --out /tmp/ppo_embedded [--sft runs/default]`.
Writes benchmarks/results/ppo_embedded.{json,md,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os

import common  # noqa: F401  (sets the host's malloc before JAX starts)
import dpo_embedded
import jax
import numpy as np

from jaxtune import api, config, generate, sharding
from jaxtune.data import packing, pipeline
from jaxtune.data.packing import Stats
from jaxtune.train import held_out, loop, ppo, ppo_run


def _records(run_dir: str) -> list[dict]:
  return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def _done(run_dir: str) -> bool:
  """A finished run of an earlier call (its held-out results written): reused, not retrained."""
  return os.path.exists(os.path.join(run_dir, "metrics.jsonl")) and os.path.isdir(
    os.path.join(run_dir, "checkpoints")
  )


def _reward_summary(run_dir: str) -> dict:
  losses = [r["eval_loss"] for r in _records(run_dir) if "eval_loss" in r]
  return {"eval_loss_start": losses[0], "eval_loss_end": losses[-1]}


def _ppo_summary(run_dir: str) -> dict:
  records = _records(run_dir)
  em = [r["held_out_exact_match"] for r in records if "held_out_exact_match" in r]
  return {
    "rollouts": [r for r in records if "rollout/kl" in r],
    "held_out_exact_match": [em[0], em[-1]],
  }


def _checker_score(answer: str, reference: str) -> float:
  if held_out.exact_match(answer, reference):
    return 1.0
  return 0.9 * difflib.SequenceMatcher(None, answer.strip(), reference.strip()).ratio()


def rankings(sft, convs, k: int, seed: int) -> list[dict]:
  """Ranked records (`data.format: ranked`, scores) of the SFT model's own k samples."""
  prompts = [
    packing.prompt_ids(
      dataclasses.replace(c, messages=c.messages[:-1]), sft.template, sft.tokenizer
    )
    for c in convs
  ]
  sampling = generate.Sampling(max_new_tokens=64, temperature=1.0)
  samples = [sft.generate(prompts, sampling, seed=seed + i, batch_size=64) for i in range(k)]
  records = []
  for n, conv in enumerate(convs):
    reference, seen = conv.messages[-1].content, {}
    for run in samples:
      text = sft.tokenizer.decode(run[n].ids).strip()
      score = round(_checker_score(text, reference), 6)
      if text and text not in seen and score not in seen.values():
        seen[text] = score
    if len(seen) >= 2:
      records.append(
        {
          "prompt": conv.messages[-2].content,
          "responses": list(seen),
          "scores": list(seen.values()),
        }
      )
  return records


def memory(sft_dir: str, batch_size: int, length: int) -> dict[str, dict[str, int]]:
  """Compiled per-device bytes of the SFT and the PPO(-ptx) step under LoRA, same model."""
  out = {}
  base = [f"train.init_from={sft_dir}", "peft.method=lora", f"train.batch_size={batch_size}"]
  base += [f"data.max_length={length}", f"data.tokenizer={os.path.join(sft_dir, 'tokenizer')}"]
  for name, extra in (("sft", []), ("ppo", ["train.objective=ppo", "ppo.ptx_coef=1.0"])):
    cfg = config.load(None, base + extra)
    mesh = sharding.make_mesh(cfg.mesh)
    goal = (lambda m, c=cfg: ppo.PPO(m, c.ppo)) if name == "ppo" else None
    t = loop.build(cfg, mesh, 1, shapes_only=True, make_goal=goal)
    batch = common.train_batch(batch_size, length, cfg.model.vocab_size, t.batch_sharding)
    if name == "ppo":
      zeros = jax.device_put(np.zeros((batch_size, length), np.float32), t.batch_sharding)
      batch = {**batch, **{k: zeros for k in ppo.SCORED_KEYS}}
      batch.update({f"ptx_{k}": v for k, v in list(batch.items()) if k in ppo.ROLLOUT_KEYS})
    with sharding.use(mesh, t.rules):
      compiled = t.train_step.lower(t.state, t.frozen, batch).compile()
    out[name] = common.compiled_memory(compiled)
  return out


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", required=True)
  parser.add_argument("--sft", default="")
  parser.add_argument("--k", type=int, default=4)
  parser.add_argument("--rm-prompts", type=int, default=300)
  parser.add_argument("--rm-steps", type=int, default=120)
  parser.add_argument("--ppo-steps", type=int, default=160)
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  sft_dir = args.sft or os.path.join(args.out, "sft")
  sft_cfg = config.load(None, [f"train.output_dir={sft_dir}"])
  if not args.sft and not os.path.isdir(os.path.join(sft_dir, "checkpoints")):
    loop.run(sft_cfg)
  sft = api.load(sft_dir)
  convs = pipeline.conversations(sft_cfg.data, sft_cfg.train.seed, Stats())
  scored = held_out.select(
    convs.held_out, sft.tokenizer, sft_cfg.data.template, sft_cfg.model.max_seq_len, 16
  )
  scored_prompts = {c.messages[-2].content for c in scored.conversations}
  pool = [c for c in convs.held_out if c.messages[-2].content not in scored_prompts]
  rank_path = os.path.join(args.out, "rankings.jsonl")
  if os.path.exists(rank_path):  # An earlier call's (the same seeds draw the same samples).
    records = [json.loads(line) for line in open(rank_path)]
  else:
    records = rankings(sft, pool[: args.rm_prompts], args.k, seed=1)
    with open(rank_path, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in records)
  rm_dir = os.path.join(args.out, "reward")
  eval_groups = max(len(records) // 5, 8)
  rm_summary = (
    _reward_summary(rm_dir)
    if _done(rm_dir)
    else loop.run(
      config.load(
        None,
        [
          f"data.path={rank_path}",
          "data.format=ranked",
          f"data.tokenizer={os.path.join(sft_dir, 'tokenizer')}",
          f"data.template={sft_cfg.data.template}",
          "data.max_length=256",
          f"data.eval_size={eval_groups}",
          "data.on_bad_record=skip",
          "peft.method=lora",
          "train.objective=reward",
          f"train.init_from={sft_dir}",
          f"train.steps={args.rm_steps}",
          "train.batch_size=16",
          "train.learning_rate=1e-3",
          "train.end_learning_rate=1e-4",
          "train.warmup_steps=10",
          f"train.eval_every={args.rm_steps // 4}",
          f"train.checkpoint_every={args.rm_steps}",
          f"train.output_dir={rm_dir}",
        ],
      )
    )
  )
  ppo_dir = os.path.join(args.out, "ppo")
  ppo_summary = (
    _ppo_summary(ppo_dir)
    if _done(ppo_dir)
    else ppo_run.run(
      config.load(
        os.path.join(os.path.dirname(common.RESULTS), "..", "configs", "ppo.yaml"),
        [
          f"data.tokenizer={os.path.join(sft_dir, 'tokenizer')}",
          f"train.init_from={sft_dir}",
          f"train.steps={args.ppo_steps}",
          f"train.checkpoint_every={args.ppo_steps}",
          f"train.output_dir={ppo_dir}",
        ],
      )
    )
  )
  dpo_path = os.path.join(common.RESULTS, "dpo_embedded.json")
  dpo = json.load(open(dpo_path)) if os.path.exists(dpo_path) else None
  mem = memory(sft_dir, 8, sft_cfg.data.max_length)
  # Every held-out prompt, greedy, as dpo_embedded.py scores DPO.
  greedy = generate.Sampling(max_new_tokens=96)
  em_all = [
    dpo_embedded.exact(convs.held_out, dpo_embedded.answers(m, convs.held_out, greedy))
    for m in (sft, api.load(ppo_dir))
  ]
  last = ppo_summary["rollouts"][-1]
  em_before, em_after = ppo_summary["held_out_exact_match"]
  results = {
    "sft_run": sft_dir,
    "rankings": {
      "prompts_sampled": min(args.rm_prompts, len(pool)),
      "k": args.k,
      "groups": len(records),
      "held_out_groups": eval_groups,
      "mean_responses": float(np.mean([len(r["responses"]) for r in records])),
      "with_an_exact_answer": sum(1.0 in r["scores"] for r in records),
    },
    "reward_model": {
      "steps": args.rm_steps,
      "held_out_accuracy": [rm_summary["eval_loss_start"], rm_summary["eval_loss_end"]],
    },
    "ppo": {
      "steps": args.ppo_steps,
      "held_out_exact_match": [em_before, em_after],
      "held_out_exact_match_all_prompts": em_all,
      "held_out_prompts": len(convs.held_out),
      "kl_end": last["rollout/kl"],
      "reward_end": last["rollout/reward"],
      "curve": ppo_summary["rollouts"],
    },
    "dpo_from_dpo_embedded": None
    if dpo is None
    else [dpo["held_out_exact_match_sft"], dpo["held_out_exact_match_dpo"], dpo["kl_end"]],
    "memory_bytes_per_device": mem,
    "machine": common.machine(),
  }
  ratio = sum(mem["ppo"].values()) / sum(mem["sft"].values())
  em = "held-out exact match (all prompts)"
  rows = [
    {
      "model": "SFT (default run)",
      "held-out exact match (80)": f"{100 * em_before:.1f}%",
      em: f"{100 * em_all[0]:.1f}%",
      "KL": "0",
    },
    {
      "model": f"+ PPO-ptx ({args.ppo_steps} updates)",
      "held-out exact match (80)": f"{100 * em_after:.1f}%",
      em: f"{100 * em_all[1]:.1f}%",
      "KL": f"{last['rollout/kl']:.3f}",
    },
  ]
  if dpo is not None:
    rows += [
      {
        "model": "SFT (dpo_embedded's run)",
        "held-out exact match (80)": "",
        em: f"{100 * dpo['held_out_exact_match_sft']:.1f}%",
        "KL": "0",
      },
      {
        "model": f"+ DPO ({dpo['dpo_steps']} steps)",
        "held-out exact match (80)": "",
        em: f"{100 * dpo['held_out_exact_match_dpo']:.1f}%",
        "KL": f"{dpo['kl_end']:.3f}",
      },
    ]
  rm = results["reward_model"]["held_out_accuracy"]
  markdown = (
    "# Reward model and PPO-ptx on the SFT model's own samples (embedded tasks)\n\n"
    f"Rankings: {len(records)} groups (mean {results['rankings']['mean_responses']:.2f} "
    f"responses) of the SFT model's {args.k} samples per held-out prompt, ranked by the checker; "
    f"reward model held-out pairwise accuracy {rm[0]:.3f} -> {rm[1]:.3f} "
    f"({eval_groups} groups, {args.rm_steps} steps).\n\n"
    + common.markdown_table(rows, ["model", "held-out exact match (80)", em, "KL"])
    + f"\n\n(80): the run's own held-out score, 16 prompts per task; all prompts: the "
    f"{len(convs.held_out)} held-out prompts, greedy, as `dpo_embedded.py` scores. KL: per "
    "response, nats (PPO: the last iteration's rollouts, log pi - log ref summed over the "
    "sampled tokens; DPO: from its metrics, exact per position). The PPO step's figure excludes "
    "the rollouts' scoring pass and the KV cache of sampling, which run apart from it.\n\n"
    f"Per-device memory of the compiled step under LoRA (batch 8 x {sft_cfg.data.max_length}): "
    f"PPO-ptx {sum(mem['ppo'].values()) / 2**20:.1f} MiB vs SFT "
    f"{sum(mem['sft'].values()) / 2**20:.1f} MiB ({ratio:.2f}x; arguments + outputs + "
    "temporaries + aliases).\n"
  )
  common.write("ppo_embedded", results, markdown)
  _plot(results)


def _plot(results: dict) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
  names, values = ["SFT", "PPO-ptx"], list(results["ppo"]["held_out_exact_match_all_prompts"])
  if results["dpo_from_dpo_embedded"]:
    names += ["SFT (DPO run)", "DPO"]
    values += results["dpo_from_dpo_embedded"][:2]
  a.bar(names, [100 * v for v in values])
  a.set_ylabel(f"held-out exact match, {results['ppo']['held_out_prompts']} prompts (%)")
  a.set_title("embedded tasks, greedy")
  curve = results["ppo"]["curve"]
  steps = [r["step"] for r in curve]
  b.plot(steps, [r["rollout/reward"] for r in curve], label="rollout reward")
  b.plot(steps, [r["rollout/kl"] for r in curve], label="KL to reference (nats)")
  b.set_xlabel("PPO update")
  b.legend()
  b.set_title(f"reward model held-out acc {results['reward_model']['held_out_accuracy'][1]:.3f}")
  fig.tight_layout()
  fig.savefig(os.path.join(common.RESULTS, "ppo_embedded.png"), dpi=100)


if __name__ == "__main__":
  main()
