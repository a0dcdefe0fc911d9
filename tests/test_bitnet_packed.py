"""Packed ternary models: the 2-bit layout is transformers' own, `convert --pack-ternary` restores
to exactly the QAT model's effective weights, and greedy decoding from the packed model equals
greedy decoding from the QAT model."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.integrations.bitnet import pack_weights, unpack_weights

from jaxtune import api, config, generate, sharding
from jaxtune.config import PeftConfig
from jaxtune.config_model import ModelConfig
from jaxtune.convert import export, ternary
from jaxtune.errors import CheckpointError, ConfigError
from jaxtune.model import bitlinear, packed, transformer
from jaxtune.peft import methods
from jaxtune.train import loop

CFG = ModelConfig(
  vocab_size=64,
  dim=32,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  mlp_dim=64,
  mlp="relu2",
  sub_norm=True,
  linear="bitnet158",
  bitnet_groups=2,
  max_seq_len=64,
)


def test_packing_is_transformers_layout():
  codes_oi = np.random.default_rng(0).integers(-1, 2, (16, 12)).astype(np.int8)
  theirs = pack_weights(torch.as_tensor(codes_oi.copy()))
  np.testing.assert_array_equal(packed.pack(codes_oi), theirs.numpy())
  with torch._dynamo.config.patch(disable=True):
    np.testing.assert_array_equal(
      np.asarray(packed.unpack(jnp.asarray(theirs.numpy()))),
      unpack_weights(theirs, torch.float32).numpy(),
    )


@pytest.fixture(scope="module")
def qat():
  module = transformer.Transformer(CFG)
  params = nn.meta.unbox(jax.jit(transformer.init_fn(module))(jax.random.key(0)))["params"]
  return api.Model(CFG, params, None)


def test_pack_restores_exactly_the_effective_weights_and_greedy_decoding(qat, tmp_path):
  cfg, params = ternary.pack(qat.config, qat.params)
  assert cfg == dataclasses.replace(CFG, linear="bitnet158_packed")
  latent_abstract = jax.eval_shape(
    transformer.init_fn(transformer.Transformer(CFG)), jax.random.key(0)
  )
  checked = 0
  for mod, proj in [("attn", x) for x in "qkvo"] + [("mlp", x) for x in ("gate", "up", "down")]:
    box = latent_abstract["params"]["layers"][mod][proj]["kernel"]
    names, shape = box.names[1:], box.value.shape[1:]
    axis = next(i for i, n in enumerate(names) if n in bitlinear.SPLIT_AXES)
    for layer in range(CFG.num_layers):
      want = bitlinear.ternary(qat.params["layers"][mod][proj]["kernel"][layer], axis, 2)
      one = params["layers"][mod][proj]
      codes = packed.kernel_of(packed.unpack(jnp.asarray(one["packed"][layer])), shape)
      got = bitlinear.scaled(codes, jnp.asarray(one["scale"][layer]), axis, 2)
      # Equal values (a weight rounded to zero from below is -0.0 in the QAT model, +0.0 packed).
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
      checked += 1
  assert checked == 14

  # Through a jaxtune run: convert --pack-ternary, restored by jaxtune.load.
  export.save_run(qat, tmp_path / "qat")
  export.convert(tmp_path / "qat", tmp_path / "packed", "jaxtune", pack_ternary=True)
  restored = api.load(tmp_path / "packed")
  assert restored.config == cfg
  for x, y in zip(jax.tree.leaves(restored.params), jax.tree.leaves(params), strict=True):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(x, y)

  prompts = [[1, 2, 3, 4], [5, 6, 7]]
  greedy = generate.Sampling(max_new_tokens=24)
  from_qat = qat.generate(prompts, greedy, stop_ids=())
  from_packed = restored.generate(prompts, greedy, stop_ids=())
  assert [c.ids for c in from_packed] == [c.ids for c in from_qat]
  assert len(set(from_qat[0].ids)) > 1  # Not a degenerate repetition.


def test_only_bitnet158_models_pack(qat):
  with pytest.raises(
    CheckpointError, match="packs a model.linear=bitnet158 model; this one is dense"
  ):
    ternary.pack(dataclasses.replace(CFG, linear="dense"), qat.params)


def test_a_packed_model_is_not_fully_fine_tuned():
  cfg = config.load(None, ["model.linear=bitnet158_packed"])
  mesh = sharding.make_mesh(cfg.mesh)
  with pytest.raises(
    ConfigError, match="bitnet158_packed holds 2-bit codes, which cannot be trained"
  ):
    loop.build(cfg, mesh, steps=1)


def test_lora_beside_quantized_projections_is_not_folded_in(qat):
  with_lora = dataclasses.replace(qat, adapters=methods.adapters(PeftConfig(method="lora")))
  with pytest.raises(CheckpointError, match="LoRA beside model.linear=bitnet158 projections"):
    with_lora.merged()
