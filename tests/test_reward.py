"""The reward model: InstructGPT's K-wise loss on packed rankings against the pairs one at a
time, its training step sharded against one device, and a trained one loaded to score."""

import dataclasses
import math

import jax
import numpy as np
import pytest
from subprocesses import TINY_RUN
from test_dpo import LENGTH, MODEL, _batch, _groups, _init, _run
from test_precomputed import write_pairs

import jaxtune
from jaxtune import config
from jaxtune.config import TrainConfig
from jaxtune.data import pipeline
from jaxtune.data.packing import Stats
from jaxtune.errors import CheckpointError
from jaxtune.model import transformer
from jaxtune.train import loop, objective, reward


def _scores(model, params, groups) -> list[list[float]]:
  """Each response's reward, alone in a row: its score at its last input token."""
  examples = [r for g in groups for r in g.responses]
  ids = np.zeros((len(examples), LENGTH), np.int32)
  for n, ex in enumerate(examples):
    ids[n, : len(ex) - 1] = ex.ids[:-1]
  score = np.asarray(
    jax.jit(model.apply, static_argnames="head")({"params": params}, ids, head="score"), np.float64
  )
  flat = [score[n, len(ex) - 2] for n, ex in enumerate(examples)]
  out, start = [], 0
  for g in groups:
    out.append(flat[start : start + len(g.responses)])
    start += len(g.responses)
  return out


MARGINS = (0.0, 0.5)


def test_kwise_loss_is_the_mean_of_its_pairs_one_at_a_time():
  """With and without a margin, on rankings of 4, 3 and 2 responses packed together."""
  model = transformer.Transformer(MODEL, scalar_head=True, scalar_bias=True)
  params = _init(model, 5)
  groups = _groups(6, sizes=(4, 3, 2, 4))
  batch = _batch(groups, rows=3, pack=True)
  goals = [reward.RewardModel(model, m) for m in MARGINS]
  loss_fn = jax.jit(lambda p, b: [g.loss(p, b, None) for g in goals])
  results = loss_fn(params, batch)
  n = float(goals[0].normalizer(batch))
  assert n == len(groups)
  scores = _scores(model, params, groups)
  for margin, (loss, metrics) in zip(MARGINS, results, strict=True):
    per_group, accuracy = [], []
    for g, r in zip(groups, scores, strict=True):
      k = len(g.responses)
      pairs = [(i, j) for i in range(k) for j in range(k) if g.ranks[i] < g.ranks[j]]
      assert len(pairs) == math.comb(k, 2)
      losses = [
        np.log1p(np.exp(-(r[i] - r[j] - margin * (g.ranks[j] - g.ranks[i])))) for i, j in pairs
      ]
      per_group.append(np.mean(losses))
      accuracy.append(np.mean([r[i] > r[j] for i, j in pairs]))
    np.testing.assert_allclose(float(loss) / n, np.mean(per_group), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["accuracy"]) / n, np.mean(accuracy), rtol=1e-6)
  # After training, the offset moves so the demonstrations (best responses) score 0 on average;
  # the pairwise loss does not change.
  normalized = goals[0].finish(params, {}, [batch])
  best = [r[g.ranks.index(0)] for g, r in zip(groups, scores, strict=True)]
  assert float(normalized["score"]["bias"]) == pytest.approx(-np.mean(best), rel=1e-5)
  total, count = goals[0].demonstrations(normalized, batch)
  assert abs(float(total) / int(count)) < 1e-5 and int(count) == len(groups)
  for (a, _), (b, _) in zip(results, loss_fn(normalized, batch), strict=True):
    np.testing.assert_allclose(float(a), float(b), rtol=1e-5)


def test_the_scalar_head_trains_under_lora():
  trains = objective.trains(TrainConfig(objective="reward"), lambda path: path[-1] == "lora_a")
  assert trains(("score", "kernel")) and trains(("layers", "q", "lora_a"))
  assert not trains(("layers", "q", "kernel"))


SHARDED_BATCH = _batch(_groups(7, sizes=(4, 3, 2) * 4), rows=8, pack=True)


@pytest.fixture(scope="module")
def one_device():
  return _run((1, 1), "lora", SHARDED_BATCH, "reward")


@pytest.mark.parametrize("shape", [(2, 4), (8, 1)])
def test_sharded_step_equals_one_device(shape, one_device):
  """LoRA and the scalar head on 2x4 and 8x1 meshes: two steps give one device's losses and
  metrics (each step compiled once: `_run`)."""
  for a, b in zip(one_device, _run(shape, "lora", SHARDED_BATCH, "reward"), strict=True):
    for key in ("loss", "grad_norm", "rewards_chosen", "margin"):
      np.testing.assert_allclose(a[key], b[key], rtol=2e-5, atol=1e-6, err_msg=f"{shape} {key}")
  assert one_device[-1]["loss"] < one_device[0]["loss"]


def test_a_reward_run_loads_and_scores_as_it_was_evaluated(tmp_path, capsys):
  """A LoRA reward run: it prints no generated answers; `jaxtune.load` of it scores the held-out
  pairs with the accuracy the run measured at its end, and the held-out best responses average
  0 (the offset set after training)."""
  cfg = config.load(
    None,
    [
      *TINY_RUN,
      f"data.path={write_pairs(tmp_path / 'pairs.jsonl', 64)}",
      "data.eval_size=16",
      "data.template=raw",
      "data.max_length=128",
      "peft.method=lora",
      "train.objective=reward",
      "train.steps=2",
      "train.batch_size=8",
      "train.warmup_steps=0",
      "train.eval_every=100",
      f"train.output_dir={tmp_path / 'run'}",
    ],
  )
  summary = loop.run(cfg)
  assert "(reference:" not in capsys.readouterr().out
  held_out = pipeline.conversations(cfg.data, cfg.train.seed, Stats()).held_out
  model = jaxtune.load(tmp_path / "run")
  chosen, rejected = (model.score([p.conversations[i] for p in held_out]) for i in (0, 1))
  assert len(chosen) == 16 and np.ptp(chosen) > 0
  assert float(np.mean(chosen > rejected)) == pytest.approx(summary["eval_loss_end"], abs=1e-6)
  assert float(np.mean(chosen)) == pytest.approx(0.0, abs=1e-4)
  with pytest.raises(CheckpointError, match="no scalar head"):
    dataclasses.replace(model, options=()).score_ids([[1, 2, 3]])
