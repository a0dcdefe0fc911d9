"""BitNet on a `model` axis of 8: group quantization adds no collective to the compiled train
step (counted in its HLO, against `dense` and ungrouped scales), also under fsdp on 2 x 4 (whose
layers add collectives on `data` only), and the sharded model computes what one device computes
with the same groups."""

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import config, sharding
from jaxtune.config import MeshConfig
from jaxtune.config_model import ModelConfig
from jaxtune.errors import ConfigError
from jaxtune.model import attention, transformer
from jaxtune.train import loop

_MODEL = dict(vocab_size=64, dim=64, num_layers=1, num_heads=8, mlp_dim=128, max_seq_len=32)
_ROWS, _LENGTH = 8, 32


def _compiled_step(linear: str, groups: int, data: int = 1, strategy: str = "tp") -> str:
  """The HLO of the compiled train step on a data x (8 / data) mesh, traced under the rules as
  `loop.run` traces it (the activations' logical constraints in force)."""
  overrides = [f"model.{k}={v}" for k, v in _MODEL.items()] + [
    f"model.linear={linear}",
    f"model.sub_norm={linear != 'dense'}",
    f"model.bitnet_groups={groups}",
    "model.mlp=relu2",
    f"mesh.data={data}",
    f"mesh.model={8 // data}",
    f"mesh.strategy={strategy}",
    f"train.batch_size={_ROWS}",
    f"data.max_length={_LENGTH}",
  ]
  cfg = config.load(None, overrides)
  mesh = sharding.make_mesh(cfg.mesh)
  t = loop.build(cfg, mesh, steps=1, shapes_only=True)
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
  with sharding.use(mesh, t.rules):
    return t.train_step.lower(t.state, t.frozen, batch).compile().as_text()


def _all_reduces(hlo: str) -> list[str]:
  return [line for line in hlo.splitlines() if re.search(r" all-reduce(-start)?\(", line)]


def _iota(dims: str, perm: str | None) -> np.ndarray:
  shape = [int(d) for d in dims.split(",")]
  ids = np.arange(math.prod(shape)).reshape(shape)
  return ids.transpose([int(a) for a in perm.split(",")]) if perm else ids


def _replica_groups(line: str) -> list[set[int]]:
  """The device groups of an all-reduce, in each form XLA prints: explicit `{{0,4},...}`, iota
  `[2,4]<=[8]`, or `mesh[sizes], device_ids=(iota) {reduced axes}`."""
  head = re.search(
    r"replica_groups=(\{[\d,{}]*\}|\[[\d,]+\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?|mesh)", line
  )
  if head.group(1).startswith("{"):
    return [set(map(int, g.split(","))) for g in re.findall(r"\{([\d,]+)\}", head.group(1))]
  if head.group(1) != "mesh":
    shape = [int(d) for d in re.match(r"\[([\d,]+)\]", head.group(1)).group(1).split(",")]
    return [set(g) for g in _iota(head.group(2), head.group(3)).reshape(shape).tolist()]
  m = re.search(
    r"replica_groups=mesh\[([^\]]*)\]"
    r"(?:, device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))? \{([^}]*)\}",
    line,
  )
  sizes = [int(n) for n in re.findall(r"=(\d+)", m.group(1))]
  devices = _iota(m.group(2), m.group(3)) if m.group(2) else np.arange(math.prod(sizes))
  ids = devices.reshape(sizes)
  reduced = [int(a) for a in re.findall(r"axis_(\d+)", m.group(4))]
  kept = [a for a in range(len(sizes)) if a not in reduced]
  rows = ids.transpose(kept + reduced).reshape(-1, math.prod(sizes[a] for a in reduced))
  return [set(g) for g in rows.tolist()]


def test_grouped_scales_add_no_collective_on_a_model_axis_of_8():
  dense = len(_all_reduces(_compiled_step("dense", 8)))  # (Its groups change nothing.)
  ungrouped = len(_all_reduces(_compiled_step("bitnet158", 1)))
  grouped = len(_all_reduces(_compiled_step("bitnet158", 8)))
  assert ungrouped > dense, (dense, ungrouped)  # Whole-weight means, sub-norms: all-reduces.
  assert grouped == dense, (dense, grouped)


def test_under_fsdp_the_grouped_layers_add_collectives_on_data_only():
  """fsdp stores each kernel's input dimension split over `data`: a scale sums its shards' parts
  over `data` (4 devices apart here), and no layer adds a collective that spans `model`."""
  mesh = sharding.make_mesh(MeshConfig(data=2, model=4))
  model_of = {d.id: m for (_, m), d in np.ndenumerate(mesh.devices)}

  def in_layers(linear: str) -> tuple[int, int]:
    spans = [
      any(len({model_of[d] for d in g}) > 1 for g in _replica_groups(line))
      for line in _all_reduces(_compiled_step(linear, 4, data=2, strategy="fsdp"))
      if "closed_call/layers/" in line
    ]
    return sum(spans), len(spans) - sum(spans)

  dense_model, dense_data = in_layers("dense")
  bitnet_model, bitnet_data = in_layers("bitnet158")
  assert bitnet_model == dense_model, (dense_model, bitnet_model)
  assert bitnet_data > dense_data, (dense_data, bitnet_data)  # The scales' sums over data.


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
