"""`jaxtune train` of LLaVA's two stages (`vision` section, `train/llava_run.py`): a tiny stage
1 then stage 2 from it through the training loop on a 2x4 mesh, each loaded back with
`jaxtune.load`."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import traverse_util
from test_llava_train import RECORDS, write_images

from jaxtune import api, config
from jaxtune.data import llava_data, multimodal
from jaxtune.errors import ConfigError
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
  log-softmax) over the first batch of the data: what the loop's held-out loss measures."""
  data = llava_data.load(cfg, 0, None)
  batch = next(feed.held_out_batches(data, cfg, None))
  logits = np.asarray(model.logits(batch.inputs, batch.images), np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, batch.targets[..., None], -1)[..., 0]
  return float((nll * batch.weights).sum() / batch.weights.sum())


@pytest.fixture(scope="module")
def llava_json(tmp_path_factory):
  folder = tmp_path_factory.mktemp("llava_run")
  write_images(folder, 3)
  path = folder / "llava.json"
  path.write_text(json.dumps(RECORDS * 4, indent=1))
  return path


def test_two_stages_train_and_load(llava_json, tmp_path):
  stage1 = tmp_path / "stage1"
  cfg1 = config.load(None, [*TINY, f"data.path={llava_json}", f"train.output_dir={stage1}"])
  summary1 = loop.run(cfg1)
  first = api.load(stage1)
  assert first.llava is not None and first.llava.image_token_id == first.tokenizer.special_id(
    multimodal.IMAGE
  )
  cfg2 = config.load(
    None,
    [
      *TINY,
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


def test_a_vision_run_needs_the_llava_objective(llava_json, tmp_path):
  cfg = config.load(None, [*TINY, "train.objective=sft", f"data.path={llava_json}"])
  with pytest.raises(ConfigError, match="train.objective=llava_sft"):
    loop.llava_run.model(cfg)


def test_a_vision_run_refuses_held_out_data_it_would_ignore(llava_json):
  cfg = config.load(None, [*TINY, "data.eval_size=2", f"data.path={llava_json}"])
  with pytest.raises(ConfigError, match="unset data.eval_path and data.eval_size"):
    llava_data.load(cfg, 0, None)


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
