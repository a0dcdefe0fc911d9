"""LoRA adapters in Hugging Face PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

The adapted model is a Llama-family one (Llama, Mistral, Qwen2, Gemma: `hf_llama.py`'s
families), whose projections are `nn.Linear`s with weights [out, in]. PEFT stores, per layer and
projection, `lora_A.weight` [R, in] and `lora_B.weight` [out, R], and computes
`x A^T B^T * alpha / R`, which is jaxtune's `(x A) B * alpha / R` with A and B flattened and
transposed. `peft.PeftModel.from_pretrained(base, folder)` loads the result on the base model
exported by `hf.save_hf`.
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

import jax
import numpy as np
import safetensors.numpy

from jaxtune.config_model import ModelConfig
from jaxtune.convert.hf_layout import family_for
from jaxtune.errors import CheckpointError
from jaxtune.model.adapters import LORA_A, LORA_B, Adapters

log = logging.getLogger(__name__)

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# jaxtune projection -> (its module under layers/, the Hugging Face module under layers.{i}.).
_MODULES = {
  "q": ("attn", "self_attn.q_proj"),
  "k": ("attn", "self_attn.k_proj"),
  "v": ("attn", "self_attn.v_proj"),
  "o": ("attn", "self_attn.o_proj"),
  "gate": ("mlp", "mlp.gate_proj"),
  "up": ("mlp", "mlp.up_proj"),
  "down": ("mlp", "mlp.down_proj"),
}


def save_adapter(
  config: ModelConfig,
  adapters: Adapters,
  params: Any,
  folder: str | pathlib.Path,
  base_model: str = "",
  dtype: str = "float32",
) -> None:
  """Writes the LoRA adapters in `params` (the full tree or its trainable part) to `folder`.

  `base_model` is recorded as `base_model_name_or_path`: where the base model lives.
  """
  if not adapters.lora_rank:
    raise CheckpointError("only LoRA adapters have a PEFT form; this model has none")
  family = family_for(config)
  if family == "gpt2":
    raise CheckpointError("PEFT export covers Llama-family models; GPT-2 fuses q, k and v")
  layers = jax.device_get(params["layers"])
  tensors = {}
  for name in adapters.lora_targets:
    group, hf_name = _MODULES[name]
    a_lir, b_lro = (np.asarray(layers[group][name][k], np.float32) for k in (LORA_A, LORA_B))
    rank = adapters.lora_rank
    for i in range(config.num_layers):
      key = f"base_model.model.model.layers.{i}.{hf_name}"
      tensors[f"{key}.lora_A.weight"] = a_lir[i].reshape(-1, rank).T
      tensors[f"{key}.lora_B.weight"] = b_lro[i].reshape(rank, -1).T
  tensors = {k: np.ascontiguousarray(v, dtype) for k, v in tensors.items()}
  adapter_config = dict(
    peft_type="LORA",
    task_type="CAUSAL_LM",
    base_model_name_or_path=base_model or None,
    r=adapters.lora_rank,
    lora_alpha=adapters.lora_alpha,
    lora_dropout=adapters.lora_dropout,
    target_modules=sorted(_MODULES[t][1].rpartition(".")[2] for t in adapters.lora_targets),
    bias="none",
    fan_in_fan_out=False,
    inference_mode=True,
    use_rslora=False,
  )
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  (folder / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2) + "\n")
  safetensors.numpy.save_file(tensors, folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})
  log.info("saved %d LoRA tensors (rank %d) to %s", len(tensors), adapters.lora_rank, folder)
