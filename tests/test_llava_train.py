"""LLaVA data and training: LLaVA's JSON with real image files (made here with Pillow), image
tokens, truncation around images, packing with images (same loss as unpacked), the
projector-only stage (gradients and optimizer state for the projector alone) and sharded ==
single device on 2x4 and 8x1."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from PIL import Image

from jaxtune import sharding
from jaxtune.config import MeshConfig, TrainConfig
from jaxtune.config_model import ModelConfig
from jaxtune.config_vision import LlavaConfig, VisionConfig
from jaxtune.data import inspect_images, multimodal
from jaxtune.data.images import Preprocess
from jaxtune.errors import ConfigError, DataError
from jaxtune.model import llava, transformer
from jaxtune.model.adapters import Adapters
from jaxtune.peft import partition
from jaxtune.train import llava_run, llava_sft, objective, step

IMAGE_ID = 5
CFG = LlavaConfig(
  vision=VisionConfig(image_size=16, patch_size=8, dim=16, num_layers=2, num_heads=4, mlp_dim=32),
  text=ModelConfig(vocab_size=104, dim=32, num_layers=2, num_heads=4, mlp_dim=64, max_seq_len=128),
  image_token_id=IMAGE_ID,
)
PRE = Preprocess(size=16)
PROJECTOR = llava_run.STAGES["projector"](lambda path: True)  # LLaVA's stage 1.


class CharTokenizer:
  """One id per printable ASCII character (6 + code - 32, above the image id) or newline (3)."""

  bos_id, eos_id, prepend_scheme, vocab_size = 1, 2, "first", 104

  def encode(self, text, first=False):
    return [3 if c == "\n" else 6 + ord(c) - 32 for c in text]

  def decode(self, ids, show_special=False):
    specials = {1: "<s>", 2: "</s>"} if show_special else {}
    return "".join(specials.get(i, "\n" if i == 3 else chr(i - 6 + 32)) for i in ids)

  def special_id(self, token):
    return None


def write_images(folder, n, seed=0):
  rng = np.random.default_rng(seed)
  for i in range(n):
    pixels = rng.integers(0, 256, (12 + 4 * i, 20, 3), np.uint8)  # Not square: resized, cropped.
    Image.fromarray(pixels).save(folder / f"im{i}.png")


def record(images, question, answer):
  marks = "".join(f"{multimodal.IMAGE}\n" for _ in images)
  return {
    "image": images if len(images) != 1 else images[0],
    "conversations": [
      {"from": "human", "value": marks + question},
      {"from": "gpt", "value": answer},
    ],
  }


RECORDS = [
  record(["im0.png"], "what is it?", "a shoe"),
  record(["im1.png", "im2.png"], "same?", "no"),
  record([], "hello", "hi there"),
  record(["im2.png"], "is it footwear?", "yes it is"),
]


@pytest.fixture
def data(tmp_path):
  write_images(tmp_path, 3)
  path = tmp_path / "llava.json"
  path.write_text(json.dumps(RECORDS, indent=1))
  return path


def examples(path, max_length=64, policy="truncate", stats=None):
  stats = stats or multimodal.Stats()
  out = []
  for conv in multimodal.read(str(path)):
    ex = multimodal.tokenize(conv, "raw", CharTokenizer(), IMAGE_ID, CFG.image_tokens)
    if (ex := multimodal.fit(ex, max_length, policy, stats)) is not None:
      out.append(ex)
  return out


def test_image_tokens_are_expanded_and_unsupervised(data):
  exs = examples(data)
  s = CFG.image_tokens
  for ex, n in zip(exs, (1, 2, 0, 1), strict=True):
    is_image = ex.example.ids == IMAGE_ID
    assert is_image.sum() == n * s and len(ex.spans) == n
    for start, end in ex.spans:
      assert end - start == s and is_image[start:end].all()
    assert not ex.example.supervised[is_image].any()
    assert ex.example.supervised.any()


def test_inspect_marks_image_slots(data):
  ex = examples(data)[1]
  assert inspect_images.marked(CharTokenizer(), ex) == (
    "<s>\u27e8image 1: im1.png, 4 tokens\u27e9\n\u27e8image 2: im2.png, 4 tokens\u27e9\n"
    "same?\u27e6no</s>\u27e7"
  )


def test_truncation_never_cuts_an_image(data):
  (ex, *_) = examples(data)
  first_end = ex.spans[0][1]
  stats = multimodal.Stats()
  kept = examples(data, max_length=first_end - 2, stats=stats)
  assert not any(e.images for e in kept)
  assert stats.dropped_image_cut == 3  # Three of four conversations have an image there.
  stats = multimodal.Stats()
  cut = examples(data, max_length=len(ex) - 3, stats=stats)  # Cut in the answer.
  assert cut[0].images == ex.images and len(cut[0]) == len(ex) - 2
  assert stats.truncated >= 1 and stats.dropped_image_cut == 0
  two = examples(data)[1]  # Cut inside its second image: dropped, not cut.
  stats = multimodal.Stats()
  assert multimodal.fit(two, two.spans[1][0] + 1, "truncate", stats) is None
  assert stats.dropped_image_cut == 1


@pytest.mark.parametrize(
  "change, message",
  [
    (lambda r: r | {"image": "gone.png"}, r"llava.json:\d+: field 'image': .*gone.png.*no such"),
    (lambda r: r | {"image": ["im0.png", "im1.png"]}, r"llava.json:\d+: .*1 <image> .* but 2"),
    (lambda r: r | {"image": 3}, r"llava.json:\d+: field 'image': expected a path"),
  ],
)
def test_bad_records_name_file_and_line(data, change, message):
  """In a .jsonl file, file:line; in a .json array, file: record N (as every data format)."""
  records = [RECORDS[2], change(RECORDS[0])]
  lines = data.with_suffix(".jsonl")
  lines.write_text("\n".join(json.dumps(r) for r in records))
  with pytest.raises(DataError, match=message.replace(r"llava.json:\d+", "llava.jsonl:2")):
    multimodal.read(str(lines))
  data.write_text(json.dumps(records, indent=1))
  with pytest.raises(DataError, match=message.replace(r":\d+", ": record 1")):
    multimodal.read(str(data))


def test_corrupt_image_names_its_record(data):
  (data.parent / "im1.png").write_bytes(b"not a png")
  exs = examples(data)
  placed = multimodal.assign_rows(exs, 4, 64, 2, pack=False)
  with pytest.raises(DataError, match=r"llava.json: record 1: image .*im1.png.*cannot read"):
    multimodal.make_batch(exs, placed, 64, 2, PRE)


def test_preprocess_against_numpy(tmp_path):
  """A 12x20 image: shortest edge to 16 (Pillow bicubic), center crop, normalized; with
  pad_to_square, padded with the mean color first."""
  write_images(tmp_path, 1)
  image = Image.open(tmp_path / "im0.png")
  resized = np.asarray(image.resize((27, 16), Image.Resampling.BICUBIC), np.float32)
  crop = resized[:, 5:21] / 255.0
  expected = (crop - np.asarray(PRE.mean)) / np.asarray(PRE.std)
  np.testing.assert_allclose(PRE(image), expected, atol=1e-6)
  padded = dataclasses.replace(PRE, pad_to_square=True)(image)
  assert padded.shape == (16, 16, 3)
  np.testing.assert_allclose(
    padded[0], np.zeros((16, 3)), atol=0.5 / 255 / 0.26
  )  # The mean color, rounded.


def _loss(model, params, batch):
  objective = llava_sft.LlavaSFT(model)
  loss, _ = jax.jit(objective.loss)(params, {k: jnp.asarray(v) for k, v in batch.items()}, None)
  return loss


@pytest.fixture(scope="module")
def params():
  """Random parameters of every part (norms too), drawn on the host: no init to compile."""
  abstract = nn.meta.unbox(jax.eval_shape(llava.init_fn(llava.model(CFG)), jax.random.key(0)))
  rng = np.random.default_rng(0)
  return jax.tree.map(
    lambda s: jnp.asarray(rng.normal(0.0, 0.1, s.shape), s.dtype), abstract["params"]
  )


def test_packed_rows_give_the_loss_of_unpacked(data, params):
  exs = examples(data)
  model = llava.model(CFG)
  packed = multimodal.assign_rows(exs, 4, 96, 4, pack=True)  # Three rows empty: one shape.
  unpacked = multimodal.assign_rows(exs, 4, 96, 4, pack=False)
  assert len(packed[0]) > 1 and [len(r) for r in unpacked] == [1, 1, 1, 1]
  loss_packed = _loss(model, params, multimodal.make_batch(exs, packed, 96, 4, PRE))
  loss_unpacked = _loss(model, params, multimodal.make_batch(exs, unpacked, 96, 4, PRE))
  np.testing.assert_allclose(loss_packed, loss_unpacked, rtol=1e-5)
  # The images matter: zeroed images change the loss.
  batch = multimodal.make_batch(exs, packed, 96, 4, PRE)
  assert abs(_loss(model, params, batch | {"images": 0 * batch["images"]}) - loss_packed) > 1e-4


def _batch(data, rows=8):
  exs = examples(data) * 2
  placed = multimodal.assign_rows(exs, rows, 48, 2, pack=False)
  return multimodal.make_batch(exs, placed, 48, 2, PRE)


def _placed(batch, mesh, rules):
  names = {k: ("act_batch",) + (None,) * (v.ndim - 1) for k, v in batch.items()}
  return {k: sharding.put_global(v, mesh, rules, names[k]) for k, v in batch.items()}


def _mesh(data_axis, model_axis, abstract):
  mesh = sharding.make_mesh(MeshConfig(data=data_axis, model=model_axis))
  rules = sharding.resolve_rules("fsdp", mesh, abstract)
  shardings = sharding.variable_shardings(abstract, mesh, rules, "fsdp")["params"]
  assert all(any(s.spec) for s in jax.tree.leaves(shardings["vision"]))  # The encoder is split.
  return mesh, rules, shardings


def test_projector_stage_trains_the_projector_alone(data, params):
  """Gradients and optimizer state for the projector alone; the step on a 2x4 mesh (fsdp: the
  frozen encoder and decoder split too) updates it as on one device."""
  model = llava.model(CFG)
  trainable, frozen = partition.split(params, PROJECTOR)
  assert set(trainable) == {"projector"} and "projector" not in frozen
  optimizer = optax.adamw(1e-2)
  opt_shapes = {x.shape for x in jax.tree.leaves(optimizer.init(trainable)) if x.ndim}
  assert opt_shapes == {x.shape for x in jax.tree.leaves(trainable)}
  train_step = jax.jit(
    step.make_train_step(llava_sft.LlavaSFT(model), optimizer, jax.random.key(1))
  )
  batch = _batch(data)

  def run(trainable, frozen, batch):
    state = step.TrainState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable))
    return train_step(state, frozen, batch)

  new, metrics = run(trainable, frozen, {k: jnp.asarray(v) for k, v in batch.items()})
  assert jax.tree.structure(new.params) == jax.tree.structure(trainable)
  assert float(metrics["grad_norm"]) > 0
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new.params, trainable)
  assert all(jax.tree.leaves(moved))

  abstract = jax.eval_shape(llava.init_fn(model), jax.random.key(0))
  mesh, rules, shardings = _mesh(2, 4, abstract)
  on_mesh = jax.device_put(params, shardings)
  with sharding.use(mesh, rules):
    sharded, sharded_metrics = run(
      *partition.split(on_mesh, PROJECTOR), _placed(batch, mesh, rules)
    )
  np.testing.assert_allclose(sharded_metrics["loss"], metrics["loss"], rtol=1e-5)
  np.testing.assert_allclose(sharded_metrics["grad_norm"], metrics["grad_norm"], rtol=1e-4)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), sharded.params, new.params
  )


def test_sharded_loss_equals_single_device(data, params):
  """fsdp on 2x4 and 8x1: the encoder's, projector's and decoder's weights split over the mesh;
  the loss of a batch of packed rows with images as on one device."""
  model = llava.model(CFG)
  objective = llava_sft.LlavaSFT(model)
  batch = _batch(data)
  loss = jax.jit(lambda p, b: objective.loss(p, b, None)[0])
  expected = loss(params, {k: jnp.asarray(v) for k, v in batch.items()})
  abstract = jax.eval_shape(llava.init_fn(model), jax.random.key(0))
  for data_axis, model_axis in [(2, 4), (8, 1)]:
    mesh, rules, shardings = _mesh(data_axis, model_axis, abstract)
    with sharding.use(mesh, rules):
      got = loss(jax.device_put(params, shardings), _placed(batch, mesh, rules))
    np.testing.assert_allclose(got, expected, rtol=1e-5, err_msg=f"{data_axis}x{model_axis}")


def test_stages_choose_their_parameters():
  """Stage 1: the projector; stage 2: the projector and the decoder, or the projector and the
  decoder's LoRA adapters. The encoder never trains."""
  adapters = Adapters(lora_rank=4, lora_targets=("q", "v"))
  module = llava.model(CFG, adapters=adapters)
  abstract = nn.meta.unbox(jax.eval_shape(llava.init_fn(module), jax.random.key(0)))["params"]
  flat = traverse_util.flatten_dict(abstract)
  assert any(p[0] == "vision" for p in flat) and any(p[-1] == "lora_a" for p in flat)
  lora_trains = lambda p: p[-1] in ("lora_a", "lora_b")  # noqa: E731 (peft.method=lora's)
  for stage, method_trains, expected in (
    ("projector", lora_trains, lambda p: p[0] == "projector"),
    ("language", lambda p: True, lambda p: p[0] != "vision"),
    ("language", lora_trains, lambda p: p[0] == "projector" or p[-1] in ("lora_a", "lora_b")),
  ):
    trains = llava_run.STAGES[stage](method_trains)
    trainable, frozen = partition.split(abstract, trains)
    assert set(traverse_util.flatten_dict(trainable)) == {p for p in flat if expected(p)}, stage
    assert "vision" in frozen


def test_llava_objective_needs_a_llava_model():
  train = TrainConfig(objective="llava_sft")
  with pytest.raises(ConfigError, match="needs a LLaVA model"):
    objective.make(transformer.Transformer(CFG.text), train)
  assert isinstance(objective.make(llava.model(CFG), train), llava_sft.LlavaSFT)
