"""QAT from a dense checkpoint: `train.init_from` the float stories260K (SwiGLU, no sub-norms)
into a BitNet model with HF BitNet's sub-norms; the checkpoint's weights load as they are and the
sub-norms it lacks start as initialized (ones), saying so."""

import logging

import jax
import numpy as np
import pytest
from flax import traverse_util

from jaxtune import config, sharding
from jaxtune.config import MeshConfig
from jaxtune.convert import llama2c
from jaxtune.errors import ConfigError
from jaxtune.model import transformer
from jaxtune.train import loop


def _initial(stories, overrides):
  cfg = config.load("configs/bitnet_qat.yaml", [f"train.init_from={stories}", *overrides])
  mesh = sharding.make_mesh(MeshConfig(data=1, model=1), jax.devices()[:1])
  model = transformer.Transformer(cfg.model)
  return loop._initial_params(cfg, model, mesh, jax.random.key(0)).variables["params"]


def test_a_dense_checkpoint_starts_a_bitnet_model_with_sub_norms(data_dir, caplog):
  stories = data_dir / "models" / "stories260K" / "stories260K.bin"
  with caplog.at_level(logging.INFO, logger="jaxtune.train.loop"):
    params = _initial(stories, ["model.sub_norm=true"])
  _, variables = llama2c.load_model(str(stories))
  dense = traverse_util.flatten_dict(transformer.grow_vocab(variables["params"], 513))
  flat = traverse_util.flatten_dict(params)
  new = {k for k in flat if k not in dense}
  assert new == {("layers", "attn", "sub_norm", "scale"), ("layers", "mlp", "sub_norm", "scale")}
  for k in new:
    np.testing.assert_array_equal(flat[k], np.ones(flat[k].shape))
  assert flat["layers", "attn", "sub_norm", "scale"].shape == (5, 8, 8)  # [L, N, H]
  for k, v in dense.items():
    np.testing.assert_array_equal(np.asarray(flat[k]), np.asarray(v), err_msg=str(k))
  (line,) = [r.getMessage() for r in caplog.records if "sub_norm" in r.getMessage()]
  assert "layers/attn/sub_norm/scale, layers/mlp/sub_norm/scale" in line, line


def test_a_checkpoint_lacking_other_parameters_still_fails(data_dir):
  stories = data_dir / "models" / "stories260K" / "stories260K.bin"
  with pytest.raises(ConfigError, match=r"parameter shapes .* do not fit the model .*'bias'"):
    _initial(stories, ["model.sub_norm=true", "model.qkv_bias=true"])  # Biases are not new norms.
