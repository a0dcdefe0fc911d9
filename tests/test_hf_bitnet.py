"""Hugging Face BitNet (`BitNetForCausalLM`) import and export against transformers itself.

Random tiny models are built by transformers in each of its forms: plain nn.Linear (no
quantization_config), master weights quantized online (`AutoBitLinear`, online), and packed
2-bit weights with a `weight_scale` per projection (`AutoBitLinear` offline, which multiplies by
the scale, and `BitLinear`, which divides by it), packed by transformers' own `pack_weights`. Each
is loaded by `jaxtune.load` and compared logit by logit with PyTorch (float32); the import is then
exported and loaded back by transformers, with the same logits.
"""

import dataclasses
import json

import jax
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from transformers.integrations.bitnet import pack_weights

import jaxtune
from jaxtune.config_model import ModelConfig
from jaxtune.convert import hf
from jaxtune.errors import CheckpointError

TOKENS_BT = np.random.default_rng(0).integers(0, 256, (2, 16))
TOLERANCE = 1e-4
_SMALL = dict(
  vocab_size=256,
  hidden_size=64,
  intermediate_size=128,
  num_hidden_layers=2,
  num_attention_heads=8,
  num_key_value_heads=2,  # GQA.
  max_position_embeddings=128,
  bos_token_id=0,
  eos_token_id=1,
)
# case -> (linear_class, quantization_mode) of its quantization_config (None: none), model.linear.
CASES = {
  "float": (None, "dense"),
  "online": (("autobitlinear", "online"), "bitnet158"),
  "packed-autobitlinear": (("autobitlinear", "offline"), "bitnet158_packed"),
  "packed-bitlinear": (("bitlinear", "offline"), "bitnet158_packed"),
}


@pytest.fixture(autouse=True)
def _no_torch_compile():
  """transformers' BitNet quantizers are `torch.compile`d; eager on CPU is the same math."""
  with torch._dynamo.config.patch(disable=True):
    yield


def _float_model() -> transformers.BitNetForCausalLM:
  torch.manual_seed(0)
  model = transformers.BitNetForCausalLM(transformers.BitNetConfig(**_SMALL))
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


def _write(case: str, folder) -> None:
  """The case's folder: the float model's weights as that form stores them."""
  quant, _ = CASES[case]
  model = _float_model()
  model.save_pretrained(folder)
  if quant is None:
    return
  linear_class, mode = quant
  config = json.loads((folder / "config.json").read_text())
  config["quantization_config"] = dict(
    quant_method="bitnet", linear_class=linear_class, quantization_mode=mode
  )
  (folder / "config.json").write_text(json.dumps(config))
  if mode == "online":
    return
  tensors = {}
  for name, w in model.state_dict().items():
    if not name.endswith("_proj.weight"):
      tensors[name] = w.contiguous()
      continue
    # transformers' own quantizer (WeightQuant) and packer.
    s = 1.0 / w.abs().mean().clamp(min=1e-5)
    tensors[name] = pack_weights((w * s).round().clamp(-1, 1))
    scale = 1.0 / s if linear_class == "autobitlinear" else s  # Multiplied / divided by.
    tensors[name + "_scale"] = scale.reshape(1)
  safetensors.torch.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _torch_logits(folder) -> np.ndarray:
  model = transformers.AutoModelForCausalLM.from_pretrained(
    folder, dtype=torch.float32, attn_implementation="eager"
  )
  with torch.no_grad():
    return model.eval()(torch.as_tensor(TOKENS_BT)).logits.numpy()


@pytest.mark.parametrize("case", CASES)
def test_bitnet_logit_parity_and_round_trip(case, tmp_path):
  _write(case, tmp_path / "hf")
  theirs_btv = _torch_logits(tmp_path / "hf")
  model = jaxtune.load(tmp_path / "hf")
  assert model.config.linear == CASES[case][1]
  assert (model.config.mlp, model.config.sub_norm, model.config.kv_heads) == ("relu2", True, 2)
  ours_btv = np.asarray(model.logits(TOKENS_BT))
  assert np.abs(theirs_btv).max() > 1.0
  assert np.abs(ours_btv - theirs_btv).max() < TOLERANCE

  hf.save_hf(model.config, model.params, tmp_path / "out")
  assert np.abs(_torch_logits(tmp_path / "out") - ours_btv).max() < TOLERANCE
  again = jaxtune.load(tmp_path / "out")
  assert again.config == model.config
  for x, y in zip(*(jax.tree.leaves(m.params) for m in (again, model)), strict=True):
    assert x.dtype == y.dtype
    np.testing.assert_allclose(x, y, rtol=1e-7)  # Exact but a BitLinear scale's 1 / (1 / s).


def test_what_transformers_cannot_express_is_refused():
  base = dict(_SMALL, model_type="bitnet", hidden_act="relu2")
  one_bit = ModelConfig(**hf.FAMILIES["bitnet"].to_config(base) | dict(linear="bitnet"))
  with pytest.raises(CheckpointError, match="cannot express model.linear='bitnet'"):
    hf.family_for(one_bit)
  grouped = dataclasses.replace(one_bit, linear="bitnet158", bitnet_groups=2)
  with pytest.raises(CheckpointError, match="model.bitnet_groups=2"):
    hf.family_for(grouped)
  quant = dict(quant_method="bitnet", linear_class="bitlinear", use_rms_norm=True)
  with pytest.raises(CheckpointError, match="use_rms_norm=True has no jaxtune equivalent"):
    hf.FAMILIES["bitnet"].to_config(dict(base, quantization_config=quant))
