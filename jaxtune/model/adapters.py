"""The adapters a model builds around its base weights, as sizes: what `Transformer` adds for
LoRA, a prefix, a soft prompt and banks of them. Which of them train, and how a run's
`peft.method` chooses them, is `peft/`'s business (`peft/methods.py`); the model sees only this.

Adapter parameters have names no base weight has (`is_adapter`), so a tree's base part and its
adapters can be told apart by path alone.
"""

from __future__ import annotations

import dataclasses

LORA_A, LORA_B = "lora_a", "lora_b"  # The LoRA factors beside an adapted projection's kernel.
PREFIX, PROMPT = "prefix", "prompt"  # Top-level subtrees of the prefix and the soft prompt.


@dataclasses.dataclass(frozen=True)
class Lora:
  """The LoRA update `scale * (x A) B` of one projection."""

  rank: int
  scale: float  # alpha / rank.
  dropout: float
  bank: int = 0  # 0: one adapter; M > 0: a bank of M, chosen per row.


@dataclasses.dataclass(frozen=True)
class Adapters:
  """Sizes of the adapters of a model; zeros (the default) build none.

  - LoRA (Hu et al. 2021): rank `lora_rank` updates on the projections named in `lora_targets`
    (q, k, v, o, gate, up, down), scaled by `lora_alpha / lora_rank`;
  - a prefix (Li and Liang 2021): `prefix_length` keys and values at every layer, through an MLP
    of width `prefix_hidden` (0: held directly);
  - a soft prompt (Lester et al. 2021): `prompt_length` embeddings before each row.

  `bank` = M > 0 stacks M LoRA adapters or (plain) prefixes, one chosen per row by `adapter_ids`.
  """

  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_dropout: float = 0.0
  lora_targets: tuple[str, ...] = ()
  prefix_length: int = 0
  prefix_hidden: int = 0
  prompt_length: int = 0
  bank: int = 0

  @property
  def lora_scale(self) -> float:
    return self.lora_alpha / self.lora_rank

  def lora(self, projection: str) -> Lora | None:
    """The LoRA update of the projection called `projection`, or None if it has none."""
    if not self.lora_rank or projection not in self.lora_targets:
      return None
    return Lora(self.lora_rank, self.lora_scale, self.lora_dropout, self.bank)


NONE = Adapters()


def is_adapter(path: tuple[str, ...]) -> bool:
  """Whether the parameter at `path` belongs to an adapter rather than the base model."""
  return path[0] in (PREFIX, PROMPT) or path[-1] in (LORA_A, LORA_B)
