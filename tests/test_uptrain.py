"""GQA/MQA uptraining conversion: K/V heads mean-pooled in groups, checked against plain numpy."""

import dataclasses
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.config import load
from jaxtune.config_model import ModelConfig
from jaxtune.convert.uptrain import to_kv_heads
from jaxtune.errors import ConfigError
from jaxtune.model import transformer

MHA = ModelConfig(vocab_size=128, dim=64, num_layers=2, num_heads=8, mlp_dim=128, qkv_bias=True)
TOKENS_BT = np.random.default_rng(0).integers(0, 128, (2, 12))


@pytest.fixture(scope="module")
def mha():
  """Random MHA variables: weights and biases ~ N(0, 0.1), norm scales ~ N(1, 0.1)."""
  abstract = jax.eval_shape(transformer.init_fn(transformer.Transformer(MHA)), jax.random.key(0))
  rng = np.random.default_rng(1)

  def draw(path, x):
    mean = 1.0 if path[-1].key == "scale" else 0.0
    return mean + 0.1 * rng.standard_normal(x.shape, np.float32)

  return jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(abstract))


def _pooled_reference(x: np.ndarray, axis: int, kv_heads: int) -> np.ndarray:
  """New head j = mean of old heads j*G .. (j+1)*G - 1, one head at a time."""
  x = np.moveaxis(np.asarray(x, np.float64), axis, 0)
  g = x.shape[0] // kv_heads
  out = np.stack([sum(x[j * g + i] for i in range(g)) / g for j in range(kv_heads)])
  return np.moveaxis(out, 0, axis)


def test_same_number_of_heads_is_the_identity(mha):
  cfg, variables = to_kv_heads(MHA, mha, 8)
  assert cfg is MHA and variables is mha


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_mean_pooling_matches_numpy(mha, kv_heads):
  cfg, variables = to_kv_heads(MHA, mha, kv_heads)
  assert cfg == dataclasses.replace(MHA, num_kv_heads=kv_heads)
  before, after = mha["params"]["layers"]["attn"], variables["params"]["layers"]["attn"]
  for name in ("k", "v"):
    np.testing.assert_allclose(
      after[name]["kernel"],
      _pooled_reference(before[name]["kernel"], 2, kv_heads),
      rtol=1e-6,
      atol=1e-7,
    )
    np.testing.assert_allclose(
      after[name]["bias"],
      _pooled_reference(before[name]["bias"], 1, kv_heads),
      rtol=1e-6,
      atol=1e-7,
    )
    assert after[name]["kernel"].shape == (2, 64, kv_heads, 8)
  assert after["q"] is before["q"] and after["o"] is before["o"]
  assert variables["params"]["embed"] is mha["params"]["embed"]
  # Every layer of the converted tree is that of a freshly built model with the new config.
  abstract = jax.eval_shape(transformer.init_fn(transformer.Transformer(cfg)), jax.random.key(0))
  shapes = jax.tree.map(lambda x: x.shape, nn.meta.unbox(abstract))
  assert jax.tree.map(lambda x: x.shape, variables) == shapes


def test_pooling_in_steps_equals_pooling_at_once(mha):
  cfg_steps, steps = to_kv_heads(*to_kv_heads(MHA, mha, 4), 2)
  cfg_once, once = to_kv_heads(MHA, mha, 2)
  assert cfg_steps == cfg_once
  for a, b in zip(jax.tree.leaves(steps), jax.tree.leaves(once), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_groups_follow_the_attention_head_order(mha):
  """When the heads of each group are equal, pooling loses nothing: the logits do not change.

  This holds only if the pooled groups are the query groups attention uses (head n -> n // G).
  """
  kv_heads, g = 2, 4
  attn = dict(mha["params"]["layers"]["attn"])
  for name in ("k", "v"):
    kernel_ldkh = attn[name]["kernel"][:, :, ::g]  # One head per group, repeated.
    attn[name] = {
      "kernel": jnp.repeat(kernel_ldkh, g, axis=2),
      "bias": jnp.repeat(attn[name]["bias"][:, ::g], g, axis=1),
    }
  grouped = {"params": {**mha["params"], "layers": {**mha["params"]["layers"], "attn": attn}}}
  cfg, pooled = to_kv_heads(MHA, grouped, kv_heads)
  logits_mha = jax.jit(transformer.Transformer(MHA).apply)(grouped, TOKENS_BT)
  logits_gqa = jax.jit(transformer.Transformer(cfg).apply)(pooled, TOKENS_BT)
  np.testing.assert_allclose(logits_gqa, logits_mha, atol=1e-5)
  # Pooling other groups (heads j, j + 2, j + 4, j + 6) changes them.
  strided = {
    name: {key: x.reshape(*x.shape[:-2], g, kv_heads, 8).mean(-3) for key, x in attn[name].items()}
    for name in ("k", "v")
  }
  params = pooled["params"]
  wrong = {"params": {**params, "layers": {**params["layers"], "attn": attn | strided}}}
  logits_wrong = jax.jit(transformer.Transformer(cfg).apply)(wrong, TOKENS_BT)
  assert np.abs(logits_wrong - logits_mha).max() > 1e-2


def test_mqa_cache_is_num_heads_times_smaller(mha):
  cfg, variables = to_kv_heads(MHA, mha, 1)
  assert cfg.kv_heads == 1 and cfg.queries_per_kv == 8

  def kv_bytes(config):
    cache = transformer.init_cache(transformer.Transformer(config), batch=2, max_length=32)
    return sum(x.nbytes for x in jax.tree.leaves((cache["key"], cache["value"])))

  assert kv_bytes(MHA) == 8 * kv_bytes(cfg)
  logits_btv = jax.jit(transformer.Transformer(cfg).apply)(variables, TOKENS_BT)
  assert logits_btv.shape == (2, 12, 128) and np.isfinite(logits_btv).all()


@pytest.mark.parametrize("kv_heads, current", [(3, 8), (0, 8), (16, 8), (8, 4)])
def test_kv_heads_must_divide_the_current_number(mha, kv_heads, current):
  config = dataclasses.replace(MHA, num_kv_heads=current)
  with pytest.raises(ConfigError, match=f"cannot pool {current} KV heads into {kv_heads}"):
    to_kv_heads(config, mha, kv_heads)


def test_uptraining_config_loads():
  cfg = load(str(pathlib.Path(__file__).parents[1] / "configs" / "uptrain_gqa.yaml"))
  assert cfg.model.preset == "llama2-7b" and cfg.model.kv_heads == 8
  assert cfg.model.num_heads % cfg.model.kv_heads == 0
