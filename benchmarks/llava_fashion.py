"""LLaVA's two stages on Fashion-MNIST, on a CPU, in minutes: held-out answer accuracy after each
stage against a text-only baseline that sees no image.

    python benchmarks/llava_fashion.py            # the recorded run (results/llava_fashion.*)
    python benchmarks/llava_fashion.py --quick    # a smoke run, a few steps of each part

1. A ViT (CLIP layout, 28x28 grayscale, 7x7 patches: 16 patch tokens and a class token) is
   pretrained as a 10-way classifier on Fashion-MNIST's training images
   (`jaxtune.train.vision_pretrain`, what `vision.init_from` of the recipes reads).
2. Captions and visual questions are built from the labels and their attributes (what is it? is
   it footwear? is it worn on the upper body?) and written as LLaVA JSON with PNG images; a
   SentencePiece tokenizer is trained on their text.
3. A small decoder is trained on the same conversations with the images taken out: the language
   model LLaVA starts from, and the text-only baseline (it can only learn the answers' priors).
4. Stage 1 (`configs/llava_stage1.yaml`): the projector alone learns on the captions; the encoder
   and the decoder are frozen.
5. Stage 2 (`configs/llava_stage2.yaml`): the projector and the decoder learn on the questions.

Held-out: Fashion-MNIST's test images (t10k), which no part ever trains on. Accuracy is the
greedy answer (generated with the image's features prefilled into the KV cache) equal to the
expected one. The data goes through jaxtune's own LLaVA pipeline (Pillow, `<image>` expansion,
packing several conversations and their images into a row) and train step (`llava_sft`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

import common
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from jaxtune import config, generate
from jaxtune.config_model import ModelConfig
from jaxtune.config_vision import LlavaConfig, VisionConfig
from jaxtune.data import fashion_mnist, multimodal, packing, templates
from jaxtune.data import tokenizer as tokenizer_lib
from jaxtune.data.formats import Conversation, Message
from jaxtune.data.images import Preprocess
from jaxtune.model import llava, transformer
from jaxtune.peft import methods, partition
from jaxtune.train import llava_run, objective, optim, vision_pretrain
from jaxtune.train.step import TrainState, make_train_step

DATA = pathlib.Path(
  os.environ.get("JAXTUNE_DATA_DIR", pathlib.Path(__file__).parents[1] / ".." / "shared" / "data")
)
CONFIGS = pathlib.Path(__file__).parents[1] / "configs"
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST's pixel mean and deviation (of x / 255).
VIT = VisionConfig(
  image_size=28, patch_size=7, channels=1, dim=64, num_layers=4, num_heads=4, mlp_dim=128
)
PRE = Preprocess(size=28, mean=(MEAN,), std=(STD,), channels=1)
QUESTION_KINDS = tuple(fashion_mnist.QUESTIONS)
TEST_KINDS = (*QUESTION_KINDS, "caption")  # Captions show what stage 1 alone learned.
IMAGES_PER_ROW = 4


def without_image(conversation: Conversation) -> Conversation:
  messages = tuple(
    dataclasses.replace(m, content=m.content.replace(f"{multimodal.IMAGE}\n", ""))
    for m in conversation.messages
  )
  return dataclasses.replace(conversation, messages=messages)


class Cache:
  """`PRE`, each image read once: what `multimodal.make_batch` loads images with."""

  size, channels = PRE.size, PRE.channels

  def __init__(self):
    self.arrays: dict[pathlib.Path, np.ndarray] = {}

  def load(self, path, where):
    if path not in self.arrays:
      self.arrays[path] = PRE.load(path, where)
    return self.arrays[path]


def epochs(examples: Sequence[Any], place, make, seed: int) -> Iterator[dict[str, np.ndarray]]:
  """Batches of packed rows, epoch after epoch, each epoch in a new order: `place(pending)`
  fills one batch's rows (first fit), `make(pending, placed)` builds it."""
  rng = np.random.default_rng(seed)
  while True:
    pending = [examples[i] for i in rng.permutation(len(examples))]
    while pending:
      placed = place(pending)
      yield make(pending, placed)
      used = {i for row in placed for i in row}
      pending = [ex for i, ex in enumerate(pending) if i not in used]


def image_batches(examples, cfg: config.Config, cache: Cache, seed: int):
  rows, length = cfg.train.batch_size, cfg.data.max_length
  return epochs(
    examples,
    lambda pending: multimodal.assign_rows(pending, rows, length, IMAGES_PER_ROW, pack=True),
    lambda pending, placed: multimodal.make_batch(pending, placed, length, IMAGES_PER_ROW, cache),
    seed,
  )


def text_batches(examples: Sequence[packing.Example], cfg: config.Config, seed: int):
  rows, length = cfg.train.batch_size, cfg.data.max_length
  return epochs(
    examples,
    lambda pending: packing.assign_rows([len(e) - 1 for e in pending], rows, length, pack=True),
    lambda pending, placed: dataclasses.asdict(packing.make_batch(pending, placed, length)),
    seed,
  )


def train(model, params, trains, batches, train_cfg: config.TrainConfig, seed: int):
  """`train_cfg.steps` steps of jaxtune's train step (the objective, optimizer and schedule the
  recipe names) on the parameters `trains` chooses; returns the parameters and the first and
  last losses."""
  trainable, frozen = partition.split(params, trains)
  optimizer = optim.optimizer(train_cfg, train_cfg.steps)
  goal = objective.make(model, train_cfg)
  state = TrainState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable))
  step = jax.jit(make_train_step(goal, optimizer, jax.random.key(seed)), donate_argnums=0)
  losses = []
  for _, batch in zip(range(train_cfg.steps), batches, strict=False):
    state, metrics = step(state, frozen, {k: jnp.asarray(v) for k, v in batch.items()})
    losses.append(float(metrics["loss"]))
  return partition.combine(state.params, frozen), (losses[0], float(np.mean(losses[-10:])))


@dataclasses.dataclass
class Eval:
  prompts: list[list[int]]
  images: list[np.ndarray] | None
  answers: list[str]
  kinds: list[str]


def accuracy(module, params, ev: Eval, tok) -> tuple[dict[str, float], list[str]]:
  outs = generate.generate(
    module,
    params,
    ev.prompts,
    generate.Sampling(max_new_tokens=32),
    stop_ids=(tok.eos_id,),
    batch_size=64,
    images=ev.images,
  )
  said = [tok.decode(o.ids).strip() for o in outs]
  hits = np.asarray([s == a for s, a in zip(said, ev.answers, strict=True)])
  kinds = np.asarray(ev.kinds)
  by_kind = {k: float(hits[kinds == k].mean()) for k in TEST_KINDS}
  questions = float(hits[kinds != "caption"].mean())
  return {"all": questions, **by_kind}, said


def picture(path, test_images, test_indices, ev: Eval, answers: dict[str, list[str]], n: int = 6):
  """The first `n` test images (4x), each with its questions, the expected answer and each
  model's answer."""
  scale, width, line = 4, 560, 14
  per_image = len(QUESTION_KINDS)  # The questions; each image's caption comes after them.
  height = 28 * scale + 8 + line * (1 + per_image * (1 + len(answers)))
  canvas = Image.new("RGB", (width * 2, height * ((n + 1) // 2)), "white")
  draw = ImageDraw.Draw(canvas)
  for k in range(n):
    x0, y0 = (k % 2) * width, (k // 2) * height
    img = Image.fromarray(test_images[test_indices[k]]).resize((28 * scale, 28 * scale))
    canvas.paste(img.convert("RGB"), (x0 + 4, y0 + 4))
    y = y0 + 28 * scale + 8
    for q in range(per_image):
      j = k * len(TEST_KINDS) + q
      question = fashion_mnist.QUESTIONS[ev.kinds[j]][0]
      draw.text((x0 + 4, y), f"{question}  (expected: {ev.answers[j]})", fill="black")
      y += line
      for name, said in answers.items():
        ok = said[j] == ev.answers[j]
        draw.text((x0 + 16, y), f"{name}: {said[j]!r}", fill="green" if ok else "red")
        y += line
  canvas.save(path)


def recipe(name: str, quick: bool) -> config.Config:
  overrides = ["train.steps=6"] if quick else []
  return config.load(str(CONFIGS / name), overrides)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="a few steps of each part")
  parser.add_argument("--train-images", type=int, default=3000)
  parser.add_argument("--test-images", type=int, default=200)
  parser.add_argument("--vit-steps", type=int, default=600)
  parser.add_argument("--text-steps", type=int, default=300)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  if args.quick:
    args.train_images, args.test_images, args.vit_steps, args.text_steps = 200, 24, 6, 6
  started, timings = time.time(), {}
  folder = DATA / "fashion_mnist"
  train_x, train_y = fashion_mnist.load(folder, "train")
  test_x, test_y = fashion_mnist.load(folder, "test")

  t = time.time()
  vit_params, vit_accuracy = vision_pretrain.pretrain(
    VIT,
    PRE,
    (train_x, train_y),
    (test_x[:2000], test_y[:2000]),
    vision_pretrain.Settings(steps=args.vit_steps, seed=args.seed),
  )
  timings["vit"] = time.time() - t
  print(f"ViT: test accuracy {vit_accuracy:.3f} ({timings['vit']:.0f} s)", flush=True)

  rng = np.random.default_rng(args.seed)
  train_idx = rng.permutation(len(train_x))[: args.train_images].tolist()
  test_idx = rng.permutation(len(test_x))[: args.test_images].tolist()
  work = pathlib.Path(tempfile.mkdtemp(prefix="llava_fashion_"))
  write = fashion_mnist.write_llava
  stage1_file = write(work, "stage1", "train", train_x, train_y, train_idx, ["caption"])
  stage2_file = write(work, "stage2", "train", train_x, train_y, train_idx, QUESTION_KINDS)
  test_file = write(work, "test", "test", test_x, test_y, test_idx, TEST_KINDS)
  stage1, stage2, test = (multimodal.read(str(f)) for f in (stage1_file, stage2_file, test_file))

  stage1_cfg, stage2_cfg = (
    recipe("llava_stage1.yaml", args.quick),
    recipe("llava_stage2.yaml", args.quick),
  )
  template = stage2_cfg.data.template
  texts = [
    templates.to_text(templates.render(without_image(c.conversation), template), "", "")
    for c in stage1 + stage2
  ]
  tok = tokenizer_lib.train(texts, 320, [multimodal.IMAGE])
  image_id = tok.special_id(multimodal.IMAGE)
  text_cfg = ModelConfig(
    vocab_size=-(-tok.vocab_size // 8) * 8,
    dim=128,
    num_layers=4,
    num_heads=4,
    mlp_dim=384,
    max_seq_len=stage2_cfg.data.max_length,
  )
  cfg = LlavaConfig(vision=VIT, text=text_cfg, image_token_id=image_id)
  cfg.validate()

  def examples(convs, data_cfg):
    stats = multimodal.Stats()
    out = []
    for c in convs:
      ex = multimodal.tokenize(c, template, tok, image_id, cfg.image_tokens)
      if (ex := multimodal.fit(ex, data_cfg.max_length, data_cfg.truncation, stats)) is not None:
        out.append(ex)
    return out

  # The language model alone, on the conversations without their images: LLaVA's starting
  # point and the text-only baseline.
  t = time.time()
  text_examples = [
    packing.tokenize(templates.render(without_image(c.conversation), template), tok, False)
    for c in stage1 + stage2
  ]
  decoder = transformer.Transformer(text_cfg)
  text_params = nn.meta.unbox(jax.jit(transformer.init_fn(decoder))(jax.random.key(args.seed)))
  text_train = dataclasses.replace(stage2_cfg.train, steps=args.text_steps, objective="sft")
  text_params, text_loss = train(
    decoder,
    text_params["params"],
    lambda path: True,
    text_batches(text_examples, stage2_cfg, args.seed),
    text_train,
    args.seed,
  )
  timings["text"] = time.time() - t

  def prompt_of(conv, image: bool):
    user = conv.conversation.messages[0]
    if not image:
      user = Message("user", user.content.replace(f"{multimodal.IMAGE}\n", ""))
    head = multimodal.ImageConversation(
      Conversation((user,), conv.where), conv.images if image else ()
    )
    return multimodal.prompt_ids(head, template, tok, image_id, cfg.image_tokens)

  answers = [c.conversation.messages[1].content for c in test]
  kinds = [TEST_KINDS[k % len(TEST_KINDS)] for k in range(len(test))]
  cache = Cache()
  with_images = Eval(
    [prompt_of(c, True) for c in test],
    [np.stack([cache.load(p, c.where) for p in c.images]) for c in test],
    answers,
    kinds,
  )
  text_only = dataclasses.replace(
    with_images, prompts=[prompt_of(c, False) for c in test], images=None
  )
  results: dict[str, Any] = {"vit_test_accuracy": vit_accuracy}
  results["text_only"], said_text = accuracy(decoder, text_params, text_only, tok)
  print(f"text-only baseline: {results['text_only']}", flush=True)

  module = llava.model(cfg)
  params = nn.meta.unbox(jax.jit(llava.init_fn(module))(jax.random.key(args.seed + 1)))["params"]
  params = {**params, **text_params, "vision": vit_params}
  said = {"text-only": said_text}
  losses = {"text": text_loss}
  for name, recipe_cfg, convs in (("stage1", stage1_cfg, stage1), ("stage2", stage2_cfg, stage2)):
    t = time.time()
    exs = examples(convs, recipe_cfg.data)
    params, losses[name] = train(
      module,
      params,
      llava_run.trains(recipe_cfg, methods.trains(recipe_cfg.peft)),  # The recipe's stage.
      image_batches(exs, recipe_cfg, cache, args.seed),
      recipe_cfg.train,
      args.seed,
    )
    results[name], said[name] = accuracy(module, params, with_images, tok)
    timings[name] = time.time() - t
    print(f"{name}: {results[name]} ({timings[name]:.0f} s)", flush=True)

  results.update(
    losses=losses,
    seconds=timings | {"total": time.time() - started},
    sizes=dict(
      train_images=args.train_images,
      test_images=args.test_images,
      test_questions=sum(k != "caption" for k in kinds),
      vit_steps=args.vit_steps,
      text_steps=args.text_steps,
      stage1_steps=stage1_cfg.train.steps,
      stage2_steps=stage2_cfg.train.steps,
    ),
  )
  if args.quick:
    return
  picture(
    os.path.join(common.RESULTS, "llava_fashion.png"),
    test_x,
    test_idx,
    with_images,
    {"text-only": said["text-only"], "stage 1": said["stage1"], "stage 2": said["stage2"]},
  )
  rows = [
    {"model": name, **{k: f"{v:.3f}" for k, v in results[key].items()}}
    for name, key in (("text-only", "text_only"), ("stage 1", "stage1"), ("stage 2", "stage2"))
  ]
  table = common.markdown_table(rows, ["model", "all", *TEST_KINDS])
  common.write("llava_fashion", results, _markdown(results, table))


def _markdown(results: dict[str, Any], table: str) -> str:
  s = results["sizes"]
  seconds = ", ".join(f"{k} {v:.0f}" for k, v in results["seconds"].items())
  return f"""# LLaVA's two stages on Fashion-MNIST

Held-out answer accuracy (greedy, exact answer) on {s["test_questions"]} questions about
{s["test_images"]} Fashion-MNIST test images (t10k, never trained on); "all" is over the three
kinds of question, "caption" is the exact caption ("Describe the image.", stage 1's task):

{table}

ViT pretraining (10-way classification, {s["vit_steps"]} steps): test accuracy
{results["vit_test_accuracy"]:.3f}. Seconds: {seconds}.

![test images and answers](llava_fashion.png)
"""


if __name__ == "__main__":
  main()
