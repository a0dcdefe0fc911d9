"""Fashion-MNIST from ../shared/data: the idx files as published (10,000 test images, 1,000 per
class), the questions' answers from the labels, and the LLaVA files jaxtune reads back."""

import gzip
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
