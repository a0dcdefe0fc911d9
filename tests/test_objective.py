"""A new objective needs no edit to jaxtune: one defined here, registered in
`objective.OBJECTIVES`, trains through the generic step on a 2x4 mesh, micro-batches included.

The toy objective is the token-mean of mean(logits^2) over the real tokens; its first loss is
checked against NumPy on the initial parameters, and it must fall as it trains.
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from subprocesses import TINY_RUN

from jaxtune import config, sharding
from jaxtune.model import transformer
from jaxtune.peft import partition
from jaxtune.train import loop, objective


@dataclasses.dataclass(frozen=True)
class LogitsL2:
  model: transformer.Transformer
  batch_keys: ClassVar[tuple[str, ...]] = ("inputs", "segment_ids")
  eval_metric: ClassVar[str] = "loss"

  def normalizer(self, batch):
    return jnp.sum(batch["segment_ids"] > 0)

  def loss(self, params, batch, rng):
    logits_btv = self.model.apply({"params": params}, batch["inputs"], None, batch["segment_ids"])
    real_bt = batch["segment_ids"] > 0
    return jnp.sum(jnp.mean(jnp.square(logits_btv), axis=-1) * real_bt), {"real": jnp.sum(real_bt)}


def test_a_toy_objective_trains_on_a_2x4_mesh(monkeypatch):
  monkeypatch.setitem(objective.OBJECTIVES, "logits_l2", lambda model, train: LogitsL2(model))
  cfg = config.load(
    None,
    [
      *TINY_RUN,
      "train.objective=logits_l2",
      "train.batch_size=8",
      "train.micro_batches=2",
      "train.learning_rate=3e-3",
      "train.warmup_steps=0",
      "train.schedule=constant",
      "mesh.data=2",
      "mesh.model=4",
    ],
  )
  mesh = sharding.make_mesh(cfg.mesh)
  t = loop.build(cfg, mesh, steps=6)
  assert isinstance(t.objective, LogitsL2)
  rng = np.random.default_rng(0)
  inputs = rng.integers(0, cfg.model.vocab_size, (8, 16)).astype(np.int32)
  segment_ids = np.ones((8, 16), np.int32)
  segment_ids[:, 10:] = 2  # Two packed segments a row...
  segment_ids[::3, 13:] = 0  # ...and padding in some.
  batch = {
    "inputs": jax.device_put(inputs, t.batch_sharding),
    "segment_ids": jax.device_put(segment_ids, t.batch_sharding),
  }
  initial = jax.device_get(partition.combine(t.state.params, t.frozen))
  logits = np.asarray(
    t.model.apply({"params": initial}, inputs, None, segment_ids), np.float64
  )  # One device, outside the step.
  real = segment_ids > 0
  expected = (np.square(logits).mean(-1) * real).sum() / real.sum()

  state, losses = t.state, []
  with sharding.use(mesh, t.rules):
    for _ in range(6):
      state, metrics = t.train_step(state, t.frozen, batch)
      losses.append(float(metrics["loss"]))
      assert bool(metrics["finite"])
  np.testing.assert_allclose(losses[0], expected, rtol=1e-5)
  assert float(metrics["real"]) == 1.0  # Metric sums are divided by the normalizer too.
  assert float(metrics["tokens"]) == real.sum()
  assert losses[-1] < 0.5 * losses[0], losses
