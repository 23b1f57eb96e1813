"""The device mesh, logical-axis rules, and host batches turned into global arrays.

Modules name logical axes ("batch", "embed", "heads", "mlp", "vocab", ...); the config maps them to
the mesh axes data, fsdp and tensor. Data parallelism is `batch -> data`, FSDP adds
`batch -> fsdp` and `embed -> fsdp`, tensor parallelism `heads/mlp/vocab -> tensor`. Rules are
applied in order and a mesh axis is used at most once per array (flax's rule), so `batch` must come
before `embed` for activations to shard over the batch rather than the hidden size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any, Callable, Iterator, Mapping, Sequence

from absl import logging
import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

Rules = tuple[tuple[str, Any], ...]


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int, where: str = ""
               ) -> tuple[int, ...]:
  """Sizes of (data, fsdp, tensor); one size may be -1 and takes the remaining devices.

  Errors name the axis at fault and `where` the devices are (a topology, say).
  """
  unknown = sorted(set(mesh_config) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"config.mesh: unknown axes {unknown}; expected only {list(MESH_AXES)}")
  sizes = [int(mesh_config.get(a, 1)) for a in MESH_AXES]
  described = f"config.mesh ({', '.join(f'{a}={s}' for a, s in zip(MESH_AXES, sizes))})"
  described += _on(where)
  fill = [i for i, s in enumerate(sizes) if s == -1]
  if len(fill) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"{described}: sizes must be positive, with at most one -1")
  known = math.prod(s for s in sizes if s != -1)
  if fill:
    if num_devices % known:
      product = 1
      for axis, size in zip(MESH_AXES, sizes):
        product *= size if size != -1 else 1
        if num_devices % product:
          break
      raise ValueError(f"{described}: axis {axis}={size} does not divide the {num_devices} "
                       f"devices (the fixed axes need a multiple of {known})")
    sizes[fill[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"{described} needs {math.prod(sizes)} devices but {num_devices} are "
                     f"present; use -1 on one axis to fill")
  return tuple(sizes)


def _described(mesh_config: Mapping[str, int]) -> str:
  return ", ".join(f"{a}={mesh_config.get(a, 1)}" for a in MESH_AXES)


def num_slices(devices: Sequence[Any]) -> int:
  """How many TPU slices the devices span (1 where devices carry no slice index)."""
  return len({getattr(d, "slice_index", 0) or 0 for d in devices})


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[Any] | None = None,
              where: str = "") -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (all devices by default).

  Over several slices, data parallelism spans the slices (their slow links carry only the
  gradient reduction) while fsdp and tensor stay inside each slice. `where` names the devices
  in errors (a topology, say).
  """
  devices = list(jax.devices() if devices is None else devices)
  where = where or _describe(devices)
  shape = mesh_shape(mesh_config, len(devices), where)
  slices = num_slices(devices)
  if slices > 1:
    grid = _hybrid_grid(shape, slices, devices, where)
  else:
    grid = _topology_grid(shape, devices)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _topology_grid(shape: tuple[int, ...], devices: list[Any]) -> np.ndarray:
  try:
    # Follows the physical topology on TPU so that the inner axes ride the fastest links.
    return mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, NotImplementedError, AssertionError) as e:
    described = ", ".join(f"{a}={n}" for a, n in zip(MESH_AXES, shape))
    logging.warning("config.mesh (%s) on %d x %s: the topology-aware device layout failed "
                    "(%s); the devices are used in their listed order, so the inner axes may "
                    "not ride the fastest links", described, len(devices),
                    devices[0].device_kind, e)
    return np.asarray(devices, dtype=object).reshape(shape)


def _hybrid_grid(shape: tuple[int, ...], slices: int, devices: list[Any],
                 where: str) -> np.ndarray:
  data = shape[0]
  described = ", ".join(f"{a}={n}" for a, n in zip(MESH_AXES, shape))
  if data % slices:
    raise ValueError(f"config.mesh ({described}){_on(where)}: axis data={data} must be a "
                     f"multiple of the {slices} slices; data parallelism spans slices while "
                     f"fsdp and tensor stay inside one")
  ici = (data // slices,) + tuple(shape[1:])
  return mesh_utils.create_hybrid_device_mesh(ici, (slices,) + (1,) * (len(shape) - 1),
                                              devices)


def describe_devices(mesh: Mesh) -> str:
  """"8 cpu devices in 2 processes": the devices of a mesh, for messages."""
  return _describe(list(mesh.devices.flat))


def _describe(devices: Sequence[Any]) -> str:
  procs = len({d.process_index for d in devices})
  return (f"{len(devices)} {devices[0].device_kind} devices in {procs} "
          f"process{'es' if procs > 1 else ''}")


def _on(where: str) -> str:
  return f" on {where}" if where else ""


def axis_placement(mesh: Mesh) -> tuple[str, ...]:
  """Where each mesh axis lies: across slices (DCN), across hosts, or within one host."""
  out = []
  grid = mesh.devices
  for i, name in enumerate(mesh.axis_names):
    size = grid.shape[i]
    lines = np.moveaxis(grid, i, -1).reshape(-1, size)
    slices = max(len({getattr(d, "slice_index", 0) or 0 for d in line}) for line in lines)
    hosts = max(len({d.process_index for d in line}) for line in lines)
    if size == 1:
      kind = "unused"
    elif slices > 1:
      kind = f"across {slices} slices (DCN)" + (f" x {size // slices} within a slice"
                                                if size > slices else "")
    elif hosts > 1:
      kind = f"across {hosts} hosts of a slice (ICI)"
    else:
      kind = "within one host"
    out.append(f"{name}={size}: {kind}")
  return tuple(out)


def make_rules(rules_config: Sequence[Sequence[Any]]) -> Rules:
  """Validates `config.sharding_rules`: (logical name, mesh axis | tuple of axes | None) pairs."""
  rules = []
  for i, rule in enumerate(rules_config):
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise ValueError(f"config.sharding_rules[{i}] = {rule!r}: expected (logical_name, "
                       f"mesh_axes)")
    name, axes = rule
    if isinstance(axes, (list, tuple)):
      axes = tuple(axes)
      names = axes
    else:
      names = () if axes is None else (axes,)
    bad = [a for a in names if a not in MESH_AXES]
    if bad:
      raise ValueError(f"config.sharding_rules[{i}] ({name!r}): unknown mesh axes {bad}; "
                       f"expected names from {list(MESH_AXES)}")
    rules.append((name, axes))
  return tuple(rules)


@contextlib.contextmanager
def activate(mesh: Mesh | None, rules: Rules) -> Iterator[None]:
  """Makes the mesh and rules visible to flax's logical constraints while tracing.

  Without a mesh, flax's activation constraints are no-ops and only the rules are set.
  """
  with contextlib.ExitStack() as stack:
    if mesh is not None:
      stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(rules))
    yield


def logical_to_sharding(tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for a tree of boxed (logically partitioned) values; plain leaves replicate."""
  return nn.logical_to_mesh_sharding(nn.get_partition_spec(tree), mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_axes(rules: Rules) -> tuple[str, ...]:
  """The mesh axes the batch dimension is split over."""
  axes = nn.logical_to_mesh_axes(("batch",), rules)[0]
  if axes is None:
    return ()
  return tuple(axes) if isinstance(axes, (list, tuple)) else (axes,)


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Leading (batch) dimension split over the batch axes, the rest replicated."""
  axes = batch_axes(rules)
  return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def data_parallelism(mesh: Mesh, rules: Rules) -> int:
  return math.prod(mesh.shape[a] for a in batch_axes(rules))


@dataclasses.dataclass(frozen=True)
class InputPlacement:
  """Which rows of each global batch every process reads: those its devices hold.

  A mesh ordered by topology puts a host's devices at scattered batch positions (libtpu's
  v5e:4x4 gives process 0 rows 0, 1, 6 and 15 of 16 shards), and where a tensor or fsdp axis
  spans hosts, several hosts hold the same rows and read the same examples.
  """
  batch_size: int
  shards: int  # the batch's split over the batch axes
  rows: Mapping[int, np.ndarray]  # process index -> the sorted global rows it feeds

  def summary(self) -> str:
    sizes = sorted({len(r) for r in self.rows.values()})
    each = f"{sizes[0]} rows each" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]} rows"
    per_shard = self.batch_size // self.shards
    first = min(self.rows)
    return (f"input placement: {len(self.rows)} host(s) feed {each} of the global batch of "
            f"{self.batch_size} ({self.shards} batch shard(s) of {per_shard}); process {first} "
            f"reads rows {_ranges(self.rows[first])}")


def _ranges(rows: np.ndarray) -> str:
  """[0, 1, 2, 6, 7] -> "0-2, 6-7"."""
  parts, start = [], None
  for i, r in enumerate(rows):
    if start is None:
      start = r
    if i + 1 == len(rows) or rows[i + 1] != r + 1:
      parts.append(f"{start}" if start == r else f"{start}-{r}")
      start = None
  return ", ".join(parts)


def input_placement(batch_size: int, mesh: Mesh, rules: Rules, *,
                    key: str = "config.batch_size", micro_steps: int = 1,
                    where: str = "") -> InputPlacement:
  """The rows every process feeds; a batch the hosts cannot feed raises, naming the axis, the
  devices (`where`: a topology, say) and the process."""
  shards = data_parallelism(mesh, rules)
  axes = " x ".join(f"{a}={mesh.shape[a]}" for a in batch_axes(rules)) or "none"
  # Shard k of the batch is row k of a (shards,) array: which shards each process holds.
  shard_map = batch_sharding(mesh, rules).devices_indices_map((shards,))
  by_process: dict[int, set[int]] = {}
  for device, index in shard_map.items():
    by_process.setdefault(device.process_index, set()).add(index[0].start or 0)
  if batch_size <= 0 or batch_size % (shards * micro_steps):
    accum = f" times config.grad_accum_steps={micro_steps}" if micro_steps > 1 else ""
    process = min(by_process)
    devices = sum(d.process_index == process for d in shard_map)
    share = len(by_process[process]) * max(batch_size, 0) / shards
    context = f"On {where}, process" if where else "Process"
    raise ValueError(f"{key}={batch_size} is not divisible by the {shards} batch shards of "
                     f"config.mesh ({axes}){accum}; expected a multiple of "
                     f"{shards * micro_steps}. {context} {process} would feed {share:g} rows "
                     f"to its {devices} devices")
  per_shard = batch_size // shards
  rows = {p: np.concatenate([np.arange(k * per_shard, (k + 1) * per_shard)
                             for k in sorted(held)]) for p, held in sorted(by_process.items())}
  return InputPlacement(batch_size, shards, rows)


def check_batch_size(batch_size: int, mesh: Mesh, rules: Rules, key: str = "config.batch_size",
                     micro_steps: int = 1) -> None:
  """The global batch must split evenly over the batch shards and micro-batches."""
  input_placement(batch_size, mesh, rules, key=key, micro_steps=micro_steps)


def process_rows(batch_size: int, mesh: Mesh, rules: Rules) -> np.ndarray:
  """The sorted rows of a global batch that this process's devices hold, wherever they lie."""
  indices = batch_sharding(mesh, rules).addressable_devices_indices_map((batch_size,))
  rows = set()
  for index in indices.values():
    sl = index[0]
    rows.update(range(sl.start or 0, batch_size if sl.stop is None else sl.stop))
  return np.array(sorted(rows), np.int64)


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh, rules: Rules
                 ) -> dict[str, jax.Array]:
  """One global jax.Array per field from this process's rows (`process_rows`, in order).

  The fields travel together: their 4-byte words (ints, floats, bools widened) are laid side by
  side in one [rows, words] int32 array, which is the one transfer to the devices, and a
  compiled split gives the fields back on device with the batch's sharding. A field of another
  width travels on its own.
  """
  sharding = batch_sharding(mesh, rules)
  shards = data_parallelism(mesh, rules)
  # Each addressable shard is one row of a (shards,) array: their count is this process's
  # share of the shards, whatever rows they stand for.
  mine = len({index[0].start for index in
              sharding.addressable_devices_indices_map((shards,)).values()})

  def put(value: np.ndarray) -> jax.Array:
    global_shape = (value.shape[0] * shards // mine,) + value.shape[1:]
    return jax.make_array_from_process_local_data(sharding, value, global_shape)

  words, layout, alone = _as_words(local)
  out = {name: put(value) for name, value in alone.items()}
  if layout:
    out.update(_unpacker(layout, sharding)(put(words)))
  return {name: out[name] for name in local}


def _as_words(local: Mapping[str, np.ndarray]
              ) -> tuple[np.ndarray | None, tuple[tuple[Any, ...], ...], dict[str, np.ndarray]]:
  """The 4-byte fields side by side as [rows, words] int32, where each lies (name, dtype, shape
  after the rows, first and last word), and the fields of other widths."""
  parts, layout, alone, at = [], [], {}, 0
  for name, value in local.items():
    value = np.asarray(value)
    dtype = np.dtype(jax.dtypes.canonicalize_dtype(value.dtype))  # int64 -> int32 without x64
    if dtype == np.bool_:
      word = value.astype(np.int32)
    elif dtype.itemsize == 4 and value.ndim >= 1:
      word = np.ascontiguousarray(value, dtype).view(np.int32)
    else:
      alone[name] = value
      continue
    word = word.reshape(len(value), -1)
    parts.append(word)
    layout.append((name, dtype.str, value.shape[1:], at, at + word.shape[1]))
    at += word.shape[1]
  words = np.concatenate(parts, axis=1) if parts else None
  return words, tuple(layout), alone


@functools.lru_cache(maxsize=64)
def _unpacker(layout: tuple[tuple[Any, ...], ...], sharding: NamedSharding
              ) -> Callable[[jax.Array], dict[str, jax.Array]]:
  def unpack(words: jax.Array) -> dict[str, jax.Array]:
    out = {}
    for name, dtype, shape, start, stop in layout:
      part = words[:, start:stop].reshape((words.shape[0],) + shape)
      dtype = np.dtype(dtype)
      out[name] = part != 0 if dtype == np.bool_ else jax.lax.bitcast_convert_type(part, dtype)
    return out
  return jax.jit(unpack, out_shardings=sharding)


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs that carry their target shardings (for restore and AOT lowering)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)
