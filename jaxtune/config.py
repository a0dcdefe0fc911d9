"""Configuration: frozen dataclass sections loaded as defaults <- YAML file <- `section.key=value`.

Every key has a type; values from YAML or the command line are coerced by that type (the
machinery, which knows types but not keys, is `config_values.py`), and unknown keys, wrong types
and invalid values raise `ConfigError` naming the key and where it came from.
Validation runs once, on the final values. Derived values are properties, never stored keys.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from jaxtune import config_values
from jaxtune.config_model import ModelConfig
from jaxtune.config_ppo import PpoConfig
from jaxtune.config_values import check as _check
from jaxtune.config_vision import ImageConfig
from jaxtune.model import presets  # Plain data: imports nothing.

_FLOAT32_MAX = 3.4028234663852886e38  # numpy.finfo(float32).max, without importing numpy here.


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """A 2D ("data", "model") device mesh. -1 fills the axis with the remaining devices."""

  data: int = -1
  model: int = 1
  strategy: Literal["tp", "fsdp"] = "tp"

  def validate(self) -> None:
    for key in ("data", "model"):
      value = getattr(self, key)
      _check(value == -1 or value > 0, f"mesh.{key}={value} must be positive or -1")
    _check(
      not (self.data == -1 and self.model == -1),
      "mesh.data and mesh.model cannot both be -1",
    )


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Instruction data: where it is, how it reads, renders, tokenizes and packs."""

  # "": the embedded synthetic mixture; a .json/.jsonl/.tsv file; a TFDS-prepared directory;
  # or a folder of Flan CoT .tsv files (one task each, mixed Flan-style).
  path: str = ""
  format: Literal[
    "auto",
    "alpaca",
    "sharegpt",
    "messages",
    "dolly",
    "gsm8k",
    "flan_cot",
    "prompt_completion",
    "pairwise",  # Preference data (`data/preference.py`).
    "ranked",
  ] = "auto"
  fields: str = ""  # Field renames, e.g. "instruction=query,output=response".
  tsv_columns: str = "question,answer,rationale"
  # ChatML: 8 tokens of markers a turn where Alpaca's header takes 25. With zero-shot examples
  # (`few_shot`) the embedded mixture's examples are 33 tokens instead of 59: the default run
  # sees 1.8 times more of them, and their questions are a larger share of what attention sees.
  template: Literal["alpaca", "vicuna", "lima", "llama2", "chatml", "raw"] = "chatml"
  system_prompt: str | None = None
  tokenizer: str = ""  # A .model (SentencePiece), .bin (llama2.c), .json, or folder; "": train.
  # 1024: the embedded mixture's words become whole pieces (at 512 they split into fragments
  # that differ with context); the model's `vocab_size` matches.
  tokenizer_vocab_size: int = 1024
  max_length: int = 128  # Next-token pairs per row.
  truncation: Literal["truncate", "drop"] = "truncate"
  pack: bool = True
  # Most segments (examples, or preference responses) in a packed row; 0: as many as the data's
  # shortest allows. Bounds the preference objectives' [rows, S, S] pair matrix.
  max_segments: int = 0
  train_on_prompt: bool = False
  on_bad_record: Literal["error", "skip"] = "error"
  shuffle: bool = True
  eval_path: str = ""
  eval_size: int = 0  # Records of `path` held out for evaluation when there is no eval_path.
  mixture_cap: int = 0  # Per-task cap of a mixture (0: none).
  # Exemplars in half of a mixture's examples (0: zero-shot only, as the default run's held-out
  # prompts are; an exemplar doubles an example's tokens for the same supervised answer).
  few_shot: int = 0
  synthetic_examples: int = 2000  # Records per embedded task, times its share (data/synthetic.py).

  def validate(self) -> None:
    for key in ("max_length", "tokenizer_vocab_size", "synthetic_examples"):
      _check(getattr(self, key) > 0, f"data.{key}={getattr(self, key)} must be positive")
    for key in ("eval_size", "mixture_cap", "few_shot", "max_segments"):
      _check(getattr(self, key) >= 0, f"data.{key}={getattr(self, key)} must not be negative")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The training loop, optimizer, schedule, checkpoints and metrics."""

  steps: int = 740  # Used when `epochs` is 0.
  epochs: int = 0  # If > 0, the run is this many passes over the training data.
  seed: int = 0
  batch_size: int = 16  # Global, in rows of data.max_length.
  micro_batches: int = 1  # Gradient accumulation: the batch is split into this many parts.
  optimizer: Literal["adamw", "adafactor"] = "adamw"
  # The default run (seed 0, before the mixture's drawn openings): held-out exact match 52.5% at
  # 3e-3 (720 steps), 72.5% at 5e-3, 62.5% at 7e-3 (680 steps); with them, 5e-3 gives 76.2 /
  # 78.8 / 78.8% at seeds 0 / 1 / 2 (740 steps; README).
  learning_rate: float = 5e-3
  end_learning_rate: float = 3e-4
  schedule: Literal["constant", "cosine", "linear", "rsqrt"] = "cosine"
  warmup_steps: int = 30
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.0
  clip_norm: float = 1.0  # 0: no clipping.
  objective: str = "sft"  # What the step minimizes (`train/objective.py`; ppo: `train/ppo_run.py`).
  z_loss: float = 0.0  # PaLM's auxiliary loss on log(Z)^2 (1e-4 in PaLM).
  # Preference objectives (`train/dpo.py`, `train/reward.py`).
  preference_beta: float = 0.1  # DPO's and IPO's beta; SimPO's (which takes ~2).
  label_smoothing: float = 0.0  # Conservative DPO: the chance a label is flipped (< 0.5).
  simpo_gamma: float = 0.5  # SimPO's target reward margin.
  reward_margin: float = 0.0  # The reward model's margin per rank apart (0: InstructGPT's).
  # DPO's reference (`train/reference.py`): auto (the base under an adapter method, else a
  # frozen copy), base, copy, or precomputed (log-probabilities computed once, in the run folder).
  reference: Literal["auto", "base", "copy", "precomputed"] = "auto"
  # A precomputed reference also keeps its k most likely next tokens at each supervised token,
  # for the `kl` metric (k * 8 + 4 bytes per supervised token; `train/precomputed.py`).
  reference_top_k: int = 16
  # NEFTune: 0 is off; the paper uses 5, 10, 15 on 4096-wide models. Its noise, alpha/sqrt(L*d),
  # is sqrt(4096/128) = 5.7 times stronger against a 128-wide model's embeddings: on the default
  # run (400 steps) alpha 5 gave 17.5% held-out exact match, alpha 0 28.7%.
  neftune_alpha: float = 0.0
  nonfinite: Literal["stop", "skip"] = "stop"  # What a non-finite loss, gradient or update does.
  log_every: int = 20
  eval_every: int = 100
  # Held-out prompts per task family answered greedily before and after training, scored by
  # exact match (`train/held_out.py`); 0: none.
  held_out_prompts: int = 16
  checkpoint_every: int = 200
  keep_checkpoints: int = 2
  # False: no checkpoint of the last step, for runs measured by their metrics alone (a sweep's
  # arms); `jaxtune.load`, `train.resume` and `train.init_from` need the checkpoint.
  final_checkpoint: bool = True
  resume: bool = False  # Continue from the latest checkpoint in output_dir.
  # Pretrained weights: a llama2.c .bin, a Hugging Face folder or a jaxtune run directory.
  init_from: str = ""
  peak_flops: float = 0.0  # Per device, for MFU; 0: the vendor's, or measured (train/peak.py).
  output_dir: str = "runs/default"

  def validate(self) -> None:
    for key in (
      "steps",
      "batch_size",
      "micro_batches",
      "log_every",
      "eval_every",
      "checkpoint_every",
      "keep_checkpoints",
    ):
      _check(getattr(self, key) > 0, f"train.{key}={getattr(self, key)} must be positive")
    for key in (
      "epochs",
      "held_out_prompts",
      "warmup_steps",
      "weight_decay",
      "clip_norm",
      "z_loss",
      "neftune_alpha",
      "end_learning_rate",
      "peak_flops",
    ):
      _check(getattr(self, key) >= 0, f"train.{key}={getattr(self, key)} must not be negative")
    _check(
      self.preference_beta > 0, f"train.preference_beta={self.preference_beta} must be positive"
    )
    _check(self.reference_top_k >= 1, f"train.reference_top_k={self.reference_top_k} must be >= 1")
    _check(
      0 <= self.label_smoothing < 0.5,
      f"train.label_smoothing={self.label_smoothing} must be in [0, 0.5)",
    )
    _check(self.learning_rate > 0, f"train.learning_rate={self.learning_rate} must be positive")
    for key in ("b1", "b2"):
      value = getattr(self, key)
      _check(0.0 <= value < 1.0, f"train.{key}={value} must be in [0, 1)")
    _check(self.eps > 0, f"train.eps={self.eps} must be positive")
    _check(0 <= self.seed < 2**32, f"train.seed={self.seed} must be in [0, 2**32)")
    _check(bool(self.output_dir), "train.output_dir must not be empty")
    # Both parameter dtypes (float32, bfloat16) top out at about 3.4e38: a larger rate
    # overflows in the update, however small the gradient.
    for key in ("learning_rate", "end_learning_rate"):
      value = getattr(self, key)
      _check(
        math.isfinite(value) and value <= _FLOAT32_MAX,
        f"train.{key}={value} does not fit the parameters' float32 or bfloat16 "
        f"(at most {_FLOAT32_MAX:.3g})",
      )
    _check(
      self.batch_size % self.micro_batches == 0,
      f"train.batch_size={self.batch_size} is not divisible by "
      f"train.micro_batches={self.micro_batches}",
    )


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class PeftConfig:
  """Parameter-efficient fine-tuning: which parameters train (see `jaxtune/peft/`).

  - `lora` (Hu et al. 2021): rank-`lora_rank` updates `(alpha / rank) * A B` on `lora_targets`;
  - `prefix` (Li and Liang 2021): `prefix_length` trainable keys and values at every layer,
    produced during training by an MLP of width `prefix_hidden` (0: trained directly);
  - `prompt` (Lester et al. 2021): `prompt_length` trainable embeddings before each row.

  `prefix_init_text` / `prompt_init_text`: start from the activations / embeddings of this text's
  tokens (repeated to the length) instead of random values.
  """

  method: Literal["none", "lora", "prefix", "prompt"] = "none"
  lora_rank: int = 8
  lora_alpha: float = 16.0
  lora_dropout: float = 0.0
  lora_targets: tuple[str, ...] = ("q", "v")
  prefix_length: int = 16
  prefix_hidden: int = 512
  prefix_init_text: str = ""
  prompt_length: int = 16
  prompt_init_text: str = ""

  @property
  def lora_scale(self) -> float:
    return self.lora_alpha / self.lora_rank

  def validate(self) -> None:
    _check(self.lora_rank > 0, f"peft.lora_rank={self.lora_rank} must be positive")
    _check(
      0.0 <= self.lora_dropout < 1.0, f"peft.lora_dropout={self.lora_dropout} must be in [0, 1)"
    )
    unknown = sorted(set(self.lora_targets) - set(LORA_TARGETS))
    _check(
      not unknown and bool(self.lora_targets),
      f"peft.lora_targets={list(self.lora_targets)}: choose among {list(LORA_TARGETS)}",
    )
    for key in ("prefix_length", "prefix_hidden", "prompt_length"):
      _check(getattr(self, key) >= 0, f"peft.{key}={getattr(self, key)} must not be negative")
    # What the method trains must not be empty or scaled to nothing.
    used = {"lora": "lora_alpha", "prefix": "prefix_length", "prompt": "prompt_length"}
    key = used.get(self.method)
    if key is not None:
      _check(
        getattr(self, key) > 0,
        f"peft.{key}={getattr(self, key)} must be positive with peft.method={self.method}: "
        "nothing would train",
      )


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """Multi-process runs (`jaxtune/distributed.py`). A key set here wins over its environment
  variable (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), which wins over what
  JAX detects on Cloud TPU VMs and under SLURM or Open MPI."""

  # auto: multi-process when set or detected; required: fail if not; disabled: one process.
  mode: Literal["auto", "required", "disabled"] = "auto"
  coordinator_address: str = ""  # host:port of process 0.
  num_processes: int = 0  # 0: from the environment or detected.
  process_id: int = -1  # -1: from the environment or detected.
  initialization_timeout_s: int = 300  # How long to wait for every process to join.
  heartbeat_timeout_s: int = 100  # A process silent this long is lost: the others stop.
  shutdown_timeout_s: int = 300  # How long a finished or failed process waits for the others.

  def validate(self) -> None:
    host, colon, port = self.coordinator_address.rpartition(":")
    _check(
      not self.coordinator_address or (bool(host and colon) and port.isdigit()),
      f"distributed.coordinator_address={self.coordinator_address!r} must be host:port",
    )
    _check(
      self.num_processes >= 0,
      f"distributed.num_processes={self.num_processes} must not be negative",
    )
    _check(
      self.process_id >= -1, f"distributed.process_id={self.process_id} must be -1 or an index"
    )
    _check(
      not self.num_processes or self.process_id < self.num_processes,
      f"distributed.process_id={self.process_id} must be below "
      f"distributed.num_processes={self.num_processes}",
    )
    for key in ("initialization_timeout_s", "heartbeat_timeout_s", "shutdown_timeout_s"):
      _check(getattr(self, key) > 0, f"distributed.{key}={getattr(self, key)} must be positive")


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = ModelConfig()
  mesh: MeshConfig = MeshConfig()
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()
  peft: PeftConfig = PeftConfig()
  distributed: DistributedConfig = DistributedConfig()
  vision: ImageConfig = ImageConfig()  # A LLaVA model's encoder and projector (`config_vision`).
  ppo: PpoConfig = PpoConfig()  # PPO-ptx, with train.objective=ppo (`config_ppo`).

  def to_dict(self) -> dict[str, dict[str, Any]]:
    """Plain values (tuples as lists), as YAML writes them."""
    return {
      section: {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
      for section, values in dataclasses.asdict(self).items()
    }


_SECTIONS: dict[str, type] = typing.get_type_hints(Config)


def load(path: str | Sequence[str] | None = None, overrides: Sequence[str] = ()) -> Config:
  """Builds a Config from defaults, then the YAML file(s) at `path` (later files override
  earlier ones: a recipe, then e.g. configs/lora.yaml), then `section.key=value` items.

  An override's value is text converted by its key's type, not YAML: a string key takes the text
  exactly as written; numbers, booleans and lists (`a,b` or `[a, b]`) are parsed; `none` or
  `null` is None where the key allows it."""
  raw: dict[str, dict[str, tuple[Any, str]]] = {}  # section -> key -> (value, source)
  for one in [path] if isinstance(path, str) else path or ():
    _merge_yaml(raw, one)
  for item in overrides:
    key, sep, text = item.partition("=")
    _check(bool(sep), f"override {item!r} is not of the form section.key=value")
    section, dot, name = key.strip().partition(".")
    _check(bool(dot and name), f"override {item!r}: the key must be section.key")
    _add(raw, section, name, config_values.Text(text), "the command line")
  return from_dict(raw)


def check_paths(cfg: Config) -> None:
  """What training needs of the file system, checked before anything is written: that
  `train.output_dir` is or can become a folder, and that `train.init_from` (and
  `vision.init_from`) exist. (Not part of
  `validate`: a finished run's config must still load after these paths have moved.)"""
  out = cfg.train.output_dir
  existing = out
  while existing and not os.path.exists(existing):
    existing = os.path.dirname(existing)
  _check(
    not existing or os.path.isdir(existing),
    f"train.output_dir={out}: "
    + ("is a file, not a folder" if existing == out else f"{existing} is a file, not a folder"),
  )
  init = cfg.train.init_from
  _check(not init or os.path.exists(init), f"train.init_from={init}: no such file or folder")
  vision = cfg.vision.init_from if cfg.vision.enabled else ""
  _check(not vision or os.path.isdir(vision), f"vision.init_from={vision}: no such folder")


def from_dict(raw: Mapping[str, Mapping[str, Any]]) -> Config:
  """Builds a Config from {section: {key: value}}; values may be (value, source) pairs."""
  sections = {}
  for section, section_type in _SECTIONS.items():
    items = {k: v if isinstance(v, tuple) else (v, "") for k, v in raw.get(section, {}).items()}
    base = section_type()
    hints = typing.get_type_hints(section_type)
    if section == "model" and "preset" in items:
      name, source = items["preset"]
      where = f" (from {source})" if source else ""
      name = config_values.coerce("model.preset", name, hints["preset"], where)
      if name is not None:  # null: no preset.
        base = _preset((name, source))
    values = {}
    for key, (value, source) in items.items():
      where = f" (from {source})" if source else ""
      _check(key in hints, config_values.unknown(f"{section}.{key}", hints, where))
      values[key] = config_values.coerce(f"{section}.{key}", value, hints[key], where)
    built = dataclasses.replace(base, **values)
    built.validate()
    sections[section] = built
  for section in raw:
    _check(section in _SECTIONS, config_values.unknown(section, _SECTIONS, ""))
  return Config(**sections)


def _preset(item: tuple[Any, str]) -> ModelConfig:
  name, source = item
  where = f" (from {source})" if source else ""
  _check(
    name in presets.PRESETS, config_values.unknown(f"model.preset={name}", presets.PRESETS, where)
  )
  return ModelConfig(preset=name, **presets.PRESETS[name])


def _merge_yaml(raw: dict, path: str) -> None:
  data = config_values.read_yaml(path)
  for section, items in data.items():
    _check(
      isinstance(items, dict),
      f"{path}: section {section!r} must be a mapping of keys to values",
    )
    for key, value in items.items():
      _add(raw, str(section), str(key), value, path)


def _add(raw: dict, section: str, key: str, value: Any, source: str) -> None:
  raw.setdefault(section, {})[key] = (value, source)
