"""The decoder: packing, KV-cache decoding, variants, remat and dropout."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import generate
from jaxtune.config_model import ModelConfig
from jaxtune.model import transformer

BASE = ModelConfig(vocab_size=256, dim=64, num_layers=2, num_heads=8, mlp_dim=128, max_seq_len=64)
VARIANTS = {
  "mha": BASE,
  "gqa": dataclasses.replace(BASE, num_kv_heads=2),
  "mqa": dataclasses.replace(BASE, num_kv_heads=1),
  "palm": dataclasses.replace(
    BASE, num_kv_heads=1, parallel_block=True, norm="layernorm", scale_tied_logits=True
  ),
  "gpt2": dataclasses.replace(
    BASE, mlp="gelu", norm="layernorm", use_bias=True, position="learned"
  ),
  "gemma": dataclasses.replace(
    BASE, num_kv_heads=1, head_dim=16, mlp="geglu", scale_embeddings=True
  ),
  "qwen2": dataclasses.replace(BASE, num_kv_heads=2, qkv_bias=True, tie_embeddings=False),
}


def _init(cfg, seed=0):
  model = transformer.Transformer(cfg)
  variables = nn.meta.unbox(jax.jit(transformer.init_fn(model))(jax.random.key(seed)))
  # Random non-trivial biases and norms so that every parameter matters.
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [
    x + 0.05 * np.asarray(jax.random.normal(k, x.shape)) for x, k in zip(leaves, keys, strict=True)
  ]
  return model, jax.tree.unflatten(tree, leaves)


@functools.cache
def _jit(model):
  """model.apply, compiled once per model (several times faster than eager on CPU)."""
  return jax.jit(model.apply, static_argnames=("deterministic",))


def _tokens(b, t, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (b, t)), jnp.int32)


@pytest.mark.parametrize("name", VARIANTS)
def test_packed_rows_equal_examples_alone(name):
  model, variables = _init(VARIANTS[name])
  lengths = [5, 7, 3]
  tokens = _tokens(1, 17)
  segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(2)])
  packed = _jit(model)(variables, tokens, segment_ids_bt=jnp.asarray(segments[None], jnp.int32))
  start = 0
  for n in lengths:
    alone = _jit(model)(variables, tokens[:, start : start + n])
    np.testing.assert_allclose(packed[:, start : start + n], alone, atol=2e-5, rtol=1e-5)
    start += n


@pytest.mark.parametrize("name", VARIANTS)
def test_kv_cache_decoding_equals_full_forward(name):
  cfg = VARIANTS[name]
  model, variables = _init(cfg)
  b, t, prompt = 2, 12, 5
  tokens = _tokens(b, t, seed=3)
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  full = _jit(model)(variables, tokens)

  cache = transformer.init_cache(model, b, max_length=16)
  step = jax.jit(
    lambda c, x, p: model.apply({**variables, "cache": c}, x, p, decode=True, mutable=["cache"])
  )
  logits, mutated = step(cache, tokens[:, :prompt], positions[:, :prompt])
  np.testing.assert_allclose(logits, full[:, :prompt], atol=1e-5, rtol=1e-5)
  for i in range(prompt, t):
    logits, mutated = step(mutated["cache"], tokens[:, i : i + 1], positions[:, i : i + 1])
    np.testing.assert_allclose(logits[:, 0], full[:, i], atol=1e-5, rtol=1e-5)


def test_cache_is_sized_by_kv_heads():
  for name, kv in [("mha", 8), ("gqa", 2), ("mqa", 1)]:
    model = transformer.Transformer(VARIANTS[name])
    cache = transformer.init_cache(model, batch=3, max_length=16)
    heads = (kv,) if kv > 1 else ()  # One KV head: no heads' axis.
    for name in ("key", "value"):  # One array per layer.
      assert [x.shape for x in cache[name]] == [(3, *heads, 16, 8)] * 2


def test_decoding_loop_reads_the_cache_in_place():
  """The engine's decode loop (MQA), state donated, returns the cache in the donated buffers and
  holds less than one layer's keys in temporaries (the weights split by layer, once, included):
  no copy of a layer's cache at each step (scanned layers sliced each one out; MQA's size-1
  KV-heads axis made XLA copy it 4 times a step)."""
  cfg = dataclasses.replace(
    BASE, dim=128, num_heads=2, num_kv_heads=1, num_layers=4, max_seq_len=512
  )
  model = transformer.Transformer(cfg)
  params = nn.meta.unbox(jax.eval_shape(transformer.init_fn(model), jax.random.key(0)))["params"]
  prefill, decode = generate._compiled(model, generate.Sampling(max_new_tokens=8), ())
  b, t = 32, 504
  ids = jax.ShapeDtypeStruct((b, t), jnp.int32)
  state = jax.eval_shape(
    lambda p, x, r: prefill(p, x, x, x, r, np.uint32(0), None, cache_len=t + 7, samples=1),
    params,
    ids,
    jax.ShapeDtypeStruct((b,), jnp.int32),
  )
  keys = state.cache["key"]
  layer_bytes = keys[0].size * keys[0].dtype.itemsize
  kv_bytes = 2 * cfg.num_layers * layer_bytes
  memory = decode.lower(params, state, np.int32(8)).compile().memory_analysis()
  assert memory.alias_size_in_bytes >= kv_bytes
  assert memory.temp_size_in_bytes < layer_bytes, (memory.temp_size_in_bytes, layer_bytes)


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch", "minimal"])
def test_remat_keeps_logits_and_gradients(remat):
  cfg = VARIANTS["gqa"]
  model, variables = _init(cfg)
  rematted = transformer.Transformer(dataclasses.replace(cfg, remat=remat))
  tokens = _tokens(2, 9)

  def loss(m):
    return lambda v: jnp.mean(jax.nn.log_softmax(m.apply(v, tokens))[..., 0])

  np.testing.assert_allclose(
    _jit(rematted)(variables, tokens), _jit(model)(variables, tokens), atol=1e-6
  )
  g0, g1 = jax.jit(jax.grad(loss(model)))(variables), jax.jit(jax.grad(loss(rematted)))(variables)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g0, g1)


def test_residual_dropout_is_seeded_and_off_when_deterministic():
  cfg = dataclasses.replace(VARIANTS["gqa"], residual_dropout=0.3)
  model, variables = _init(cfg)
  tokens = _tokens(2, 9)
  clean = _jit(model)(variables, tokens)
  np.testing.assert_array_equal(clean, _jit(_init(VARIANTS["gqa"])[0])(variables, tokens))

  def noisy(seed):
    return _jit(model)(
      variables, tokens, deterministic=False, rngs={"dropout": jax.random.key(seed)}
    )

  np.testing.assert_array_equal(noisy(1), noisy(1))
  assert not np.allclose(noisy(1), noisy(2))
  assert not np.allclose(noisy(1), clean)


def test_linear_dropout_schedule_leaves_the_bottom_layer_alone():
  # One layer with the linear schedule has rate 0 at its (only, bottom) layer... unless L == 1,
  # where the schedule is the top rate; with two layers the bottom is 0 and the top is the rate.
  cfg = dataclasses.replace(
    VARIANTS["gqa"], num_layers=2, residual_dropout=0.5, residual_dropout_schedule="linear"
  )
  assert cfg.layer_dropout_rates == (0.0, 0.5)
  model, variables = _init(cfg)
  tokens = _tokens(1, 6)
  out = _jit(model)(variables, tokens, deterministic=False, rngs={"dropout": jax.random.key(0)})
  assert not np.allclose(out, _jit(model)(variables, tokens))


def test_bfloat16_compute_keeps_float32_params():
  cfg = dataclasses.replace(VARIANTS["gqa"], dtype="bfloat16")
  model, variables = _init(cfg)
  tokens = _tokens(2, 9)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  out = _jit(model)(variables, tokens)
  ref = _jit(transformer.Transformer(VARIANTS["gqa"]))(variables, tokens)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, atol=0.1)
  assert np.mean(np.argmax(out, -1) == np.argmax(ref, -1)) > 0.8


def test_variants_have_the_expected_parameters():
  def names(cfg):
    shapes = jax.eval_shape(transformer.init_fn(transformer.Transformer(cfg)), jax.random.key(0))
    shapes = nn.meta.unbox(shapes)
    return {
      "/".join(k.key for k in path)
      for path, _ in jax.tree_util.tree_flatten_with_path(shapes["params"])[0]
    }

  assert "layers/norm/scale" in names(VARIANTS["palm"])
  assert "layers/attn_norm/scale" not in names(VARIANTS["palm"])
  assert "position/embedding" in names(VARIANTS["gpt2"])
  assert "layers/attn/o/bias" in names(VARIANTS["gpt2"])
  assert {"layers/attn/q/bias", "lm_head/embedding"} <= names(VARIANTS["qwen2"])
  assert "layers/attn/o/bias" not in names(VARIANTS["qwen2"])
  assert not any("bias" in n for n in names(VARIANTS["gqa"]))


def test_growing_the_vocabulary_keeps_old_logits():
  cfg = VARIANTS["qwen2"]  # Untied: the embedding and the output layer both grow.
  model, variables = _init(cfg)
  grown = transformer.grow_vocab(variables["params"], cfg.vocab_size + 3)
  bigger = transformer.Transformer(dataclasses.replace(cfg, vocab_size=cfg.vocab_size + 3))
  tokens = _tokens(2, 7)
  old = _jit(model)(variables, tokens)
  new = _jit(bigger)({"params": grown}, tokens)
  np.testing.assert_allclose(new[..., : cfg.vocab_size], old, atol=1e-6)
  np.testing.assert_allclose(
    grown["embed"]["embedding"][-1],
    np.mean(variables["params"]["embed"]["embedding"], 0),
    atol=1e-6,
  )
