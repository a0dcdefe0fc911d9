"""BitNet in Hugging Face's format (`BitNetForCausalLM`, transformers' `bitnet` model type): the
Llama family's tensors and config (`hf_llama.py`) with ReLU^2, the attention and MLP sub-norms,
and each projection either float (online quantization, `AutoBitLinear`) or packed (uint8
[out / 4, in] plus `weight_scale`, `BitLinear` or `AutoBitLinear` offline).

Shape letters: D model dim, F mlp dim, N query heads, K KV heads, H head dim.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxtune.config_model import ModelConfig
from jaxtune.convert.hf_llama import decoder_config, decoder_hf, decoder_tensors
from jaxtune.convert.hf_schema import (
  Family,
  Tensor,
  View,
  check_value,
  norm,
  require,
  view_tensor,
)
from jaxtune.errors import CheckpointError


def _packed(name: str, path: str, out: int, inp: int, reciprocal: bool) -> list[Tensor]:
  """A packed BitNet nn.Linear: uint8 weight [out / 4, in] and weight_scale [1] <-> the packed
  projection's `packed` and `scale` (see `model/packed.py`, which stores them in this layout)."""
  rows = (out // 4, inp)
  return [
    Tensor(name, (f"{path}/packed",), rows, (View(rows, (0, 1)),), dtype="uint8"),
    Tensor(
      name + "_scale",
      (f"{path}/scale",),
      (1,),
      (View((1,), (0,), reciprocal=reciprocal),),
      "float32",
    ),
  ]


def _bitnet_tensors(cfg: ModelConfig, hf: Mapping[str, Any] | None = None) -> list[Tensor]:
  """BitNet: Llama's tensors, the sub-norms, and with packed weights (`bitnet158_packed`) each
  projection as `weight` (uint8) and `weight_scale`, which transformers' `BitLinear` divides by
  and `AutoBitLinear` multiplies by (jaxtune's scale multiplies)."""
  d, f, n, k, h = cfg.dim, cfg.mlp_dim, cfg.num_heads, cfg.kv_heads, cfg.head_size
  attn, mlp = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
  tensors = decoder_tensors(cfg) + [
    view_tensor(attn + "attn_sub_norm.weight", "layers/attn/sub_norm/scale", (n * h,), (n, h)),
    norm(mlp + "ffn_sub_norm.weight", "layers/mlp/sub_norm/scale", f, 0.0),
  ]
  if cfg.linear != "bitnet158_packed":
    return tensors
  quant = (hf or {}).get("quantization_config") or {}
  reciprocal = quant.get("linear_class", "bitlinear") == "bitlinear"
  projections = {
    attn + "q_proj.weight": ("layers/attn/q", n * h, d),
    attn + "k_proj.weight": ("layers/attn/k", k * h, d),
    attn + "v_proj.weight": ("layers/attn/v", k * h, d),
    attn + "o_proj.weight": ("layers/attn/o", d, n * h),
    mlp + "gate_proj.weight": ("layers/mlp/gate", f, d),
    mlp + "up_proj.weight": ("layers/mlp/up", f, d),
    mlp + "down_proj.weight": ("layers/mlp/down", d, f),
  }
  tensors = [t for t in tensors if t.name not in projections]
  for name, (path, out, inp) in projections.items():
    tensors += _packed(name, path, out, inp, reciprocal)
  return tensors


# transformers' BitNet quantization_config (linear_class, quantization_mode) -> model.linear.
# `BitLinear` always reads packed weights; `AutoBitLinear` quantizes float weights online or
# reads packed ones offline. No quantization_config: plain nn.Linear layers.
_BITNET_LINEAR = {
  ("autobitlinear", "online"): "bitnet158",
  ("autobitlinear", "offline"): "bitnet158_packed",
  ("bitlinear", "online"): "bitnet158_packed",
  ("bitlinear", "offline"): "bitnet158_packed",
}


def _bitnet_config(hf: Mapping[str, Any]) -> dict[str, Any]:
  require(hf, "hidden_act", ("relu2",), "relu2")
  require(hf, "attention_bias", (False,), False)
  linear = "dense"
  quant = hf.get("quantization_config")
  if quant:
    check_value("quantization_config.quant_method", quant.get("quant_method"), ("bitnet",))
    check_value("quantization_config.use_rms_norm", quant.get("use_rms_norm", False), (False,))
    not_converted = set(quant.get("modules_to_not_convert") or ()) - {"lm_head"}
    if not_converted:
      raise CheckpointError(
        f"config.json: quantization_config.modules_to_not_convert={sorted(not_converted)}: "
        "jaxtune quantizes every projection but the output layer"
      )
    key = (quant.get("linear_class", "bitlinear"), quant.get("quantization_mode", "offline"))
    check_value("quantization_config (linear_class, quantization_mode)", key, tuple(_BITNET_LINEAR))
    linear = _BITNET_LINEAR[key]
  return decoder_config(hf, tie_default=False) | dict(
    mlp="relu2", sub_norm=True, linear=linear, bitnet_groups=1
  )


# model.linear -> the quantization_config written (packed: BitLinear, as published checkpoints).
_BITNET_QUANTIZATION = {
  "dense": None,
  "bitnet158": dict(linear_class="autobitlinear", quantization_mode="online"),
  "bitnet158_packed": dict(linear_class="bitlinear", quantization_mode="offline"),
}


def _bitnet_hf(cfg: ModelConfig) -> dict[str, Any]:
  hf = decoder_hf(cfg, "relu2") | dict(attention_bias=False)
  quant = _BITNET_QUANTIZATION.get(cfg.linear)
  if quant is not None:
    hf["quantization_config"] = dict(quant_method="bitnet", use_rms_norm=False, **quant)
  return hf


FAMILY = Family(
  ("BitNetForCausalLM", "BitNetModel"), "model.", _bitnet_config, _bitnet_hf, _bitnet_tensors
)
