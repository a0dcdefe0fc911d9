"""GPT-2 in Hugging Face's format: `transformer.h.{i}.*` tensors (Conv1D weights [in, out], the
fused `c_attn`), LayerNorms with biases, learned positions, and config.json <-> ModelConfig.

Shape letters: D model dim, F mlp dim, V vocab, S positions, N heads, H head dim.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxtune.config_model import ModelConfig
from jaxtune.convert.hf_schema import (
  TANH_GELUS,
  Family,
  Tensor,
  View,
  copied,
  get,
  require,
  view_tensor,
)


def _fused_qkv(name: str, kind: str, n: int, h: int, d: int) -> Tensor:
  """GPT-2 `c_attn`: Conv1D weight [D, 3*N*H] or bias [3*N*H] <-> q, k, v [D, N, H] or [N, H]."""
  lead = (d,) if kind == "kernel" else ()
  split = (*lead, 3, n, h)
  return Tensor(
    name,
    tuple(f"layers/attn/{x}/{kind}" for x in "qkv"),
    (*lead, 3 * n * h),
    tuple(View(split, tuple(range(len(split) - 1)), pick=(len(lead), j)) for j in range(3)),
  )


def _gpt2_tensors(cfg: ModelConfig, hf: Mapping[str, Any] | None = None) -> list[Tensor]:
  d, f, v, p = cfg.dim, cfg.mlp_dim, cfg.vocab_size, cfg.max_seq_len
  n, h = cfg.num_heads, cfg.head_size
  block = "transformer.h.{i}."
  tensors = [
    copied("transformer.wte.weight", "embed/embedding", (v, d)),
    copied("transformer.wpe.weight", "position/embedding", (p, d)),
    _fused_qkv(block + "attn.c_attn.weight", "kernel", n, h, d),
    _fused_qkv(block + "attn.c_attn.bias", "bias", n, h, d),
    view_tensor(block + "attn.c_proj.weight", "layers/attn/o/kernel", (n * h, d), (n, h, d)),
    copied(block + "attn.c_proj.bias", "layers/attn/o/bias", (d,)),
    copied(block + "mlp.c_fc.weight", "layers/mlp/up/kernel", (d, f)),
    copied(block + "mlp.c_fc.bias", "layers/mlp/up/bias", (f,)),
    copied(block + "mlp.c_proj.weight", "layers/mlp/down/kernel", (f, d)),
    copied(block + "mlp.c_proj.bias", "layers/mlp/down/bias", (d,)),
  ]
  for hf_name, ours in (
    (block + "ln_1", "layers/attn_norm"),
    (block + "ln_2", "layers/mlp_norm"),
    ("transformer.ln_f", "final_norm"),
  ):
    tensors.append(copied(hf_name + ".weight", ours + "/scale", (d,)))
    tensors.append(copied(hf_name + ".bias", ours + "/bias", (d,)))
  if not cfg.tie_embeddings:
    tensors.append(copied("lm_head.weight", "lm_head/embedding", (v, d)))
  return tensors


def _gpt2_config(hf: Mapping[str, Any]) -> dict[str, Any]:
  require(hf, "activation_function", TANH_GELUS, "gelu_new")
  require(hf, "scale_attn_weights", (True,), True)
  require(hf, "scale_attn_by_inverse_layer_idx", (False,), False)
  require(hf, "add_cross_attention", (False,), False)
  dim = get(hf, "n_embd")
  return dict(
    vocab_size=get(hf, "vocab_size"),
    dim=dim,
    num_layers=get(hf, "n_layer"),
    num_heads=get(hf, "n_head"),
    mlp_dim=get(hf, "n_inner", 4 * dim),
    mlp="gelu",
    norm="layernorm",
    norm_eps=float(get(hf, "layer_norm_epsilon")),
    use_bias=True,
    position="learned",
    max_seq_len=get(hf, "n_positions"),
    tie_embeddings=bool(get(hf, "tie_word_embeddings", True)),
  )


def _gpt2_hf(cfg: ModelConfig) -> dict[str, Any]:
  # GPT-2's <|endoftext|> (transformers' default) only where the vocabulary has it.
  end_of_text = 50256 if cfg.vocab_size > 50256 else None
  return dict(
    bos_token_id=end_of_text,
    eos_token_id=end_of_text,
    vocab_size=cfg.vocab_size,
    n_embd=cfg.dim,
    n_layer=cfg.num_layers,
    n_head=cfg.num_heads,
    n_inner=cfg.mlp_dim,
    n_positions=cfg.max_seq_len,
    activation_function="gelu_new",
    layer_norm_epsilon=cfg.norm_eps,
    tie_word_embeddings=cfg.tie_embeddings,
  )


FAMILY = Family(
  ("GPT2LMHeadModel", "GPT2Model"), "transformer.", _gpt2_config, _gpt2_hf, _gpt2_tensors
)
