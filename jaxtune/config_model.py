"""The `model` section: a PaLM / Llama-family decoder's shape and layout, what every layer of
`model/` receives (never the whole `Config`). A frozen dataclass loaded and validated as the other
sections of `config.py` are; derived values are properties.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from jaxtune.config_values import check as _check


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A PaLM / Llama-family decoder. `preset` names a starting point in `model/presets.py`."""

  preset: str | None = None
  vocab_size: int = 1024  # As data.tokenizer_vocab_size.
  dim: int = 128
  num_layers: int = 4
  num_heads: int = 8
  num_kv_heads: int | None = None  # None: as many as num_heads (MHA); 1: MQA; else GQA.
  head_dim: int | None = None  # None: dim // num_heads.
  mlp_dim: int = 384
  mlp: Literal["swiglu", "geglu", "gelu", "relu2"] = "swiglu"  # relu2: gated ReLU^2 (BitNet).
  norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
  norm_eps: float = 1e-5
  parallel_block: bool = False  # PaLM: x + attn(ln(x)) + mlp(ln(x)).
  use_bias: bool = False  # Biases on every projection and LayerNorm (GPT-2).
  qkv_bias: bool = False  # Biases on q, k, v only (Qwen2).
  position: Literal["rope", "learned"] = "rope"
  rope_theta: float = 10000.0
  max_seq_len: int = 2048
  tie_embeddings: bool = True
  scale_embeddings: bool = False  # Multiply input embeddings by sqrt(dim) (Gemma).
  scale_tied_logits: bool = False  # Divide tied logits by sqrt(dim) (PaLM).
  residual_dropout: float = 0.0  # Rate at the last layer.
  residual_dropout_schedule: Literal["constant", "linear"] = "constant"  # LIMA: linear from 0.
  dtype: Literal["float32", "bfloat16"] = "float32"  # Compute dtype.
  param_dtype: Literal["float32", "bfloat16"] = "float32"
  remat: Literal["none", "full", "dots", "dots_no_batch", "minimal"] = "none"
  # The projections' kernel product (`model/linear.py`): full precision, BitNet's 1-bit or
  # b1.58's ternary weights (trained on float latent weights), or b1.58's packed 2-bit weights.
  linear: Literal["dense", "bitnet", "bitnet158", "bitnet158_packed"] = "dense"
  sub_norm: bool = False  # RMSNorms before o and down (HF BitNet's attn/ffn_sub_norm).
  # BitNet's scales per block of the heads / mlp axis (`model/bitlinear.py`); 0: one block per
  # device of the `model` mesh axis, fixed when training starts (1 without a mesh).
  bitnet_groups: int = 0

  @property
  def kv_heads(self) -> int:
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  @property
  def head_size(self) -> int:
    return self.dim // self.num_heads if self.head_dim is None else self.head_dim

  @property
  def queries_per_kv(self) -> int:
    return self.num_heads // self.kv_heads

  @property
  def groups(self) -> int:
    """The blocks of BitNet's scales and sub-norms (`bitnet_groups`; 1 while unresolved)."""
    return self.bitnet_groups or 1

  @property
  def layer_dropout_rates(self) -> tuple[float, ...]:
    """Residual dropout rate of each layer, bottom to top."""
    if self.residual_dropout_schedule == "constant" or self.num_layers == 1:
      return (self.residual_dropout,) * self.num_layers
    return tuple(self.residual_dropout * i / (self.num_layers - 1) for i in range(self.num_layers))

  def validate(self) -> None:
    for key in ("vocab_size", "dim", "num_layers", "num_heads", "mlp_dim", "max_seq_len"):
      _check(getattr(self, key) > 0, f"model.{key}={getattr(self, key)} must be positive")
    for key in ("num_kv_heads", "head_dim"):
      value = getattr(self, key)
      _check(value is None or value > 0, f"model.{key}={value} must be positive")
    _check(
      self.vocab_size < 2**31,
      f"model.vocab_size={self.vocab_size} is too large: token ids are 32-bit (at most 2**31 - 1)",
    )
    _check(
      self.num_heads % self.kv_heads == 0,
      f"model.num_heads={self.num_heads} is not divisible by model.num_kv_heads={self.kv_heads}",
    )
    _check(
      self.head_dim is not None or self.dim % self.num_heads == 0,
      f"model.dim={self.dim} is not divisible by model.num_heads={self.num_heads}; "
      "set model.head_dim",
    )
    _check(
      self.position != "rope" or self.head_size % 2 == 0,
      f"RoPE needs an even head size, got {self.head_size} (model.head_dim)",
    )
    _check(
      self.bitnet_groups >= 0, f"model.bitnet_groups={self.bitnet_groups} must not be negative"
    )
    for key, size in (("num_heads", self.num_heads), ("num_kv_heads", self.kv_heads)):
      _check(
        size % self.groups == 0,
        f"model.bitnet_groups={self.groups} does not divide model.{key}={size}",
      )
    _check(
      self.mlp_dim % self.groups == 0,
      f"model.bitnet_groups={self.groups} does not divide model.mlp_dim={self.mlp_dim}",
    )
    packed_rows = {
      "dim": self.dim,
      "mlp_dim": self.mlp_dim,
      "kv_heads * head_dim": self.kv_heads * self.head_size,
    }
    for key, rows in packed_rows.items():
      _check(
        self.linear != "bitnet158_packed" or rows % 4 == 0,
        f"model.linear=bitnet158_packed packs 4 weights to a byte: model.{key}={rows} is not a "
        "multiple of 4",
      )
    _check(
      not self.sub_norm or self.num_heads * self.head_size == self.dim,
      f"model.sub_norm needs num_heads * head_dim = dim ({self.num_heads} * {self.head_size} "
      f"!= {self.dim}), as HF's attn_sub_norm",
    )
    _check(self.norm_eps > 0, f"model.norm_eps={self.norm_eps} must be positive")
    _check(self.rope_theta > 0, f"model.rope_theta={self.rope_theta} must be positive")
    _check(
      0.0 <= self.residual_dropout < 1.0,
      f"model.residual_dropout={self.residual_dropout} must be in [0, 1)",
    )
