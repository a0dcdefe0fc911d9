"""Fashion-MNIST from ../shared/data: the idx files as published (10,000 test images, 1,000 per
class), the questions' answers from the labels, and the LLaVA files jaxtune reads back."""

import gzip
import json
import struct

import numpy as np
import pytest
from PIL import Image

from jaxtune.data import fashion_mnist, multimodal
from jaxtune.errors import DataError


def test_test_split_as_published(data_dir):
  images, labels = fashion_mnist.load(data_dir / "fashion_mnist", "test")
  assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(labels), [1000] * 10)
  assert 0.25 < images.mean() / 255 < 0.32  # Fashion-MNIST's mean pixel is 0.286.


def test_llava_files_read_back_with_the_labels_answers(data_dir, tmp_path):
  images, labels = fashion_mnist.load(data_dir / "fashion_mnist", "test")
  indices = [0, 1, 2, 3]
  kinds = [*fashion_mnist.QUESTIONS, "caption"]
  path = fashion_mnist.write_llava(tmp_path, "q", "test", images, labels, indices, kinds)
  convs = multimodal.read(str(path))
  assert len(convs) == len(indices) * len(kinds)
  for k, conv in enumerate(convs):
    label = int(labels[indices[k // len(kinds)]])
    answer = conv.conversation.messages[1].content
    kind = kinds[k % len(kinds)]
    if kind == "what":
      assert answer == fashion_mnist.NAMES[label]
    elif kind == "footwear":
      assert answer == ("yes" if label in (5, 7, 9) else "no")  # Sandal, sneaker, ankle boot.
    elif kind == "upper_body":
      assert answer == ("yes" if label in (0, 2, 4, 6) else "no")  # Top, pullover, coat, shirt.
  np.testing.assert_array_equal(np.asarray(Image.open(convs[0].images[0])), images[0])


def test_bad_idx_files(tmp_path):
  path = tmp_path / "x-idx1-ubyte.gz"
  path.write_bytes(gzip.compress(struct.pack(">II", 0x801, 5) + bytes(3)))
  with pytest.raises(DataError, match="3 bytes of data, but the header says"):
    fashion_mnist.read_idx(path)
  path.write_bytes(gzip.compress(struct.pack(">II", 0x999, 5)))
  with pytest.raises(DataError, match="not an idx file"):
    fashion_mnist.read_idx(path)


def test_a_vit_pretrained_here_is_an_encoder_transformers_loads(data_dir, tmp_path):
  """`train/vision_pretrain.py` on Fashion-MNIST: a tiny ViT learns (test accuracy well above
  chance after 60 steps), and the folder it writes is a CLIPVisionModel whose hidden states on
  test images equal the trained encoder's."""
  import torch
  import transformers

  from jaxtune.config_vision import VisionConfig
  from jaxtune.convert import hf_vision
  from jaxtune.data.images import Preprocess
  from jaxtune.model import vision
  from jaxtune.train import vision_pretrain

  cfg = VisionConfig(
    image_size=28, patch_size=7, channels=1, dim=32, num_layers=2, num_heads=2, mlp_dim=64
  )
  pre = Preprocess(size=28, resize="square", mean=(0.286,), std=(0.353,), channels=1)
  train = fashion_mnist.load(data_dir / "fashion_mnist", "train")
  test_x, test_y = fashion_mnist.load(data_dir / "fashion_mnist", "test")
  settings = vision_pretrain.Settings(steps=60, batch_size=32)
  params, accuracy = vision_pretrain.pretrain(
    cfg, pre, train, (test_x[:300], test_y[:300]), settings
  )
  assert accuracy > 0.25  # Chance: 0.1 (60 steps of 32 images reach 0.34 with this seed).
  hf_vision.save_vision(cfg, params, tmp_path)
  assert hf_vision.load_encoder(tmp_path, cfg, "vision.init_from").keys() == params.keys()
  pixels = vision_pretrain.preprocessed(test_x[:4], pre)
  ours = vision.VisionEncoder(cfg).apply({"params": params}, pixels)
  model = transformers.CLIPVisionModel.from_pretrained(tmp_path).eval()
  with torch.no_grad():
    out = model(torch.from_numpy(pixels).permute(0, 3, 1, 2), output_hidden_states=True)
  for h_ours, h_hf in zip(ours, out.hidden_states, strict=True):
    np.testing.assert_allclose(np.asarray(h_ours), h_hf.numpy(), atol=1e-4)
  # Its grayscale preparation as a preprocessor_config.json reads back the same.
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(pre.to_hf()))
  assert Preprocess.from_hf(tmp_path / "preprocessor_config.json") == pre
