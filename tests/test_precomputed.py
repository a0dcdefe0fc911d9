"""A precomputed DPO reference (`train.reference=precomputed`) in a run: computed once into the
run folder, found by every batch's tokens, read again on resume, refused when stale or missing.
(Its steps equal the live reference's: tests/test_dpo.py.)"""

import json
import logging
import os

import numpy as np
import pytest
from subprocesses import TINY_RUN

from jaxtune import config, runs
from jaxtune.errors import ConfigError
from jaxtune.train import loop

WORDS = "red blue green seven apple river stone cloud light music paper glass".split()


def write_pairs(path, count: int = 24):
  """`count` pairwise records of random words, in a JSONL file at `path`."""
  rng = np.random.default_rng(0)
  with open(path, "w") as f:
    for i in range(count):
      prompt = f"Name {i}: " + " ".join(rng.choice(WORDS, 3))
      chosen, rejected = (" ".join(rng.choice(WORDS, int(rng.integers(2, 6)))) for _ in "ab")
      f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected + " no"}) + "\n")
  return path


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
  """Pairwise records, no held-out ones (so a run answers no prompts at its end)."""
  return write_pairs(tmp_path_factory.mktemp("pairs") / "pairs.jsonl")


def _config(data, output_dir, *overrides: str) -> config.Config:
  return config.load(
    None,
    [
      *TINY_RUN,
      f"data.path={data}",
      "data.template=raw",
      "data.max_length=128",
      "train.objective=dpo",
      "train.preference_beta=0.5",
      "train.steps=2",
      "train.batch_size=8",
      "train.learning_rate=1e-2",
      "train.warmup_steps=0",
      "train.log_every=1",
      "train.eval_every=100",
      "train.checkpoint_every=100",
      f"train.output_dir={output_dir}",
      *overrides,
    ],
  )


def _losses(run) -> list[tuple[int, str, float]]:
  with open(run / runs.METRICS) as f:
    records = [json.loads(line) for line in f]
  return [
    (r["step"], k, r[k]) for r in records for k in ("loss", "eval_loss", "margin", "kl") if k in r
  ]


@pytest.fixture(scope="module")
def run(pairs, tmp_path_factory):
  """Full fine-tuning from random weights with the precomputed reference, two steps."""
  out = tmp_path_factory.mktemp("reference") / "run"
  loop.run(_config(pairs, out, "train.reference=precomputed"))
  return out


def test_the_values_find_their_tokens_in_every_batch(run):
  """The reference is the initial policy: before any update, whatever the packing (computed in
  source order, trained shuffled, held out as the first batch), each pair's log-ratio is 0, so the
  loss is log 2 and the margin 0. A value read at the wrong tokens would not give 0."""
  losses = {(step, key): value for step, key, value in _losses(run)}
  assert losses[0, "eval_loss"] == pytest.approx(np.log(2), abs=1e-6)
  assert losses[1, "loss"] == pytest.approx(np.log(2), abs=1e-6)
  assert losses[1, "margin"] == pytest.approx(0.0, abs=1e-6)
  assert losses[2, "loss"] < np.log(2) - 1e-3  # It trains.
  # The top-16 KL: 0 at the reference, positive once the policy has moved.
  assert losses[1, "kl"] == pytest.approx(0.0, abs=1e-5) and losses[2, "kl"] > 1e-4
  assert (run / runs.REFERENCE_LOG_PROBS).is_file()


def test_resume_reads_it_and_a_stale_or_missing_one_is_refused(pairs, run, caplog):
  cache = run / runs.REFERENCE_LOG_PROBS
  stamp = os.stat(cache).st_mtime_ns
  resume = ("train.reference=precomputed", "train.resume=true")
  with caplog.at_level(logging.INFO):
    summary = loop.run(_config(pairs, run, *resume, "train.steps=3"))
  assert summary["start_step"] == 2 and np.isfinite(summary["eval_loss_end"])
  assert os.stat(cache).st_mtime_ns == stamp  # Read, not computed again.
  assert {(s, k) for s, k, v in _losses(run) if v > 0} >= {(3, "loss"), (3, "kl")}  # Top-k too.
  assert any("reference log-probabilities from" in r.getMessage() for r in caplog.records)
  with pytest.raises(ConfigError, match=f"{cache}: .*stale .*template: raw then, chatml now"):
    loop.run(_config(pairs, run, *resume, "train.steps=4", "data.template=chatml"))
  with pytest.raises(ConfigError, match=f"{cache}: .*stale .*reference weights: "):
    loop.run(_config(pairs, run, *resume, "train.steps=4", "train.seed=1"))
  with pytest.raises(ConfigError, match=f"{cache}: .*stale \\(top k: 16 then, 4 now\\)"):
    loop.run(_config(pairs, run, *resume, "train.steps=4", "train.reference_top_k=4"))
  assert os.stat(cache).st_mtime_ns == stamp  # Refused, not replaced.
  os.rename(cache, str(cache) + ".moved")
  with pytest.raises(ConfigError, match=f"{cache}: missing"):
    loop.run(_config(pairs, run, *resume, "train.steps=4"))
