"""BitNet on a `model` axis of 8: group quantization adds no collective to the compiled train
step (counted in its HLO, against `dense` and ungrouped scales), and the sharded model computes
what one device computes with the same groups."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import config, sharding
from jaxtune.config import MeshConfig, ModelConfig
from jaxtune.errors import ConfigError
from jaxtune.model import attention, transformer
from jaxtune.train import loop

_MODEL = dict(vocab_size=64, dim=64, num_layers=1, num_heads=8, mlp_dim=128, max_seq_len=32)
_ROWS, _LENGTH = 8, 32


def _all_reduces(linear: str, groups: int) -> int:
  overrides = [f"model.{k}={v}" for k, v in _MODEL.items()] + [
    f"model.linear={linear}",
    f"model.sub_norm={linear != 'dense'}",
    f"model.bitnet_groups={groups}",
    "model.mlp=relu2",
    "mesh.data=1",
    "mesh.model=8",
    f"train.batch_size={_ROWS}",
    f"data.max_length={_LENGTH}",
  ]
  cfg = config.load(None, overrides)
  t = loop.build(cfg, sharding.make_mesh(cfg.mesh), steps=1, shapes_only=True)
  batch = {
    k: jax.ShapeDtypeStruct((_ROWS, _LENGTH), dtype, sharding=t.batch_sharding)
    for k, dtype in [
      ("inputs", jnp.int32),
      ("targets", jnp.int32),
      ("weights", jnp.float32),
      ("segment_ids", jnp.int32),
      ("positions", jnp.int32),
    ]
  }
  hlo = t.train_step.lower(t.state, t.frozen, batch).compile().as_text()
  return sum(hlo.count(op) for op in (" all-reduce(", " all-reduce-start("))


def test_grouped_scales_add_no_collective_on_a_model_axis_of_8():
  dense = _all_reduces("dense", 8)  # (No BitNet scale: its groups change nothing.)
  ungrouped = _all_reduces("bitnet158", 1)
  grouped = _all_reduces("bitnet158", 8)
  assert ungrouped > dense, (dense, ungrouped)  # Whole-weight means, sub-norms: all-reduces.
  assert grouped == dense, (dense, grouped)


def test_sharded_bitnet_logits_equal_one_device_with_the_same_groups():
  cfg = ModelConfig(
    **_MODEL, linear="bitnet158", sub_norm=True, mlp="relu2", num_kv_heads=8, bitnet_groups=8
  )
  model = transformer.Transformer(cfg)
  init = transformer.init_fn(model)
  variables = nn.meta.unbox(jax.jit(init)(jax.random.key(0)))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (8, 16)), jnp.int32)
  segments = jnp.ones((8, 16), jnp.int32)
  positions = attention.segment_positions(segments)
  reference = jax.jit(model.apply)(variables, tokens, positions, segments)

  mesh = sharding.make_mesh(MeshConfig(data=1, model=8))
  sharded = sharding.init_sharded(init, jax.random.key(0), mesh, "tp")
  batch = sharding.logical_sharding(mesh, sharded.rules, ("act_batch", "act_seq"))
  with sharding.use(mesh, sharded.rules):
    logits = jax.jit(model.apply, in_shardings=(sharded.shardings, batch, batch, batch))(
      sharded.variables, tokens, positions, segments
    )
  # The sums of sharded products run in another order: an activation (or a 1-bit weight) that
  # lands within an ulp of a rounding boundary may take the neighbouring level, moving that
  # token's logits by about one quantization step (~1e-3), never more.
  diff = np.abs(np.asarray(logits) - np.asarray(reference))
  assert np.mean(diff <= 2e-5 + 1e-5 * np.abs(np.asarray(reference))) > 0.98
  assert diff.max() < 2e-3


def test_default_groups_are_the_model_axis_and_must_divide():
  overrides = [f"model.{k}={v}" for k, v in _MODEL.items()] + ["model.linear=bitnet158"]
  mesh = sharding.make_mesh(MeshConfig(data=2, model=4))
  resolved = loop._with_bitnet_groups(config.load(None, overrides), mesh)
  assert resolved.model.bitnet_groups == 4
  dense = config.load(None, [f"model.{k}={v}" for k, v in _MODEL.items()])
  assert loop._with_bitnet_groups(dense, mesh) == dense  # Nothing to group.
  odd = config.load(None, [*overrides, "model.mlp_dim=130"])
  with pytest.raises(ConfigError, match=r"bitnet_groups=4 does not divide model.mlp_dim=130 \(0:"):
    loop._with_bitnet_groups(odd, mesh)
