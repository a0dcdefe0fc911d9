"""PEFT: LoRA, prefix and prompt tuning, adapter banks; against the base model and numpy."""

import contextlib
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtune import sharding
from jaxtune.config import MeshConfig, PeftConfig, load
from jaxtune.config_model import ModelConfig
from jaxtune.errors import ConfigError
from jaxtune.model import presets, transformer
from jaxtune.model.adapters import Adapters, Lora
from jaxtune.model.linear import Linear, Projection
from jaxtune.peft import lora, methods, partition, prefix
from jaxtune.train.sft import SFT
from jaxtune.train.step import TrainState, make_train_step

CFG = ModelConfig(
  vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64, max_seq_len=64
)
ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
LORA = PeftConfig(method="lora", lora_rank=4, lora_alpha=8.0, lora_targets=ALL_TARGETS)
PREFIX = PeftConfig(method="prefix", prefix_length=3, prefix_hidden=16)
PROMPT = PeftConfig(method="prompt", prompt_length=3)
TOKENS = jax.random.randint(jax.random.key(1), (2, 10), 1, 64)


def _init(model: transformer.Transformer, seed: int = 0) -> dict:
  return nn.meta.unbox(transformer.init_fn(model)(jax.random.key(seed))["params"])


@functools.cache
def _base() -> dict:
  return _init(transformer.Transformer(CFG))


def _with_random_adapters(peft: PeftConfig, seed: int = 0) -> dict:
  """The base params plus `peft`'s parameters, all drawn at random (LoRA's B too, so the update
  is not zero)."""
  trainable, _ = partition.split(_init(methods.model(CFG, peft), seed), methods.trains(peft))
  keys = iter(jax.random.split(jax.random.key(100 + seed), len(jax.tree.leaves(trainable))))
  trainable = jax.tree.map(lambda x: 0.3 * jax.random.normal(next(keys), x.shape), trainable)
  return partition.combine(trainable, _base())


def _logits(peft: PeftConfig | Adapters, params, tokens=TOKENS, segment_ids=None, **kwargs):
  """Logits of the model with `peft`'s adapters (a PeftConfig's, or the Adapters themselves)."""
  adapters = methods.adapters(peft) if isinstance(peft, PeftConfig) else peft
  model = transformer.Transformer(CFG, adapters)
  return model.apply({"params": params}, tokens, None, segment_ids, **kwargs)


BASE_LOGITS = functools.cache(lambda: _logits(PeftConfig(), _base()))


def _batch(tokens):
  """A training batch of unpacked rows: predict the next token everywhere."""
  ones = jnp.ones(tokens.shape, jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  return dict(
    inputs=tokens, targets=jnp.roll(tokens, -1, 1), weights=ones.astype(jnp.float32),
    segment_ids=ones, positions=positions,
  )  # fmt: skip


# LoRA.


def test_lora_at_init_equals_the_base_model():
  params = _init(methods.model(CFG, LORA))
  adapters, _ = partition.split(params, methods.trains(LORA))
  np.testing.assert_array_equal(_logits(LORA, partition.combine(adapters, _base())), BASE_LOGITS())


@pytest.mark.parametrize(
  "equation,shape,x_shape",
  [("btd,dnh->btnh", (6, 3, 4), (2, 5, 6)), ("btnh,nhd->btd", (3, 4, 6), (2, 5, 3, 4))],
  ids=["q", "o"],
)
def test_lora_projection_matches_numpy(equation, shape, x_shape):
  cfg = dataclasses.replace(CFG, dim=6)
  spec = Lora(rank=2, scale=1.5, dropout=0.0)
  names = (
    ("embed", "q_heads", "head_dim") if len(x_shape) == 3 else ("q_heads", "head_dim", "embed")
  )
  module = Linear(Projection(equation, shape, names, bias_axes=0), cfg, spec)
  x = jax.random.normal(jax.random.key(0), x_shape)
  params = nn.meta.unbox(module.init(jax.random.key(1), x)["params"])
  params["lora_b"] = jax.random.normal(jax.random.key(2), params["lora_b"].shape)
  got = module.apply({"params": params}, x)
  w, a, b = (np.asarray(params[k], np.float64) for k in ("kernel", "lora_a", "lora_b"))
  inputs = a.ndim - 1
  xf = np.asarray(x, np.float64).reshape(*x_shape[:2], -1)
  expected = xf @ w.reshape(xf.shape[-1], -1) + 1.5 * (xf @ a.reshape(-1, 2)) @ b.reshape(2, -1)
  np.testing.assert_allclose(got, expected.reshape(got.shape), atol=1e-5)
  fan_in = np.prod(shape[:inputs])
  assert np.abs(a).max() <= 1 / np.sqrt(fan_in), "A is uniform in +-1/sqrt(fan_in)"


def test_merged_equals_unmerged_and_unmerge_restores_the_base():
  params = _with_random_adapters(LORA)
  scale = methods.adapters(LORA).lora_scale
  merged = lora.merge(params, scale)
  assert partition.split(merged, methods.trains(LORA))[0] == {}, "no adapters left after merging"
  np.testing.assert_allclose(_logits(PeftConfig(), merged), _logits(LORA, params), atol=2e-5)
  adapters, _ = partition.split(params, methods.trains(LORA))
  restored = lora.unmerge(merged, adapters, scale)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), restored, params)


def test_a_step_changes_only_the_adapters_and_only_they_have_optimizer_state():
  model = methods.model(CFG, LORA)
  params = _init(model)
  trainable, frozen = partition.split(params, methods.trains(LORA))
  optimizer = optax.adamw(1e-2)
  state = TrainState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable))
  mu = state.opt_state[0].mu
  assert jax.tree.structure(mu) == jax.tree.structure(trainable)
  assert partition.count(state.opt_state) == 2 * partition.count(trainable) + 1  # mu, nu, count.
  new_state, metrics = jax.jit(make_train_step(SFT(model), optimizer, jax.random.key(0)))(
    state, frozen, _batch(TOKENS)
  )
  assert bool(metrics["finite"])
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new_state.params, state.params)
  assert all(jax.tree.leaves(changed)), "every adapter array trains (B from zero, then A)"
  assert jax.tree.structure(new_state.params) == jax.tree.structure(trainable)


@pytest.mark.parametrize(
  "preset,peft,expected",
  [
    ("llama2-7b", PeftConfig(method="lora", lora_rank=8, lora_targets=("q", "v")), 4_194_304),
    # Prefix sized to the KV heads: L * 2 * P * K * H.
    (
      "llama2-7b",
      PeftConfig(method="prefix", prefix_length=10, prefix_hidden=0),
      32 * 2 * 10 * 32 * 128,
    ),
    (
      "llama3-8b",
      PeftConfig(method="prefix", prefix_length=10, prefix_hidden=0),
      32 * 2 * 10 * 8 * 128,
    ),
    ("llama2-7b", PeftConfig(method="prompt", prompt_length=20), 20 * 4096),
  ],
  ids=["llama2-lora-qv-r8", "llama2-prefix", "llama3-gqa-prefix", "llama2-prompt"],
)
def test_trainable_counts_are_exact(preset, peft, expected):
  model = methods.model(ModelConfig(**presets.PRESETS[preset]), peft)
  abstract = jax.eval_shape(transformer.init_fn(model), jax.random.key(0))["params"]
  trainable, frozen = partition.split(nn.meta.unbox(abstract), methods.trains(peft))
  assert partition.count(trainable) == expected
  published = {"llama2-7b": 6_738_415_616, "llama3-8b": 8_030_261_248}[preset]
  assert partition.count(frozen) == published


# Prefix and prompt tuning.


def test_prefix_of_length_zero_equals_the_base_model():
  params = _init(methods.model(CFG, dataclasses.replace(PREFIX, prefix_length=0)))
  np.testing.assert_array_equal(
    _logits(dataclasses.replace(PREFIX, prefix_length=0), params), BASE_LOGITS()
  )


def test_prefix_through_the_mlp_equals_the_collapsed_prefix():
  params = _with_random_adapters(PREFIX)
  collapsed, adapters = prefix.collapse(params, methods.adapters(PREFIX))
  assert adapters.prefix_hidden == 0 and set(collapsed["prefix"]) == {"key", "value"}
  np.testing.assert_allclose(_logits(adapters, collapsed), _logits(PREFIX, params), atol=1e-5)


@pytest.mark.parametrize("hidden", [0, 16], ids=["plain", "mlp"])
def test_prefix_from_real_tokens_equals_running_them_first(hidden):
  """A prefix initialized from the activations of real tokens u makes the model on x compute
  what the base model computes on u followed by x (Li and Liang's initialization)."""
  peft = dataclasses.replace(PREFIX, prefix_hidden=hidden)
  params = _with_random_adapters(peft)
  u = [5, 9, 13]
  init = prefix.init_from_text(transformer.Transformer(CFG), _base(), params["prefix"], u)
  joined = jnp.concatenate([jnp.broadcast_to(jnp.asarray(u), (2, 3)), TOKENS], axis=1)
  expected = _logits(PeftConfig(), _base(), joined)[:, 3:]
  np.testing.assert_allclose(_logits(peft, dict(params, prefix=init)), expected, atol=1e-4)


def test_prompt_from_real_tokens_equals_running_them_first():
  params = _with_random_adapters(PROMPT)
  u = [5, 9, 13]
  params["prompt"] = prefix.init_prompt_from_text(CFG, params, u, 3)
  joined = jnp.concatenate([jnp.broadcast_to(jnp.asarray(u), (2, 3)), TOKENS], axis=1)
  expected = _logits(PeftConfig(), _base(), joined)[:, 3:]
  np.testing.assert_allclose(_logits(PROMPT, params), expected, atol=1e-5)


def test_prompt_equals_its_prefix():
  params = _with_random_adapters(PROMPT)
  model, converted = prefix.for_decoding(methods.model(CFG, PROMPT), params)
  assert model.adapters == Adapters(prefix_length=PROMPT.prompt_length)  # A prefix, no prompt.
  assert "prompt" not in converted
  np.testing.assert_allclose(_logits(model.adapters, converted), _logits(PROMPT, params), atol=1e-5)


@pytest.mark.parametrize("peft", [LORA, PREFIX, PROMPT], ids=["lora", "prefix", "prompt"])
def test_each_packed_segment_sees_the_adapter(peft):
  params = _with_random_adapters(peft)
  a, b = TOKENS[0, :6], TOKENS[1, :3]
  packed = jnp.concatenate([a, b, jnp.zeros(1, jnp.int32)])[None]
  segments = jnp.asarray([[1] * 6 + [2] * 3 + [0]])
  got = _logits(peft, params, packed, segments)[0]
  np.testing.assert_allclose(got[:6], _logits(peft, params, a[None])[0], atol=1e-5)
  np.testing.assert_allclose(got[6:9], _logits(peft, params, b[None])[0], atol=1e-5)


def _decode(model, params, tokens, prefill: int, adapter_ids=None):
  """Logits of a prefill of `prefill` tokens, then one token at a time, through the KV cache."""
  b, t = tokens.shape
  ids = {} if adapter_ids is None else {"adapter_ids": adapter_ids}
  cache = transformer.init_cache(model, b, t)
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  out = []
  for start, stop in [(0, prefill), *((i, i + 1) for i in range(prefill, t))]:
    logits, mutated = model.apply(
      {"params": params, "cache": cache},
      tokens[:, start:stop],
      positions[:, start:stop],
      decode=True,
      mutable=["cache"],
      **ids,
    )
    cache = mutated["cache"]
    out.append(logits)
  return jnp.concatenate(out, axis=1)


@pytest.mark.parametrize("peft", [LORA, PREFIX, PROMPT], ids=["lora", "prefix", "prompt"])
def test_kv_cache_decoding_equals_the_full_forward_pass(peft):
  params = _with_random_adapters(peft)
  full = _logits(peft, params)
  model, params = prefix.for_decoding(methods.model(CFG, peft), params)
  np.testing.assert_allclose(_decode(model, params, TOKENS, prefill=6), full, atol=1e-5)


# Adapter banks: one adapter per row.


def _bank(peft: PeftConfig, count: int = 3):
  """(the adapters each decodes with, the bank's params, each adapter's own params) for `count`
  random adapters."""
  singles = [
    prefix.for_decoding(methods.model(CFG, peft), _with_random_adapters(peft, s))
    for s in range(count)
  ]
  adapters = singles[0][0].adapters
  bank = partition.stack([partition.split(p, methods.trains(peft))[0] for _, p in singles])
  return adapters, partition.combine(bank, _base()), [p for _, p in singles]


@pytest.mark.parametrize("peft", [LORA, PREFIX], ids=["lora", "prefix"])
def test_a_mixed_batch_of_adapters_equals_each_row_alone(peft):
  adapters, bank, singles = _bank(peft)
  ids = jnp.asarray([2, 0, 1, 2])
  tokens = jax.random.randint(jax.random.key(3), (4, 9), 1, 64)
  model = transformer.Transformer(CFG, dataclasses.replace(adapters, bank=3))
  mixed = model.apply({"params": bank}, tokens, adapter_ids=ids)
  decoded = _decode(model, bank, tokens, prefill=5, adapter_ids=ids)
  for row, adapter in enumerate(ids.tolist()):
    alone = _logits(adapters, singles[adapter], tokens[row : row + 1])
    np.testing.assert_allclose(mixed[row : row + 1], alone, atol=1e-5, err_msg=f"row {row}")
    np.testing.assert_allclose(decoded[row : row + 1], alone, atol=1e-5, err_msg=f"row {row}")


# Every mesh.


@functools.cache
def _single_device_reference():
  return _peft_results(None)


def _peft_results(mesh_shape):
  """LoRA: the loss and adapters after one step; a bank of prefixes: its logits."""
  results = {}
  cases = {"lora": (LORA, 0), "prefix_bank": (dataclasses.replace(PREFIX, prefix_hidden=0), 3)}
  for name, (peft, adapters) in cases.items():
    model = transformer.Transformer(CFG, dataclasses.replace(methods.adapters(peft), bank=adapters))
    if mesh_shape is None:
      params = _init(model)
      mesh, rules = None, ()
    else:
      mesh = sharding.make_mesh(MeshConfig(data=mesh_shape[0], model=mesh_shape[1]))
      sharded = sharding.init_sharded(transformer.init_fn(model), jax.random.key(0), mesh, "fsdp")
      params, rules = sharded.variables["params"], sharded.rules
      if peft.method == "lora" and not adapters:  # The rules shard adapters like their kernels.
        q = nn.get_partition_spec(jax.eval_shape(transformer.init_fn(model), jax.random.key(0)))
        q = q["params"]["layers"]["attn"]["q"]
        assert q["lora_a"][:2] == q["kernel"][:2] and q["lora_b"][2:] == q["kernel"][2:]
    ids = jnp.asarray([2, 0, 1, 2]) if adapters else None
    tokens = jax.random.randint(jax.random.key(3), (4, 8), 1, 64)
    with sharding.use(mesh, rules) if mesh else contextlib.nullcontext():
      trainable, frozen = partition.split(params, methods.trains(peft))
      # B != 0 so the adapters matter.
      trainable = jax.tree.map(lambda x: x + 0.1, trainable)
      if name == "lora":
        # SGD: Adam's update g / (|g| + eps) would turn float-level differences of gradients
        # near eps into differences of the parameters as large as the learning rate.
        optimizer = optax.sgd(1.0)
        state = TrainState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable))
        state, metrics = jax.jit(make_train_step(SFT(model), optimizer, jax.random.key(0)))(
          state, frozen, _batch(tokens)
        )
        results[name] = (float(metrics["loss"]), jax.device_get(state.params))
      else:
        apply = functools.partial(model.apply, deterministic=True)
        logits = jax.jit(apply)(
          {"params": partition.combine(trainable, frozen)}, tokens, adapter_ids=ids
        )
        results[name] = jax.device_get(logits)
  return results


# A model axis of 8 (every head split) and one split both ways; test_sharding covers the rest.
@pytest.mark.parametrize("mesh_shape", [(1, 8), (4, 2)], ids=str)
def test_peft_on_two_meshes_equals_single_device(mesh_shape):
  expected = _single_device_reference()
  got = _peft_results(mesh_shape)
  np.testing.assert_allclose(got["lora"][0], expected["lora"][0], rtol=1e-5)
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), got["lora"][1], expected["lora"][1]
  )
  np.testing.assert_allclose(got["prefix_bank"], expected["prefix_bank"], atol=1e-5)


# Configuration.


@pytest.mark.parametrize(
  "override,message",
  [
    ("peft.lora_targets=q,wq", "choose among"),
    ("peft.lora_rank=0", "lora_rank"),
    ("peft.method=ia3", "must be one of"),
    ("peft.prefix_length=-1", "prefix_length"),
  ],
)
def test_bad_peft_config_is_an_error_naming_the_key(override, message):
  with pytest.raises(ConfigError, match=message):
    load(None, [override])
