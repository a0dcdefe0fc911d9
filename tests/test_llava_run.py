"""`jaxtune train` of LLaVA's two stages (`vision` section, `train/llava_run.py`): a tiny stage
1 then stage 2 from it through the training loop on a 2x4 mesh, each loaded back with
`jaxtune.load`."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util
from test_llava_train import RECORDS, record, write_images

from jaxtune import api, config, runs
from jaxtune.convert import hf_vision
from jaxtune.data import llava_data, multimodal
from jaxtune.errors import ConfigError
from jaxtune.generate import Sampling
from jaxtune.train import feed, loop

TINY = [
  "model.vocab_size=320",
  "model.dim=32",
  "model.num_layers=2",
  "model.num_heads=4",
  "model.mlp_dim=64",
  "model.max_seq_len=64",
  "vision.encoder=vit",
  "vision.image_size=16",
  "vision.patch_size=8",
  "vision.dim=16",
  "vision.num_layers=2",
  "vision.num_heads=4",
  "vision.mlp_dim=32",
  "vision.projector=mlp2x_gelu",
  "mesh.data=2",
  "mesh.model=4",
  "data.template=raw",
  "data.tokenizer_vocab_size=290",
  "data.max_length=48",
  "data.pack=false",
  "train.objective=llava_sft",
  "train.batch_size=2",
  "train.steps=1",
  "train.warmup_steps=0",
  "train.learning_rate=1e-2",
]


def _flat(params):
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def _changed(before, after, part):
  return any(not np.array_equal(before[k], after[k]) for k in before if k[0] == part)


def _loss(model, cfg) -> float:
  """The mean next-token loss of the loaded model (logits with the images spliced in, NumPy
  log-softmax) over the held-out batches (data.eval_path's): what the loop's held-out loss
  measures."""
  data = llava_data.load(cfg, 0, None)
  total, count = 0.0, 0.0
  batches = feed.held_out_batches(data, cfg, None)
  for _ in range(batches.batches_per_epoch().batches):  # The pass the loop takes.
    batch = next(batches)
    logits = np.asarray(model.logits(batch.inputs, batch.images), np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, batch.targets[..., None], -1)[..., 0]
    total, count = total + (nll * batch.weights).sum(), count + batch.weights.sum()
  return float(total / count)


@pytest.fixture(scope="module")
def llava_json(tmp_path_factory):
  folder = tmp_path_factory.mktemp("llava_run")
  write_images(folder, 3)
  path = folder / "llava.json"
  path.write_text(json.dumps(RECORDS * 4, indent=1))
  return path


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
  """A pretrained encoder's folder: a random CLIPVisionModel of TINY's shape, as transformers
  writes it."""
  folder = tmp_path_factory.mktemp("encoder")
  torch.manual_seed(0)
  tower = transformers.CLIPVisionConfig(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=16,
    patch_size=8,
  )
  transformers.CLIPVisionModel(tower).save_pretrained(folder)
  return folder


@pytest.fixture(scope="module")
def held_out_json(llava_json):
  """Held-out conversations: new questions on the images (one with two), none trained on."""
  path = llava_json.with_name("held_out.json")
  records = [
    record(["im1.png"], "what is this?", "a boot"),
    record(["im0.png", "im2.png"], "which is darker?", "the first"),
    record(["im2.png"], "is it a bag?", "no"),
  ]
  path.write_text(json.dumps(records, indent=1))
  return path


def test_two_stages_train_and_load(llava_json, held_out_json, encoder, tmp_path):
  stage1 = tmp_path / "stage1"
  held = [f"data.eval_path={held_out_json}", "train.held_out_prompts=8"]
  cfg1 = config.load(
    None,
    [*TINY, *held, f"data.path={llava_json}", f"vision.init_from={encoder}"]
    + [f"train.output_dir={stage1}"],
  )
  summary1 = loop.run(cfg1)
  first = api.load(stage1)
  assert first.llava is not None and first.llava.image_token_id == first.tokenizer.special_id(
    multimodal.IMAGE
  )
  # The encoder is the pretrained one, in the run and in the model loaded from it.
  pretrained = _flat(hf_vision.load_vision(encoder)[1]["params"])
  assert all(np.array_equal(v, _flat(first.params)[("vision", *k)]) for k, v in pretrained.items())
  _check_held_out_answers(first, stage1, summary1)
  cfg2 = config.load(
    None,
    [
      *TINY,
      f"data.eval_path={held_out_json}",
      "train.held_out_prompts=0",  # Its held-out loss alone: the answers are checked above.
      "vision.stage=language",
      f"data.path={llava_json}",
      f"data.tokenizer={stage1}/tokenizer",
      f"train.init_from={stage1}",
      f"train.output_dir={tmp_path / 'stage2'}",
    ],
  )
  summary2 = loop.run(cfg2)
  second = api.load(tmp_path / "stage2")
  # Stage 2 started from stage 1's parameters, kept the encoder and trained the projector and
  # the decoder. (The projector-only step itself: test_llava_train.py.)
  p1, p2 = _flat(first.params), _flat(second.params)
  assert not _changed(p1, p2, "vision")
  assert _changed(p1, p2, "projector") and _changed(p1, p2, "embed")
  # The loop's held-out losses are the loaded models' losses on those rows, with their images.
  # Stage 2 began where stage 1 ended.
  assert _loss(second, cfg2) == pytest.approx(summary2["eval_loss_end"], rel=1e-4)
  assert summary2["eval_loss_start"] == pytest.approx(summary1["eval_loss_end"], rel=1e-4)
  assert jax.tree.structure(first.params) == jax.tree.structure(second.params)


def _check_held_out_answers(model, run, summary):
  """The run's held-out answers (data.eval_path, images prefilled) are the loaded model's greedy
  answers to the same prompts and images, scored by exact match."""
  record = json.loads((run / runs.HELD_OUT).read_text())
  convs = multimodal.read(record["answers"][0]["where"].split(": record")[0])
  assert len(record["answers"]) == len(convs) == 3
  prompts, images = zip(
    *(model.image_prompt(list(c.conversation.messages[:-1]), c.images) for c in convs),
    strict=True,
  )
  budget = max(len(model.tokenizer.encode(c.conversation.messages[-1].content)) for c in convs)
  outs = model.generate(list(prompts), Sampling(max_new_tokens=budget + 2), images=list(images))
  said = [model.tokenizer.decode(o.ids) for o in outs]
  assert [a["after"] for a in record["answers"]] == said
  references = [c.conversation.messages[-1].content for c in convs]
  hits = [s.strip() == r for s, r in zip(said, references, strict=True)]
  assert summary["held_out_exact_match"] == pytest.approx(sum(hits) / len(hits))


def test_a_vision_run_needs_the_llava_objective(llava_json, tmp_path):
  cfg = config.load(None, [*TINY, "train.objective=sft", f"data.path={llava_json}"])
  with pytest.raises(ConfigError, match="train.objective=llava_sft"):
    loop.llava_run.model(cfg)


def test_a_vision_run_holds_out_a_file_of_its_own(llava_json):
  cfg = config.load(None, [*TINY, "data.eval_size=2", f"data.path={llava_json}"])
  with pytest.raises(ConfigError, match="data.eval_size=2: a LLaVA run .* data.eval_path"):
    llava_data.load(cfg, 0, None)


def test_a_pretrained_encoder_that_does_not_fit_is_named(encoder, tmp_path):
  cfg = config.load(None, [*TINY, "vision.dim=32", f"vision.init_from={encoder}"])
  want = cfg.vision.vision_config(cfg.model)
  message = f"vision.init_from: {encoder}/config.json: hidden_size=16, but vision.dim=32"
  with pytest.raises(ConfigError, match=message):
    hf_vision.load_encoder(encoder, want, "vision.init_from")
  with pytest.raises(ConfigError, match="model_type=clip_vision_model, but the vision section"):
    siglip = dataclasses.replace(want, dim=16, class_token=False, pre_norm=False, patch_bias=True)
    hf_vision.load_encoder(encoder, siglip, "vision.init_from")
  missing = config.load(None, [*TINY, f"vision.init_from={tmp_path / 'nope'}"])
  with pytest.raises(ConfigError, match=f"vision.init_from={tmp_path / 'nope'}: no such folder"):
    config.check_paths(missing)
  with pytest.raises(ConfigError, match=f"vision.init_from={tmp_path}: no {tmp_path}/config.json"):
    hf_vision.load_encoder(tmp_path, want, "vision.init_from")


@pytest.mark.parametrize(
  ("override", "message"),
  [
    ("vision.mean=[0.5]", r"vision.mean \(1 values\) and vision.std \(3\)"),
    ("vision.patch_size=5", "vision.patch_size=5 does not divide vision.image_size=16"),
    ("vision.stage=both", "vision.stage"),
    ("vision.image_token_id=-2", "vision.image_token_id=-2"),
  ],
)
def test_bad_vision_sections_are_named(override, message):
  with pytest.raises(ConfigError, match=message):
    config.load(None, [*TINY, override])
