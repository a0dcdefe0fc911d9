"""`jaxtune convert --pack-ternary`: a b1.58 model trained on latent float weights
(`model.linear=bitnet158`) as the packed inference model (`bitnet158_packed`, see
`model/packed.py`): each projection's codes at 2 bits a weight plus its scales, computed by the
same `bitlinear.ternary_parts` the training model's fake quantization uses, so the packed model's
effective weights are exactly the QAT model's. Everything else (embeddings, norms, the output
layer) is copied as it is.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from jaxtune.config_model import ModelConfig
from jaxtune.errors import CheckpointError
from jaxtune.model import bitlinear, packed, transformer


def _abstract(cfg: ModelConfig) -> Mapping[str, Any]:
  model = transformer.Transformer(cfg)
  return jax.eval_shape(transformer.init_fn(model), jax.random.key(0))["params"]


def pack(cfg: ModelConfig, params: Mapping[str, Any]) -> tuple[ModelConfig, dict[str, Any]]:
  """(the packed config, its params) of a `bitnet158` model's params."""
  if cfg.linear != "bitnet158":
    raise CheckpointError(
      f"--pack-ternary packs a model.linear=bitnet158 model; this one is {cfg.linear}"
    )
  packed_cfg = dataclasses.replace(cfg, linear="bitnet158_packed")
  latent, target = _abstract(cfg), _abstract(packed_cfg)

  def convert(latent_tree, target_tree, values, where):
    out = {}
    for key, box in target_tree.items():
      if isinstance(box, Mapping) and "packed" in box:
        out[key] = _pack_projection(
          cfg, latent_tree[key]["kernel"], box["packed"], values[key]["kernel"], where + key
        )
      elif isinstance(box, Mapping):
        out[key] = convert(latent_tree[key], box, values[key], f"{where}{key}/")
      else:
        out[key] = values[key]
    return out

  return packed_cfg, convert(latent, target, nn.meta.unbox(params), "")


def _pack_projection(
  cfg: ModelConfig, box: nn.Partitioned, target: nn.Partitioned, kernel: Any, where: str
) -> dict:
  """One projection's stacked latent kernel [L, inputs..., outputs...] -> packed, scale."""
  names, shape = box.names[1:], box.value.shape[1:]  # Less the layers axis.
  axis = next((i for i, n in enumerate(names) if n in bitlinear.SPLIT_AXES), None)
  outputs = math.prod(shape) // target.value.shape[-1]  # packed: [L, O / 4, I].
  if outputs % packed.VALUES_PER_BYTE:
    raise CheckpointError(f"{where}: {outputs} outputs do not pack 4 to a byte")
  inputs = next(k for k in range(len(shape)) if math.prod(shape[k:]) == outputs)
  codes, scales = [], []
  for w in np.asarray(kernel):
    q, m = bitlinear.ternary_parts(w, axis, cfg.groups)
    codes.append(packed.pack(packed.rows(np.asarray(q).astype(np.int8), inputs)))
    scales.append(np.asarray(m, np.float32))
  return {"packed": np.stack(codes), "scale": np.stack(scales)}
