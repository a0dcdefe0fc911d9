"""Hugging Face vision checkpoints: `CLIPVisionModel` and `SiglipVisionModel` folders into a
`VisionEncoder`, and `LlavaForConditionalGeneration` folders (a CLIP or SigLIP tower, the
`mlp2x_gelu` projector, a Llama-family decoder) into a `Llava` model, and back.

Shape letters: D width, C channels, P patch size, S positions, N heads, H head dim, F mlp dim.

Stored names differ between transformers versions and between a tower saved alone and inside a
CLIPModel or LLaVA (`vision_model.`, `vision_tower.vision_model.`, `model.vision_tower.`,
`language_model.model.`, `model.language_model.`): `_RENAMES` maps each to one canonical name,
which the tensor tables below use. The decoder's tables are `hf_layout`'s own. SigLIP's attention
pooling head (`head.*`) is not part of the features LLaVA uses and is not read.
"""

from __future__ import annotations

import functools
import json
import logging
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import safetensors.numpy

from jaxtune.config_model import ModelConfig
from jaxtune.config_vision import ACTIVATIONS, LlavaConfig, VisionConfig
from jaxtune.convert import hf
from jaxtune.convert.hf_layout import FAMILIES, family_for
from jaxtune.convert.hf_schema import Tensor, View
from jaxtune.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

# model_type -> the layout's fixed choices.
_TOWERS: dict[str, dict[str, Any]] = {
  "clip_vision_model": dict(class_token=True, pre_norm=True, patch_bias=False),
  "siglip_vision_model": dict(class_token=False, pre_norm=False, patch_bias=True),
}
_TOWER_ARCHITECTURES = {
  "clip_vision_model": ("CLIPVisionModel",),
  "siglip_vision_model": ("SiglipVisionModel",),
}
_SKIPPED = ("head.",)  # SigLIP's pooling head (relative to the tower).
_SELECT = {"default": "patch", "full": "full"}  # vision_feature_select_strategy -> ours.

# Stored prefix -> canonical prefix, applied in order.
_RENAMES = (
  ("model.language_model.", "model."),
  ("language_model.model.", "model."),
  ("language_model.lm_head.", "lm_head."),
  ("model.vision_tower.", "vision_tower."),
  ("model.multi_modal_projector.", "multi_modal_projector."),
  ("vision_tower.vision_model.", "vision_tower."),
  ("vision_model.", ""),
)


# Canonical prefix -> the prefix written at export (as transformers 5's `save_pretrained` writes).
_EXPORT = (("model.", "language_model.model."), ("lm_head.", "language_model.lm_head."))


def _exported(name: str) -> str:
  old, new = next(((o, n) for o, n in _EXPORT if name.startswith(o)), ("", ""))
  return new + name[len(old) :]


def _canonical(name: str) -> str:
  for old, new in _RENAMES:
    if name.startswith(old):
      name = new + name[len(old) :]
  return name


def _view(name: str, path: str, shape: tuple[int, ...], split=None, perm=None) -> Tensor:
  split = split or shape
  return Tensor(name, (path,), shape, (View(split, perm or tuple(range(len(split)))),))


def vision_tensors(cfg: VisionConfig, prefix: str = "", path: str = "") -> list[Tensor]:
  """The tower's tensors: Hugging Face names under `prefix`, jaxtune paths under `path`."""
  d, c, p, s = cfg.dim, cfg.channels, cfg.patch_size, cfg.num_positions
  n, h, f = cfg.num_heads, cfg.head_dim, cfg.mlp_dim
  emb, layer = prefix + "embeddings.", prefix + "encoder.layers.{i}."
  tensors = [
    # Conv2d [D, C, P, P] <-> [P, P, C, D].
    _view(
      emb + "patch_embedding.weight",
      path + "embeddings/patch/kernel",
      (d, c, p, p),
      None,
      (2, 3, 1, 0),
    ),
    _view(emb + "position_embedding.weight", path + "embeddings/position", (s, d)),
  ]
  if cfg.patch_bias:
    tensors.append(_view(emb + "patch_embedding.bias", path + "embeddings/patch/bias", (d,)))
  if cfg.class_token:
    tensors.append(_view(emb + "class_embedding", path + "embeddings/class_token", (d,)))
  norms = [
    (layer + "layer_norm1", "layers/attn_norm"),
    (layer + "layer_norm2", "layers/mlp_norm"),
    (prefix + "post_layernorm", "post_norm"),
  ]
  if cfg.pre_norm:
    norms.append((prefix + "pre_layrnorm", "pre_norm"))  # Sic: CLIP's name.
  for name, ours in norms:
    tensors.append(_view(name + ".weight", path + ours + "/scale", (d,)))
    tensors.append(_view(name + ".bias", path + ours + "/bias", (d,)))
  for x in "qkv":
    proj, ours = f"{layer}self_attn.{x}_proj.", f"{path}layers/{x}/"
    # nn.Linear [N*H, D] <-> [D, N, H]; bias [N*H] <-> [N, H].
    tensors.append(_view(proj + "weight", ours + "kernel", (n * h, d), (n, h, d), (2, 0, 1)))
    tensors.append(_view(proj + "bias", ours + "bias", (n * h,), (n, h)))
  out = layer + "self_attn.out_proj."
  tensors += [
    _view(out + "weight", path + "layers/o/kernel", (d, n * h), (d, n, h), (1, 2, 0)),
    _view(out + "bias", path + "layers/o/bias", (d,)),
    _view(layer + "mlp.fc1.weight", path + "layers/up/kernel", (f, d), None, (1, 0)),
    _view(layer + "mlp.fc1.bias", path + "layers/up/bias", (f,)),
    _view(layer + "mlp.fc2.weight", path + "layers/down/kernel", (d, f), None, (1, 0)),
    _view(layer + "mlp.fc2.bias", path + "layers/down/bias", (d,)),
  ]
  return tensors


def projector_tensors(cfg: LlavaConfig) -> list[Tensor]:
  """LLaVA-1.5's `multi_modal_projector.linear_{1,2}` (nn.Linear [out, in] <-> [in, out])."""
  dv, d = cfg.vision.dim, cfg.text.dim
  shapes = {"linear_1": (d, dv), "linear_2": (d, d)}
  tensors = []
  for name, (out, inp) in shapes.items():
    hf_name, ours = f"multi_modal_projector.{name}.", f"projector/{name}/"
    tensors.append(_view(hf_name + "weight", ours + "kernel", (out, inp), None, (1, 0)))
    tensors.append(_view(hf_name + "bias", ours + "bias", (out,)))
  return tensors


# VisionConfig field -> the Hugging Face vision config's key (read and written alike).
_HF_KEYS = {
  "image_size": "image_size",
  "patch_size": "patch_size",
  "channels": "num_channels",
  "dim": "hidden_size",
  "num_layers": "num_hidden_layers",
  "num_heads": "num_attention_heads",
  "mlp_dim": "intermediate_size",
  "act": "hidden_act",
  "norm_eps": "layer_norm_eps",
}
_HF_DEFAULTS = {"num_channels": 3, "hidden_act": "quick_gelu"}


def tower_type(cfg: VisionConfig) -> str:
  """The Hugging Face model_type whose fixed layout `cfg` has (CLIP's or SigLIP's)."""
  for model_type, fixed in _TOWERS.items():
    if all(getattr(cfg, k) == v for k, v in fixed.items()):
      return model_type
  raise CheckpointError(
    f"vision.class_token={cfg.class_token}, pre_norm={cfg.pre_norm}, "
    f"patch_bias={cfg.patch_bias} is neither CLIP's nor SigLIP's layout"
  )


def hf_vision_config(cfg: VisionConfig) -> dict[str, Any]:
  """The Hugging Face vision config (CLIP's or SigLIP's) of `cfg`."""
  model_type = tower_type(cfg)
  extra = {"vision_use_head": False} if model_type == "siglip_vision_model" else {}
  return {"model_type": model_type, **{h: getattr(cfg, k) for k, h in _HF_KEYS.items()}, **extra}


def vision_config(hf_config: Mapping[str, Any], where: str) -> VisionConfig:
  """The VisionConfig of a CLIP or SigLIP vision config.json (or LLaVA's `vision_config`)."""
  model_type = hf_config.get("model_type")
  if model_type not in _TOWERS:
    raise CheckpointError(
      f"{where}: unsupported vision model_type {model_type!r}; supported: {', '.join(_TOWERS)}"
    )
  act = hf_config.get("hidden_act", "quick_gelu")
  if act not in ACTIVATIONS:
    raise CheckpointError(f"{where}: hidden_act={act!r} has no jaxtune equivalent")
  defaults = _HF_DEFAULTS | {"layer_norm_eps": 1e-5 if "clip" in model_type else 1e-6}
  try:
    values = {k: hf_config[h] if h in hf_config else defaults[h] for k, h in _HF_KEYS.items()}
    cfg = VisionConfig(
      **{k: v if k == "act" else type(getattr(VisionConfig, k))(v) for k, v in values.items()},
      **_TOWERS[model_type],
    )
    cfg.validate()
  except KeyError as e:
    raise CheckpointError(f"{where}: the vision config has no {e.args[0]!r}") from None
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{where}: {e}") from None
  except ConfigError as e:
    raise CheckpointError(f"{where}: {e}") from None
  return cfg


def llava_config(hf_config: Mapping[str, Any], where: str) -> LlavaConfig:
  """The LlavaConfig of a `llava` config.json."""
  text_hf = hf_config.get("text_config") or {}
  text_type = text_hf.get("model_type", "llama")
  if text_type not in FAMILIES or text_type == "gpt2":
    raise CheckpointError(f"{where}: unsupported text model_type {text_type!r}")
  checks = {
    "projector_hidden_act": ("gelu",),
    "multimodal_projector_bias": (True,),
    "vision_feature_select_strategy": tuple(_SELECT),
  }
  for key, allowed in checks.items():
    value = hf_config.get(key, allowed[0])
    if value not in allowed:
      raise CheckpointError(f"{where}: {key}={value!r} has no jaxtune equivalent")
  layer = hf_config.get("vision_feature_layer", -2)
  if not isinstance(layer, int):
    raise CheckpointError(f"{where}: vision_feature_layer={layer!r}: only one layer is supported")
  token = hf_config.get("image_token_index", hf_config.get("image_token_id"))
  if token is None:
    raise CheckpointError(f"{where}: no image_token_index")
  try:
    text = ModelConfig(**FAMILIES[text_type].to_config(text_hf))
    cfg = LlavaConfig(
      vision=vision_config(hf_config.get("vision_config") or {}, where),
      text=text,
      projector="mlp2x_gelu",
      feature_layer=layer,
      feature_select=_SELECT[hf_config.get("vision_feature_select_strategy", "default")],
      image_token_id=int(token),
    )
    cfg.validate()
    if not cfg.vision.class_token and cfg.feature_select == "patch":
      # transformers' "default" drops the first token, which for a tower without a class token
      # is a patch: jaxtune keeps every patch.
      raise CheckpointError(
        f"{where}: vision_feature_select_strategy='default' drops a patch of a tower without a "
        "class token; jaxtune reads such a tower with 'full'"
      )
  except ConfigError as e:
    raise CheckpointError(f"{where}: {e}") from None
  return cfg


def _read_folder(
  folder: pathlib.Path,
  tensors: list[Tensor],
  layers: Callable[[Tensor], int],
  skipped: tuple[str, ...] = (),
) -> dict[str, Any]:
  """The float32 params tree of `tensors` read from `folder`, a per-layer tensor stacking
  `layers(tensor)` layers. Every stored tensor must be read, but those `skipped` (prefixes of
  canonical names)."""
  params: dict[str, Any] = {}
  with hf._Checkpoint(folder, "") as checkpoint:
    checkpoint.stored = {_canonical(n): n for n in checkpoint.where}
    for tensor in tensors:
      stored = [checkpoint.slice(n, tensor.shape) for n in tensor.names(layers(tensor))]
      for path, view in zip(tensor.paths, tensor.views, strict=True):
        hf._put(params, path, hf._read(stored, tensor, view, np.float32, None))
    unused = [
      n for n in checkpoint.unused(ignore_lm_head=False) if not _canonical(n).startswith(skipped)
    ]
  if unused:
    raise CheckpointError(
      f"{folder}: {len(unused)} tensors this model does not have, e.g. {', '.join(unused[:3])}"
    )
  return params


def load_vision(folder: str | pathlib.Path) -> tuple[VisionConfig, dict[str, Any]]:
  """A `CLIPVisionModel` or `SiglipVisionModel` folder as (VisionConfig, {'params': ...})."""
  folder = pathlib.Path(folder)
  where = str(folder / "config.json")
  hf_config = hf._read_config(folder / "config.json")
  cfg = vision_config(hf_config, where)
  skipped = _SKIPPED if hf_config["model_type"] == "siglip_vision_model" else ()
  params = _read_folder(folder, vision_tensors(cfg), lambda _: cfg.num_layers, skipped)
  return cfg, {"params": params}


def load_encoder(folder: str | pathlib.Path, want: VisionConfig, field: str) -> dict[str, Any]:
  """The params of a CLIP or SigLIP vision folder for an encoder configured as `want`; a
  ConfigError naming `field` (the setting that names the folder), the file and the key where
  they differ."""
  folder = pathlib.Path(folder)
  if not (folder / "config.json").is_file():
    raise ConfigError(
      f"{field}={folder}: no {folder / 'config.json'} (a CLIPVisionModel or SiglipVisionModel "
      "folder, as `python -m jaxtune.train.vision_pretrain` writes)"
    )
  try:
    got, variables = load_vision(folder)
  except CheckpointError as e:
    raise ConfigError(f"{field}={folder}: {e}") from None
  where = folder / "config.json"
  if tower_type(got) != tower_type(want):
    raise ConfigError(
      f"{field}: {where}: model_type={tower_type(got)}, but the vision section "
      f"(class_token={want.class_token}, pre_norm={want.pre_norm}, patch_bias={want.patch_bias}) "
      f"is {tower_type(want)}'s layout"
    )
  for key, hf_key in _HF_KEYS.items():
    if getattr(got, key) != getattr(want, key):
      raise ConfigError(
        f"{field}: {where}: {hf_key}={getattr(got, key)!r}, but vision.{key}={getattr(want, key)!r}"
      )
  return variables["params"]


def _text_tensors(cfg: LlavaConfig) -> list[Tensor]:
  family = FAMILIES[family_for(cfg.text)]
  return family.tensors(cfg.text, family.to_hf(cfg.text))


def _llava_tensors(cfg: LlavaConfig) -> list[Tensor]:
  vision = vision_tensors(cfg.vision, prefix="vision_tower.", path="vision/")
  return [*vision, *projector_tensors(cfg), *_text_tensors(cfg)]


def is_llava(folder: str | pathlib.Path) -> bool:
  """Whether a Hugging Face folder holds a LLaVA model."""
  path = pathlib.Path(folder) / "config.json"
  return path.is_file() and hf._read_config(path).get("model_type") == "llava"


def load_llava(folder: str | pathlib.Path) -> tuple[LlavaConfig, dict[str, Any]]:
  """A `LlavaForConditionalGeneration` folder as (LlavaConfig, {'params': ...}): the decoder's
  parameters at the top, as a `Transformer`'s, with `vision` and `projector` beside them."""
  folder = pathlib.Path(folder)
  cfg = llava_config(hf._read_config(folder / "config.json"), str(folder / "config.json"))
  skipped = tuple("vision_tower." + s for s in _SKIPPED) if not cfg.vision.class_token else ()
  params = _read_folder(folder, _llava_tensors(cfg), functools.partial(_layers, cfg), skipped)
  logger.info("loaded LLaVA model from %s: %s", folder, cfg)
  return cfg, {"params": params}


def _layers(cfg: LlavaConfig, tensor: Tensor) -> int:
  """Layers of one of LLaVA's per-layer tensors: the tower's or the decoder's."""
  return cfg.vision.num_layers if tensor.paths[0].startswith("vision/") else cfg.text.num_layers


def _write(folder: str | pathlib.Path, hf_config: dict, tensors: dict[str, np.ndarray]) -> None:
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
  tensors = {n: np.ascontiguousarray(x, np.float32) for n, x in tensors.items()}
  safetensors.numpy.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
  logger.info("saved %s (%d tensors) to %s", hf_config["architectures"][0], len(tensors), folder)


def _hf_tensors(
  tensors: list[Tensor], params: Mapping[str, Any], layers: Callable[[Tensor], int]
) -> dict[str, np.ndarray]:
  """Hugging Face's tensors of `params` (a params tree) by the tables `tensors`."""
  flat = hf._flatten(hf._numpy_params(params))
  out = {}
  for tensor in tensors:
    arrays = [flat[path] for path in tensor.paths]
    if tensor.per_layer:
      for i in range(layers(tensor)):
        out[tensor.name.format(i=i)] = tensor.to_hf(*(a[i] for a in arrays))
    else:
      out[tensor.name] = tensor.to_hf(*arrays)
  return out


def save_vision(cfg: VisionConfig, params: Mapping[str, Any], folder: str | pathlib.Path) -> None:
  """Writes a `CLIPVisionModel` or `SiglipVisionModel` folder (by `cfg`'s layout; SigLIP without
  its pooling head) of a `VisionEncoder`'s params: what `load_vision` and transformers read."""
  hf_config = hf_vision_config(cfg)
  architecture = _TOWER_ARCHITECTURES[hf_config["model_type"]][0]
  tensors = _hf_tensors(vision_tensors(cfg), params, lambda _: cfg.num_layers)
  hf_config |= dict(architectures=[architecture], dtype="float32")
  _write(folder, hf_config, {"vision_model." + n: x for n, x in tensors.items()})


def save_llava(cfg: LlavaConfig, params: Mapping[str, Any], folder: str | pathlib.Path) -> None:
  """Writes config.json and model.safetensors that transformers loads as
  `LlavaForConditionalGeneration` computing the same model (float32 tensors): a CLIP tower, or a
  SigLIP one (without its pooling head; every patch a feature, transformers' "full")."""
  if cfg.projector != "mlp2x_gelu":
    raise CheckpointError(
      f"llava.projector={cfg.projector!r}: Hugging Face LLaVA has only the mlp2x_gelu projector"
    )
  vision = hf_vision_config(cfg.vision)
  # Without a class token, transformers' "default" would drop a patch; "full" keeps them all.
  select = cfg.feature_select if cfg.vision.class_token else "full"
  text_type = family_for(cfg.text)
  tensors = _hf_tensors(_llava_tensors(cfg), params, functools.partial(_layers, cfg))
  hf_config = dict(
    architectures=["LlavaForConditionalGeneration"],
    model_type="llava",
    dtype="float32",
    image_token_index=cfg.image_token_id,
    image_seq_length=cfg.image_tokens,
    projector_hidden_act="gelu",
    multimodal_projector_bias=True,
    vision_feature_layer=cfg.feature_layer,
    vision_feature_select_strategy={b: a for a, b in _SELECT.items()}[select],
    tie_word_embeddings=cfg.text.tie_embeddings,
    text_config=FAMILIES[text_type].to_hf(cfg.text) | dict(model_type=text_type),
    vision_config=vision,
  )
  _write(folder, hf_config, {_exported(n): x for n, x in tensors.items()})
