"""Visual instruction tuning's objective: SFT's loss, with each row's images (`images`
[B, M, Y, X, C]) in place of its image tokens (`model/llava.py`), which carry no loss.

Which parameters train is LLaVA's stage (`llava_run.STAGES`): stage 1 the projector alone,
stage 2 the projector and the decoder (or its LoRA adapters); the vision encoder stays frozen.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from jaxtune.config import TrainConfig
from jaxtune.errors import ConfigError
from jaxtune.model import llava, transformer
from jaxtune.train import sft


@dataclasses.dataclass(frozen=True)
class LlavaSFT(sft.SFT):
  batch_keys: ClassVar[tuple[str, ...]] = (*sft.SFT.batch_keys, "images")
  extra_inputs: ClassVar[tuple[str, ...]] = ("images",)

  @classmethod
  def from_config(cls, model: transformer.Transformer, train: TrainConfig) -> LlavaSFT:
    if not isinstance(model, llava.Llava):
      raise ConfigError(
        "train.objective=llava_sft needs a LLaVA model: set vision.encoder (see "
        "configs/llava_stage1.yaml)"
      )
    return cls(model, train.z_loss, train.neftune_alpha)
