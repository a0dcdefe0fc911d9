"""A ViT pretrained in the project, for a LLaVA run's `vision.init_from`: the encoder a run's
`vision` section describes, trained as a 10-way classifier on Fashion-MNIST's training images
(a linear head on its final-normed class token, or on the mean of its patches for a tower
without one), then written as a Hugging Face `CLIPVisionModel` (or `SiglipVisionModel`) folder
without the head, which `vision.init_from` reads and transformers loads.

    python -m jaxtune.train.vision_pretrain configs/llava_stage1.yaml \\
      ../shared/data/fashion_mnist runs/fashion_vit

Images go through the run's own preprocessing (`vision.image_size`, `mean`, `std`, channels),
as LLaVA's data later reads them. AdamW, a linear warmup over the first tenth of the steps, then
cosine decay; accuracy on Fashion-MNIST's test images (t10k) at the end, in `pretrain.json`.

Shape letters: B images, Y X pixel rows and columns, C channels, D width, K classes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import pathlib
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtune.config_vision import VisionConfig
from jaxtune.data.images import Preprocess
from jaxtune.model.vision import VisionEncoder

log = logging.getLogger(__name__)

CLASSES = 10
RESULTS = "pretrain.json"


class Classifier(nn.Module):
  """The encoder and a linear head on its final-normed class token (or mean patch)."""

  config: VisionConfig

  @nn.compact
  def __call__(self, pixels_byxc: jax.Array) -> jax.Array:
    encoder = VisionEncoder(self.config, name="encoder")
    h_bsd = encoder.last_hidden(encoder(pixels_byxc)[-1])
    pooled_bd = h_bsd[:, 0] if self.config.class_token else h_bsd.mean(axis=1)
    return nn.Dense(CLASSES, name="head")(pooled_bd)


@dataclasses.dataclass(frozen=True)
class Settings:
  steps: int = 600
  batch_size: int = 128
  learning_rate: float = 2e-3
  weight_decay: float = 1e-4
  seed: int = 0


def preprocessed(images_byx: np.ndarray, pre: Preprocess) -> np.ndarray:
  """uint8 images [B, Y, X] as the encoder's input [B, size, size, C] (`Preprocess`, as LLaVA's
  data reads their PNGs)."""
  from PIL import Image

  return np.stack([pre(Image.fromarray(x)) for x in images_byx])


def pretrain(
  cfg: VisionConfig,
  pre: Preprocess,
  train: tuple[np.ndarray, np.ndarray],
  test: tuple[np.ndarray, np.ndarray],
  settings: Settings = Settings(),
) -> tuple[dict[str, Any], float]:
  """(the encoder's params, test accuracy) after `settings.steps` steps of classification on
  `train` (uint8 images [N, Y, X], labels [N])."""
  model = Classifier(cfg)
  sample = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.channels))
  params = model.init(jax.random.key(settings.seed), sample)["params"]
  steps = settings.steps
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, settings.learning_rate, max(steps // 10, 1), max(steps, 1)
  )
  optimizer = optax.adamw(schedule, weight_decay=settings.weight_decay)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, x_byxc, labels_b):
    def loss(p):
      logits_bk = model.apply({"params": p}, x_byxc)
      return optax.softmax_cross_entropy_with_integer_labels(logits_bk, labels_b).mean()

    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  images, labels = train
  rng = np.random.default_rng(settings.seed)
  for k in range(steps):
    i = rng.integers(0, len(images), settings.batch_size)
    params, opt_state, value = step(params, opt_state, preprocessed(images[i], pre), labels[i])
    if (k + 1) % 100 == 0:
      log.info("step %d: loss %.4f", k + 1, float(value))
  predict = jax.jit(lambda p, x: jnp.argmax(model.apply({"params": p}, x), -1))
  hits = [
    np.asarray(predict(params, preprocessed(test[0][k : k + 500], pre))) == test[1][k : k + 500]
    for k in range(0, len(test[0]), 500)
  ]
  return params["encoder"], float(np.mean(np.concatenate(hits)))


def main(argv: list[str] | None = None) -> None:
  from jaxtune import config
  from jaxtune.convert import hf_vision
  from jaxtune.data import fashion_mnist, llava_data
  from jaxtune.errors import ConfigError

  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("config", help="a LLaVA run's config: its vision section is the encoder")
  parser.add_argument("source", help="the folder of Fashion-MNIST's idx .gz files")
  parser.add_argument("out", help="the new encoder folder (config.json, model.safetensors)")
  for f in dataclasses.fields(Settings):
    flag = "--" + f.name.replace("_", "-")
    parser.add_argument(flag, type=type(f.default), default=f.default)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
  cfg = config.load(args.config)
  if not cfg.vision.enabled:
    raise ConfigError(f"{args.config}: vision.encoder is none: there is no encoder to pretrain")
  vision = cfg.vision.vision_config(cfg.model)
  settings = Settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)})
  t0 = time.time()
  preprocess = llava_data.preprocess(cfg)
  params, accuracy = pretrain(
    vision,
    preprocess,
    fashion_mnist.load(args.source, "train"),
    fashion_mnist.load(args.source, "test"),
    settings,
  )
  hf_vision.save_vision(vision, params, args.out)
  hf_preprocess = json.dumps(preprocess.to_hf(), indent=2) + "\n"
  (pathlib.Path(args.out) / "preprocessor_config.json").write_text(hf_preprocess)
  results = {"test_accuracy": accuracy, "seconds": time.time() - t0, **dataclasses.asdict(settings)}
  (pathlib.Path(args.out) / RESULTS).write_text(json.dumps(results, indent=1) + "\n")
  log.info("test accuracy %.3f on Fashion-MNIST's t10k; encoder written to %s", accuracy, args.out)


if __name__ == "__main__":
  from jaxtune.errors import JaxtuneError

  try:
    main()
  except JaxtuneError as e:
    raise SystemExit(f"error: {e}") from None
