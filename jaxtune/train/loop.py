"""The training loop, the only place with I/O:
config -> data -> mesh, rules -> model -> sharded state -> jitted step -> metrics, checkpoints.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import yaml
from flax import traverse_util

from jaxtune import checkpoint, runs, sharding
from jaxtune.config import Config
from jaxtune.convert import hf, llama2c
from jaxtune.data import pipeline
from jaxtune.errors import ConfigError, DataError
from jaxtune.model import transformer
from jaxtune.peft import methods, partition
from jaxtune.train import held_out as held_out_eval
from jaxtune.train import llava_run, objective, optim, precomputed, reference, reward
from jaxtune.train import report as report_lib
from jaxtune.train.feed import Feed, held_out_batches, make_feed, with_saved_tokenizer
from jaxtune.train.step import Bound, TrainState, make_eval_step, make_train_step

log = logging.getLogger(__name__)


def _pretrained(params: Any) -> dict:
  return {k: v for k, v in partition.base(params).items() if k != reward.HEAD}


# Modules a model config adds to a pretrained architecture whose parameters, where the
# checkpoint lacks them, start as initialized: model.sub_norm's RMSNorms (scales of ones, so only
# the normalization itself is new; a dense checkpoint fine-tuned to BitNet, HF's layout).
_ADDABLE = frozenset({"sub_norm"})


def _without_new(tree: Any, loaded: Any, path: str, quiet: bool = False) -> dict:
  """`tree` (the model's parameters, or their shardings) less those that `loaded` lacks and an
  `_ADDABLE` module holds: they keep their initial values (logged unless `quiet`)."""
  have = traverse_util.flatten_dict(loaded)
  flat = traverse_util.flatten_dict(tree)
  new = [k for k in flat if k not in have and _ADDABLE.intersection(k)]
  if new and not quiet:
    log.info(
      "train.init_from=%s has no %s: they start as initialized (RMSNorm scales of ones)",
      path,
      ", ".join("/".join(k) for k in new),
    )
  return traverse_util.unflatten_dict({k: v for k, v in flat.items() if k not in new})


def _initial_params(cfg: Config, model, mesh, rng) -> sharding.Sharded:
  """Random (abstract-first, sharded) parameters, or pretrained ones from `train.init_from`
  (the base model's; PEFT parameters start as initialized)."""
  sharded = sharding.init_sharded(llava_run.init_fn(model), rng, mesh, cfg.mesh.strategy)
  if cfg.vision.enabled:
    return llava_run.initial_params(cfg, sharded, mesh)
  path = cfg.train.init_from
  if not path:
    return sharded
  # The base model's parameters; PEFT ones and a new scalar head start as initialized.
  base_shardings = _pretrained(sharded.shardings["params"])
  base_params = _pretrained(sharded.variables["params"])
  if path.endswith(".bin") or os.path.exists(os.path.join(path, "config.json")):
    # llama2.c or Hugging Face; the architecture is checked by the shapes below.
    _, variables = (llama2c.load_model if path.endswith(".bin") else hf.load_hf)(path)
    loaded = transformer.grow_vocab(variables["params"], cfg.model.vocab_size)
  else:
    abstract = checkpoint.abstract(base_params, base_shardings)
    loaded = checkpoint.restore_params(os.path.join(path, runs.CHECKPOINTS), abstract)
  want_params = _without_new(base_params, loaded, path)
  got = jax.tree.map(lambda x: x.shape, loaded)
  want = jax.tree.map(lambda x: x.shape, want_params)
  if got != want:
    raise ConfigError(f"train.init_from={path}: parameter shapes {got} do not fit the model {want}")
  shardings = _without_new(base_shardings, loaded, path, quiet=True)
  params = jax.tree.map(lambda x, s: jax.device_put(jnp.asarray(x), s), loaded, shardings)
  params = partition.combine(params, sharded.variables["params"])
  return dataclasses.replace(sharded, variables={"params": params})


def _init_peft_from_text(cfg: Config, params: Any, tokenizer, shardings: Any) -> Any:
  """PEFT parameters that start from real text (`peft.prefix_init_text` / `prompt_init_text`)."""
  method = methods.METHODS[cfg.peft.method]
  text = method.init_text(cfg.peft)
  if not text or method.from_text is None or method.root not in params:
    return params
  ids = tokenizer.encode(text)
  init = method.from_text(cfg.model, params, ids)
  log.info("%s initialized from the %d tokens of %r", method.root, len(ids), text)
  return dict(params, **{method.root: jax.device_put(init, shardings[method.root])})


@dataclasses.dataclass
class Trainer:
  """What a run trains with: the model, its sharded initial state (trainable parameters and
  optimizer moments) and frozen parameters, and the jitted steps with their shardings."""

  model: transformer.Transformer
  rules: sharding.Rules
  state: TrainState
  state_sharding: Any
  frozen: Any
  objective: objective.Objective
  train_step: Bound  # jitted (state, frozen, batch) -> (state, metrics)
  eval_step: Any  # jitted (trainable, frozen, batch) -> (metric sums, normalizer)
  batch_sharding: jax.sharding.NamedSharding
  lr: Any  # step -> learning rate
  n_params: int
  n_trainable: int


def build(
  cfg: Config,
  mesh: jax.sharding.Mesh,
  steps: int,
  tokenizer=None,
  shapes_only: bool = False,
  segments: int | None = None,
  make_goal: Any = None,
) -> Trainer:
  """The model, state and steps of `cfg` on `mesh` for a run of `steps` (the schedule's
  length); `tokenizer` encodes a PEFT method's initialization text. `shapes_only`: the state
  and frozen parameters are `jax.ShapeDtypeStruct`s with their shardings (nothing initialized
  or loaded), so the steps of a model too large to hold can be compiled and measured.
  `segments`: the most segments of a row (`pipeline.max_segments`); None: one per token.
  `make_goal`: model -> the objective, for one built from more than the train section (PPO's)."""
  if cfg.model.linear == "bitnet158_packed" and cfg.peft.method == "none":
    raise ConfigError(
      "model.linear=bitnet158_packed holds 2-bit codes, which cannot be trained: train the "
      "bitnet158 model (float latent weights) it was packed from, or a PEFT method on it"
    )
  model = llava_run.model(cfg, **objective.model_options(cfg.train))
  goal = make_goal(model) if make_goal else objective.make(model, cfg.train, segments)
  init_rng, step_rng = runs.seed_rngs(cfg.train.seed)
  if shapes_only:
    init = llava_run.init_fn(model)
    sharded = sharding.init_sharded(init, init_rng, mesh, cfg.mesh.strategy, shapes_only=True)
  else:
    sharded = _initial_params(cfg, model, mesh, init_rng)
  shardings = sharded.shardings["params"]
  params = sharded.variables["params"]
  if tokenizer is not None and not shapes_only:
    # Outside the rules: the text is one row, which a `data` axis of several devices cannot
    # split (the model's batch constraints would fail); JAX places the computation itself.
    params = _init_peft_from_text(cfg, params, tokenizer, shardings)
  trains = objective.trains(cfg.train, llava_run.trains(cfg, methods.trains(cfg.peft)))
  trainable, frozen = partition.split(params, trains)
  trainable_sharding, frozen_sharding = partition.split(shardings, trains)
  if getattr(goal, "needs_reference", False) and reference.copies(cfg.train.reference, model):
    frozen, frozen_sharding = reference.attach_copy(
      trainable, trainable_sharding, frozen, frozen_sharding, abstract=shapes_only
    )
  optimizer = optim.optimizer(cfg.train, steps)
  replicated = sharding.replicated(mesh)
  state_sharding = TrainState(
    replicated,
    trainable_sharding,
    optim.state_shardings(optimizer, trainable, trainable_sharding, replicated),
  )
  batch_sharding = sharding.logical_sharding(mesh, sharded.rules, ("act_batch", "act_seq"))
  with sharding.use(mesh, sharded.rules):
    init_state = jax.jit(
      lambda p: TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p)),
      out_shardings=state_sharding,
    )
    if shapes_only:
      state = checkpoint.abstract(jax.eval_shape(init_state, trainable), state_sharding)
    else:
      state = init_state(trainable)
    # The seed's key is an input of the step, not a constant in it: runs that differ only in
    # their seed (a sweep's seeds, with a persistent compilation cache) share one program.
    train_step = jax.jit(
      make_train_step(goal, optimizer, micro_batches=cfg.train.micro_batches),
      in_shardings=(state_sharding, frozen_sharding, batch_sharding, replicated),
      out_shardings=(state_sharding, replicated),
      donate_argnums=0,
    )
    eval_step = jax.jit(
      make_eval_step(goal), in_shardings=(state_sharding.params, frozen_sharding, batch_sharding)
    )
  return Trainer(
    model=model,
    rules=sharded.rules,
    state=state,
    state_sharding=state_sharding,
    frozen=frozen,
    objective=goal,
    train_step=Bound(train_step, step_rng),
    eval_step=eval_step,
    batch_sharding=batch_sharding,
    lr=optim.schedule(cfg.train, steps),
    n_params=partition.count(params),
    n_trainable=partition.count(trainable),
  )


def _with_reference(cfg: Config, t: Trainer, feed: Feed, mesh, resuming: bool) -> Feed:
  """The feed with the precomputed reference log-probabilities (`train/precomputed.py`) in its
  examples, and its batches (same plans) built from them."""
  rows = sharding.batch_rows(mesh, cfg.train.batch_size)
  params = partition.combine(t.state.params, t.frozen)  # The initial ones: before any step.
  put = batch_putter(cfg, t)
  data = precomputed.attach(cfg, feed.data, t.model, params, put, rows, resuming)
  batches = pipeline.training_batches(data, cfg, rows)
  return dataclasses.replace(
    feed, data=data, batches=batches, held_out=held_out_batches(data, cfg, rows)
  )


def log_model(cfg: Config, t: Trainer, mesh: jax.sharding.Mesh) -> None:
  log.info(
    "model: %s parameters on mesh %s; trainable (peft.method=%s): %s (%.4f%%)",
    f"{t.n_params:,}",
    dict(mesh.shape),
    cfg.peft.method,
    f"{t.n_trainable:,}",
    100 * t.n_trainable / t.n_params,
  )


def restore(
  cfg: Config, ckpt: checkpoint.Checkpointer, t: Trainer, feed: Feed
) -> tuple[TrainState, dict[str, Any]]:
  """The initial state and the saved data state: the newest good checkpoint's with
  `train.resume` (the data iterator moved to where it was; damaged newer ones are moved aside),
  else the freshly built one (and {})."""
  latest = ckpt.latest_step()
  if latest is None:
    return t.state, {}
  if not cfg.train.resume:
    raise ConfigError(
      f"{cfg.train.output_dir} already has checkpoints (step {latest}); set "
      "train.resume=true to continue, or choose another train.output_dir"
    )
  restored = ckpt.restore_latest(checkpoint.abstract(t.state, t.state_sharding))
  feed.batches.restore(restored.data_state)
  log.info("resumed from step %d of %s", restored.step, ckpt.directory)
  return restored.state, restored.data_state


def _with_bitnet_groups(cfg: Config, mesh: jax.sharding.Mesh) -> Config:
  """`model.bitnet_groups=0` fixed to the `model` mesh axis (one block of scales per device, so
  none needs a collective), as the run's config records it: its checkpoints then compute the
  same function on any mesh."""
  model = cfg.model
  if model.bitnet_groups or (model.linear == "dense" and not model.sub_norm):
    return cfg
  groups = sharding.model_parallelism(mesh)
  model = dataclasses.replace(model, bitnet_groups=groups)
  try:
    model.validate()
  except ConfigError as e:
    raise ConfigError(f"{e} (0: one group per device of mesh.model={groups})") from None
  log.info(
    "model.bitnet_groups=%d: one block of BitNet scales per device of the model axis", groups
  )
  return dataclasses.replace(cfg, model=model)


def write_run_files(cfg: Config, tokenizer) -> None:
  """The run's resolved config and tokenizer (process 0 alone)."""
  if jax.process_index() != 0:
    return
  os.makedirs(cfg.train.output_dir, exist_ok=True)
  with open(os.path.join(cfg.train.output_dir, runs.CONFIG), "w") as f:
    yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
  tokenizer.save(os.path.join(cfg.train.output_dir, runs.TOKENIZER))


def batch_putter(cfg: Config, t: Trainer, keys: tuple[str, ...] | None = None):
  """This process's rows of a batch -> the global batch on the mesh (`keys`, else the
  objective's)."""

  def put(batch: pipeline.Batch) -> dict[str, jax.Array]:
    # Rows first: [B, ...].
    arrays = {k: getattr(batch, k) for k in (keys or t.objective.batch_keys)}
    return {
      k: jax.make_array_from_process_local_data(
        t.batch_sharding, a, (cfg.train.batch_size, *a.shape[1:])
      )
      for k, a in arrays.items()
    }

  return put


def run(cfg: Config) -> dict[str, Any]:
  """Trains as configured; returns a summary (losses, steps, throughput)."""
  cfg = with_saved_tokenizer(cfg)
  mesh = sharding.make_mesh(cfg.mesh)
  cfg = _with_bitnet_groups(cfg, mesh)
  feed = make_feed(cfg, mesh)
  cfg = llava_run.with_image_token(cfg, feed.data.tokenizer)
  t = build(cfg, mesh, feed.steps, feed.data.tokenizer, segments=feed.segments)
  objective.check_data(cfg.train, t.objective, feed.data.train)
  log_model(cfg, t, mesh)
  with sharding.use(mesh, t.rules):
    ckpt = checkpoint.Checkpointer(
      os.path.join(cfg.train.output_dir, runs.CHECKPOINTS), cfg.train.keep_checkpoints
    )
    try:
      if "reference" in t.objective.batch_keys:  # train.reference=precomputed
        feed = _with_reference(cfg, t, feed, mesh, resuming=ckpt.latest_step() is not None)
      state, _ = restore(cfg, ckpt, t, feed)
      write_run_files(cfg, feed.data.tokenizer)
      answers = held_out_eval.Answers(cfg, t, feed.data, mesh)
      state, summary = _train(cfg, t, state, feed, ckpt, answers)
    finally:
      ckpt.close()
  report_lib.check_skipped(summary)
  metric = t.objective.eval_metric  # The reward model's is its pairwise accuracy.
  log.info(
    "held-out %s %.4f -> %.4f; checkpoints in %s",
    "loss" if metric in ("loss", "nll") else metric,
    summary["eval_loss_start"],
    summary["eval_loss_end"],
    ckpt.directory,
  )
  if len(answers.results) == 2:
    before, after = answers.results
    text = held_out_eval.report(cfg.train.output_dir, answers.prompts, before, after)
    summary["held_out_exact_match"] = after[1]["exact_match_all"]
    if jax.process_index() == 0:
      print(text)
  return summary


def _train(
  cfg: Config,
  t: Trainer,
  state: TrainState,
  feed: Feed,
  ckpt: checkpoint.Checkpointer,
  answers: Any,  # (step, trainable) -> metrics of held-out answers, at the start and the end.
) -> tuple[TrainState, dict[str, Any]]:
  """Steps from the state's step to the last, with held-out losses and answers, metrics and
  checkpoints."""
  put = batch_putter(cfg, t)
  held_out = [put(next(feed.held_out)) for _ in range(feed.held_out_batches)]

  def held_out_loss(trainable) -> float:
    total, count = 0.0, 0.0
    for b in held_out:  # One at a time: see `serialize` below.
      sums, n = t.eval_step(trainable, t.frozen, b)
      total, count = total + float(sums[t.objective.eval_metric]), count + float(n)
    if not count:
      raise DataError(
        "held-out data",
        f"nothing to score in its {len(held_out)} batches: every held-out example was dropped "
        f"or cut before its response at data.max_length={cfg.data.max_length}; raise it, or give "
        "more held-out data",
      )
    return total / count

  steps, first = feed.steps, int(state.step)
  report = report_lib.make(cfg, t.lr, t.n_params, steps, first)
  summary = {"eval_loss_start": held_out_loss(state.params), "steps": steps, "start_step": first}
  start = {"eval_loss": summary["eval_loss_start"], **answers(first, state.params)}
  if report.peak:
    log.info("MFU against the %s", report.peak.describe())
    start.update(peak_flops=report.peak.flops, peak_source=report.peak.source)
  report.writer.write(first, start)
  # XLA's CPU client can deadlock when programs with collectives overlap on emulated devices,
  # so there each step finishes before the next is dispatched. Accelerators overlap them.
  serialize = jax.default_backend() == "cpu" and jax.device_count() > 1
  pending = None
  try:
    for step in range(first + 1, steps + 1):
      state, step_metrics = t.train_step(state, t.frozen, put(next(feed.batches)))
      if serialize:
        jax.block_until_ready(state)
      if pending is not None:  # The previous step's metrics: fetching them does not stall.
        report(*pending)
      pending = (step, step_metrics)
      if step % cfg.train.eval_every == 0 and step != steps:
        report.writer.write(step, {"eval_loss": held_out_loss(state.params)})
      if step % cfg.train.checkpoint_every == 0 and step != steps:
        report_lib.check_finite(*pending, cfg)
        ckpt.save(step, state, feed.batches.state())
    if pending is not None:
      report(*pending)
    if hasattr(t.objective, "finish"):  # A reward model's offset (`train/reward.py`).
      state = state.replace(params=t.objective.finish(state.params, t.frozen, held_out))
    if cfg.train.final_checkpoint:
      ckpt.save(steps, state, feed.batches.state())
    summary["eval_loss_end"] = held_out_loss(state.params)
    end = {"eval_loss": summary["eval_loss_end"], **answers(steps, state.params)}
    report.writer.write(steps, end)
  finally:
    report.close()
  summary["tokens_per_s"] = report.tokens_per_s() if steps > first else 0.0
  summary["skipped_steps"] = report.skipped
  return state, summary
