"""The vision configs: a ViT image encoder (`VisionConfig`), a LLaVA model (`LlavaConfig`:
encoder, projector and decoder), and a run's `vision` section (`ImageConfig`: the encoder,
projector, images and training stage that `train/llava_run.py` builds a run from; `encoder: none`,
the default, is a text-only run; `llava(model)` is the `LlavaConfig` it describes).

Frozen dataclasses like those of `config.py`; kept apart from it so that the text-only sections
stay as they are. Derived values are properties.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from jaxtune.config_model import ModelConfig
from jaxtune.config_values import check as _check

# The encoders' MLP activations, by their Hugging Face names.
ACTIVATIONS = ("quick_gelu", "gelu_pytorch_tanh", "gelu")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """A ViT: square images cut into `patch_size` patches, pre-norm LayerNorm blocks with biases.

  CLIP: a class token, a LayerNorm before the blocks (`pre_norm`), a patch embedding without bias,
  quick-GELU. SigLIP: no class token, no pre-norm, a patch bias, tanh GELU.
  """

  image_size: int = 224
  patch_size: int = 16
  channels: int = 3
  dim: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  act: Literal["quick_gelu", "gelu_pytorch_tanh", "gelu"] = "quick_gelu"
  norm_eps: float = 1e-5
  class_token: bool = True
  pre_norm: bool = True
  patch_bias: bool = False
  dtype: Literal["float32", "bfloat16"] = "float32"
  param_dtype: Literal["float32", "bfloat16"] = "float32"

  @property
  def grid(self) -> int:
    """Patches per side."""
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid**2

  @property
  def num_positions(self) -> int:
    """Tokens the blocks see: the patches and the class token."""
    return self.num_patches + int(self.class_token)

  @property
  def head_dim(self) -> int:
    return self.dim // self.num_heads

  def validate(self) -> None:
    for key in ("image_size", "patch_size", "channels", "dim", "num_layers", "num_heads"):
      _check(getattr(self, key) > 0, f"vision.{key}={getattr(self, key)} must be positive")
    _check(self.mlp_dim > 0, f"vision.mlp_dim={self.mlp_dim} must be positive")
    _check(
      self.image_size % self.patch_size == 0,
      f"vision.patch_size={self.patch_size} does not divide vision.image_size={self.image_size}",
    )
    _check(
      self.dim % self.num_heads == 0,
      f"vision.num_heads={self.num_heads} does not divide vision.dim={self.dim}",
    )
    _check(self.act in ACTIVATIONS, f"vision.act={self.act!r}: choose among {list(ACTIVATIONS)}")


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
  """A vision encoder, a projector to the decoder's width and the decoder.

  `feature_layer` picks the encoder's hidden state as Hugging Face's `hidden_states` counts them
  (0: the embeddings; k: after block k; -1: the last block; LLaVA's default -2, the penultimate).
  `feature_select` "patch" drops the class token (LLaVA's "default"), "full" keeps it.
  `projector` "linear" (LLaVA) or "mlp2x_gelu" (LLaVA-1.5: linear, exact GELU, linear).
  `<image>` in a prompt becomes `image_tokens` copies of `image_token_id`, whose embeddings the
  projected features replace.
  """

  vision: VisionConfig = VisionConfig()
  text: ModelConfig = ModelConfig()
  projector: Literal["linear", "mlp2x_gelu"] = "mlp2x_gelu"
  feature_layer: int = -2
  feature_select: Literal["patch", "full"] = "patch"
  image_token_id: int = 0

  @property
  def image_tokens(self) -> int:
    """Token slots one image takes in the sequence."""
    v = self.vision
    return v.num_patches + int(v.class_token and self.feature_select == "full")

  @property
  def feature_index(self) -> int:
    """`feature_layer` as an index into the L + 1 hidden states."""
    return self.feature_layer % (self.vision.num_layers + 1)

  def validate(self) -> None:
    self.vision.validate()
    self.text.validate()
    layers = self.vision.num_layers
    _check(
      -layers - 1 <= self.feature_layer <= layers,
      f"llava.feature_layer={self.feature_layer} is not a hidden state of {layers} layers",
    )
    _check(self.projector in ("linear", "mlp2x_gelu"), f"llava.projector={self.projector!r}")
    _check(
      self.feature_select in ("patch", "full"),
      f"llava.feature_select={self.feature_select!r}: choose 'patch' or 'full'",
    )
    _check(
      0 <= self.image_token_id < self.text.vocab_size,
      f"llava.image_token_id={self.image_token_id} is not in the vocabulary of "
      f"{self.text.vocab_size}",
    )


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class ImageConfig:
  """A ViT (fields as `VisionConfig`'s), LLaVA's projector and feature choice
  (as `LlavaConfig`'s), how images are read, and which parameters train:
  `stage: projector` (LLaVA's stage 1: the projector alone) or `language` (stage 2: the
  projector and what `peft.method` trains of the decoder: all of it, or its adapters). The
  encoder never trains. `image_token_id` -1: the tokenizer's `<image>` token (resolved when
  the run starts and recorded in its config). `init_from`: a pretrained encoder, a Hugging Face
  `CLIPVisionModel` or `SiglipVisionModel` folder (`python -m jaxtune.train.vision_pretrain`
  writes one), whose config must match this section's ("": the encoder starts random)."""

  encoder: Literal["none", "vit"] = "none"
  init_from: str = ""
  image_size: int = 224
  patch_size: int = 16
  channels: int = 3
  dim: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  act: Literal["quick_gelu", "gelu_pytorch_tanh", "gelu"] = "quick_gelu"
  norm_eps: float = 1e-5
  class_token: bool = True
  pre_norm: bool = True
  patch_bias: bool = False
  projector: Literal["linear", "mlp2x_gelu"] = "mlp2x_gelu"
  feature_layer: int = -2
  feature_select: Literal["patch", "full"] = "patch"
  image_token_id: int = -1
  stage: Literal["projector", "language"] = "projector"
  image_folder: str = ""  # Image paths are relative to it ("": the data file's folder).
  resize: Literal["shortest_edge", "square"] = "shortest_edge"
  mean: tuple[float, ...] = CLIP_MEAN
  std: tuple[float, ...] = CLIP_STD
  pad_to_square: bool = False

  @property
  def enabled(self) -> bool:
    return self.encoder != "none"

  def vision_config(self, model: ModelConfig) -> VisionConfig:
    """The encoder's `VisionConfig`, in the decoder's (`model`'s) dtypes."""
    names = {f.name for f in dataclasses.fields(VisionConfig)} - {"dtype", "param_dtype"}
    return VisionConfig(
      **{k: getattr(self, k) for k in names}, dtype=model.dtype, param_dtype=model.param_dtype
    )

  def llava(self, model: ModelConfig) -> LlavaConfig:
    """The `LlavaConfig` of this encoder and projector with the decoder `model`."""
    return LlavaConfig(
      vision=self.vision_config(model),
      text=model,
      projector=self.projector,
      feature_layer=self.feature_layer,
      feature_select=self.feature_select,
      image_token_id=self.image_token_id,
    )

  def validate(self) -> None:
    if not self.enabled:
      return
    _check(
      len(self.mean) == len(self.std) == self.channels,
      f"vision.mean ({len(self.mean)} values) and vision.std ({len(self.std)}) need one value "
      f"per channel (vision.channels={self.channels})",
    )
    _check(all(s > 0 for s in self.std), f"vision.std={list(self.std)} must be positive")
    _check(
      self.image_token_id >= -1,
      f"vision.image_token_id={self.image_token_id}: a token id, or -1 for the tokenizer's <image>",
    )
    self.vision_config(ModelConfig()).validate()
