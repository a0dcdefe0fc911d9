"""A PPO-ptx run (`train.objective=ppo`; the math is `train/ppo.py`): iterations of rollouts, then
`ppo.epochs` passes of minibatches over them, on one mesh and in one process.

Each iteration i:
1. draws `ppo.rollouts` training prompts (a choice made of the seed and i) and samples a response
   to each with jaxtune's KV-cache engine (`generate.py`) from the policy's own sharded
   parameters (no copy, no second server), with the sampling seed made of `train.seed` and i: a
   run resumed at an iteration's start draws the same prompts and the same responses;
2. scores them: the reward callable (`ppo.reward`, `train/rewards.py`) against the prompt's
   reference answer, or the reward model of `ppo.reward_model` (a reward run, read by
   `train/loading.py` onto the same mesh); then `PPO.score` (compiled once) for
   log-probabilities, values, the KL penalty, GAE;
3. runs the generic train step (`train/step.py`) on `ppo.epochs` shuffled passes of minibatches
   of `train.batch_size` rollouts, each with a batch of the data's SFT rows for the ptx loss.

`train.steps` counts the updates, a whole number of iterations; checkpoints are taken at
iteration ends (`train.checkpoint_every`, a multiple of an iteration's updates), with the
adaptive KL coefficient in the data state. The policy is trained from `train.init_from` (an SFT
run), the value head from the reward model's head when there is one. Held-out exact match is
reported before and after, as in any run (`train/held_out.py`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune import checkpoint, generate, runs, sharding
from jaxtune.config import Config
from jaxtune.data import packing, pipeline
from jaxtune.data.formats import Conversation
from jaxtune.errors import ConfigError
from jaxtune.peft import partition, prefix
from jaxtune.train import held_out as held_out_eval
from jaxtune.train import loading, loop, ppo, reference, reward, rewards
from jaxtune.train import report as report_lib
from jaxtune.train.feed import make_feed, with_saved_tokenizer

log = logging.getLogger(__name__)

KL_COEF = "ppo_kl_coef"  # The adaptive KL coefficient's key in a checkpoint's data state.


def updates_per_iteration(cfg: Config) -> int:
  return cfg.ppo.epochs * cfg.ppo.rollouts // cfg.train.batch_size


def check(cfg: Config, steps: int) -> None:
  """The run's sizes fit whole iterations; one line naming the key otherwise."""
  train, ppo_cfg = cfg.train, cfg.ppo
  if ppo_cfg.rollouts % train.batch_size:
    raise ConfigError(
      f"ppo.rollouts={ppo_cfg.rollouts} must be a multiple of train.batch_size="
      f"{train.batch_size} (the minibatch)"
    )
  per = updates_per_iteration(cfg)
  for key, value in (("steps", steps), ("checkpoint_every", train.checkpoint_every)):
    if value % per:
      raise ConfigError(
        f"train.{key}={value} must be a multiple of the {per} updates of an iteration "
        f"(ppo.epochs x ppo.rollouts / train.batch_size)"
      )
  if train.micro_batches != 1:
    raise ConfigError("train.objective=ppo takes train.micro_batches=1 (a minibatch is a step)")


def _seed(seed: int, iteration: int, use: int) -> np.random.Generator:
  """The generator of `use` (0: prompts, 1: sampling, 2 + e: epoch e's order) at `iteration`."""
  return np.random.default_rng([seed, iteration, use])


@dataclasses.dataclass(frozen=True)
class Prompts:
  """The training conversations PPO samples prompts from, with their prompt ids."""

  conversations: tuple[Conversation, ...]
  ids: tuple[tuple[int, ...], ...]

  @classmethod
  def of(cls, cfg: Config, tokenizer) -> Prompts:
    """The training conversations whose prompt and longest response fit a row."""
    convs = pipeline.conversations(cfg.data, cfg.train.seed, packing.Stats()).train
    kept = []
    for conv in convs:
      if not isinstance(conv, Conversation) or conv.messages[-1].role != "assistant":
        continue
      prompt = dataclasses.replace(conv, messages=conv.messages[:-1])
      ids = packing.prompt_ids(prompt, cfg.data.template, tokenizer)
      if len(ids) + cfg.ppo.max_new_tokens <= cfg.data.max_length:
        kept.append((conv, tuple(ids)))
    if len(kept) < cfg.ppo.rollouts:
      raise ConfigError(
        f"ppo.rollouts={cfg.ppo.rollouts}: only {len(kept)} training prompts fit "
        f"data.max_length={cfg.data.max_length} with ppo.max_new_tokens={cfg.ppo.max_new_tokens}"
      )
    return cls(tuple(c for c, _ in kept), tuple(i for _, i in kept))

  def draw(self, seed: int, iteration: int, count: int) -> list[int]:
    return _seed(seed, iteration, 0).choice(len(self.ids), count, replace=False).tolist()


def rollout_rows(
  prompts: Sequence[Sequence[int]], completions: Sequence[generate.Completion], stop: int, t: int
) -> dict[str, np.ndarray]:
  """Rows [B, T] of prompt + response (+ the stop id if it stopped), left-aligned: next-token
  pairs with `weights` 1 on the response's targets."""
  out = {k: np.zeros((len(prompts), t), np.int32) for k in ppo.ROLLOUT_KEYS}
  out["weights"] = np.zeros((len(prompts), t), np.float32)
  for b, (prompt, c) in enumerate(zip(prompts, completions, strict=True)):
    ids = [*prompt, *c.ids, *([stop] if c.finish == "stop" else [])][: t + 1]
    n = len(ids) - 1
    out["inputs"][b, :n], out["targets"][b, :n] = ids[:-1], ids[1:]
    out["positions"][b, :n], out["segment_ids"][b, :n] = np.arange(n), 1
    out["weights"][b, len(prompt) - 1 : n] = 1.0
  return out


class Rewards:
  """Each rollout's sequence reward: the reward callable against the reference answer, or the
  reward model's score of (prompt, response)."""

  def __init__(self, cfg: Config, mesh: jax.sharding.Mesh):
    self.cfg = cfg
    self.model = loading.load(cfg.ppo.reward_model, mesh=mesh) if cfg.ppo.reward_model else None
    self.fn = None if self.model else rewards.named(cfg.ppo.reward)

  def __call__(self, convs: Sequence[Conversation], responses: Sequence[str]) -> np.ndarray:
    if self.model is None:
      pairs = zip(responses, convs, strict=True)
      return np.asarray([self.fn(r, c.messages[-1].content) for r, c in pairs], np.float32)
    texts = [
      dataclasses.replace(
        c, messages=(*c.messages[:-1], dataclasses.replace(c.messages[-1], content=r))
      )
      for c, r in zip(convs, responses, strict=True)
    ]
    return np.asarray(self.model.score(texts, batch_size=len(texts)), np.float32)

  def value_head(self) -> dict[str, Any] | None:
    """The reward model's scalar head, which the value head starts from (None: no model)."""
    return None if self.model is None else self.model.params[reward.HEAD]


def run(cfg: Config) -> dict[str, Any]:
  """Trains the policy of `cfg` with PPO-ptx; returns a summary."""
  cfg = with_saved_tokenizer(cfg)
  mesh = sharding.make_mesh(cfg.mesh)
  feed = make_feed(cfg, mesh)
  check(cfg, feed.steps)
  tok = feed.data.tokenizer
  t = loop.build(
    cfg, mesh, feed.steps, tok, make_goal=lambda m: ppo.PPO(m, cfg.ppo, tok.vocab_size)
  )
  loop.log_model(cfg, t, mesh)
  prompts = Prompts.of(cfg, tok)
  reward_of = Rewards(cfg, mesh)
  with sharding.use(mesh, t.rules):
    ckpt = checkpoint.Checkpointer(
      os.path.join(cfg.train.output_dir, runs.CHECKPOINTS), cfg.train.keep_checkpoints
    )
    try:
      state, data_state = loop.restore(cfg, ckpt, t, feed)
      if not data_state and reward_of.value_head() is not None:
        state = _with_value_head(t, state, reward_of.value_head())
        log.info("value head from the reward model %s", cfg.ppo.reward_model)
      loop.write_run_files(cfg, tok)
      answers = held_out_eval.Answers(cfg, t, feed.data, mesh)
      driver = Driver(cfg, t, mesh, prompts, reward_of, feed)
      state, summary = driver.train(state, data_state.get(KL_COEF, cfg.ppo.kl_coef), ckpt, answers)
    finally:
      ckpt.close()
  if len(answers.results) == 2:
    before, after = answers.results
    text = held_out_eval.report(cfg.train.output_dir, answers.prompts, before, after)
    summary["held_out_exact_match"] = [before[1]["exact_match_all"], after[1]["exact_match_all"]]
    if jax.process_index() == 0:
      print(text)
  return summary


def _with_value_head(t: loop.Trainer, state, head: dict[str, Any]):
  """The state with the value head set to a copy of the reward model's (placed as the head is:
  the step donates the state, and the reward model keeps scoring with its own)."""
  shardings = t.state_sharding.params[reward.HEAD]
  placed = {k: jax.device_put(jnp.copy(v), shardings[k]) for k, v in head.items()}
  return state.replace(params={**state.params, reward.HEAD: placed})


class Driver:
  """The iterations of a run: rollouts, scoring, updates, reports and checkpoints."""

  def __init__(self, cfg: Config, t: loop.Trainer, mesh, prompts: Prompts, reward_of, feed):
    self.cfg, self.t, self.mesh, self.prompts = cfg, t, mesh, prompts
    self.reward_of, self.feed = reward_of, feed
    tok, template = feed.data.tokenizer, cfg.data.template
    self.tokenizer, self.stop_ids = tok, generate.template_stop_ids(tok, template)
    p = cfg.ppo
    # Drawn as `ppo.PPO` scores them: the tokenizer's ids only, at `temperature`.
    self.sampling = generate.Sampling(
      p.max_new_tokens, p.temperature, p.top_k, vocab_size=tok.vocab_size
    )
    goal: ppo.PPO = t.objective
    self.score = jax.jit(
      lambda trainable, frozen, batch, rewards_b, beta: goal.score(
        partition.combine(trainable, frozen), batch, rewards_b, beta
      )
    )
    self.select = jax.jit(
      lambda full, idx: {k: v[idx] for k, v in full.items()}, out_shardings=t.batch_sharding
    )
    self.ptx = loop.batch_putter(cfg, t, ppo.ROLLOUT_KEYS) if p.ptx_coef else None

  def rollouts(self, state, iteration: int) -> tuple[dict[str, np.ndarray], list[int], list[str]]:
    """The iteration's rows, the prompts' indices and the responses' text."""
    cfg, t = self.cfg, self.t
    chosen = self.prompts.draw(cfg.train.seed, iteration, cfg.ppo.rollouts)
    ids = [self.prompts.ids[i] for i in chosen]
    params = reference.without_copy(partition.combine(state.params, t.frozen))
    model, params = prefix.for_decoding(t.model, params)
    seed = int(_seed(cfg.train.seed, iteration, 1).integers(2**32))
    completions = generate.generate(
      model,
      params,
      ids,
      self.sampling,
      stop_ids=self.stop_ids,
      seed=seed,
      batch_size=len(ids),
      mesh=self.mesh,
      rules=t.rules,
    )
    rows = rollout_rows(ids, completions, self.stop_ids[0], cfg.data.max_length)
    texts = [self.tokenizer.decode(c.ids) for c in completions]
    return rows, chosen, texts

  def iteration(self, state, iteration: int, beta: float):
    """(the state after the iteration's updates, its rollout statistics, the updates' metrics)."""
    cfg, t = self.cfg, self.t
    rows, chosen, responses = self.rollouts(state, iteration)
    scores_b = self.reward_of([self.prompts.conversations[i] for i in chosen], responses)
    put = {
      k: sharding.put_global(v, self.mesh, t.rules, ("act_batch", "act_seq"))
      for k, v in rows.items()
    }
    scores = sharding.put_global(scores_b, self.mesh, t.rules, ("act_batch",))
    scored, stats = self.score(state.params, t.frozen, put, scores, jnp.float32(beta))
    full = {**put, **scored}
    steps = []
    n, b = cfg.ppo.rollouts, cfg.train.batch_size
    for epoch in range(cfg.ppo.epochs):
      order = _seed(cfg.train.seed, iteration, 2 + epoch).permutation(n).reshape(n // b, b)
      for idx in order:
        batch = self.select(full, idx)
        if self.ptx is not None:
          ptx = self.ptx(next(self.feed.batches))
          batch.update({f"ptx_{k}": v for k, v in ptx.items()})
        state, step_metrics = t.train_step(state, t.frozen, batch)
        if jax.default_backend() == "cpu" and jax.device_count() > 1:
          jax.block_until_ready(state)  # As in the loop: no overlapping collectives on CPU.
        steps.append(step_metrics)
    stats = {f"rollout/{k}": float(v) for k, v in stats.items()}
    stats["rollout/kl_coef"] = beta
    return state, stats, steps

  def train(self, state, beta: float, ckpt, answers) -> tuple[Any, dict[str, Any]]:
    cfg, t = self.cfg, self.t
    per = updates_per_iteration(cfg)
    first, steps = int(state.step), self.feed.steps
    report = report_lib.make(cfg, t.lr, t.n_params, steps, first)
    summary: dict[str, Any] = {"steps": steps, "start_step": first, "rollouts": []}
    report.writer.write(first, answers(first, state.params))
    try:
      for iteration in range(first // per, steps // per):
        state, stats, step_metrics = self.iteration(state, iteration, beta)
        for k, m in enumerate(step_metrics):
          report(iteration * per + k + 1, m)
        step = (iteration + 1) * per
        report.writer.write(step, stats)
        summary["rollouts"].append({"step": step, **stats})
        log.info(
          "iteration %d: reward %.3f, KL %.3f, beta %.4f",
          iteration,
          stats["rollout/reward"],
          stats["rollout/kl"],
          beta,
        )
        beta = ppo.adapt_kl_coef(beta, stats["rollout/kl"], cfg.ppo.rollouts, cfg.ppo)
        if step % cfg.train.checkpoint_every == 0 or step == steps:
          ckpt.save(step, state, {**self.feed.batches.state(), KL_COEF: beta})
      report.writer.write(steps, answers(steps, state.params))
    finally:
      report.close()
    summary["tokens_per_s"] = report.tokens_per_s() if steps > first else 0.0
    return state, summary
