"""`jaxtune convert`: any checkpoint `jaxtune.load` reads, written as a jaxtune run or for Hugging
Face, optionally with its K/V heads pooled first (GQA/MQA uptraining, see `uptrain.py`) or its
b1.58 weights packed at 2 bits each (`ternary.py`). A LoRA
fine-tune is written merged into its base weights, or (`peft`) as its adapters alone in Hugging
Face PEFT's format (see `hf_peft.py`).

A jaxtune run written here is what training writes, less the optimizer state: config.yaml,
tokenizer/ and checkpoints/0/, so `jaxtune train train.init_from=DST` starts from it and
`jaxtune.load(DST)` reads it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import shutil
from collections.abc import Callable

import numpy as np
import yaml

from jaxtune import api, checkpoint, runs
from jaxtune.config import Config, DataConfig, TrainConfig
from jaxtune.convert import hf, hf_peft, hf_vision, llama2c, ternary, uptrain
from jaxtune.data import llama2c_tokenizer
from jaxtune.data import tokenizer as tokenizer_lib
from jaxtune.errors import CheckpointError, ConfigError
from jaxtune.model import adapters

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")


def convert(
  src: str | pathlib.Path,
  dst: str | pathlib.Path,
  to: str,
  kv_heads: int | None = None,
  dtype: str | None = None,
  pack_ternary: bool = False,
) -> None:
  """Writes the checkpoint at `src` to the new (or empty) directory `dst` in format `to`
  ("jaxtune", "hf" or "peft"), its K/V heads first pooled to `kv_heads` if given, its parameters in
  `dtype` (default: as loaded, see `api.load`; float16 only for "hf"); with `pack_ternary`, a
  `bitnet158` model as its packed 2-bit inference model (see `ternary.py`)."""
  dst = pathlib.Path(dst)
  if to not in _WRITERS:
    raise ConfigError(f"cannot convert to {to!r}; formats: {', '.join(_WRITERS)}")
  if dtype not in (None, *DTYPES):
    raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
  if dtype == "float16" and to != "hf":
    raise ConfigError("jaxtune parameters are float32 or bfloat16, not float16")
  if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
    raise CheckpointError(f"{dst}: already exists and is not empty; convert into a new directory")
  model = api.load(src, param_dtype="float32" if dtype == "float16" else dtype)
  if to != "peft":
    model = model.merged()  # A LoRA fine-tune as plain weights.
  elif kv_heads is not None:
    raise ConfigError("--kv-heads changes the base model; it does not apply to --to peft")
  if kv_heads is not None:
    cfg, variables = uptrain.to_kv_heads(model.config, {"params": model.params}, kv_heads)
    model = dataclasses.replace(model, config=cfg, params=variables["params"])
  if pack_ternary:
    if to == "peft":
      raise ConfigError("--pack-ternary packs a whole model; it does not apply to --to peft")
    cfg, params = ternary.pack(model.config, model.params)
    model = dataclasses.replace(model, config=cfg, params=params)
  existed = dst.exists()
  try:
    _WRITERS[to](model, dst, dtype or model.config.param_dtype)
  except BaseException:
    shutil.rmtree(dst, ignore_errors=True)  # No half-written checkpoint is left behind.
    if existed:
      dst.mkdir()
    raise
  log.info("converted %s to %s (%s)", src, dst, to)


def save_run(model: api.Model, folder: str | pathlib.Path, step: int = 0) -> None:
  """Writes `model` as a jaxtune run directory with one checkpoint, `step`."""
  folder = pathlib.Path(folder).absolute()
  saved_tokenizer = folder / runs.TOKENIZER
  cfg = Config(
    model=model.config,
    data=DataConfig(
      template=model.template, tokenizer=str(saved_tokenizer) if model.tokenizer else ""
    ),
    train=TrainConfig(output_dir=str(folder)),
  )
  folder.mkdir(parents=True, exist_ok=True)
  with open(folder / runs.CONFIG, "w") as f:
    yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
  if model.tokenizer is not None:
    model.tokenizer.save(str(saved_tokenizer))
  log.info("writing the parameters to %s", folder / runs.CHECKPOINTS)
  ckpt = checkpoint.Checkpointer(str(folder / runs.CHECKPOINTS), keep=1)
  ckpt.save(step, {"step": np.int32(step), "params": model.params}, {})
  ckpt.close()


def _write_jaxtune(model: api.Model, folder: pathlib.Path, dtype: str) -> None:
  del dtype  # Loaded in it.
  save_run(model, folder)


def _write_hf(model: api.Model, folder: pathlib.Path, dtype: str) -> None:
  if model.llava is not None:  # LlavaForConditionalGeneration: CLIP or SigLIP tower.
    if dtype != "float32":
      raise ConfigError(f"a LLaVA model exports in float32, not --dtype {dtype}")
    hf_vision.save_llava(model.llava, model.params, folder)
    if model.preprocess is not None:  # How its images are prepared travels with it.
      preprocess = json.dumps(model.preprocess.to_hf(), indent=2)
      (folder / "preprocessor_config.json").write_text(preprocess + "\n")
  else:
    hf.save_hf(model.config, model.params, folder, dtype)
  if model.tokenizer is not None:
    save_hf_tokenizer(model.tokenizer, folder, hf.family_for(model.config))


def save_hf_tokenizer(tok: api.Tokenizer, folder: pathlib.Path, family: str = "llama") -> None:
  """The tokenizer as transformers' AutoTokenizer reads it, encoding as jaxtune does: a
  tokenizer.json as it is (with tokenizer_config.json); a SentencePiece model, or a llama2.c
  tokenizer as the SentencePiece model it came from, as tokenizer.model with
  tokenizer_config.json. Both keep jaxtune's added tokens in special_tokens.json too."""
  folder = pathlib.Path(folder)
  if isinstance(tok, llama2c_tokenizer.Tokenizer):
    tok = llama2c.to_sentencepiece(tok)
  tok.save(str(folder))
  if isinstance(tok, tokenizer_lib.Tokenizer):
    _write_tokenizer_config(tok, folder, family)


def _write_tokenizer_config(tok: tokenizer_lib.Tokenizer, folder: pathlib.Path, family: str):
  """tokenizer_config.json, so that transformers reads tokenizer.model as the SentencePiece
  tokenizer of the family (BOS first, as jaxtune's templates begin), with the added tokens, and
  puts the dummy prefix where jaxtune does (`legacy` false: "first", its default since
  transformers 5 but not before)."""
  added = {
    str(i): dict(content=t, special=True, lstrip=False, rstrip=False, normalized=False)
    for t, i in tok.added.items()
  }
  config = dict(
    tokenizer_class="GemmaTokenizer" if family == "gemma" else "LlamaTokenizer",
    add_bos_token=True,
    add_eos_token=False,
    legacy=tok.prepend_scheme == "always",
    added_tokens_decoder=added,
  )
  for name, i in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id)):
    if i >= 0:
      config[name] = tok.piece(i)
  (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _write_peft(model: api.Model, folder: pathlib.Path, dtype: str) -> None:
  if model.adapters == adapters.NONE:
    raise CheckpointError("not a PEFT fine-tune: there are no adapters to export (use --to hf)")
  log.info(
    "adapters for the base model %s with a %d-token vocabulary (a run that added tokens needs "
    "them in the base too: --to hf exports the whole fine-tune)",
    model.base or "(the run's random initialization)",
    model.config.vocab_size,
  )
  hf_peft.save_adapter(model.config, model.adapters, model.params, folder, model.base, dtype)


_WRITERS: dict[str, Callable[[api.Model, pathlib.Path, str], None]] = {
  "jaxtune": _write_jaxtune,
  "hf": _write_hf,
  "peft": _write_peft,
}
