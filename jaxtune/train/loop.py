"""The training loop: config -> mesh, rules -> model -> sharded state -> jitted step -> metrics."""

from __future__ import annotations

import itertools
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from tqdm import tqdm

from jaxtune import sharding
from jaxtune.config import Config, ConfigError
from jaxtune.data import pipeline
from jaxtune.model import transformer
from jaxtune.train.step import TrainState, loss_fn, make_train_step

log = logging.getLogger(__name__)


def run(cfg: Config) -> dict[str, float]:
  """Trains on the configured data; returns the first and last held-out losses."""
  data = pipeline.load(cfg.data, cfg.train.seed)
  if cfg.model.vocab_size < data.tokenizer.vocab_size:
    raise ConfigError(
      f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
      f"{data.tokenizer.vocab_size} tokens (added: {list(data.tokenizer.added)})"
    )
  log.info(
    "data: %d examples, %d tokens, %.1f%% supervised, %d truncated, %d dropped",
    data.stats.examples,
    data.stats.tokens,
    100 * data.stats.supervised_fraction,
    data.stats.truncated,
    data.stats.dropped_too_long + data.stats.dropped_unsupervised,
  )
  mesh = sharding.make_mesh(cfg.mesh)
  sharding.check_batch(cfg.train.batch_size, mesh)
  model = transformer.Transformer(cfg.model)
  root = jax.random.key(cfg.train.seed)
  init_rng, dropout_rng = jax.random.split(root)
  sharded = sharding.init_sharded(transformer.init_fn(model), init_rng, mesh, cfg.mesh.strategy)
  params = sharded.variables["params"]
  log.info(
    "model: %s parameters on mesh %s", f"{transformer.param_count(params):,}", dict(mesh.shape)
  )

  schedule = optax.warmup_cosine_decay_schedule(
    0.0, cfg.train.learning_rate, min(100, cfg.train.steps // 10), cfg.train.steps
  )
  optimizer = optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.0)
  batch_sharding = sharding.logical_sharding(mesh, sharded.rules, ("act_batch", "act_seq"))
  with sharding.use(mesh, sharded.rules):
    state = jax.jit(lambda p: TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p)))(params)
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    step = jax.jit(
      make_train_step(model, optimizer, dropout_rng),
      in_shardings=(state_sharding, batch_sharding),
      out_shardings=(state_sharding, sharding.replicated(mesh)),
      donate_argnums=0,
    )
    evaluate = jax.jit(
      lambda p, b: loss_fn(model, p, b, None), in_shardings=(state_sharding.params, batch_sharding)
    )

    def put(batch):
      return {k: jax.device_put(v, batch_sharding) for k, v in vars(batch).items()}

    train_data = pipeline.Batches(
      data.train,
      cfg.train.batch_size,
      cfg.data.max_length,
      cfg.data.pack,
      cfg.train.seed,
      cfg.data.shuffle,
    )
    eval_source = data.eval or data.train[: cfg.train.batch_size]
    eval_batches = pipeline.Batches(
      eval_source, cfg.train.batch_size, cfg.data.max_length, cfg.data.pack, 0, shuffle=False
    )
    held_out = [put(b) for b in itertools.islice(eval_batches, eval_batches.batches_per_epoch()[0])]

    def held_out_loss(params):
      sums = [
        (float(evaluate(params, b)) * float(b["weights"].sum()), float(b["weights"].sum()))
        for b in held_out
      ]
      return sum(s for s, _ in sums) / sum(n for _, n in sums)

    losses = {"eval_loss_start": held_out_loss(state.params)}

    os.makedirs(cfg.train.output_dir, exist_ok=True)
    with open(os.path.join(cfg.train.output_dir, "config.yaml"), "w") as f:
      yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    metrics_path = os.path.join(cfg.train.output_dir, "metrics.jsonl")
    with open(metrics_path, "w") as metrics_file, tqdm(total=cfg.train.steps, unit="step") as bar:
      tokens, start = 0, time.perf_counter()
      for i in range(1, cfg.train.steps + 1):
        batch = next(train_data)
        tokens += int(np.count_nonzero(batch.segment_ids))
        state, metrics = step(state, put(batch))
        if i % cfg.train.log_every == 0 or i == cfg.train.steps:
          metrics = {k: float(v) for k, v in metrics.items()}
          elapsed = time.perf_counter() - start
          record = {
            "step": i,
            **metrics,
            "lr": float(schedule(i)),
            "tokens_per_s": tokens / elapsed,
          }
          metrics_file.write(json.dumps(record) + "\n")
          bar.set_postfix(
            loss=f"{metrics['loss']:.3f}",
            gnorm=f"{metrics['grad_norm']:.2f}",
            tok_s=f"{record['tokens_per_s']:.0f}",
          )
        bar.update()
    losses["eval_loss_end"] = held_out_loss(state.params)
  log.info(
    "held-out loss %.4f -> %.4f; metrics in %s",
    losses["eval_loss_start"],
    losses["eval_loss_end"],
    metrics_path,
  )
  return losses
