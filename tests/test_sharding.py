"""Sharding: the mesh, the rules, and sharded logits equal to single-device logits."""

import dataclasses
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import sharding
from jaxtune.config import MeshConfig
from jaxtune.config_model import ModelConfig
from jaxtune.errors import ShardingError
from jaxtune.model import attention, presets, transformer

MESHES = [(1, 8), (2, 4), (4, 2), (8, 1)]
BASE = ModelConfig(vocab_size=256, dim=64, num_layers=2, num_heads=8, mlp_dim=128, max_seq_len=64)
# GPT-2's layout (biases, LayerNorm, learned positions, tied embeddings) with a vocabulary and a
# head count that divide no mesh axis of 8 devices: 1001 = 7 x 11 x 13 tokens, 12 heads.
GPT2_LIKE = ModelConfig(
  **{
    **presets.PRESETS["gpt2"],
    **dict(vocab_size=1001, dim=96, num_layers=2, mlp_dim=384, max_seq_len=64),
  }
)
CONFIGS = {
  "mha": BASE,
  "gqa": dataclasses.replace(BASE, num_kv_heads=2),
  "mqa": dataclasses.replace(BASE, num_kv_heads=1),
  "gpt2": GPT2_LIKE,
}
# The meshes each kind's logits are checked on: between them every mesh, each with heads that
# divide the model axis and heads that do not (KV heads replicated: GQA's 2 on 4, MQA's 1 on 8).
LOGITS_MESHES = {
  "mha": [(1, 8), (8, 1)],
  "gqa": [(2, 4), (4, 2)],
  "mqa": [(1, 8), (4, 2)],
  "gpt2": [(2, 4), (8, 1)],
}


def test_eight_devices_are_emulated():
  assert jax.device_count() == 8


@pytest.mark.parametrize(
  "data, model, shape",
  [
    (-1, 1, (8, 1)),
    (-1, 2, (4, 2)),
    (2, -1, (2, 4)),
    (1, 8, (1, 8)),
  ],
)
def test_make_mesh_fills_minus_one(data, model, shape):
  mesh = sharding.make_mesh(MeshConfig(data=data, model=model))
  assert (mesh.shape["data"], mesh.shape["model"]) == shape


@pytest.mark.parametrize(
  "data, model, message",
  [
    (3, 2, "mesh.data=3 x mesh.model=2 = 6 devices, but 8 are available"),
    (-1, 3, "mesh.model=3 does not divide the 8 available devices"),
    (16, -1, "mesh.data=16 does not divide the 8 available devices"),
  ],
)
def test_mesh_that_does_not_fit_is_an_error(data, model, message):
  with pytest.raises(ShardingError, match=message.replace(".", r"\.")):
    sharding.make_mesh(MeshConfig(data=data, model=model))


def _abstract(cfg):
  return jax.eval_shape(transformer.init_fn(transformer.Transformer(cfg)), jax.random.key(0))


def test_mqa_kv_heads_are_replicated_loudly(caplog):
  mesh = sharding.make_mesh(MeshConfig(data=1, model=8))
  with caplog.at_level(logging.WARNING):
    rules = dict(
      sharding.resolve_rules("tp", mesh, _abstract(dataclasses.replace(BASE, num_kv_heads=1)))
    )
  assert rules["kv_heads"] is None and rules["act_kv_heads"] is None
  assert rules["q_heads"] == "model"
  assert "'kv_heads' (size 1) does not divide mesh axis 'model' (size 8): replicated" in caplog.text


def test_fsdp_shards_every_weight_matrix_over_both_axes():
  mesh = sharding.make_mesh(MeshConfig(data=2, model=4))
  abstract = _abstract(BASE)
  rules = sharding.resolve_rules("fsdp", mesh, abstract)
  specs = nn.meta.unbox(sharding.variable_shardings(abstract, mesh, rules, "fsdp"))
  q = specs["params"]["layers"]["attn"]["q"]["kernel"].spec
  assert tuple(q) == (None, "data", "model", None)
  tp_rules = sharding.resolve_rules("tp", mesh, abstract)
  tp_specs = sharding.variable_shardings(abstract, mesh, tp_rules, "tp")
  tp_q = tp_specs["params"]["layers"]["attn"]["q"]["kernel"]
  assert tuple(tp_q.spec) == (None, None, "model", None)


@pytest.mark.parametrize("kind", ["gpt2", "mqa"])
@pytest.mark.parametrize("data, model", MESHES)
def test_fsdp_stores_one_eighth_of_every_weight(kind, data, model):
  """Where the rules must replicate an axis (GPT-2's vocabulary and heads, MQA's one KV head),
  fsdp still stores 1/8 of every weight per device, never splitting the layer stack; tp keeps the
  rules' replication."""
  mesh = sharding.make_mesh(MeshConfig(data=data, model=model))
  abstract = _abstract(CONFIGS[kind])
  boxes = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  total = sum(int(np.prod(box.value.shape)) for box in boxes)
  stored = {}
  for strategy in ("fsdp", "tp"):
    rules = sharding.resolve_rules(strategy, mesh, abstract)
    shardings = jax.tree.leaves(sharding.variable_shardings(abstract, mesh, rules, strategy))
    stored[strategy] = 0
    for box, sharded in zip(boxes, shardings, strict=True):
      shard = sharded.shard_shape(box.value.shape)
      stored[strategy] += int(np.prod(shard))
      for name, size, size_of_shard in zip(box.names, box.value.shape, shard, strict=True):
        assert name != "layers" or size_of_shard == size
  assert stored["fsdp"] * 8 == total
  if data == 1:  # Without a data axis, tp stores more only through the rules' replication.
    assert stored["tp"] * 8 > total


def test_unknown_logical_names_are_errors():
  box = nn.Partitioned(jax.ShapeDtypeStruct((4, 4), jnp.float32), ("embed", "heads_typo"))
  mesh = sharding.make_mesh(MeshConfig())
  with pytest.raises(ShardingError, match="heads_typo"):
    sharding.resolve_rules("tp", mesh, {"w": box})
  from jaxtune.model.layers import constrain

  with pytest.raises(ValueError, match="act_typo"):
    constrain(jnp.zeros(3), ("act_typo",))


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_every_logical_name_of_every_preset_has_a_rule(name):
  cfg = ModelConfig(**presets.PRESETS[name])
  names = set()
  for box in jax.tree.leaves(_abstract(cfg), is_leaf=lambda x: isinstance(x, nn.Partitioned)):
    names.update(box.names)
  assert names <= sharding.LOGICAL_NAMES


def test_batch_must_divide_the_data_axis():
  mesh = sharding.make_mesh(MeshConfig(data=4, model=2))
  sharding.check_batch(8, mesh)
  with pytest.raises(ShardingError, match="batch size 6"):
    sharding.check_batch(6, mesh)


@pytest.mark.parametrize("kind", CONFIGS)
def test_sharded_logits_equal_single_device(kind):
  cfg = CONFIGS[kind]
  model = transformer.Transformer(cfg)
  init = transformer.init_fn(model)
  reference_vars = nn.meta.unbox(jax.jit(init)(jax.random.key(0)))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 16)), jnp.int32)
  segments = jnp.asarray(np.repeat([[1] * 9 + [2] * 5 + [0] * 2], 8, axis=0), jnp.int32)
  positions = attention.segment_positions(segments)
  reference = jax.jit(model.apply)(reference_vars, tokens, positions, segments)

  for data, model_axis in LOGITS_MESHES[kind]:
    mesh = sharding.make_mesh(MeshConfig(data=data, model=model_axis))
    # GPT-2's shapes divide no mesh axis: tp replicates them as in the other cases; what is
    # particular to it is fsdp's storage (to keep the suite's time down, only that is run).
    for strategy in ("fsdp",) if kind == "gpt2" else ("tp", "fsdp"):
      sharded = sharding.init_sharded(init, jax.random.key(0), mesh, strategy)
      # Abstract-first init writes the same values, straight into shards.
      jax.tree.map(np.testing.assert_array_equal, sharded.variables, reference_vars)
      batch = sharding.logical_sharding(mesh, sharded.rules, ("act_batch", "act_seq"))
      with sharding.use(mesh, sharded.rules):
        logits = jax.jit(model.apply, in_shardings=(sharded.shardings, batch, batch, batch))(
          sharded.variables, tokens, positions, segments
        )
      expected = sharding.logical_sharding(
        mesh, sharded.rules, ("act_batch", "act_seq", "act_vocab")
      )
      assert logits.sharding.is_equivalent_to(expected, 3), (logits.sharding, expected)
      np.testing.assert_allclose(
        logits, reference, atol=2e-5, rtol=1e-5, err_msg=f"{data}x{model_axis} {strategy}"
      )
