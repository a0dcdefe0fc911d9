"""Hugging Face checkpoints: `load_hf` and `save_hf` for folders of config.json + safetensors.

Families: Llama (1/2/3), Mistral, Qwen2, Gemma, GPT-2 and BitNet (float, online-quantized or
packed 2-bit weights); their config and tensor layouts are in `hf_llama.py`, `hf_gpt2.py` and
`hf_bitnet.py`, tabled in `hf_layout.py`. Weights are read with safetensors' numpy API, one file
or shards listed in `model.safetensors.index.json`. Pickled checkpoints (.bin, .pt) are refused,
never unpickled: unpickling runs arbitrary code. Every error is a `CheckpointError` naming the
file and the tensor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import pathlib
import re
import struct
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from tqdm import tqdm

from jaxtune.config_model import ModelConfig
from jaxtune.convert.hf_layout import FAMILIES, family_for
from jaxtune.convert.hf_schema import Family, Tensor, View
from jaxtune.errors import CheckpointError, ConfigError
from jaxtune.model import transformer

logger = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
_PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
# Buffers, not weights, that some checkpoints store: GPT-2 causal masks, cached RoPE frequencies.
_BUFFERS = re.compile(r"(\.attn\.(masked_)?bias|\.rotary_emb\.inv_freq)$")


def load_config(folder: str | pathlib.Path, param_dtype: str | None = "float32") -> ModelConfig:
  """The ModelConfig of a Hugging Face folder, reading only config.json and the safetensors
  headers; `param_dtype` as in `load_hf`."""
  cfg, *_ = _open(pathlib.Path(folder), param_dtype)
  return cfg


def load_hf(
  folder: str | pathlib.Path,
  param_dtype: str | None = "float32",
  shardings: Mapping[str, Any] | None = None,
) -> tuple[ModelConfig, dict[str, Any]]:
  """Reads a Hugging Face folder into a ModelConfig and a `{'params': ...}` tree.

  The arrays are cast to `param_dtype` ("float32" or "bfloat16"; None: bfloat16 if every stored
  weight is, else float32), which the config records. Without `shardings` they are numpy arrays.
  With `shardings` (the params tree of `jax.sharding.Sharding`s of this config's model, e.g.
  from a mesh's rules) they are jax Arrays built shard by shard: each distinct shard is read
  straight from the file (`hf_schema.View.read`), so a host holds only its own devices' shards,
  one tensor at a time, never a whole tensor that is sharded (except across a sharded head_dim,
  which no rule preset does, where whole heads are read).
  """
  folder = pathlib.Path(folder)
  cfg, model_type, family, checkpoint = _open(folder, param_dtype)
  hf_config = _read_config(folder / "config.json")
  dtype = jnp.dtype(cfg.param_dtype)
  placement = _flatten(shardings) if shardings is not None else {}
  with checkpoint:
    tensors = family.tensors(cfg, hf_config)
    # Every name and shape is checked before anything is read.
    stored = {
      t.name: [checkpoint.slice(n, t.shape) for n in t.names(cfg.num_layers)] for t in tensors
    }
    params: dict[str, Any] = {}
    chief = jax.process_index() == 0
    for tensor in tqdm(tensors, f"reading {folder.name}", unit="tensor", disable=not chief):
      as_dtype = jnp.dtype(tensor.dtype) if tensor.dtype else dtype
      for path, view in zip(tensor.paths, tensor.views, strict=True):
        read = functools.partial(_read, stored[tensor.name], tensor, view, as_dtype)
        if shardings is None:
          _put(params, path, read(None))
        else:
          shape = (cfg.num_layers, *view.shape) if tensor.per_layer else view.shape
          _put(params, path, _sharded(read, shape, placement[path], as_dtype))
    unused = checkpoint.unused(ignore_lm_head=cfg.tie_embeddings)
  if unused:
    raise CheckpointError(
      f"{folder}: {len(unused)} tensors that a {model_type} model with this config.json does not "
      f"have, e.g. {', '.join(unused[:3])}"
    )
  logger.info("loaded %s model from %s: %s", model_type, folder, cfg)
  return cfg, {"params": params}


def _sharded(read: Callable, shape: tuple[int, ...], sharding: Any, dtype: Any) -> jax.Array:
  """A jax Array of `shape` with `sharding`, each distinct shard read once by `read(box)` (its
  devices' replicas share it)."""
  shards: dict[tuple, np.ndarray] = {}

  def shard(index: tuple[slice, ...]) -> np.ndarray:
    box = tuple((s.start, s.stop) for s in index)
    if box not in shards:
      shards[box] = read(box)
    return shards[box]

  return jax.make_array_from_callback(shape, sharding, shard, dtype)


def _read(
  layers: list[_Slice], tensor: Tensor, view: View, dtype: Any, box: tuple | None
) -> np.ndarray:
  """The `box` (None: all) of the jaxtune array `view` of `tensor`, stacked over layers if it is
  per layer, as contiguous numpy of `dtype`."""
  index = None if box is None else tuple(slice(*b) for b in box)
  if not tensor.per_layer:
    return np.ascontiguousarray(view.read(layers[0], tensor.shape, index), dtype)
  picked = range(len(layers)) if index is None else range(len(layers))[index[0]]
  inner = None if index is None else index[1:]
  return np.ascontiguousarray(
    np.stack([view.read(layers[i], tensor.shape, inner) for i in picked]), dtype
  )


def save_hf(
  config: ModelConfig,
  variables: Mapping[str, Any],
  folder: str | pathlib.Path,
  dtype: str = "float32",
) -> None:
  """Writes config.json and model.safetensors that `transformers` loads as the same model.

  `variables` is `{'params': ...}` (as `load_hf` returns) or the params tree itself, of numpy or
  (fully addressable) jax arrays, boxed or not. `dtype` ("float32", "bfloat16" or "float16") is
  that of the stored tensors. The family follows from the config: GPT-2 (learned positions and
  biases), Qwen2 (q/k/v biases), Gemma (scaled embeddings and GeGLU), else Llama; a model no family
  computes exactly (e.g. the PaLM parallel block) is a CheckpointError. Mistral is written as
  Llama, which is the same model (jaxtune has no sliding window).
  """
  if dtype not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"dtype={dtype!r} must be float32, bfloat16 or float16")
  model_type = family_for(config)
  family = FAMILIES[model_type]
  params = _flatten(_numpy_params(variables))
  _check_shapes(config, params)
  tensors = {}
  np_dtype = jnp.dtype(dtype)
  hf_config = family.to_hf(config)
  for tensor in family.tensors(config, hf_config):
    arrays = [params[path] for path in tensor.paths]
    as_dtype = np.uint8 if tensor.dtype == "uint8" else np_dtype  # Packed codes stay packed.
    names = tensor.names(config.num_layers)
    for i, name in enumerate(names):
      x = tensor.to_hf(*(a[i] for a in arrays)) if tensor.per_layer else tensor.to_hf(*arrays)
      tensors[name] = np.ascontiguousarray(x, as_dtype)

  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  hf_config = hf_config | dict(
    architectures=[family.architectures[0]],
    model_type=model_type,
    dtype=dtype,  # transformers 5; 4 reads torch_dtype.
    torch_dtype=dtype,
  )
  (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
  safetensors.numpy.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
  logger.info("saved %s model (%d tensors, %s) to %s", model_type, len(tensors), dtype, folder)


def _open(
  folder: pathlib.Path, param_dtype: str | None
) -> tuple[ModelConfig, str, Family, _Checkpoint]:
  """The config, model_type, family and (unopened) tensors of a folder."""
  if param_dtype not in (None, "float32", "bfloat16"):
    raise ValueError(f"param_dtype={param_dtype!r} must be float32, bfloat16 or None")
  hf_config = _read_config(folder / "config.json")
  model_type, family = _family(hf_config, folder / "config.json")
  try:
    cfg = ModelConfig(**family.to_config(hf_config))
    cfg.validate()
  except (CheckpointError, ConfigError) as e:
    raise CheckpointError(f"{folder / 'config.json'}: {e}") from None
  checkpoint = _Checkpoint(folder, family.prefix)
  if param_dtype is None:
    weights = [d for n, d in checkpoint.dtypes.items() if not _BUFFERS.search(n)]
    param_dtype = "bfloat16" if weights and all(d == "BF16" for d in weights) else "float32"
  return dataclasses.replace(cfg, param_dtype=param_dtype), model_type, family, checkpoint


def _read_config(path: pathlib.Path) -> dict[str, Any]:
  try:
    hf_config = json.loads(path.read_text())
  except OSError as e:
    raise CheckpointError(f"{path}: cannot read the Hugging Face config: {e.strerror}") from None
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: not valid JSON: {e}") from None
  if not isinstance(hf_config, dict):
    raise CheckpointError(f"{path}: not a JSON object")
  return hf_config


def _family(hf_config: Mapping[str, Any], path: pathlib.Path) -> tuple[str, Family]:
  model_type = hf_config.get("model_type")
  if model_type not in FAMILIES:
    raise CheckpointError(
      f"{path}: unsupported model_type {model_type!r}; supported: {', '.join(FAMILIES)}"
    )
  family = FAMILIES[model_type]
  for architecture in hf_config.get("architectures") or ():
    if architecture not in family.architectures:
      raise CheckpointError(
        f"{path}: unsupported architecture {architecture!r} for model_type {model_type!r}; "
        f"supported: {', '.join(family.architectures)}"
      )
  return model_type, family


class _Slice:
  """One stored tensor, read by boxes (`tensor[index]`); errors name the file and the tensor."""

  def __init__(self, path: pathlib.Path, name: str, handle: Any):
    self.path, self.name = path, name
    try:
      self._slice = handle.get_slice(name)
      self.shape = tuple(self._slice.get_shape())
    except (safetensors.SafetensorError, KeyError, TypeError) as e:
      raise CheckpointError(f"{path}: cannot read tensor {name!r}: {e}") from None

  def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
    try:
      return self._slice[index]
    except (safetensors.SafetensorError, KeyError, TypeError, ValueError) as e:
      raise CheckpointError(f"{self.path}: cannot read tensor {self.name!r}: {e}") from None


class _Checkpoint(contextlib.ExitStack):
  """The tensors of a folder's safetensors files, each file's header checked before it is opened.

  Checkpoints of a bare base model (`GPT2Model`) store names without the family's prefix.
  """

  def __init__(self, folder: pathlib.Path, prefix: str):
    super().__init__()
    self.folder = folder
    self.where: dict[str, pathlib.Path] = {}  # Stored name -> file.
    self.dtypes: dict[str, str] = {}  # Stored name -> safetensors dtype ("F32", "BF16", ...).
    for path in _files(folder):
      for name, dtype in _header(path).items():
        if name in self.where:
          raise CheckpointError(f"tensor {name!r} is in both {self.where[name]} and {path}")
        self.where[name], self.dtypes[name] = path, dtype
    _check_index(folder, self.where)
    bare = not any(name.startswith(prefix) for name in self.where)
    self.stored = {(prefix + n if bare and n != "lm_head.weight" else n): n for n in self.where}
    self.used: set[str] = set()
    self.handles: dict[pathlib.Path, Any] = {}

  def slice(self, name: str, shape: tuple[int, ...]) -> _Slice:
    """The stored tensor `name` (read later, in boxes), after checking its `shape`."""
    stored = self.stored.get(name)
    if stored is None:
      files = ", ".join(sorted({p.name for p in self.where.values()}))
      raise CheckpointError(f"{self.folder}: missing tensor {name!r} (not in {files})")
    path = self.where[stored]
    if path not in self.handles:
      try:
        self.handles[path] = self.enter_context(safetensors.safe_open(path, framework="numpy"))
      except safetensors.SafetensorError as e:
        raise CheckpointError(f"{path}: not a valid safetensors file: {e}") from None
    tensor = _Slice(path, stored, self.handles[path])
    if tensor.shape != shape:
      raise CheckpointError(
        f"{path}: tensor {stored!r} has shape {list(tensor.shape)}, but config.json implies "
        f"{list(shape)}"
      )
    self.used.add(stored)
    return tensor

  def unused(self, ignore_lm_head: bool) -> list[str]:
    """Stored tensors not read, less buffers and (as transformers does) a tied model's lm_head."""
    return sorted(
      n
      for n in self.where
      if n not in self.used
      and not _BUFFERS.search(n)
      and not (ignore_lm_head and n == "lm_head.weight")
    )


def _files(folder: pathlib.Path) -> list[pathlib.Path]:
  """The safetensors files: the shards an index lists, else every *.safetensors in the folder."""
  if not folder.is_dir():
    raise CheckpointError(f"{folder}: not a folder")
  index = folder / INDEX
  if index.exists():
    shards = sorted(set(_read_index(index).values()))
    for shard in shards:
      parts = pathlib.PurePath(shard).parts
      if not parts or pathlib.PurePath(shard).is_absolute() or ".." in parts:
        raise CheckpointError(f"{index}: shard {shard!r} is outside the folder: refused")
      if not (folder / shard).is_file():
        raise CheckpointError(f"{index}: shard {shard!r} is missing")
    return [folder / shard for shard in shards]
  files = sorted(folder.glob("*.safetensors"))
  if files:
    return files
  pickles = sorted(p.name for pattern in _PICKLES for p in folder.glob(pattern))
  if pickles:
    raise CheckpointError(
      f"{folder}: only pickled weights ({', '.join(pickles)}); jaxtune never unpickles, as that "
      "can run arbitrary code. Convert them to safetensors where you trust them, e.g. "
      "`save_pretrained` in transformers"
    )
  raise CheckpointError(f"{folder}: no *.safetensors files")


def _read_index(index: pathlib.Path) -> dict[str, str]:
  weight_map = _read_config(index).get("weight_map")
  if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
    raise CheckpointError(f"{index}: no 'weight_map' of tensor names to files")
  return weight_map


def _check_index(folder: pathlib.Path, where: Mapping[str, pathlib.Path]) -> None:
  index = folder / INDEX
  if not index.exists():
    return
  for name, shard in _read_index(index).items():
    if where.get(name) != folder / shard:
      raise CheckpointError(f"{index}: lists tensor {name!r} in {shard}, which does not hold it")


def _header(path: pathlib.Path) -> dict[str, str]:
  """The tensors of a safetensors header (name -> dtype), after checking that each lies within
  the file.

  Layout: an 8-byte little-endian header length, a JSON header of
  `name -> {dtype, shape, data_offsets: [begin, end]}` (offsets after the header), the data.
  """
  size = path.stat().st_size
  with open(path, "rb") as f:
    length_bytes = f.read(8)
    if len(length_bytes) < 8:
      raise CheckpointError(f"{path}: {size} bytes is too short for a safetensors file")
    (length,) = struct.unpack("<Q", length_bytes)
    if length > size - 8:
      raise CheckpointError(
        f"{path}: the safetensors header claims {length} bytes but the file has {size}; "
        "the file is truncated or not safetensors"
      )
    try:
      header = json.loads(f.read(length))
      header.pop("__metadata__", None)
      ends = {n: int(t["data_offsets"][1]) for n, t in header.items()}
      dtypes = {n: str(t["dtype"]) for n, t in header.items()}
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError) as e:
      raise CheckpointError(f"{path}: corrupt safetensors header: {e!r}") from None
  for name, end in ends.items():
    if 8 + length + end > size:
      raise CheckpointError(
        f"{path}: truncated: tensor {name!r} ends at byte {8 + length + end} of a {size}-byte file"
      )
  return dtypes


def _put(tree: dict[str, Any], path: str, value: np.ndarray) -> None:
  *parents, leaf = path.split("/")
  for key in parents:
    tree = tree.setdefault(key, {})
  tree[leaf] = value


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f"{prefix}{key}/"))
    else:
      flat[prefix + key] = value
  return flat


def _numpy_params(variables: Mapping[str, Any]) -> Mapping[str, Any]:
  params = variables["params"] if "params" in variables else variables
  return jax.tree.map(np.asarray, jax.device_get(nn.meta.unbox(params)))


def _check_shapes(config: ModelConfig, params: Mapping[str, Any]) -> None:
  """Params must be exactly those of `Transformer(config)`."""
  model = transformer.Transformer(config)
  abstract = jax.eval_shape(transformer.init_fn(model), jax.random.key(0))
  expected = {k: v.shape for k, v in _flatten(nn.meta.unbox(abstract)["params"]).items()}
  got = {k: v.shape for k, v in params.items()}
  if got != expected:
    wrong = sorted(k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k))
    raise CheckpointError(
      "the params do not match the config: "
      + ", ".join(f"{k} is {got.get(k)}, expected {expected.get(k)}" for k in wrong[:4])
    )
