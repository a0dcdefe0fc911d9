"""The trainer: sharded == single device, accumulation, z-loss, the non-finite guard, one compile,
optimizers and schedules, and kill-and-resume through the real command."""

import dataclasses
import functools
import json
import math
import pathlib
import signal
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from subprocesses import JAXTUNE, TINY_RUN, Background, one_device_env

from jaxtune import config, sharding
from jaxtune.config import MeshConfig, TrainConfig
from jaxtune.config_model import ModelConfig
from jaxtune.data import packing
from jaxtune.model import transformer
from jaxtune.train import loop, optim
from jaxtune.train.sft import SFT, token_losses
from jaxtune.train.step import TrainState, make_train_step

VOCAB = 256
BASE = ModelConfig(
  vocab_size=VOCAB, dim=32, num_layers=2, num_heads=8, num_kv_heads=2, mlp_dim=64, max_seq_len=64
)
KINDS = {"mha": None, "gqa": 2, "mqa": 1}
ADAMW = TrainConfig(
  learning_rate=1e-3, schedule="constant", warmup_steps=0, weight_decay=0.1, clip_norm=1.0
)


def _examples(seed: int, count: int) -> list[packing.Example]:
  """Random examples of 4..19 tokens: a prompt (not supervised) and a response (supervised)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    size = int(rng.integers(4, 20))
    prompt = int(rng.integers(1, size - 1))
    out.append(
      packing.Example(rng.integers(1, VOCAB, size).astype(np.int32), np.arange(size) >= prompt)
    )
  return out


def _batch(seed: int, rows: int = 8, length: int = 32) -> dict[str, np.ndarray]:
  """Packed rows (several segments, padding at the end) as the pipeline makes them."""
  examples = _examples(seed, 4 * rows)
  placed = packing.assign_rows([len(e) - 1 for e in examples], rows, length, True)
  assert all(placed), "every row holds at least one example"
  return dict(vars(packing.make_batch(examples, placed, length)))


def _init(model: transformer.Transformer, seed: int = 0):
  return nn.meta.unbox(jax.jit(transformer.init_fn(model))(jax.random.key(seed)))["params"]


def _state(params, optimizer) -> TrainState:
  return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


def _device_state(params, optimizer) -> TrainState:
  """The state committed to one device, like the step's outputs (so the step compiles once)."""
  return jax.device_put(_state(params, optimizer), jax.devices()[0])


def _xent(logits_btv, targets_bt, weights_bt):
  """The masked token-mean cross-entropy, written out (not `token_losses`)."""
  logp_btv = logits_btv - jax.nn.logsumexp(logits_btv, axis=-1, keepdims=True)
  picked_bt = jnp.sum(logp_btv * jax.nn.one_hot(targets_bt, logits_btv.shape[-1]), axis=-1)
  return -jnp.sum(picked_bt * weights_bt) / jnp.sum(weights_bt)


def _assert_trees_close(actual, expected, atol, rtol=0.0, what=""):
  leaves_a = jax.tree_util.tree_leaves_with_path(actual)
  leaves_e = jax.tree.leaves(expected)
  assert len(leaves_a) == len(leaves_e), what
  for (path, a), e in zip(leaves_a, leaves_e, strict=True):
    np.testing.assert_allclose(
      np.asarray(a),
      np.asarray(e),
      atol=atol,
      rtol=rtol,
      err_msg=f"{what}{jax.tree_util.keystr(path)}",
    )


@functools.cache
def _base_params():
  """BASE's initial parameters (host copies), shared by the single-device tests."""
  return jax.device_get(_init(transformer.Transformer(BASE)))


# 1. Sharded training equals single-device training.

# Every mesh shape of 8 devices; tp and fsdp; MQA (KV heads replicated, loudly), MHA and GQA
# (2 KV heads: split on a 2-way model axis, replicated on wider ones).
SHARDED_CASES = [
  ((1, 8), "tp", "mqa"),
  ((2, 4), "fsdp", "mha"),
  ((4, 2), "tp", "gqa"),
  ((8, 1), "fsdp", "gqa"),
]
SHARDED_STEPS = 3
NEFTUNE_ALPHA = 5.0  # With residual dropout: their noise, too, must not depend on the mesh.
_single_device_runs = {}


def _noisy_model(kind: str) -> transformer.Transformer:
  return transformer.Transformer(
    dataclasses.replace(BASE, num_kv_heads=KINDS[kind], residual_dropout=0.1)
  )


def _single_device_run(kind: str, params):
  """(losses, final state) of SHARDED_STEPS steps from `params`, jitted with no shardings."""
  if kind not in _single_device_runs:
    optimizer = optim.optimizer(ADAMW, 100)
    step = jax.jit(
      make_train_step(
        SFT(_noisy_model(kind), neftune_alpha=NEFTUNE_ALPHA), optimizer, jax.random.key(1)
      )
    )
    state = _device_state(params, optimizer)
    losses = []
    for i in range(SHARDED_STEPS):
      state, metrics = step(state, {}, _batch(i))
      losses.append(float(metrics["loss"]))
    _single_device_runs[kind] = losses, jax.device_get(state)
  return _single_device_runs[kind]


@functools.cache
def _sharded_step(mesh_shape, strategy: str, kind: str):
  """Built as loop.run builds it: abstract-first sharded init, the state sharded like its params,
  one jit with explicit shardings and the state donated.

  Returns (the initial params on the host, a function making the initial state, a function
  running one step on a host batch, the jitted step, the list of its traces)."""
  model = _noisy_model(kind)
  optimizer = optim.optimizer(ADAMW, 100)
  mesh = sharding.make_mesh(MeshConfig(data=mesh_shape[0], model=mesh_shape[1]))
  sharded = sharding.init_sharded(transformer.init_fn(model), jax.random.key(0), mesh, strategy)
  batch_sharding = sharding.logical_sharding(mesh, sharded.rules, ("act_batch", "act_seq"))
  train_step = make_train_step(
    SFT(model, neftune_alpha=NEFTUNE_ALPHA), optimizer, jax.random.key(1)
  )
  traces = []

  def counted(state, batch):
    traces.append(1)  # Runs only when jax traces the step.
    return train_step(state, {}, batch)

  params, replicated = sharded.variables["params"], sharding.replicated(mesh)
  moments = optim.state_shardings(optimizer, params, sharded.shardings["params"], replicated)
  state_sharding = TrainState(replicated, sharded.shardings["params"], moments)

  def initial_state():
    with sharding.use(mesh, sharded.rules):
      return jax.jit(lambda p: _state(p, optimizer), out_shardings=state_sharding)(params)

  step = jax.jit(
    counted,
    in_shardings=(state_sharding, batch_sharding),
    out_shardings=(state_sharding, sharding.replicated(mesh)),
    donate_argnums=0,
  )

  def run(state, batch):
    with sharding.use(mesh, sharded.rules):
      put = {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in batch.items()}
      return step(state, put)

  return jax.device_get(sharded.variables["params"]), initial_state, run, step, traces


@pytest.mark.parametrize("mesh_shape, strategy, kind", SHARDED_CASES)
def test_sharded_training_equals_single_device(mesh_shape, strategy, kind):
  initial, initial_state, run, _, _ = _sharded_step(mesh_shape, strategy, kind)
  state = initial_state()
  losses = []
  for i in range(SHARDED_STEPS):
    state, metrics = run(state, _batch(i))
    losses.append(float(metrics["loss"]))
  # The weights really are split over the devices (fsdp: every matrix over both axes).
  q_kernel = state.params["layers"]["attn"]["q"]["kernel"]
  mesh = q_kernel.sharding.mesh
  assert dict(mesh.shape) == {"data": mesh_shape[0], "model": mesh_shape[1]}
  q_spec = jax.sharding.PartitionSpec(None, "data" if strategy == "fsdp" else None, "model", None)
  assert q_kernel.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, q_spec), 4)
  # So are Adam's moments, like their parameters (not replicated on every device).
  adam = state.opt_state[1][0]
  for moment in (adam.mu, adam.nu):
    same = jax.tree.map(
      lambda m, p: m.sharding.is_equivalent_to(p.sharding, m.ndim), moment, state.params
    )
    assert all(jax.tree.leaves(same)), same

  expected_losses, expected = _single_device_run(kind, initial)  # A plain init's values (tested).
  where = f"{mesh_shape} {strategy} {kind}: "
  np.testing.assert_allclose(losses, expected_losses, atol=1e-5, rtol=0, err_msg=where)
  assert len(set(losses)) == SHARDED_STEPS, "three different batches and weights"
  assert int(state.step) == SHARDED_STEPS
  _assert_trees_close(state.params, expected.params, atol=1e-5, what=where)
  _assert_trees_close(state.opt_state, expected.opt_state, atol=1e-5, what=where)


# Adafactor's factored second moments (a row and a column per matrix) are replicated: 5% of
# this small model's state.
@pytest.mark.parametrize("name, slack", [("adamw", 1.01), ("adafactor", 1.1)])
def test_built_state_is_split_over_the_devices(name, slack):
  """`loop.build` on 2x4 fsdp: parameters and optimizer moments each hold 1/8 per device (norms
  and step counts aside), and the shapes-only build describes the same state."""
  cfg = config.load(None, ["mesh.data=2", "mesh.model=4", "mesh.strategy=fsdp"])
  cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, optimizer=name))
  mesh = sharding.make_mesh(cfg.mesh)
  state = loop.build(cfg, mesh, steps=10).state
  total = sum(x.nbytes for x in jax.tree.leaves(state))
  for device in jax.devices():
    held = sum(
      s.data.nbytes
      for x in jax.tree.leaves(state)
      for s in x.addressable_shards
      if s.device == device
    )
    assert held <= slack * total / 8, (device, held, total)

  shapes = loop.build(cfg, mesh, steps=10, shapes_only=True).state
  same = jax.tree.map(
    lambda x, s: x.shape == s.shape and x.dtype == s.dtype and x.sharding == s.sharding,
    state,
    shapes,
  )
  assert all(jax.tree.leaves(same)), same


# 2. Gradient accumulation.


def test_micro_batches_equal_one_batch_and_a_plain_gradient():
  model = transformer.Transformer(BASE)
  optimizer = optim.optimizer(dataclasses.replace(ADAMW, clip_norm=0.5), 100)
  params = _base_params()
  batch = _batch(7, rows=8)
  results = {}
  for k in (1, 4):
    step = jax.jit(make_train_step(SFT(model), optimizer, jax.random.key(0), micro_batches=k))
    results[k] = step(_state(params, optimizer), {}, batch)
  (one_state, one), (four_state, four) = results[1], results[4]
  for key in ("loss", "nll", "grad_norm", "supervised_tokens"):
    np.testing.assert_allclose(four[key], one[key], atol=1e-6, rtol=1e-6, err_msg=key)
  # Adam divides each gradient by its own size, so a near-zero gradient, rounded differently in
  # one batch than in four sums, moves its parameter by up to a few 1e-6 (the step is lr = 1e-3);
  # the moments, which carry the gradients themselves, agree to 1e-6.
  _assert_trees_close(four_state.params, one_state.params, atol=5e-6, what="4 micro-batches ")
  _assert_trees_close(four_state.opt_state, one_state.opt_state, atol=1e-6, what="4 micro-batches ")

  # An independent reference: jax.grad of the masked token mean, outside the step.
  def reference_loss(p):
    logits = model.apply({"params": p}, batch["inputs"], batch["positions"], batch["segment_ids"])
    return _xent(logits, batch["targets"], batch["weights"])

  loss, grads = jax.jit(jax.value_and_grad(reference_loss))(params)
  grad_norm = np.sqrt(
    sum(np.sum(np.square(np.asarray(g, np.float64))) for g in jax.tree.leaves(grads))
  )
  assert grad_norm > 0.5, "the gradient is clipped, so the clipped update is compared too"
  for k, (_, metrics) in results.items():
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6, err_msg=f"k={k}")
    np.testing.assert_allclose(metrics["nll"], loss, rtol=1e-6, err_msg=f"k={k}")
    np.testing.assert_allclose(metrics["grad_norm"], grad_norm, rtol=1e-5, err_msg=f"k={k}")
    assert float(metrics["supervised_tokens"]) == float(np.sum(batch["weights"]))


def test_bfloat16_step_runs_on_cpu_and_follows_float32():
  # XLA:CPU refused this step's attention products (BF16 x BF16 -> F32: UNIMPLEMENTED).
  optimizer = optim.optimizer(ADAMW, 100)
  params, batch = _base_params(), _batch(7, rows=4)
  metrics = {}
  for dtype in ("float32", "bfloat16"):
    model = transformer.Transformer(dataclasses.replace(BASE, dtype=dtype))
    step = jax.jit(make_train_step(SFT(model), optimizer, jax.random.key(0)))
    metrics[dtype] = step(_state(params, optimizer), {}, batch)[1]
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose(
      metrics["bfloat16"][key], metrics["float32"][key], rtol=2e-2, err_msg=key
    )


# 3. z-loss.


def test_z_loss_equals_numpy():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
  targets = rng.integers(0, 11, (3, 5))
  weights = (rng.random((3, 5)) > 0.3).astype(np.float32)
  z = 1e-2
  loss, nll = jax.jit(functools.partial(token_losses, z_loss=z))(logits, targets, weights)

  x = logits.astype(np.float64)
  top = x.max(-1, keepdims=True)
  log_z = (top + np.log(np.exp(x - top).sum(-1, keepdims=True)))[..., 0]
  target_logit = np.array(
    [[x[b, t, targets[b, t]] for t in range(5)] for b in range(3)], np.float64
  )
  nll_expected = np.sum((log_z - target_logit) * weights)
  z_expected = z * np.sum(log_z**2 * weights)
  np.testing.assert_allclose(nll, nll_expected, rtol=1e-6)
  np.testing.assert_allclose(loss, nll_expected + z_expected, rtol=1e-6)
  assert z_expected > 1e-3 * nll_expected, "the z term is large enough to be seen"
  loss0, nll0 = token_losses(logits, targets, weights)
  np.testing.assert_allclose(loss0, nll_expected, rtol=1e-6)
  np.testing.assert_allclose(nll0, nll_expected, rtol=1e-6)


# 4. The non-finite guard.


def _nan_weight(params, batch):
  weights = batch["weights"].copy()
  weights[0, np.flatnonzero(weights[0])[0]] = np.nan
  return params, {**batch, "weights": weights}


def _nan_param(params, batch):
  kernel = params["layers"]["mlp"]["up"]["kernel"]
  poisoned = jax.tree.map(lambda x: x, params)
  poisoned["layers"]["mlp"]["up"]["kernel"] = kernel.at[0, 0, 0].set(jnp.nan)
  return poisoned, batch


@functools.cache
def _adamw_step_and_state():
  """A jitted AdamW step and the state after one step (so the Adam moments are not zero)."""
  optimizer = optim.optimizer(ADAMW, 100)
  step = jax.jit(make_train_step(SFT(transformer.Transformer(BASE)), optimizer, jax.random.key(0)))
  state, _ = step(_device_state(_base_params(), optimizer), {}, _batch(0))
  return step, state


@pytest.mark.parametrize("poison", [_nan_weight, _nan_param], ids=["nan_weight", "nan_param"])
def test_non_finite_step_leaves_the_state_unchanged(poison):
  step, state = _adamw_step_and_state()
  params, batch = poison(state.params, _batch(1))
  before = jax.device_get(state.replace(params=params))

  after, metrics = step(state.replace(params=params), {}, batch)
  assert not bool(metrics["finite"])
  assert not np.isfinite(float(metrics["loss"]))
  assert int(after.step) == int(before.step) + 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(after.params), before.params)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(after.opt_state), before.opt_state)

  # Not vacuous: the same step on clean inputs is finite and changes every weight.
  clean, clean_metrics = step(state, {}, _batch(1))
  assert bool(clean_metrics["finite"])
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), clean.params, state.params)
  assert all(jax.tree.leaves(changed))


def test_an_update_that_overflows_is_reported():
  """Finite loss and gradient, but lr 1e39 (past config validation) overflows the update: the
  step says so (`update_finite`, and not `finite`), so that the loop stops before any checkpoint
  holds the result (before, it reported a finite step and wrote NaN parameters)."""
  optimizer = optim.optimizer(dataclasses.replace(ADAMW, learning_rate=1e39), 100)
  step = jax.jit(make_train_step(SFT(transformer.Transformer(BASE)), optimizer, jax.random.key(0)))
  after, metrics = step(_device_state(_base_params(), optimizer), {}, _batch(1))
  assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
  assert not bool(metrics["update_finite"]) and not bool(metrics["finite"])
  assert not all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(after.params)))
  # Not vacuous: the same step at a sane rate is finite.
  sane = optim.optimizer(ADAMW, 100)
  step = jax.jit(make_train_step(SFT(transformer.Transformer(BASE)), sane, jax.random.key(0)))
  _, metrics = step(_device_state(_base_params(), sane), {}, _batch(1))
  assert bool(metrics["update_finite"]) and bool(metrics["finite"])


# 5. One compilation.


def test_train_step_compiles_once():
  """The loop's jitted step (sharded, state donated) traces and compiles once over 5 steps of
  different data (and over the sharded test's steps too, when that ran first)."""
  _, initial_state, run, step, traces = _sharded_step((2, 4), "fsdp", "mha")
  state = initial_state()
  losses = []
  for i in range(5):
    state, metrics = run(state, _batch(10 + i))
    losses.append(float(metrics["loss"]))
  assert len(traces) == 1
  assert step._cache_size() == 1
  assert int(state.step) == 5 and len(set(losses)) == 5


def test_runs_that_differ_in_seed_share_the_loops_step():
  """The loop's step takes the seed's key as an input, not a constant: two runs that differ only
  in `train.seed` lower to one program (a sweep's seeds compile once with a persistent cache),
  and the key still reaches the noise (NEFTune's, on the same state and batch)."""
  cfgs = [
    config.load(None, [*TINY_RUN, "train.batch_size=8", "train.neftune_alpha=5", f"train.seed={s}"])
    for s in (0, 1)
  ]
  mesh = sharding.make_mesh(cfgs[0].mesh, jax.devices()[:1])  # One device: a cheap compile.
  t = loop.build(cfgs[0], mesh, steps=4)
  other = loop.build(cfgs[1], mesh, steps=4, shapes_only=True)
  batch = {k: jax.device_put(v, t.batch_sharding) for k, v in _batch(0).items()}
  with sharding.use(mesh, t.rules):
    lowered = [x.train_step.lower(x.state, x.frozen, batch).as_text() for x in (t, other)]
    assert lowered[0] == lowered[1]
    losses = [
      float(t.train_step.jitted(jax.tree.map(jnp.copy, t.state), t.frozen, batch, key)[1]["loss"])
      for key in (t.train_step.key, other.train_step.key)
    ]
  assert t.train_step.key is not other.train_step.key and losses[0] != losses[1]


# 6. Optimizers and schedules.

GPT2 = dataclasses.replace(
  BASE, use_bias=True, norm="layernorm", position="learned", mlp="gelu", num_kv_heads=None
)
# Hand-written: which leaves of the GPT-2-style tree decay.
GPT2_DECAYS = {
  "embed/embedding": True,
  "position/embedding": True,
  "final_norm/scale": False,
  "final_norm/bias": False,
  **{f"layers/{n}_norm/{leaf}": False for n in ("attn", "mlp") for leaf in ("scale", "bias")},
  **{f"layers/attn/{p}/kernel": True for p in "qkvo"},
  **{f"layers/attn/{p}/bias": False for p in "qkvo"},
  **{f"layers/mlp/{p}/kernel": True for p in ("up", "down")},
  **{f"layers/mlp/{p}/bias": False for p in ("up", "down")},
}


def _by_path(tree) -> dict[str, object]:
  return {
    "/".join(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def test_decay_mask_is_kernels_and_embeddings_only():
  params = jax.eval_shape(lambda: _init(transformer.Transformer(GPT2)))
  assert _by_path(optim.decay_mask(params)) == GPT2_DECAYS


def test_adamw_decays_kernels_not_norms_or_biases():
  rng = np.random.default_rng(0)
  params = jax.tree.map(
    lambda x: jnp.asarray(rng.normal(size=x.shape) + 1.0, jnp.float32),
    jax.eval_shape(lambda: _init(transformer.Transformer(GPT2))),
  )
  lr, wd = 1e-2, 0.1
  optimizer = optim.optimizer(dataclasses.replace(ADAMW, learning_rate=lr, weight_decay=wd), 100)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(optimizer.update)(zeros, optimizer.init(params), params)
  new = _by_path(jax.tree.map(lambda p, u: p + u, params, updates))
  old = _by_path(params)
  for path, decays in GPT2_DECAYS.items():
    if decays:
      np.testing.assert_allclose(new[path], old[path] * (1 - lr * wd), rtol=1e-6, err_msg=path)
    else:
      np.testing.assert_array_equal(new[path], old[path], err_msg=path)


def _numpy_schedule(name, lr, end, warmup, steps, s):
  if warmup and s < warmup:
    return lr * s / warmup
  t = min((s - warmup) / max(steps - warmup, 1), 1.0)
  if name == "constant":
    return lr
  if name == "cosine":
    return end + (lr - end) * 0.5 * (1 + math.cos(math.pi * t))
  if name == "linear":
    return lr + (end - lr) * t
  raise ValueError(name)


@pytest.mark.parametrize(
  "name, lr, end, warmup, steps",
  [
    ("constant", 3e-3, 0.0, 10, 100),
    ("cosine", 3e-3, 3e-4, 10, 100),
    ("cosine", 1e-3, 0.0, 0, 50),
    ("linear", 1e-5, 1e-6, 0, 40),  # LIMA: 1e-5 linearly to 1e-6, no warmup.
    ("linear", 2e-4, 2e-5, 5, 40),
  ],
)
def test_schedule_equals_closed_form(name, lr, end, warmup, steps):
  cfg = TrainConfig(
    schedule=name, learning_rate=lr, end_learning_rate=end, warmup_steps=warmup, steps=steps
  )
  schedule = optim.schedule(cfg, steps)
  for s in sorted(
    {0, 1, warmup // 2, warmup, warmup + 1, steps // 3, steps // 2, steps - 1, steps}
  ):
    np.testing.assert_allclose(
      schedule(s), _numpy_schedule(name, lr, end, warmup, steps, s), rtol=1e-5, err_msg=f"step {s}"
    )
  if name == "linear" and warmup == 0:
    np.testing.assert_allclose(schedule(0), lr, rtol=1e-6)
    np.testing.assert_allclose(schedule(steps), end, rtol=1e-6)


@pytest.mark.parametrize("warmup", [1, 16])
def test_rsqrt_schedule_equals_closed_form(warmup):
  lr = 1e-2
  schedule = optim.schedule(TrainConfig(schedule="rsqrt", learning_rate=lr, warmup_steps=warmup), 0)
  for s in (1, 2, 8, 16, 17, 100, 10_000):
    expected = lr * min(s / warmup, math.sqrt(warmup / s))
    np.testing.assert_allclose(schedule(s), expected, rtol=1e-5, err_msg=f"step {s}")


def test_adafactor_lowers_the_loss():
  model = transformer.Transformer(BASE)
  cfg = dataclasses.replace(ADAMW, optimizer="adafactor", learning_rate=1e-2, weight_decay=1e-3)
  optimizer = optim.optimizer(cfg, 100)
  step = jax.jit(make_train_step(SFT(model), optimizer, jax.random.key(0)))
  state = _device_state(_base_params(), optimizer)
  batch = _batch(0)
  losses = []
  for _ in range(4):
    state, metrics = step(state, {}, batch)
    assert bool(metrics["finite"])
    losses.append(float(metrics["loss"]))
  assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
  assert losses[-1] < losses[0] - 0.02, losses


# 7. Kill and resume, through the real command.

RUN = [
  "train.steps=16",
  "train.checkpoint_every=4",
  "train.keep_checkpoints=2",
  "train.eval_every=100",
  "train.batch_size=8",
  "train.seed=3",
  "train.schedule=cosine",  # The learning rate, the noise and the data all depend on the step.
  "train.warmup_steps=2",
  "train.neftune_alpha=5",
  "model.residual_dropout=0.1",
  *TINY_RUN,
  "model.max_seq_len=256",  # Room for the held-out prompts and answers printed at the end.
]


def _Run(output_dir: pathlib.Path, *overrides: str) -> Background:  # noqa: N802 (a constructor)
  """A `jaxtune train` subprocess on one CPU device, as a user runs it."""
  command = [*JAXTUNE, "train", *RUN, *overrides, f"train.output_dir={output_dir}"]
  log = output_dir.parent / f"{output_dir.name}.{time.monotonic_ns()}.log"
  return Background(command, one_device_env(), log, cwd=output_dir.parent)


def _steps(checkpoints: pathlib.Path) -> list[int]:
  """Complete checkpoint steps (orbax renames a step's temporary folder when it is complete)."""
  if not checkpoints.is_dir():
    return []
  return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit() and p.is_dir())


def _saved_state(output_dir: pathlib.Path, step: int):
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(output_dir / "checkpoints" / str(step) / "state")


class _Background:
  """Runs started together when the first test needs one, so that they share the cores with
  run B: A (16 steps, uninterrupted) and S (a model whose positions the held-out prompts fill)."""

  def __init__(self, root: pathlib.Path):
    self.dirs = {"A": root / "uninterrupted", "S": root / "short_model"}
    self.runs = {
      "A": _Run(self.dirs["A"]),
      "S": _Run(self.dirs["S"], "train.steps=2", "model.max_seq_len=96", "data.max_length=96"),
    }

  def wait(self, name: str) -> tuple[pathlib.Path, int, str]:
    code, output = self.runs[name].finish()
    return self.dirs[name], code, output


@pytest.fixture(scope="module")
def background(tmp_path_factory):
  runs = _Background(tmp_path_factory.mktemp("runs"))
  yield runs
  for run in runs.runs.values():
    run.kill()


def test_killed_and_resumed_run_equals_uninterrupted_run(background, tmp_path):
  output_dir = tmp_path / "run"
  checkpoints = output_dir / "checkpoints"
  run = _Run(output_dir)  # Run B: killed once a checkpoint of step 4, 8 or 12 is complete.
  try:
    deadline = time.monotonic() + 240
    while not any(4 <= s < 16 for s in _steps(checkpoints)):
      assert run.process.poll() is None, run.output()[-3000:]
      assert time.monotonic() < deadline, "no checkpoint within 240 s"
      time.sleep(0.002)
    run.process.send_signal(signal.SIGKILL)
    run.process.wait()
  finally:
    run.kill()
  assert run.process.returncode == -signal.SIGKILL
  killed_at = max(_steps(checkpoints))
  assert 4 <= killed_at < 16, f"the run was killed after step {killed_at}, not mid-run"
  at_kill = _saved_state(output_dir, killed_at)

  code, output = _Run(output_dir, "train.resume=true").finish()
  assert code == 0, output[-3000:]
  records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
  # The resumed run starts with a held-out evaluation at the step it resumed from.
  assert [r["step"] for r in records if "eval_loss" in r] == [0, killed_at, 16], records

  reference_dir, reference_code, reference_output = background.wait("A")
  assert reference_code == 0, reference_output[-3000:]
  reference = _saved_state(reference_dir, 16)
  resumed = _saved_state(output_dir, 16)
  assert int(at_kill["step"]) == killed_at
  assert int(resumed["step"]) == int(reference["step"]) == 16
  jax.tree.map(np.testing.assert_array_equal, resumed["params"], reference["params"])
  jax.tree.map(np.testing.assert_array_equal, resumed["opt_state"], reference["opt_state"])
  # Not vacuous: the resumed run trained on, moving every weight from the killed run's.
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), at_kill["params"], resumed["params"])
  assert all(jax.tree.leaves(moved))


def _snapshot(directory: pathlib.Path) -> dict[str, tuple[int, int]]:
  return {
    str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
    for p in sorted(directory.rglob("*"))
    if p.is_file()
  }


def test_training_into_a_run_with_checkpoints_needs_resume(background):
  output_dir, code, output = background.wait("A")
  assert code == 0, output[-3000:]
  before = _snapshot(output_dir)
  assert any(k.startswith("checkpoints/16/") for k in before)
  code, output = _Run(output_dir).finish()
  assert code == 2, output[-3000:]
  assert "Traceback" not in output
  last = output.strip().splitlines()[-1]
  assert last.startswith("jaxtune train: error: "), last
  assert "already has checkpoints (step 16)" in last and "train.resume=true" in last, last
  assert _snapshot(output_dir) == before, "nothing in the run directory was written"


def test_train_logs_its_progress(background):
  """The INFO lines a user watches: data statistics, the model, the held-out loss."""
  _, code, output = background.wait("A")
  assert code == 0, output[-3000:]
  for line in (
    "jaxtune.train.feed: data: ",
    "jaxtune.train.loop: model: ",
    "held-out loss ",
    "MFU against the peak ",
  ):
    assert line in output, f"no {line!r} in the output of `jaxtune train`:\n{output[-2000:]}"


def test_run_finishes_when_held_out_prompts_fill_the_model(background):
  """model.max_seq_len = data.max_length = 96: some held-out prompts are longer than the model's
  positions; the greedy answers printed at the end must not crash a finished run."""
  output_dir, code, output = background.wait("S")
  assert 2 in _steps(output_dir / "checkpoints")  # Training itself finished.
  assert code == 0, output[-3000:]
