"""The PEFT methods, by `peft.method`: the one place that reads that name.

A method is what the model builds for it (`Adapters`, see `model/adapters.py`), which parameters
train (a predicate on their paths, for `partition.split`) and, for prefix and prompt tuning, how
its parameters start from real text. Everything else works from these objects:

- `none`: everything trains (full fine-tuning);
- `lora`: the `lora_a` / `lora_b` arrays of the adapted projections;
- `prefix` / `prompt`: the top-level `prefix` / `prompt` subtree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from jaxtune.config import PeftConfig
from jaxtune.config_model import ModelConfig
from jaxtune.model import transformer
from jaxtune.model.adapters import LORA_A, LORA_B, NONE, PREFIX, PROMPT, Adapters
from jaxtune.peft import partition, prefix
from jaxtune.peft.partition import Predicate

# (model config, params, token ids) -> the adapter's subtree, started from those tokens.
FromText = Callable[[ModelConfig, Any, Sequence[int]], Any]


@dataclasses.dataclass(frozen=True)
class Method:
  adapters: Callable[[PeftConfig], Adapters]
  trains: Predicate
  root: str = ""  # The top-level subtree that holds the method's parameters, if one does.
  init_text: Callable[[PeftConfig], str] = lambda peft: ""
  from_text: FromText | None = None


def _lora(peft: PeftConfig) -> Adapters:
  return Adapters(
    lora_rank=peft.lora_rank,
    lora_alpha=peft.lora_alpha,
    lora_dropout=peft.lora_dropout,
    lora_targets=peft.lora_targets,
  )


def _prefix_from_text(cfg: ModelConfig, params: Any, ids: Sequence[int]) -> Any:
  base = transformer.Transformer(cfg)
  return prefix.init_from_text(base, partition.base(params), params[PREFIX], ids)


def _prompt_from_text(cfg: ModelConfig, params: Any, ids: Sequence[int]) -> Any:
  return prefix.init_prompt_from_text(cfg, params, ids, params[PROMPT].shape[0])


METHODS: dict[str, Method] = {
  "none": Method(lambda peft: NONE, lambda path: True),
  "lora": Method(_lora, lambda path: path[-1] in (LORA_A, LORA_B)),
  "prefix": Method(
    lambda peft: Adapters(prefix_length=peft.prefix_length, prefix_hidden=peft.prefix_hidden),
    lambda path: path[0] == PREFIX,
    PREFIX,
    lambda peft: peft.prefix_init_text,
    _prefix_from_text,
  ),
  "prompt": Method(
    lambda peft: Adapters(prompt_length=peft.prompt_length),
    lambda path: path[0] == PROMPT,
    PROMPT,
    lambda peft: peft.prompt_init_text,
    _prompt_from_text,
  ),
}


def adapters(peft: PeftConfig) -> Adapters:
  """What the model builds for `peft`."""
  return METHODS[peft.method].adapters(peft)


def trains(peft: PeftConfig) -> Predicate:
  """Which parameters train under `peft`."""
  return METHODS[peft.method].trains


def model(cfg: ModelConfig, peft: PeftConfig, **kwargs) -> transformer.Transformer:
  """The model of `cfg` with the adapters of `peft`."""
  return transformer.Transformer(cfg, adapters(peft), **kwargs)
