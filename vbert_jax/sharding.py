"""The device mesh, logical-axis rules, and host batches turned into global arrays.

Modules name logical axes ("batch", "embed", "heads", "mlp", "vocab", ...); the config maps them to
the mesh axes data, fsdp and tensor. Data parallelism is `batch -> data`, FSDP adds
`batch -> fsdp` and `embed -> fsdp`, tensor parallelism `heads/mlp/vocab -> tensor`. Rules are
applied in order and a mesh axis is used at most once per array (flax's rule), so `batch` must come
before `embed` for activations to shard over the batch rather than the hidden size.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

Rules = tuple[tuple[str, Any], ...]


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Sizes of (data, fsdp, tensor); one size may be -1 and takes the remaining devices."""
  unknown = sorted(set(mesh_config) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"config.mesh: unknown axes {unknown}; expected only {list(MESH_AXES)}")
  sizes = [int(mesh_config.get(a, 1)) for a in MESH_AXES]
  described = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))
  fill = [i for i, s in enumerate(sizes) if s == -1]
  if len(fill) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh ({described}): sizes must be positive, with at most one -1")
  known = math.prod(s for s in sizes if s != -1)
  if fill:
    if num_devices % known:
      raise ValueError(f"config.mesh ({described}) does not divide the {num_devices} devices: "
                       f"the fixed axes need a multiple of {known}")
    sizes[fill[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"config.mesh ({described}) needs {math.prod(sizes)} devices but "
                     f"{num_devices} are present; use -1 on one axis to fill")
  return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (all devices by default)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  try:
    # Follows the physical topology on TPU so that the inner axes ride the fastest links.
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


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


def check_batch_size(batch_size: int, mesh: Mesh, rules: Rules, key: str = "config.batch_size",
                     micro_steps: int = 1) -> None:
  """The global batch must split evenly over hosts, batch shards and micro-batches."""
  shards = data_parallelism(mesh, rules)
  procs = jax.process_count()
  axes = " x ".join(f"{a}={mesh.shape[a]}" for a in batch_axes(rules)) or "none"
  if batch_size <= 0 or batch_size % procs:
    raise ValueError(f"{key}={batch_size} must be a positive multiple of the {procs} processes")
  if batch_size % (shards * micro_steps):
    accum = f" times config.grad_accum_steps={micro_steps}" if micro_steps > 1 else ""
    raise ValueError(f"{key}={batch_size} is not divisible by the {shards} batch shards of "
                     f"config.mesh ({axes}){accum}; expected a multiple of {shards * micro_steps}")


def local_batch_size(batch_size: int) -> int:
  """This process's share of a global batch."""
  return batch_size // jax.process_count()


def process_batch_shard(batch_size: int, mesh: Mesh, rules: Rules) -> tuple[int, int]:
  """(index, count): this process holds rows [index * n, (index + 1) * n) of the global batch.

  The mesh may order the devices by topology rather than by process, so the rows a process must
  read follow from where its devices sit in the batch sharding, not from its process index.
  """
  indices = batch_sharding(mesh, rules).addressable_devices_indices_map((batch_size,))
  rows = sorted({(s[0].start or 0, s[0].stop or batch_size) for s in indices.values()})
  first, last = rows[0][0], max(stop for _, stop in rows)
  local = local_batch_size(batch_size)
  if last - first != local or first % local:
    raise ValueError(f"config.mesh: the devices of process {jax.process_index()} hold rows "
                     f"{rows} of the batch, not one block of {local}; put the data axis across "
                     f"processes")
  return first // local, batch_size // local


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh, rules: Rules
                 ) -> dict[str, jax.Array]:
  """One global jax.Array per field from each process's host-local rows."""
  sharding = batch_sharding(mesh, rules)
  procs = jax.process_count()
  out = {}
  for name, value in local.items():
    value = np.asarray(value)
    global_shape = (value.shape[0] * procs,) + value.shape[1:]
    out[name] = jax.make_array_from_process_local_data(sharding, value, global_shape)
  return out


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs that carry their target shardings (for restore and AOT lowering)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)
