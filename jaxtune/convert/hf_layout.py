"""Hugging Face model families (Llama, Mistral, Qwen2, Gemma, GPT-2, BitNet): the table from
config.json's `model_type` to each family's mappings (config.json <-> ModelConfig, and each
tensor's name and layout), and which family a ModelConfig exports as.

The families live in `hf_llama.py` (Llama, Mistral, Qwen2, Gemma), `hf_gpt2.py` and
`hf_bitnet.py`, in the vocabulary of `hf_schema.py` (`Tensor`, `View`, `Family`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxtune.config_model import ModelConfig
from jaxtune.convert import hf_bitnet, hf_gpt2, hf_llama
from jaxtune.convert.hf_schema import Family
from jaxtune.errors import CheckpointError

# Fields that do not change the function the model computes.
_NOT_ARCHITECTURE = (
  "preset",
  "dtype",
  "param_dtype",
  "remat",
  "residual_dropout",
  "residual_dropout_schedule",
)


FAMILIES: dict[str, Family] = {
  **hf_llama.FAMILIES,
  "gpt2": hf_gpt2.FAMILY,
  "bitnet": hf_bitnet.FAMILY,
}


def _architecture(cfg: ModelConfig) -> dict[str, Any]:
  """The fields that define the function a model computes, with derived head counts and sizes."""
  fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
  for name in _NOT_ARCHITECTURE:
    del fields[name]
  fields.update(num_kv_heads=cfg.kv_heads, head_dim=cfg.head_size, bitnet_groups=cfg.groups)
  if cfg.position != "rope":
    del fields["rope_theta"]
  return fields


def family_for(cfg: ModelConfig) -> str:
  """The `model_type` to export `cfg` as; a CheckpointError if no family computes the same model."""
  if cfg.position == "learned" and cfg.use_bias:
    model_type = "gpt2"
  elif cfg.qkv_bias:
    model_type = "qwen2"
  elif cfg.scale_embeddings and cfg.mlp == "geglu":
    model_type = "gemma"
  elif cfg.sub_norm:
    model_type = "bitnet"
  else:
    model_type = "llama"
  family = FAMILIES[model_type]
  ours = _architecture(cfg)
  theirs = _architecture(ModelConfig(**family.to_config(family.to_hf(cfg))))
  lost = [f"model.{k}={v!r}" for k, v in ours.items() if theirs.get(k) != v]
  if lost:
    raise CheckpointError(
      f"this model has no Hugging Face equivalent: the closest, {family.architectures[0]}, "
      f"cannot express {', '.join(lost)}"
    )
  return model_type
