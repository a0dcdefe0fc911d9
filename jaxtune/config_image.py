"""The `vision` section of a run's config: a LLaVA model's vision encoder, projector, images and
training stage (`train/llava_run.py` builds the run from it). `encoder: none` (the default) is a
text-only run.

A flat frozen dataclass like the sections of `config.py` (whose `ModelConfig` `config_vision.py`
needs, hence a module of its own); `llava(model)` is the `LlavaConfig` it describes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from jaxtune.config_values import check as _check

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class ImageConfig:
  """A ViT (fields as `config_vision.VisionConfig`'s), LLaVA's projector and feature choice
  (as `LlavaConfig`'s), how images are read, and which parameters train:
  `stage: projector` (LLaVA's stage 1: the projector alone) or `language` (stage 2: the
  projector and what `peft.method` trains of the decoder: all of it, or its adapters). The
  encoder never trains. `image_token_id` -1: the tokenizer's `<image>` token (resolved when
  the run starts and recorded in its config)."""

  encoder: Literal["none", "vit"] = "none"
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

  def vision_config(self, model: Any):
    """The encoder's `VisionConfig`, in the decoder's (`model`'s) dtypes."""
    from jaxtune.config_vision import VisionConfig

    names = {f.name for f in dataclasses.fields(VisionConfig)} - {"dtype", "param_dtype"}
    return VisionConfig(
      **{k: getattr(self, k) for k in names}, dtype=model.dtype, param_dtype=model.param_dtype
    )

  def llava(self, model: Any):
    """The `LlavaConfig` of this encoder and projector with the decoder `model`."""
    from jaxtune.config_vision import LlavaConfig

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
    from jaxtune.config import ModelConfig

    self.vision_config(ModelConfig()).validate()
