"""NEFTune against numpy: per-segment lengths and scales, none on padding, packed == alone, off at
alpha 0 and in evaluation, reproducible from (seed, step) and the same on every mesh."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxtune import sharding
from jaxtune.config import MeshConfig, TrainConfig
from jaxtune.config_model import ModelConfig
from jaxtune.model import attention, neftune, transformer
from jaxtune.train import optim
from jaxtune.train.sft import SFT
from jaxtune.train.step import TrainState, make_eval_step, make_train_step

ALPHA = 5.0
WIDE = 4096  # A large model dim: many samples per segment, so the statistics are tight.
CFG = ModelConfig(
  vocab_size=256, dim=32, num_layers=2, num_heads=8, num_kv_heads=2, mlp_dim=64, max_seq_len=64
)


def _rows(*segment_lengths_per_row: list[int], length: int) -> np.ndarray:
  """Segment ids [B, T]: each row's segments 1, 2, ... of the given lengths, then padding (0)."""
  out = np.zeros((len(segment_lengths_per_row), length), np.int32)
  for r, lengths in enumerate(segment_lengths_per_row):
    start = 0
    for segment, n in enumerate(lengths, 1):
      out[r, start : start + n] = segment
      start += n
  return out


def _numpy_lengths(segment_ids: np.ndarray) -> np.ndarray:
  out = np.zeros_like(segment_ids)
  for b in range(segment_ids.shape[0]):
    for t in range(segment_ids.shape[1]):
      s = segment_ids[b, t]
      out[b, t] = 0 if s == 0 else int(np.sum(segment_ids[b] == s))
  return out


def _scale(length: int, dim: int = WIDE) -> float:
  """NEFTune's bound on |noise| for an example of `length` tokens: alpha / sqrt(L d)."""
  return ALPHA / np.sqrt(length * dim)


def test_segment_lengths_equal_a_numpy_loop():
  rng = np.random.default_rng(0)
  rows = []
  for _ in range(6):
    lengths, total = [], 0
    while total < 40:
      n = int(rng.integers(1, 15))
      lengths.append(min(n, 48 - total))
      total += lengths[-1]
    rows.append(lengths)
  rows += [[], [48], [1] * 48]  # All padding, one full segment, 48 one-token segments.
  segments = _rows(*rows, length=48)
  got = jax.jit(neftune.segment_lengths)(segments)
  np.testing.assert_array_equal(got, _numpy_lengths(segments))


def test_each_segment_gets_noise_scaled_by_its_own_length_and_padding_none():
  lengths = [3, 13, 40, 64]
  segments = _rows(lengths, [], length=128)  # 8 padding slots, then a row of padding only.
  noise = np.asarray(
    jax.jit(neftune.noise, static_argnums=(2, 3))(jax.random.key(0), segments, WIDE, ALPHA)
  )
  assert noise.shape == (2, 128, WIDE) and noise.dtype == np.float32
  np.testing.assert_array_equal(noise[segments == 0], 0.0)
  assert np.count_nonzero(segments == 0) == 8 + 128
  for segment, n in enumerate(lengths, 1):
    values = noise[0][segments[0] == segment]
    bound = _scale(n)
    assert values.shape == (n, WIDE)
    assert np.max(np.abs(values)) <= bound * (1 + 1e-6), f"segment of {n}"
    assert np.max(np.abs(values)) >= 0.99 * bound, f"segment of {n}: uses the whole range"
    # U(-1, 1) * bound has standard deviation bound / sqrt(3).
    np.testing.assert_allclose(np.std(values), bound / np.sqrt(3), rtol=0.03, err_msg=f"{n}")
    np.testing.assert_allclose(np.mean(values), 0.0, atol=0.03 * bound)


def test_packed_example_gets_the_noise_it_would_get_alone():
  segments = _rows([10, 50], [10], length=64)  # The same 10-token example, packed and alone.
  noise = np.asarray(
    jax.jit(neftune.noise, static_argnums=(2, 3))(jax.random.key(1), segments, WIDE, ALPHA)
  )
  packed, alone = noise[0, :10], noise[1, :10]
  np.testing.assert_allclose(np.std(packed), np.std(alone), rtol=0.03)
  np.testing.assert_allclose(np.std(packed), _scale(10) / np.sqrt(3), rtol=0.03)
  np.testing.assert_allclose(np.max(np.abs(packed)), np.max(np.abs(alone)), rtol=0.01)
  assert not np.array_equal(packed, alone), "independent draws"


@functools.cache
def _variables():
  """CFG's initial variables (dropout rates do not change them)."""
  init = transformer.init_fn(transformer.Transformer(CFG))
  return nn.meta.unbox(jax.jit(init)(jax.random.key(0)))


def _batch(seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  segments = _rows(*([[9, 14, 5], [20, 8]] * 4), length=32)
  inputs = rng.integers(1, 256, segments.shape).astype(np.int32) * (segments > 0)
  targets = rng.integers(1, 256, segments.shape).astype(np.int32) * (segments > 0)
  weights = ((segments > 0) & (rng.random(segments.shape) > 0.4)).astype(np.float32)
  positions = np.asarray(attention.segment_positions(jnp.asarray(segments)))
  return dict(
    inputs=inputs, targets=targets, weights=weights, segment_ids=segments, positions=positions
  )


def test_alpha_zero_is_no_neftune():
  model = transformer.Transformer(CFG)  # residual_dropout = 0.
  variables = _variables()
  b = _batch()
  rngs = {"dropout": jax.random.key(1), "neftune": jax.random.key(2)}

  @functools.partial(jax.jit, static_argnames=("deterministic", "alpha"))
  def logits(deterministic, alpha):
    return model.apply(
      variables,
      b["inputs"],
      b["positions"],
      b["segment_ids"],
      deterministic=deterministic,
      neftune_alpha=alpha,
      rngs=rngs,
    )

  clean = logits(True, 0.0)
  np.testing.assert_array_equal(logits(False, 0.0), clean)
  np.testing.assert_array_equal(logits(True, ALPHA), clean)  # Evaluation: never noise.
  assert np.max(np.abs(logits(False, ALPHA) - clean)) > 1e-3, "alpha > 0 in training: noise"


def _numpy_nll_sum(logits, targets, weights) -> float:
  x = np.asarray(logits, np.float64)
  top = x.max(-1, keepdims=True)
  log_z = (top + np.log(np.exp(x - top).sum(-1, keepdims=True)))[..., 0]
  picked = np.take_along_axis(x, targets[..., None].astype(np.int64), axis=-1)[..., 0]
  return float(np.sum((log_z - picked) * weights))


def test_eval_step_is_deterministic_and_noise_free():
  cfg = dataclasses.replace(CFG, residual_dropout=0.2)  # Dropout configured: eval ignores it.
  model = transformer.Transformer(cfg)
  params = _variables()["params"]
  b = _batch(1)
  eval_step = jax.jit(make_eval_step(SFT(model)))
  sums, count = eval_step(params, {}, b)
  first, second = sums["nll"], eval_step(params, {}, b)[0]["nll"]
  assert float(first) == float(second)
  assert float(count) == float(np.sum(b["weights"]))
  logits = model.apply({"params": params}, b["inputs"], b["positions"], b["segment_ids"])
  np.testing.assert_allclose(
    float(first), _numpy_nll_sum(logits, b["targets"], b["weights"]), rtol=1e-5
  )


def test_train_noise_is_reproducible_from_seed_and_step():
  model = transformer.Transformer(CFG)
  optimizer = optim.optimizer(TrainConfig(schedule="constant", warmup_steps=0), 100)
  params = _variables()["params"]
  step = jax.jit(make_train_step(SFT(model, neftune_alpha=ALPHA), optimizer, jax.random.key(7)))
  b = _batch(2)

  def loss_at(step_number):
    state = TrainState(jnp.asarray(step_number, jnp.int32), params, optimizer.init(params))
    return float(jax.device_get(step(jax.device_put(state, jax.devices()[0]), {}, b)[1]["loss"]))

  sums, count = jax.jit(make_eval_step(SFT(model)))(params, {}, b)
  clean = float(sums["nll"] / count)
  noisy = {s: loss_at(s) for s in (3, 4)}
  assert loss_at(3) == noisy[3], "the same (seed, step): the same noise"
  assert noisy[3] != noisy[4], "another step: other noise"
  assert noisy[3] != clean and noisy[4] != clean, "the train step adds noise"


@pytest.mark.parametrize("mesh_shape", [(2, 4), (8, 1)])
def test_noise_is_the_same_on_every_mesh(mesh_shape):
  segments = _rows(*([[9, 14, 5], [20, 8]] * 4), length=32)
  draw = functools.partial(neftune.noise, dim=64, alpha=ALPHA)
  key = jax.random.fold_in(jax.random.key(3), 11)
  single = jax.jit(draw)(key, segments)
  mesh = sharding.make_mesh(MeshConfig(data=mesh_shape[0], model=mesh_shape[1]))
  out_sharding = NamedSharding(mesh, PartitionSpec("data", None, "model"))
  with jax.set_mesh(mesh):
    sharded = jax.jit(
      draw,
      in_shardings=(
        NamedSharding(mesh, PartitionSpec()),
        NamedSharding(mesh, PartitionSpec("data")),
      ),
      out_shardings=out_sharding,
    )(key, segments)
  assert sharded.sharding == out_sharding
  assert len(sharded.addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(sharded), np.asarray(single))
  assert np.count_nonzero(single) == np.count_nonzero(segments) * 64
