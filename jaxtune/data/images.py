"""Images for a vision encoder: read with Pillow, made square, resized and normalized as the
encoder's preprocessor says.

Shape letters: Y X pixel rows and columns, C channels.

`Preprocess` holds the few numbers a Hugging Face `preprocessor_config.json` gives (CLIP: the
shortest edge resized to `size`, then a center crop; SigLIP: resized to `size` x `size`; both:
scaled to [0, 1], then `(x - mean) / std` per channel). `pad_to_square` (LLaVA-1.5's "pad"
aspect ratio) first pads the image to a square with the mean color, so that nothing is cropped.
Images come out channels last, float32 [Y, X, C]. Unreadable or missing files are DataErrors
naming the record that wants them.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Literal

import numpy as np

from jaxtune.errors import DataError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """How an image becomes the encoder's input."""

  size: int = 224
  resize: Literal["shortest_edge", "square"] = "shortest_edge"  # Then a center crop to `size`.
  mean: tuple[float, ...] = CLIP_MEAN
  std: tuple[float, ...] = CLIP_STD
  channels: int = 3
  pad_to_square: bool = False

  @classmethod
  def from_hf(cls, path: str | pathlib.Path, pad_to_square: bool = False) -> Preprocess:
    """The preprocessing a `preprocessor_config.json` describes."""
    try:
      hf: dict[str, Any] = json.loads(pathlib.Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
      raise DataError(str(path), f"cannot read the preprocessor config: {e}") from None
    size = hf.get("size", {})
    size = size if isinstance(size, dict) else {"shortest_edge": size}
    crop = hf.get("crop_size", {})
    crop = crop if isinstance(crop, dict) else {"height": crop}
    if "shortest_edge" in size and hf.get("do_center_crop", True):
      resize, side = "shortest_edge", crop.get("height", size["shortest_edge"])
    elif "height" in size:
      resize, side = "square", size["height"]
    else:
      raise DataError(str(path), f"size {size!r}: expected shortest_edge or height and width")
    mean = tuple(hf.get("image_mean", CLIP_MEAN))
    return cls(
      size=int(side),
      resize=resize,
      mean=mean,
      std=tuple(hf.get("image_std", CLIP_STD)),
      channels=1 if len(mean) == 1 else 3,  # A grayscale encoder's one mean and deviation.
      pad_to_square=pad_to_square,
    )

  def to_hf(self) -> dict[str, Any]:
    """This preprocessing as a `preprocessor_config.json` (what `from_hf` reads back):
    CLIPImageProcessor's fields for a shortest-edge resize and crop, SiglipImageProcessor's for
    a square resize (bicubic, rescaled by 1/255, normalized)."""
    side = {"height": self.size, "width": self.size}
    common = {
      "do_resize": True,
      "resample": 3,  # Bicubic, as `__call__` resizes.
      "do_rescale": True,
      "rescale_factor": 1 / 255,
      "do_normalize": True,
      "image_mean": list(self.mean[: self.channels]),
      "image_std": list(self.std[: self.channels]),
      "do_convert_rgb": self.channels == 3,
    }
    if self.resize == "square":
      return {"image_processor_type": "SiglipImageProcessor", **common, "size": side}
    return {
      "image_processor_type": "CLIPImageProcessor",
      **common,
      "size": {"shortest_edge": self.size},
      "do_center_crop": True,
      "crop_size": side,
    }

  def __call__(self, image: Any) -> np.ndarray:
    """A Pillow image as the encoder's input [size, size, C], float32."""
    from PIL import Image

    image = image.convert("RGB" if self.channels == 3 else "L")
    if self.pad_to_square and image.width != image.height:
      side = max(image.size)
      fill = tuple(round(m * 255) for m in self.mean[: self.channels])
      square = Image.new(image.mode, (side, side), fill if self.channels == 3 else fill[0])
      square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
      image = square
    if self.resize == "square":
      image = image.resize((self.size, self.size), Image.Resampling.BICUBIC)
    else:
      scale = self.size / min(image.size)
      w, h = max(self.size, round(image.width * scale)), max(self.size, round(image.height * scale))
      if (w, h) != image.size:
        image = image.resize((w, h), Image.Resampling.BICUBIC)
      left, top = (w - self.size) // 2, (h - self.size) // 2
      image = image.crop((left, top, left + self.size, top + self.size))
    x = np.asarray(image, np.float32).reshape(self.size, self.size, self.channels) / 255.0
    return (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)

  def load(self, path: str | pathlib.Path, where: str) -> np.ndarray:
    """The image file at `path` preprocessed; a DataError naming `where` if it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
      with Image.open(path) as image:
        image.load()
        return self(image)
    except FileNotFoundError:
      raise DataError(where, f"image {str(path)!r}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
      raise DataError(where, f"image {str(path)!r}: cannot read it: {e}") from None
