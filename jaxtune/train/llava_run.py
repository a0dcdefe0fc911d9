"""What a LLaVA run (`vision.encoder` set) builds differently from a text-only one, for the
generic loop (`train/loop.py`): the model (decoder, encoder, projector), its initialization, which
parameters train (LLaVA's stage), its data (`data/llava_data.py`) and the image token it reads.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxtune.config import Config
from jaxtune.data import llava_data
from jaxtune.errors import ConfigError
from jaxtune.model import llava, transformer
from jaxtune.peft import methods
from jaxtune.peft.partition import Predicate


def model(cfg: Config, **kwargs: Any) -> transformer.Transformer:
  """The run's model: `model` (with `peft`'s adapters), and `vision`'s encoder and projector
  when set."""
  if not cfg.vision.enabled:
    return methods.model(cfg.model, cfg.peft, **kwargs)
  if cfg.train.objective != "llava_sft":
    raise ConfigError(
      f"vision.encoder={cfg.vision.encoder} trains with train.objective=llava_sft (its batches "
      f"carry the images), not {cfg.train.objective}"
    )
  return llava.model(cfg.vision.llava(cfg.model), adapters=methods.adapters(cfg.peft), **kwargs)


def init_fn(module: transformer.Transformer):
  """`rng -> variables` of any part the module has."""
  if isinstance(module, llava.Llava):
    return llava.init_fn(module)
  return transformer.init_fn(module)


# `vision.stage` -> which parameters train, given those `peft.method` trains of the decoder.
STAGES = {
  "projector": lambda method_trains: lambda path: path[0] == "projector",
  "language": lambda method_trains: (
    lambda path: path[0] == "projector" or (path[0] != "vision" and method_trains(path))
  ),
}


def trains(cfg: Config, method_trains: Predicate) -> Predicate:
  return STAGES[cfg.vision.stage](method_trains) if cfg.vision.enabled else method_trains


def load_data(cfg: Config, seed: int, rows):
  """The run's data: LLaVA conversations with images, or text (`pipeline.load`)."""
  from jaxtune.data import pipeline

  if cfg.vision.enabled:
    return llava_data.load(cfg, seed, rows)
  return pipeline.load(cfg.data, seed, rows)


def with_image_token(cfg: Config, tokenizer) -> Config:
  """`vision.image_token_id=-1` resolved to the tokenizer's `<image>`, as the run records it."""
  if not cfg.vision.enabled or cfg.vision.image_token_id >= 0:
    return cfg
  token = llava_data.image_token_id(cfg, tokenizer)
  return dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, image_token_id=token))


def initial_params(cfg: Config, sharded: Any, mesh) -> Any:
  """`sharded` (the initialized variables) with the pretrained parameters (`pretrained`) placed
  as they are sharded."""
  import jax
  import jax.numpy as jnp

  if not (cfg.train.init_from or cfg.vision.init_from):
    return sharded
  initialized, shardings = sharded.variables["params"], sharded.shardings["params"]
  params = pretrained(cfg, initialized, mesh)
  placed = jax.tree.map(
    lambda x, init, s: jax.device_put(jnp.asarray(x, init.dtype), s), params, initialized, shardings
  )
  return dataclasses.replace(sharded, variables={"params": placed})


def pretrained(cfg: Config, initialized: Any, mesh) -> Any:
  """A LLaVA run's `initialized` parameters with `train.init_from`'s in place (a LLaVA run's:
  encoder, projector, decoder; or a text model's, any format `jaxtune.load` reads: the decoder),
  then `vision.init_from`'s encoder."""
  import jax

  from jaxtune.convert import hf_vision
  from jaxtune.peft import partition
  from jaxtune.train import loading  # Every checkpoint format; it imports this module.

  params = initialized
  if path := cfg.train.init_from:
    loaded = loading.load(path, mesh=mesh, strategy=cfg.mesh.strategy).merged().params
    loaded = transformer.grow_vocab(partition.base(loaded), cfg.model.vocab_size)
    base = {k: v for k, v in partition.base(initialized).items() if k in loaded}
    got, want = (jax.tree.map(lambda x: x.shape, t) for t in (loaded, base))
    if got != want:
      raise ConfigError(
        f"train.init_from={path}: parameter shapes {got} do not fit the model {want}"
      )
    params = partition.combine(loaded, initialized)
  if path := cfg.vision.init_from:
    want = cfg.vision.vision_config(cfg.model)
    params = {**params, "vision": hf_vision.load_encoder(path, want, "vision.init_from")}
  return params
