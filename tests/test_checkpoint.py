"""Orbax checkpoints: a state saved on one mesh restores onto another, values intact."""

import jax
import numpy as np

from jaxtune import checkpoint, sharding
from jaxtune.config import MeshConfig, ModelConfig
from jaxtune.model import transformer


def test_restore_onto_a_different_mesh_shape(tmp_path):
  cfg = ModelConfig(vocab_size=256, dim=32, num_layers=2, num_heads=8, num_kv_heads=2, mlp_dim=64)
  init = transformer.init_fn(transformer.Transformer(cfg))
  saved_mesh = sharding.make_mesh(MeshConfig(data=2, model=4))
  saved = sharding.init_sharded(init, jax.random.key(3), saved_mesh, "fsdp")
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=1)
  ckpt.save(7, saved.variables, {"epoch": 1, "index": 5, "batches": 9})
  ckpt.close()

  other_mesh = sharding.make_mesh(MeshConfig(data=8, model=1))
  target = sharding.init_sharded(init, jax.random.key(0), other_mesh, "tp")
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=1)
  assert ckpt.latest_step() == 7
  state, data_state = ckpt.restore(7, checkpoint.abstract(target.variables, target.shardings))
  ckpt.close()
  assert data_state == {"epoch": 1, "index": 5, "batches": 9}
  for got, want, want_sharding in zip(
    jax.tree.leaves(state),
    jax.tree.leaves(saved.variables),
    jax.tree.leaves(target.shardings),
    strict=True,
  ):
    np.testing.assert_array_equal(got, want)
    assert got.sharding.is_equivalent_to(want_sharding, got.ndim)


def test_params_restore_from_a_run_directory(tmp_path):
  cfg = ModelConfig(vocab_size=256, dim=32, num_layers=2, num_heads=8, mlp_dim=64)
  init = transformer.init_fn(transformer.Transformer(cfg))
  mesh = sharding.make_mesh(MeshConfig(data=4, model=2))
  sharded = sharding.init_sharded(init, jax.random.key(1), mesh, "tp")
  state = {"params": sharded.variables["params"], "step": np.int32(3)}
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), keep=1)
  ckpt.save(3, state, {})
  ckpt.close()
  params = sharded.variables["params"]
  abstract = checkpoint.abstract(params, sharded.shardings["params"])
  restored = checkpoint.restore_params(str(tmp_path / "checkpoints"), abstract)
  jax.tree.map(np.testing.assert_array_equal, restored, params)
