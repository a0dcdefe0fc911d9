"""The Llama family in Hugging Face's format (Llama, Mistral, Qwen2, Gemma): `model.layers.{i}.*`
tensors, RMSNorms, an optional `lm_head`, and config.json <-> ModelConfig (`hf_schema.py` for the
vocabulary). BitNet builds on these (`hf_bitnet.py`).

Shape letters: D model dim, F mlp dim, V vocab, N query heads, K KV heads, H head dim.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from typing import Any

from jaxtune.config_model import ModelConfig
from jaxtune.convert.hf_schema import (
  TANH_GELUS,
  Family,
  Tensor,
  check_value,
  copied,
  get,
  head_bias,
  heads_in,
  heads_out,
  linear,
  norm,
  require,
)
from jaxtune.errors import CheckpointError

logger = logging.getLogger(__name__)


def decoder_tensors(
  cfg: ModelConfig, hf: Mapping[str, Any] | None = None, norm_offset: float = 0.0
) -> list[Tensor]:
  """Llama, Mistral, Qwen2 and Gemma: `model.layers.{i}.*`, RMSNorms, an optional `lm_head`."""
  d, f, v = cfg.dim, cfg.mlp_dim, cfg.vocab_size
  n, k, h = cfg.num_heads, cfg.kv_heads, cfg.head_size
  attn, mlp = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
  tensors = [
    copied("model.embed_tokens.weight", "embed/embedding", (v, d)),
    norm("model.layers.{i}.input_layernorm.weight", "layers/attn_norm/scale", d, norm_offset),
    heads_in(attn + "q_proj.weight", "layers/attn/q/kernel", n, h, d),
    heads_in(attn + "k_proj.weight", "layers/attn/k/kernel", k, h, d),
    heads_in(attn + "v_proj.weight", "layers/attn/v/kernel", k, h, d),
    heads_out(attn + "o_proj.weight", "layers/attn/o/kernel", n, h, d),
    norm(
      "model.layers.{i}.post_attention_layernorm.weight", "layers/mlp_norm/scale", d, norm_offset
    ),
    linear(mlp + "gate_proj.weight", "layers/mlp/gate/kernel", f, d),
    linear(mlp + "up_proj.weight", "layers/mlp/up/kernel", f, d),
    linear(mlp + "down_proj.weight", "layers/mlp/down/kernel", d, f),
    norm("model.norm.weight", "final_norm/scale", d, norm_offset),
  ]
  if cfg.qkv_bias:
    for x, heads in (("q", n), ("k", k), ("v", k)):
      tensors.append(head_bias(attn + f"{x}_proj.bias", f"layers/attn/{x}/bias", heads, h))
  if not cfg.tie_embeddings:
    tensors.append(copied("lm_head.weight", "lm_head/embedding", (v, d)))
  return tensors


def rope_theta(hf: Mapping[str, Any]) -> float:
  """`rope_theta`, top-level (transformers 4) or in `rope_parameters` (5); no RoPE scaling."""
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind != "default":
    raise CheckpointError(f"config.json: RoPE scaling {kind!r} is not supported")
  if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
    raise CheckpointError("config.json: partial rotary embeddings are not supported")
  return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def decoder_config(hf: Mapping[str, Any], tie_default: bool) -> dict[str, Any]:
  """The fields shared by Llama, Mistral, Qwen2 and Gemma."""
  dim, heads = get(hf, "hidden_size"), get(hf, "num_attention_heads")
  kv_heads = get(hf, "num_key_value_heads", heads)
  head_dim = get(hf, "head_dim", dim // heads)
  max_len = get(hf, "max_position_embeddings")
  window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
  if window is not None and window < max_len:
    logger.warning(
      "sliding-window attention (%d tokens) is not implemented: the model is exact up to %d "
      "tokens, so max_seq_len is set to %d instead of %d",
      window,
      window,
      window,
      max_len,
    )
    max_len = window
  return dict(
    vocab_size=get(hf, "vocab_size"),
    dim=dim,
    num_layers=get(hf, "num_hidden_layers"),
    num_heads=heads,
    num_kv_heads=None if kv_heads == heads else kv_heads,
    head_dim=None if head_dim * heads == dim else head_dim,
    mlp_dim=get(hf, "intermediate_size"),
    norm="rmsnorm",
    norm_eps=float(get(hf, "rms_norm_eps", 1e-6)),  # The default of all four families.
    position="rope",
    rope_theta=rope_theta(hf),
    max_seq_len=max_len,
    tie_embeddings=bool(get(hf, "tie_word_embeddings", tie_default)),
  )


def _llama_config(hf: Mapping[str, Any]) -> dict[str, Any]:
  require(hf, "hidden_act", ("silu",), "silu")
  require(hf, "attention_bias", (False,), False)
  require(hf, "mlp_bias", (False,), False)
  return decoder_config(hf, tie_default=False) | dict(mlp="swiglu")


def _qwen2_config(hf: Mapping[str, Any]) -> dict[str, Any]:
  return _llama_config(hf) | dict(qkv_bias=True)


def _gemma_config(hf: Mapping[str, Any]) -> dict[str, Any]:
  # Gemma's legacy `hidden_act="gelu"` means the tanh approximation (as in transformers).
  act = hf.get("hidden_activation") or get(hf, "hidden_act", "gelu_pytorch_tanh")
  check_value("hidden_act", act, ("gelu", *TANH_GELUS))
  require(hf, "attention_bias", (False,), False)
  return decoder_config(hf, tie_default=True) | dict(mlp="geglu", scale_embeddings=True)


def decoder_hf(cfg: ModelConfig, act: str) -> dict[str, Any]:
  return dict(
    vocab_size=cfg.vocab_size,
    hidden_size=cfg.dim,
    intermediate_size=cfg.mlp_dim,
    num_hidden_layers=cfg.num_layers,
    num_attention_heads=cfg.num_heads,
    num_key_value_heads=cfg.kv_heads,
    head_dim=cfg.head_size,
    hidden_act=act,
    max_position_embeddings=cfg.max_seq_len,
    rms_norm_eps=cfg.norm_eps,
    rope_theta=cfg.rope_theta,  # transformers 4; 5 reads rope_parameters.
    rope_parameters=dict(rope_type="default", rope_theta=cfg.rope_theta),
    tie_word_embeddings=cfg.tie_embeddings,
  )


def _llama_hf(cfg: ModelConfig) -> dict[str, Any]:
  return decoder_hf(cfg, "silu") | dict(attention_bias=False, mlp_bias=False)


def _qwen2_hf(cfg: ModelConfig) -> dict[str, Any]:
  return decoder_hf(cfg, "silu") | dict(use_sliding_window=False, sliding_window=None)


def _gemma_hf(cfg: ModelConfig) -> dict[str, Any]:
  return decoder_hf(cfg, "gelu_pytorch_tanh") | dict(attention_bias=False)


FAMILIES: dict[str, Family] = {
  "llama": Family(
    ("LlamaForCausalLM", "LlamaModel"), "model.", _llama_config, _llama_hf, decoder_tensors
  ),
  "mistral": Family(
    ("MistralForCausalLM", "MistralModel"), "model.", _llama_config, _llama_hf, decoder_tensors
  ),
  "qwen2": Family(
    ("Qwen2ForCausalLM", "Qwen2Model"), "model.", _qwen2_config, _qwen2_hf, decoder_tensors
  ),
  "gemma": Family(
    ("GemmaForCausalLM", "GemmaModel"),
    "model.",
    _gemma_config,
    _gemma_hf,
    functools.partial(decoder_tensors, norm_offset=1.0),
  ),
}
