"""PPO-ptx (`train/ppo.py`, `train/ppo_run.py`): GAE against a NumPy transcription of Schulman et
al. 2016; the update on a one-token bandit (a reward favouring one token raises its probability,
a large KL coefficient keeps the policy near the reference); scoring and the step sharded against
one device and compiled once; a resumed run drawing the same rollouts."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from subprocesses import TINY_RUN
from test_dpo import VOCAB

from jaxtune import config, generate, sharding
from jaxtune.errors import ConfigError
from jaxtune.peft import partition
from jaxtune.train import loop, ppo, ppo_run, rewards


def _gae_numpy(r, v, m, gamma, lam):
  """Backwards over each row's response tokens; the value after the last one is 0."""
  adv = np.zeros_like(r)
  for b in range(r.shape[0]):
    running, next_value = 0.0, 0.0
    for t in reversed(np.nonzero(m[b])[0]):
      delta = r[b, t] + gamma * next_value - v[b, t]
      running = delta + gamma * lam * running
      adv[b, t], next_value = running, v[b, t]
  return adv, np.where(m > 0, adv + v, 0.0)


@pytest.mark.parametrize("gamma, lam", [(0.9, 0.8), (1.0, 1.0), (1.0, 0.0)])
def test_gae_equals_numpy(gamma, lam):
  rng = np.random.default_rng(0)
  b, t = 6, 14
  m = np.zeros((b, t), np.float32)
  for row, (start, n) in enumerate([(3, 5), (0, 1), (8, 6), (2, 11), (5, 2), (13, 1)]):
    m[row, start : start + n] = 1
  r = rng.normal(size=(b, t)).astype(np.float32) * m
  v = rng.normal(size=(b, t)).astype(np.float32) * m
  adv, ret = jax.jit(ppo.gae, static_argnums=(3, 4))(r, v, m, gamma, lam)
  want_adv, want_ret = _gae_numpy(r.astype(np.float64), v.astype(np.float64), m, gamma, lam)
  np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-6)


ROWS, LENGTH = 64, 16  # Rollouts of an iteration, in two minibatches; their rows' length.


def _cfg(mesh_shape, peft="none", **ppo_keys):
  model = dict(vocab_size=VOCAB, dim=32, num_layers=2, num_heads=4, mlp_dim=64, max_seq_len=64)
  keys = {"rollouts": ROWS, "epochs": 2, **ppo_keys}
  return config.load(
    None,
    [f"model.{k}={v}" for k, v in model.items()]
    + [f"ppo.{k}={v}" for k, v in keys.items()]
    + [
      "train.objective=ppo",
      f"train.batch_size={ROWS // 2}",
      "train.learning_rate=1e-2",
      "train.warmup_steps=0",
      "train.schedule=constant",
      f"peft.method={peft}",
      f"mesh.data={mesh_shape[0]}",
      f"mesh.model={mesh_shape[1]}",
    ],
  )


def _trainer(mesh_shape):
  """The mesh, the Trainer (full fine-tuning: the reference a frozen copy) and its scoring
  (jitted: beta is an argument)."""
  cfg = _cfg(mesh_shape)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[: mesh_shape[0] * mesh_shape[1]])
  t = loop.build(cfg, mesh, 100, make_goal=lambda m: ppo.PPO(m, cfg.ppo))
  score = jax.jit(
    lambda p, b, r, beta: t.objective.score(partition.combine(p, t.frozen), b, r, beta)
  )
  return mesh, t, score, jax.tree.map(jnp.copy, t.state)  # The step donates its state.


def _rollouts(seed):
  """Random prompts and responses (some stopped, some cut at the length) as rollout rows."""
  rng = np.random.default_rng(seed)
  prompts = [rng.integers(2, VOCAB, int(rng.integers(2, 7))).tolist() for _ in range(ROWS)]
  completions = [
    generate.Completion(rng.integers(2, VOCAB, int(rng.integers(1, 8))).tolist(), finish)
    for finish in rng.choice(["stop", "length"], ROWS)
  ]
  return ppo_run.rollout_rows(prompts, completions, 1, LENGTH)


def _update(t, state, rows, scored):
  """An iteration's epochs of its two minibatches; the steps' metrics."""
  full, out = {**rows, **scored}, []
  for _ in range(2):
    for half in (slice(0, ROWS // 2), slice(ROWS // 2, ROWS)):
      batch = {k: jax.device_put(v[half], t.batch_sharding) for k, v in full.items()}
      state, metrics = t.train_step(state, t.frozen, batch)
      out.append(jax.device_get(metrics))
  return state, out


def _scored_steps(trainer):
  """The scoring of random rollouts and an iteration's 4 steps over them."""
  mesh, t, score, initial = trainer
  rows = _rollouts(0)
  rewards_b = np.random.default_rng(2).normal(size=ROWS).astype(np.float32)
  with sharding.use(mesh, t.rules):
    put = {k: jax.device_put(v, t.batch_sharding) for k, v in rows.items()}
    rewards = sharding.put_global(rewards_b, mesh, t.rules, ("act_batch",))
    scored, stats = jax.device_get(score(initial.params, put, rewards, jnp.float32(0.1)))
    _, steps = _update(t, jax.tree.map(jnp.copy, initial), rows, scored)
  assert t.train_step.jitted._cache_size() == 1 and score._cache_size() == 1  # Compiled once each.
  return stats, scored, steps


@pytest.fixture(scope="module")
def single():
  return _trainer((1, 1))


@pytest.mark.parametrize("shape", [(2, 4), (8, 1)])
def test_sharded_scoring_and_steps_equal_one_device(shape, single):
  """The scored rollouts (log-probabilities, values, KL, GAE) and an iteration's steps give one
  device's numbers (the value head and the reference copy sharded like the policy)."""
  want, got = _scored_steps(single), _scored_steps(_trainer(shape))
  for key, value in want[0].items():
    np.testing.assert_allclose(got[0][key], value, rtol=2e-5, atol=1e-6, err_msg=key)
  for key in ppo.SCORED_KEYS:
    np.testing.assert_allclose(got[1][key], want[1][key], rtol=2e-4, atol=2e-5, err_msg=key)
  for a, b in zip(want[2], got[2], strict=True):
    for key in ("loss", "grad_norm", "policy_loss", "value_loss", "clip_fraction"):
      np.testing.assert_allclose(a[key], b[key], rtol=2e-4, atol=1e-5, err_msg=key)
  assert want[0]["kl"] == 0.0  # At the start the policy is its reference.


FAVOURED = 7


def _bandit(trainer, beta, iterations=6):
  """One-token responses to ROWS fixed prompts, reward 1 for FAVOURED, a k1 penalty of `beta`:
  (the token's mean probability before and after; KL(pi || ref) after, averaged over the
  prompts, exact from the distributions)."""
  mesh, t, score, initial = trainer
  prompts = np.random.default_rng(3).integers(2, VOCAB, (ROWS, 4))

  @jax.jit
  def next_token(trainable, key):
    params = partition.combine(trainable, t.frozen)
    policy, ref_model, ref_params = ppo.reference.split(t.model, params)
    logits = t.model.apply({"params": policy}, prompts)[:, -1]
    ref = ref_model.apply({"params": ref_params}, prompts)[:, -1]
    log_p, log_q = jax.nn.log_softmax(logits), jax.nn.log_softmax(ref)
    kl_value = jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1))
    return jax.random.categorical(key, logits), jnp.mean(jnp.exp(log_p[:, FAVOURED])), kl_value

  state = jax.tree.map(jnp.copy, initial)
  with sharding.use(mesh, t.rules):
    _, before, _ = next_token(state.params, jax.random.key(0))
    for i in range(iterations):
      tokens = np.asarray(next_token(state.params, jax.random.key(i))[0])
      completions = [generate.Completion([int(x)], "length") for x in tokens]
      rows = ppo_run.rollout_rows(prompts.tolist(), completions, 1, LENGTH)
      rewards = (tokens == FAVOURED).astype(np.float32)
      scored, _ = score(state.params, rows, rewards, jnp.float32(beta))
      state, _ = _update(t, state, rows, jax.device_get(scored))
    _, after, kl_value = next_token(state.params, jax.random.key(99))
  return float(before), float(after), float(kl_value)


def test_a_reward_favouring_one_token_raises_it_and_a_large_beta_stays_near_the_reference(single):
  before, after, kl_free = _bandit(single, 0.0)
  assert after > 5 * before, (before, after)
  _, held, kl_held = _bandit(single, 20.0)
  # What is left is about the first iteration's move, made before any KL to penalize.
  assert kl_held < 0.08 and kl_held < kl_free / 4, (kl_held, kl_free)
  assert held < after


def test_bad_sizes_name_the_key():
  cfg = _cfg((1, 1), rollouts=12)
  with pytest.raises(ConfigError, match="ppo.rollouts=12 must be a multiple"):
    ppo_run.check(cfg, 2)
  with pytest.raises(ConfigError, match="train.steps=3 must be a multiple of the 4 updates"):
    ppo_run.check(_cfg((1, 1)), 3)
  with pytest.raises(ConfigError, match="adaptive_kl needs ppo.kl=k1"):
    _cfg((1, 1), kl="k3", adaptive_kl=True)


def test_adaptive_kl_follows_zieglers_controller():
  cfg = dataclasses.replace(_cfg((1, 1)).ppo, adaptive_kl=True, kl_target=6.0, kl_horizon=100)
  assert ppo.adapt_kl_coef(0.1, 12.0, 10, cfg) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
  assert ppo.adapt_kl_coef(0.1, 5.4, 10, cfg) == pytest.approx(0.1 * (1 - 0.1 * 0.1))
  assert ppo.adapt_kl_coef(0.1, 5.4, 10, dataclasses.replace(cfg, adaptive_kl=False)) == 0.1


def test_a_resumed_run_draws_the_same_rollouts(tmp_path):
  """Two iterations of a tiny run on the embedded tasks; resumed from the first iteration's
  checkpoint, the second iteration samples and scores the same rollouts and trains the same."""
  out = tmp_path / "ppo"
  overrides = [
    *TINY_RUN,
    "train.held_out_prompts=0",
    "train.objective=ppo",
    "peft.method=lora",
    "train.steps=2",
    "train.batch_size=8",
    "train.checkpoint_every=1",
    "train.log_every=1",
    "ppo.rollouts=8",
    "ppo.epochs=1",
    "ppo.max_new_tokens=4",
    "ppo.ptx_coef=1.0",
    "ppo.adaptive_kl=true",
    "ppo.kl_horizon=16",
    "train.peak_flops=1e11",  # No MFU peak measured (16 s of a loaded 2-core host's matmuls).
    f"train.output_dir={out}",
  ]
  first = ppo_run.run(config.load(None, overrides))
  shutil.rmtree(out / "checkpoints" / "2")
  second = ppo_run.run(config.load(None, [*overrides, "train.resume=true"]))
  assert second["start_step"] == 1 and len(second["rollouts"]) == 1
  # LoRA at initialization (B = 0): the policy is its reference (the base, adapters off).
  assert first["rollouts"][0]["rollout/kl"] == 0.0
  assert first["rollouts"][1] == pytest.approx(second["rollouts"][0], rel=1e-5, abs=1e-6)
  records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
  losses = [r["loss"] for r in records if r["step"] == 2 and "loss" in r]
  assert len(losses) == 2 and losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_programmatic_rewards_and_their_names():
  exact = rewards.named("jaxtune.train.rewards:exact_match")
  assert exact(" 134 ", "134") == 1.0 and exact("135", "134") == 0.0
  gsm8k = rewards.named("jaxtune.train.rewards:gsm8k_answer")
  reference = "She pays 3 * 24 = 72 dollars.\n#### 72"
  assert gsm8k("3 times 24 is 72. The answer is 72.", reference) == 1.0
  assert gsm8k("The answer is 1,000", "#### 1000") == 1.0
  assert gsm8k("The answer is 71.", reference) == 0.0
  for bad, named in [("nocolon", "module:function"), ("jaxtune.nope:f", "cannot import")]:
    with pytest.raises(ConfigError, match=named):
      rewards.named(bad)
  with pytest.raises(ConfigError, match="has no callable missing"):
    rewards.named("jaxtune.train.rewards:missing")


def test_k3_is_an_unbiased_nonnegative_estimate_of_the_kl():
  """k3-in-loss's estimator: its expectation under the policy is KL(pi || ref), exactly."""
  rng = np.random.default_rng(5)
  log_p = jax.nn.log_softmax(rng.normal(size=(3, 11)))
  log_q = jax.nn.log_softmax(rng.normal(size=(3, 11)))
  per_token = ppo.k3(log_p, log_q)
  assert float(per_token.min()) >= 0.0
  kl = np.sum(np.exp(log_p) * (log_p - log_q), -1)
  np.testing.assert_allclose(np.sum(np.exp(log_p) * per_token, -1), kl, rtol=1e-5)


def test_scored_log_probs_are_of_the_distribution_the_rollouts_are_sampled_from():
  """At a temperature, with a tokenizer smaller than the model's vocabulary, the policy's and the
  reference's log-probabilities are those `sampling.pick` draws from: log softmax of the known
  ids' logits over the temperature (NumPy), not of the raw logits."""
  cfg = _cfg((1, 1), temperature=0.7)
  known = VOCAB - 3
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  t = loop.build(cfg, mesh, 100, make_goal=lambda m: ppo.PPO(m, cfg.ppo, known))
  rng = np.random.default_rng(5)
  prompts = [rng.integers(2, known, 4).tolist() for _ in range(ROWS)]
  completions = [generate.Completion(rng.integers(2, known, 3).tolist(), "stop")] * ROWS
  rows = ppo_run.rollout_rows(prompts, completions, 1, LENGTH)
  params = partition.combine(t.state.params, t.frozen)
  with sharding.use(mesh, t.rules):
    scored, _ = jax.device_get(t.objective.score(params, rows, jnp.zeros(ROWS), jnp.float32(0.1)))
    logits = np.asarray(
      t.model.apply(
        {"params": ppo.reference.without_copy(params)},
        rows["inputs"],
        rows["positions"],
        rows["segment_ids"],
      )
    )
  z = logits[..., :known].astype(np.float64) / 0.7
  log_p = z - z.max(-1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
  want = np.take_along_axis(log_p, rows["targets"][..., None], -1)[..., 0] * rows["weights"]
  for key in ("old_log_probs", "reference_log_probs"):  # The reference is the start's copy.
    np.testing.assert_allclose(scored[key], want, rtol=1e-5, atol=1e-5, err_msg=key)
  raw = jax.nn.log_softmax(logits, -1)
  assert not np.allclose(
    np.take_along_axis(raw, rows["targets"][..., None], -1)[..., 0] * rows["weights"],
    want,
    atol=1e-3,
  )
