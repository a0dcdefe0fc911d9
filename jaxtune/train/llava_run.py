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
  """`sharded` (the initialized variables) with `train.init_from`'s parameters in place: a
  LLaVA run's (stage 2 from stage 1: encoder, projector, decoder), or a text model's (any
  format `jaxtune.load` reads: the decoder; the encoder and projector stay initialized)."""
  import jax
  import jax.numpy as jnp

  from jaxtune import api  # Reads every checkpoint format; imported when a run starts from one.
  from jaxtune.peft import partition

  path = cfg.train.init_from
  loaded = api.load(path, mesh=mesh, strategy=cfg.mesh.strategy).merged().params
  loaded = transformer.grow_vocab(partition.base(loaded), cfg.model.vocab_size)
  initialized, shardings = sharded.variables["params"], sharded.shardings["params"]
  base = {k: v for k, v in partition.base(initialized).items() if k in loaded}
  got, want = (jax.tree.map(lambda x: x.shape, t) for t in (loaded, base))
  if got != want:
    raise ConfigError(f"train.init_from={path}: parameter shapes {got} do not fit the model {want}")
  placed = jax.tree.map(
    lambda x, s: jax.device_put(jnp.asarray(x), s),
    loaded,
    {k: v for k, v in partition.base(shardings).items() if k in loaded},
  )
  params = partition.combine(placed, initialized)
  return dataclasses.replace(sharded, variables={"params": params})
