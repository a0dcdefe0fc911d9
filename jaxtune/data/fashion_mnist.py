"""Fashion-MNIST (Zalando, MIT) as visual instruction data: the idx files read, and captions and
visual questions built from each image's label and the label's attributes, written as LLaVA JSON
with PNG images (`data/multimodal.py` reads them back).

The idx format: a big-endian header (magic 0x00000803 for images, then count, rows, columns;
0x00000801 for labels, then count), then one unsigned byte per pixel or label, gzipped.
"""

from __future__ import annotations

import gzip
import json
import pathlib
import struct
from collections.abc import Callable, Sequence

import numpy as np

from jaxtune.errors import DataError

SPLITS = {"train": "train", "test": "t10k"}
NAMES = (
  "t-shirt",
  "pair of trousers",
  "pullover",
  "dress",
  "coat",
  "sandal",
  "shirt",
  "sneaker",
  "bag",
  "ankle boot",
)
FOOTWEAR = frozenset({5, 7, 9})
UPPER_BODY = frozenset({0, 2, 4, 6})  # A dress covers more than the upper body.


def _yes(labels: frozenset[int]) -> Callable[[int], str]:
  return lambda label: "yes" if label in labels else "no"


# Question kind -> (the question, the answer to it for a label).
QUESTIONS: dict[str, tuple[str, Callable[[int], str]]] = {
  "what": ("What is it?", lambda label: NAMES[label]),
  "footwear": ("Is it footwear?", _yes(FOOTWEAR)),
  "upper_body": ("Is it worn on the upper body?", _yes(UPPER_BODY)),
}
CAPTION = "Describe the image."


def caption(label: int) -> str:
  kind = (
    "footwear"
    if label in FOOTWEAR
    else "worn on the upper body"
    if label in UPPER_BODY
    else "not worn on the upper body"
  )
  return f"A {NAMES[label]}, {kind}."


def read_idx(path: str | pathlib.Path) -> np.ndarray:
  """An idx file (gzipped or not) as uint8 [N] (labels) or [N, rows, columns] (images)."""
  path = pathlib.Path(path)
  try:
    raw = path.read_bytes()
    blob = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
  except (OSError, EOFError, gzip.BadGzipFile) as e:
    raise DataError(str(path), f"cannot read the idx file: {e}") from None
  if len(blob) < 8:
    raise DataError(str(path), "too short for an idx file")
  magic, count = struct.unpack(">II", blob[:8])
  dims = {0x801: 0, 0x803: 2}.get(magic)
  if dims is None:
    raise DataError(str(path), f"magic {magic:#010x} is not an idx file of unsigned bytes")
  shape = (count, *struct.unpack(f">{dims}I", blob[8 : 8 + 4 * dims]))
  start = 8 + 4 * dims
  if len(blob) - start != int(np.prod(shape)):
    raise DataError(str(path), f"{len(blob) - start} bytes of data, but the header says {shape}")
  return np.frombuffer(blob, np.uint8, offset=start).reshape(shape)


def load(folder: str | pathlib.Path, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N, 28, 28], labels uint8 [N]) of the "train" or "test" split."""
  stem = pathlib.Path(folder) / SPLITS[split]
  images = read_idx(f"{stem}-images-idx3-ubyte.gz")
  labels = read_idx(f"{stem}-labels-idx1-ubyte.gz")
  if len(images) != len(labels):
    raise DataError(str(stem), f"{len(images)} images but {len(labels)} labels")
  return images, labels


def records(
  indices: Sequence[int], labels: np.ndarray, kinds: Sequence[str], image_names: Sequence[str]
) -> list[dict]:
  """LLaVA records: for each image, one conversation per question kind ("caption" or a key of
  QUESTIONS)."""
  out = []
  for i, name in zip(indices, image_names, strict=True):
    label = int(labels[i])
    for kind in kinds:
      question, answer = (CAPTION, caption) if kind == "caption" else QUESTIONS[kind]
      out.append(
        {
          "id": f"{name}:{kind}",
          "image": name,
          "conversations": [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": answer(label)},
          ],
        }
      )
  return out


def write_llava(
  folder: str | pathlib.Path,
  name: str,
  split: str,
  images: np.ndarray,
  labels: np.ndarray,
  indices: Sequence[int],
  kinds: Sequence[str],
) -> pathlib.Path:
  """Writes the `split`'s images at `indices` as PNGs (`folder`/images/<split>-<index>.png) and
  their conversations as `folder`/`name`.json; returns the JSON's path."""
  from PIL import Image

  folder = pathlib.Path(folder)
  (folder / "images").mkdir(parents=True, exist_ok=True)
  image_names = []
  for i in indices:
    image_name = f"images/{split}-{i}.png"
    if not (folder / image_name).exists():
      Image.fromarray(images[i]).save(folder / image_name)
    image_names.append(image_name)
  path = folder / f"{name}.json"
  path.write_text(json.dumps(records(indices, labels, kinds, image_names), indent=1))
  return path


def without_images(path: pathlib.Path, name: str) -> pathlib.Path:
  """The LLaVA file `path`'s conversations with their images taken out, as `name`.json next to
  it (ShareGPT records): what a text-only model sees."""
  records = [
    {
      "id": r["id"],
      "conversations": [
        {**turn, "value": turn["value"].replace("<image>\n", "")} for turn in r["conversations"]
      ],
    }
    for r in json.loads(path.read_text())
  ]
  out = path.with_name(f"{name}.json")
  out.write_text(json.dumps(records, indent=1))
  return out


def write_recipe_data(
  source: str | pathlib.Path, out: str | pathlib.Path, train_images: int, test_images: int
) -> None:
  """The LLaVA recipes' data in `out` (configs/llava_stage{1,2}.yaml, llava_text.yaml):
  stage1.json (captions), stage2.json (visual questions) of `train_images` training images,
  test.json (the questions) of `test_images` t10k images, which training never sees, and
  text_stage2.json, text_test.json: stage2.json and test.json without the images."""
  rng = np.random.default_rng(0)
  train_x, train_y = load(source, "train")
  test_x, test_y = load(source, "test")
  train_idx = rng.permutation(len(train_x))[:train_images].tolist()
  test_idx = rng.permutation(len(test_x))[:test_images].tolist()
  write_llava(out, "stage1", "train", train_x, train_y, train_idx, ["caption"])
  stage2 = write_llava(out, "stage2", "train", train_x, train_y, train_idx, list(QUESTIONS))
  test = write_llava(out, "test", "test", test_x, test_y, test_idx, list(QUESTIONS))
  without_images(stage2, "text_stage2")
  without_images(test, "text_test")


if __name__ == "__main__":
  import argparse

  parser = argparse.ArgumentParser(description="Writes the LLaVA recipes' Fashion-MNIST data.")
  parser.add_argument("source", help="the folder of Fashion-MNIST's idx .gz files")
  parser.add_argument(
    "out", help="where to write stage1.json, stage2.json, test.json, text_*.json, images/"
  )
  parser.add_argument("--train-images", type=int, default=3000)
  parser.add_argument("--test-images", type=int, default=200)
  args = parser.parse_args()
  write_recipe_data(args.source, args.out, args.train_images, args.test_images)
