"""Throughput, FLOPs and MFU, and the metric files (JSONL and TensorBoard events).

FLOP convention (PaLM, Chowdhery et al. 2022, appendix B): a token costs 6N + 12*L*H*Q*T FLOPs
for a forward and backward pass, where N is the number of matmul parameters (everything but the
input embedding lookup; a tied table counts once, as the output layer), L layers, H query heads,
Q head dim and T the row length (attention over the whole row, not halved for causality). Only
real (non-padding) tokens are counted, so packing shows up as throughput, and MFU is that rate
over the devices' peak (`train/peak.py`: the best rate the hardware shows).
"""

from __future__ import annotations

import json
import os
from typing import Any

from jaxtune.config_model import ModelConfig
from jaxtune.model import attention


def matmul_params(cfg: ModelConfig, total_params: int) -> int:
  """Parameters that take part in matmuls: all but the input embedding lookup (and learned
  positions); a tied embedding is the output layer's matmul."""
  lookup = cfg.vocab_size * cfg.dim if not cfg.tie_embeddings else 0
  if cfg.position == "learned":
    lookup += cfg.max_seq_len * cfg.dim
  return total_params - lookup


def forward_flops_per_token(cfg: ModelConfig, total_params: int, keys: int) -> float:
  """Forward FLOPs per token attending to `keys` keys: 2N + 4*L*H*Q*keys (a decoding step's
  token attends to every slot of the cache)."""
  return (
    2 * matmul_params(cfg, total_params) + 4 * cfg.num_layers * cfg.num_heads * cfg.head_size * keys
  )


def flops_per_token(cfg: ModelConfig, total_params: int, row_length: int) -> float:
  """Training FLOPs per token: 6N + 12*L*H*Q*T, three times the forward pass's."""
  return 3 * forward_flops_per_token(cfg, total_params, row_length)


def hardware_flops_per_token(
  cfg: ModelConfig, total_params: int, row_length: int, frozen_params: int = 0
) -> float:
  """Training FLOPs per token that the hardware executes, for HFU (same N and L as
  `flops_per_token`). Matmuls: the forward, 2N; the backward's gradients of activations, 2N, and
  of trainable weights, 2 per trainable matmul parameter (the base model's `frozen_params` under
  LoRA take none). Attention (`attention.causal_attention`): each query's products cover only
  the keys up to the end of its block, on average S = `attention.keys_computed(T)` of them
  (about T/2 for long rows); the forward runs two products, 4*L*H*Q*S, and the backward five
  (the scores again, then the gradients of values, probabilities, keys and queries), 10*L*H*Q*S.
  Then what `cfg.remat` recomputes in the layers for the backward: their whole forward (`full`;
  the output layer is outside the layers), or only the attention's forward (`dots` and
  `dots_no_batch` do not save its output; `minimal` does). XLA leaves out recomputed products
  that the backward does not read (the MLP down projection), so it runs a little less.
  """
  attention_products = (
    cfg.num_layers * cfg.num_heads * cfg.head_size * attention.keys_computed(row_length)
  )
  matmul = matmul_params(cfg, total_params)
  frozen = matmul_params(cfg, frozen_params) if frozen_params else 0
  layers = matmul - cfg.vocab_size * cfg.dim
  recomputed = {
    "none": 0,
    "minimal": 0,
    "dots": 4 * attention_products,
    "dots_no_batch": 4 * attention_products,
    "full": 2 * layers + 4 * attention_products,
  }[cfg.remat]
  return 4 * matmul + 2 * (matmul - frozen) + 14 * attention_products + recomputed


class Writer:
  """Appends metric records to `metrics.jsonl` and TensorBoard event files in `directory`."""

  def __init__(self, directory: str, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    from tensorboardX import SummaryWriter  # Light: no TensorFlow.

    os.makedirs(directory, exist_ok=True)
    self.jsonl = open(os.path.join(directory, "metrics.jsonl"), "a")
    self.tensorboard = SummaryWriter(os.path.join(directory, "tensorboard"))

  def write(self, step: int, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    self.jsonl.write(json.dumps({"step": step, **record}) + "\n")
    self.jsonl.flush()
    for key, value in record.items():
      if isinstance(value, int | float):
        self.tensorboard.add_scalar(key, value, step)
    self.tensorboard.flush()

  def close(self) -> None:
    if self.enabled:
      self.jsonl.close()
      self.tensorboard.close()
