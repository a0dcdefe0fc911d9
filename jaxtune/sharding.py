"""Device mesh, logical axis rules and shardings: the only module that names mesh axes.

Model code labels every weight and activation with logical axis names. A rule preset maps each
logical name to a mesh axis of the 2D ("data", "model") mesh:

- `tp`: Megatron-style tensor parallelism over `model`, data parallelism over `data`;
- `fsdp`: PaLM's 2D layout: the same, with every weight's `embed` dimension also sharded over
  `data`, so no device holds a full copy of any weight.

`resolve_rules` checks the preset against the model's actual sizes once, at startup: a logical
axis whose dimension does not divide its mesh axis (MQA's single KV head on an 8-way model axis,
GPT-2's vocabulary of 50,257) is replicated, with a warning, and the final table is logged.

The rules say how weights are laid out for compute. Under `fsdp`, a weight's storage (and its
optimizer moments) is also sharded over every mesh axis that its rules leave unused, on its
outermost dimension that divides (`weight_spec`): the replicated vocabulary's embedding
table is stored split over its `embed` dimension, and gathered where it is used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxtune.config import MeshConfig
from jaxtune.errors import ShardingError

log = logging.getLogger(__name__)

DATA, MODEL = "data", "model"
MESH_AXES = (DATA, MODEL)

_TP: dict[str, str | None] = {
  # Weights.
  "vocab": MODEL,
  "embed": None,
  "mlp": MODEL,
  "q_heads": MODEL,
  "kv_heads": MODEL,
  "head_dim": None,
  "layers": None,
  "position": None,
  # PEFT weights: LoRA's rank, a bank's adapters, prefix positions, the prefix MLP's width.
  "lora_rank": None,
  "adapters": None,
  "prefix": None,
  "prefix_hidden": None,
  # Activations.
  "act_batch": DATA,
  "act_seq": None,
  "act_embed": None,
  "act_mlp": MODEL,
  "act_heads": MODEL,
  "act_kv_heads": MODEL,
  "act_head_dim": None,
  "act_vocab": MODEL,
}
RULE_PRESETS: dict[str, dict[str, str | None]] = {"tp": _TP, "fsdp": {**_TP, "embed": DATA}}
LOGICAL_NAMES = frozenset(_TP)

# An activation axis is sharded only where the weight axis that sizes it is.
_WEIGHT_OF_ACTIVATION = {
  "act_mlp": "mlp",
  "act_heads": "q_heads",
  "act_kv_heads": "kv_heads",
  "act_vocab": "vocab",
  "act_head_dim": "head_dim",
}

Rules = tuple[tuple[str, str | None], ...]


def make_mesh(cfg: MeshConfig, devices: list[jax.Device] | None = None) -> Mesh:
  """Builds the ("data", "model") mesh; -1 on one axis takes the remaining devices."""
  devices = jax.devices() if devices is None else devices
  n = len(devices)
  data, model = cfg.data, cfg.model
  if data == -1 or model == -1:
    known, name = (model, "mesh.model") if data == -1 else (data, "mesh.data")
    if n % known:
      raise ShardingError(f"{name}={known} does not divide the {n} available devices")
    data, model = (n // known, model) if data == -1 else (data, n // known)
  if data * model != n:
    raise ShardingError(
      f"mesh.data={data} x mesh.model={model} = {data * model} devices, but {n} are available; "
      "set one of them to -1 to fill the rest"
    )
  return jax.make_mesh((data, model), MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def model_parallelism(mesh: Mesh) -> int:
  """The number of devices on the `model` axis (what each weight's split axis is cut into)."""
  return mesh.shape[MODEL]


def resolve_rules(strategy: str, mesh: Mesh, abstract_variables: Any) -> Rules:
  """Fits the `strategy` preset to the logical axes and sizes of `abstract_variables`.

  `abstract_variables` is what `jax.eval_shape(model.init, ...)` returns: a tree whose leaves are
  `nn.Partitioned` boxes carrying logical names. Raises on logical names the table lacks (they
  would silently replicate); replicates, with a warning, axes whose sizes do not divide.
  """
  table = dict(RULE_PRESETS[strategy])
  boxes = jax.tree.leaves(abstract_variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  for box in boxes:
    if not isinstance(box, nn.Partitioned):
      continue
    for name, size in zip(box.names, box.value.shape, strict=True):
      if name is None:
        continue
      if name not in table:
        raise ShardingError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}")
      axis = table[name]
      if axis is not None and size % mesh.shape[axis]:
        log.warning(
          "logical axis %r (size %d) does not divide mesh axis %r (size %d): replicated%s",
          name,
          size,
          axis,
          mesh.shape[axis],
          " in compute (fsdp stores its weights split on another dimension)"
          if strategy == "fsdp"
          else "",
        )
        table[name] = None  # Warned once: later arrays with this name see None.
  for activation, weight in _WEIGHT_OF_ACTIVATION.items():
    if table[weight] is None:
      table[activation] = None
  rules = tuple(table.items())
  log.info(
    "sharding rules (%s on mesh %s): %s",
    strategy,
    dict(mesh.shape),
    ", ".join(f"{k}->{v}" for k, v in rules if v is not None),
  )
  return rules


def logical_sharding(mesh: Mesh, rules: Rules, names: tuple[str | None, ...]) -> NamedSharding:
  """The NamedSharding of an array whose axes carry the logical `names`."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(names, rules))


# Stacked axes that a step slices or gathers from (the layer scan, a bank's adapters per row):
# never sharded to spread a weight, which would make every slice a collective.
_STACKED = frozenset({"layers", "adapters"})


def _mesh_axes(entry: str | tuple[str, ...] | None) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def weight_spec(box: nn.Partitioned, mesh: Mesh, rules: Rules, strategy: str) -> PartitionSpec:
  """The PartitionSpec that stores the weight `box`: its logical names through `rules`; under
  `fsdp`, each mesh axis of more than one device that the spec leaves unused is added to the
  outermost dimension that it still divides (stacked axes excepted), so that a shard is a run of
  whole rows where it can be."""
  axes = [_mesh_axes(entry) for entry in nn.logical_to_mesh_axes(box.names, rules)]
  for axis in MESH_AXES if strategy == "fsdp" else ():
    if mesh.shape[axis] == 1 or any(axis in dim for dim in axes):
      continue
    for i, (name, size) in enumerate(zip(box.names, box.value.shape, strict=True)):
      shards = int(np.prod([mesh.shape[a] for a in axes[i]])) * mesh.shape[axis]
      if name not in _STACKED and size % shards == 0:
        axes[i] = (*axes[i], axis)
        break
  return PartitionSpec(*(_spec_entry(dim) for dim in axes))


def _spec_entry(axes: tuple[str, ...]) -> str | tuple[str, ...] | None:
  return None if not axes else axes[0] if len(axes) == 1 else axes


def variable_shardings(abstract_variables: Any, mesh: Mesh, rules: Rules, strategy: str) -> Any:
  """NamedShardings for the (unboxed) tree of `abstract_variables` (see `weight_spec`)."""

  def sharding_of(leaf: Any) -> NamedSharding:
    if not isinstance(leaf, nn.Partitioned):
      return replicated(mesh)
    return NamedSharding(mesh, weight_spec(leaf, mesh, rules, strategy))

  return jax.tree.map(
    sharding_of, abstract_variables, is_leaf=lambda x: isinstance(x, nn.Partitioned)
  )


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


@dataclasses.dataclass(frozen=True)
class Sharded:
  """Variables created directly in their shards, with their shardings and the rules used."""

  variables: Any
  shardings: Any
  rules: Rules


def init_sharded(
  init_fn: Callable[[jax.Array], Any],
  rng: jax.Array,
  mesh: Mesh,
  strategy: str,
  shapes_only: bool = False,
) -> Sharded:
  """Abstract-first initialization: shapes, then rules and shardings, then a jitted init that
  writes every array straight into its shards (no host ever holds a full copy). `shapes_only`
  stops before the init: the variables are `jax.ShapeDtypeStruct`s carrying their shardings,
  enough to compile (and measure) the programs of a model too large to hold."""
  abstract = jax.eval_shape(init_fn, rng)
  rules = resolve_rules(strategy, mesh, abstract)
  shardings = variable_shardings(abstract, mesh, rules, strategy)
  if shapes_only:
    shapes = nn.meta.unbox(abstract)
    variables = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
    )
    return Sharded(variables, shardings, rules)
  with use(mesh, rules):
    variables = jax.jit(lambda r: nn.meta.unbox(init_fn(r)), out_shardings=shardings)(rng)
  return Sharded(variables, shardings, rules)


def check_batch(batch_size: int, mesh: Mesh) -> None:
  if batch_size % mesh.shape[DATA]:
    raise ShardingError(
      f"batch size {batch_size} is not divisible by the mesh's data axis ({mesh.shape[DATA]})"
    )


@dataclasses.dataclass(frozen=True)
class BatchRows:
  """The rows of a global batch of `batch_size` rows that this process's devices hold under the
  `act_batch` sharding (`mine`, ascending). Stacked in that order, they are what
  `jax.make_array_from_process_local_data` expects from the process. Each row is its own stream
  of the data (`data/pipeline.py`), so the batch does not depend on the mesh: the mesh only says
  which process builds which rows."""

  batch_size: int
  mine: tuple[int, ...]

  @functools.cached_property
  def _mine(self) -> frozenset[int]:
    return frozenset(self.mine)

  def keeps(self, position: int) -> bool:
    """Whether the example at `position` of a source trains in one of this process's rows (the
    row position % batch_size)."""
    return position % self.batch_size in self._mine

  def __str__(self) -> str:
    """The row ranges this process holds, as in "rows 0-3, 8-11 of 16"."""
    starts = [r for r in self.mine if r - 1 not in self._mine]
    ends = [r for r in self.mine if r + 1 not in self._mine]
    spans = [f"{a}" if a == b else f"{a}-{b}" for a, b in zip(starts, ends, strict=True)]
    return f"rows {', '.join(spans)} of {self.batch_size}"


def batch_rows(mesh: Mesh, batch_size: int) -> BatchRows:
  """The rows of the global batch that this process's devices hold: rows [p*B/P, (p+1)*B/P) for
  process p of P when its devices are adjacent on the data axis (as `make_mesh` lays out CPU and
  GPU devices), and all of them when the data axis does not span processes."""
  check_batch(batch_size, mesh)
  batch_sharding = logical_sharding(mesh, tuple(_TP.items()), ("act_batch", "act_seq"))
  held = batch_sharding.addressable_devices_indices_map((batch_size, 1))
  rows = {r for index, _ in held.values() for r in range(*index.indices(batch_size))}
  return BatchRows(batch_size, tuple(sorted(rows)))


@contextlib.contextmanager
def use(mesh: Mesh | None, rules: Rules) -> Iterator[None]:
  """Activates `mesh` and `rules` so the model's logical constraints take effect (no mesh:
  nothing to activate, one device)."""
  if mesh is None:
    yield
    return
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def put_global(
  x: np.ndarray, mesh: Mesh | None, rules: Rules, names: tuple[str | None, ...]
) -> jax.Array:
  """A host array that every process holds in full (an evaluation batch), placed on the mesh as
  its logical axis `names` say (no mesh: on the default device)."""
  if mesh is None:
    return jax.numpy.asarray(x)
  return jax.make_array_from_callback(
    x.shape, logical_sharding(mesh, rules, names), lambda index: x[index]
  )
