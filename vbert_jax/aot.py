"""Ahead-of-time compilation of the real train step for a TPU topology that is not present.

With `libtpu` installed, JAX on a CPU machine can describe a TPU slice (or several) and compile
for it: this shows whether a config fits a pod (memory per chip against the chip's HBM), whether
every host can feed its devices (which rows of the batch each host reads, wherever the topology
puts its chips), where each mesh axis lies (within a host, across hosts, across slices), what a
step costs (the model's FLOPs, and XLA's count of FLOPs and bytes per chip), the roofline step
time those counts give at the chip's peak FLOP/s and memory bandwidth, and how the arguments are
sharded, before anyone pays for one. It exits 1 when the step does not fit or cannot be fed.

    JAX_PLATFORMS=cpu python -m vbert_jax.aot --config=configs/pretrain.py:variant=large \
        --topology=v5e:4x4 --mesh=fsdp=4
    JAX_PLATFORMS=cpu python -m vbert_jax.aot --config=configs/pretrain.py:variant=base \
        --topology=v5e:2x2 --num_slices=2

Topologies are named `<generation>:<shape>`: v4:2x2x1 (4 chips), v5e:2x2, v5e:4x4, v5p:2x2x2,
v6e:2x2, ... (the shape counts chips).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import math
import os
import re
from typing import Any, Iterator, Mapping, Sequence
import sys

import jax
import ml_collections
from jax.experimental import topologies
from absl import app
from absl import flags
from ml_collections import config_flags

from vbert_jax import console
from vbert_jax import flops as flops_lib
from vbert_jax import sharding
from vbert_jax import pretrain as pretrain_lib
from vbert_jax import train

GIB = 1024 ** 3

# HBM of one chip, from the Cloud TPU system architecture pages.
HBM_BYTES = {"v4": 32 * GIB, "v5e": 16 * GIB, "v5p": 95 * GIB, "v6e": 32 * GIB}
# libtpu's chip configuration: v4 chips run their two TensorCores as one device (megacore), as
# JAX does on a v4 VM; the others have one device per chip with the default configuration.
CHIP_CONFIG = {"v4": "megacore"}
# HBM bandwidth of one chip, bytes/s, from the same pages.
HBM_BYTES_PER_S = {"v4": 1200e9, "v5e": 819e9, "v5p": 2765e9, "v6e": 1640e9}


@dataclasses.dataclass(frozen=True)
class Topology:
  """A TPU slice named `<generation>:<shape>`, e.g. `v5e:4x4` (16 chips)."""
  name: str
  generation: str
  shape: tuple[int, ...]

  @property
  def chips(self) -> int:
    return math.prod(self.shape)

  @property
  def hbm_bytes(self) -> int:
    return HBM_BYTES[self.generation]

  def default_host_bounds(self) -> tuple[int, int, int]:
    """Four chips (2x2) per host where the slice is that large, as on Cloud TPU VMs."""
    dims = tuple(self.shape) + (1,) * (3 - len(self.shape))
    return (min(dims[0], 2), min(dims[1], 2), 1)


def parse_topology(name: str) -> Topology:
  """`v5e:2x2` -> Topology; an unknown generation or a malformed shape raises, naming it."""
  generation, _, shape = name.strip().partition(":")
  known = ", ".join(f"{g}:..." for g in HBM_BYTES)
  if generation not in HBM_BYTES:
    raise ValueError(f"unknown TPU topology {name!r}: generation {generation!r} is not one of "
                     f"{known} (e.g. v5e:2x2, v5e:4x4, v4:2x2x1, v5p:2x2x2)")
  dims = shape.split("x")
  if not shape or not all(d.isdigit() and int(d) > 0 for d in dims) or len(dims) > 3:
    raise ValueError(f"TPU topology {name!r}: shape {shape!r} is not 2 or 3 positive sizes "
                     f"joined by 'x' (e.g. {generation}:2x2 or {generation}:2x2x1)")
  return Topology(name.strip(), generation, tuple(int(d) for d in dims))


def topology_devices(topology: str = "v5e:2x2",
                     chips_per_host_bounds: Sequence[int] | None = None,
                     num_slices: int = 1) -> list[Any]:
  """Abstract TPU devices of a named topology, e.g. `v5e:2x2` or `v4:2x2x2`: one per chip."""
  topo = parse_topology(topology)
  bounds = tuple(chips_per_host_bounds or topo.default_host_bounds())
  # Compiling needs no TPU; without this, a second process compiling at the same time fails on
  # libtpu's lockfile.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=topo.name,
        chip_config_name=CHIP_CONFIG.get(topo.generation, "default"),
        chips_per_host_bounds=bounds, num_slices=num_slices)
  except Exception as e:  # libtpu's own errors do not say which argument was wrong
    raise ValueError(f"TPU topology {topology!r} with chips_per_host_bounds={bounds}: libtpu "
                     f"cannot describe it ({type(e).__name__}: {e})") from e
  return list(desc.devices)


@dataclasses.dataclass(frozen=True)
class CompileReport:
  """What XLA says about the compiled step, per chip."""
  topology: str
  num_devices: int
  device_kind: str
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  generated_code_bytes: int
  flops: float  # XLA's count for one step on one chip (a scanned loop body counts once)
  bytes_accessed: float = 0.0  # XLA's count of HBM bytes read and written, likewise

  @property
  def peak_bytes(self) -> int:
    """Arguments + outputs + temporaries, minus the donated state that outputs reuse."""
    return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
            + self.generated_code_bytes)

  def summary(self) -> str:
    return (f"{self.topology} ({self.num_devices} x {self.device_kind}): "
            f"{self.peak_bytes / GIB:.2f} GiB per chip (arguments {self.argument_bytes / GIB:.2f}, "
            f"outputs {self.output_bytes / GIB:.2f}, donated {self.alias_bytes / GIB:.2f}, "
            f"temporaries {self.temp_bytes / GIB:.2f}), XLA counts {self.flops / 1e12:.2f} TFLOP "
            f"per chip (a scanned layer once)")


def make_trainer(config: ml_collections.ConfigDict, devices: Sequence[Any],
                 where: str = "") -> train.Trainer:
  mesh = sharding.make_mesh(config.mesh, devices, where=where)
  return train.Trainer(pretrain_lib.make_trainable(config), config, mesh)


def compile_report(compiled: Any, devices: Sequence[Any], topology: str = "") -> CompileReport:
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX returns one dict per computation
    cost = cost[0] if cost else {}
  return CompileReport(
      topology=topology, num_devices=len(devices), device_kind=devices[0].device_kind,
      argument_bytes=int(memory.argument_size_in_bytes),
      output_bytes=int(memory.output_size_in_bytes),
      alias_bytes=int(memory.alias_size_in_bytes),
      temp_bytes=int(memory.temp_size_in_bytes),
      generated_code_bytes=int(memory.generated_code_size_in_bytes),
      flops=float((cost or {}).get("flops", 0.0)),
      bytes_accessed=float((cost or {}).get("bytes accessed", 0.0)))


@contextlib.contextmanager
def _no_persistent_cache() -> Iterator[None]:
  """An executable for absent devices cannot be read back from the persistent cache (JAX warns
  on every try), so writing it there only costs time."""
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", enabled)


def compile_lowered(lowered: Any) -> Any:
  with _no_persistent_cache():
    return lowered.compile()


def compile_train_step(config: ml_collections.ConfigDict, devices: Sequence[Any],
                       topology: str = "") -> tuple[Any, CompileReport]:
  """Compiles the pretraining step of `config` over `devices`; returns it and its report."""
  compiled = compile_lowered(make_trainer(config, devices).lower_train_step())
  return compiled, compile_report(compiled, devices, topology)


# ---------------------------------------------------------------------------------------------
# Readiness: does it fit, what does it cost, how is it sharded.

_SIZE = r"([0-9.]+)\s*([KMGT]?)(?:i?B)?"
_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": GIB, "T": 1024 ** 4}
# XLA's TPU compiler refuses a program that does not fit; these are its two phrasings.
_OOM_PATTERNS = (
    re.compile(rf"required for [^(]*\({_SIZE}\) exceeds available HBM \({_SIZE}\)"),
    re.compile(rf"Used {_SIZE} of {_SIZE} hbm", re.IGNORECASE),
)


def parse_oom(message: str) -> tuple[int, int] | None:
  """(bytes required, bytes available) from XLA's out-of-HBM error, or None if it is not one."""
  if not re.search(r"RESOURCE_EXHAUSTED|HbmOom|out of memory", message, re.IGNORECASE):
    return None
  for pattern in _OOM_PATTERNS:
    m = pattern.search(message)
    if m:
      need = float(m.group(1)) * _UNITS[m.group(2)]
      have = float(m.group(3)) * _UNITS[m.group(4)]
      return int(need), int(have)
  return (0, 0)


@dataclasses.dataclass(frozen=True)
class Readiness:
  """The verdict for one config on one topology."""
  topology: Topology
  mesh: dict[str, int]
  num_devices: int
  device_kind: str
  hbm_bytes: int  # of one device (one chip)
  model_flops: float  # per step, all chips (vbert_jax.flops)
  peak_flops: float  # per chip (flops.PEAK_BF16_FLOPS)
  bandwidth: float  # HBM bytes/s per chip
  shardings: tuple[str, ...]
  num_slices: int = 1
  scanned: bool = False  # layers under nn.scan: XLA's counts see the loop body once
  axes: tuple[str, ...] = ()  # where each mesh axis lies
  placement: str = ""  # the input placement line, or why the hosts cannot feed the devices
  feedable: bool = True
  compiled: Any = None  # None when XLA refused the program
  report: CompileReport | None = None
  required_bytes: int = 0  # from XLA's refusal when it did not compile
  error: str = ""

  @property
  def needed_bytes(self) -> int:
    return self.report.peak_bytes if self.report is not None else self.required_bytes

  @property
  def fits(self) -> bool:
    return self.report is not None and self.report.peak_bytes <= self.hbm_bytes

  @property
  def ready(self) -> bool:
    return self.fits and self.feedable

  @property
  def roofline(self) -> tuple[float, float]:
    """(compute, memory) seconds of a step at the chip's peak: XLA's FLOPs per chip over the
    peak FLOP/s, and its bytes accessed per chip over the HBM bandwidth."""
    if self.report is None:
      return 0.0, 0.0
    return self.report.flops / self.peak_flops, self.report.bytes_accessed / self.bandwidth

  @property
  def step_seconds(self) -> float:
    """The roofline step time: the slower of compute and memory traffic at their peaks (a
    bound no step beats; the model's MFU at that time is the best it can reach)."""
    return max(self.roofline)

  def lines(self) -> list[str]:
    mesh = ", ".join(f"{k}={v}" for k, v in self.mesh.items())
    slices = f" x {self.num_slices} slices" if self.num_slices > 1 else ""
    out = [f"topology {self.topology.name}{slices}: {self.num_devices} x {self.device_kind}, "
           f"{self.hbm_bytes / GIB:.0f} GiB HBM per chip; mesh {mesh}"]
    out.append("mesh axes: " + "; ".join(self.axes))
    out.append(self.placement if self.feedable else f"input placement: CANNOT FEED: "
               f"{self.placement}")
    if self.report is not None:
      r = self.report
      out.append(f"memory per chip: {r.peak_bytes / GIB:.2f} GiB of {self.hbm_bytes / GIB:.0f} "
                 f"GiB ({100 * r.peak_bytes / self.hbm_bytes:.0f}%): arguments "
                 f"{r.argument_bytes / GIB:.2f}, outputs {r.output_bytes / GIB:.2f}, donated "
                 f"{r.alias_bytes / GIB:.2f}, temporaries {r.temp_bytes / GIB:.2f}, code "
                 f"{r.generated_code_bytes / GIB:.2f}")
      xla = (f"; XLA counts {r.flops / 1e12:.3f} TFLOP per chip, "
             f"{r.flops * self.num_devices / 1e12:.3f} in all (a scanned layer body once)")
    elif not self.feedable:
      out.append("memory per chip: not compiled, since the batch cannot be fed")
      xla = ""
    else:
      out.append(f"memory per chip: XLA needs at least {self.required_bytes / GIB:.2f} GiB, "
                 f"more than the {self.hbm_bytes / GIB:.0f} GiB a chip has")
      xla = ""
    out.append(f"FLOPs per step: model {self.model_flops / 1e12:.3f} TFLOP{xla}")
    if self.report is not None:
      compute, memory = self.roofline
      bound = "compute" if compute >= memory else "memory"
      terms = (f"{bound} bound: {1e3 * compute:.3g} ms at {self.peak_flops / 1e12:.0f} TFLOP/s, "
               f"{1e3 * memory:.3g} ms for XLA's {self.report.bytes_accessed / GIB:.2f} GiB at "
               f"{self.bandwidth / 1e9:.0f} GB/s per chip")
      if self.scanned:
        out.append(f"roofline step time: at least {1e3 * self.step_seconds:.3g} ms ({terms}); "
                   f"XLA counts the scanned layer body once, so this is a lower bound "
                   f"(--config.model.scan_layers=False counts every layer)")
      else:
        best = self.model_flops / (self.num_devices * self.peak_flops * self.step_seconds)
        out.append(f"roofline step time: {1e3 * self.step_seconds:.3g} ms ({terms}); the "
                   f"model's FLOPs in that time: MFU {best:.2f}, the most this step can reach")
    out.append("shardings:")
    out.extend(f"  {s}" for s in self.shardings)
    verdict = "fits" if self.fits else "DOES NOT FIT"
    out.append(f"verdict: {verdict}" + ("" if self.feedable else
                                        ", but the hosts CANNOT FEED their devices"))
    return out


def with_mesh(config: ml_collections.ConfigDict, mesh: Mapping[str, int] | None
              ) -> ml_collections.ConfigDict:
  """A copy of `config` whose mesh axes are overridden; an unknown axis raises, naming it."""
  config = copy.deepcopy(config)
  for axis, size in (mesh or {}).items():
    if axis not in sharding.MESH_AXES:
      raise ValueError(f"--mesh: unknown axis {axis!r}; expected names from "
                       f"{list(sharding.MESH_AXES)}")
    with config.unlocked():
      config.mesh[axis] = int(size)
  return config


def parse_mesh(text: str) -> dict[str, int]:
  """`data=2,fsdp=-1` -> {"data": 2, "fsdp": -1}."""
  out = {}
  for item in filter(None, (p.strip() for p in text.split(","))):
    axis, eq, size = item.partition("=")
    if not eq or not re.fullmatch(r"-?\d+", size.strip()):
      raise ValueError(f"--mesh: {item!r} is not axis=size (e.g. data=-1,fsdp=4)")
    out[axis.strip()] = int(size)
  return out


def _spec_text(spec: Any) -> str:
  parts = ["-" if p is None else (p if isinstance(p, str) else "+".join(p)) for p in spec]
  return f"({', '.join(parts)})" if parts else "replicated"


def sharding_summary(trainer: train.Trainer, batch_size: int, top: int = 5) -> tuple[str, ...]:
  """The state grouped by partition spec (largest `top` groups), then the batch.

  A spec lists the mesh axes each dimension is split over ("-": not split).
  """
  groups: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0, 0.0])

  def add(key: str, abstract: Any, shard: Any) -> None:
    size = math.prod(abstract.shape) * abstract.dtype.itemsize
    local = math.prod(shard.shard_shape(abstract.shape)) * abstract.dtype.itemsize
    g = groups[key]
    g[0] += 1
    g[1] += size
    g[2] += local

  for a, s in zip(jax.tree.leaves(trainer.abstract_state),
                  jax.tree.leaves(trainer.state_shardings)):
    add(_spec_text(s.spec), a, s)
  state = sorted(groups.items(), key=lambda kv: -kv[1][1])
  if len(state) > top + 1:
    rest = [sum(g[i] for _, g in state[top:]) for i in range(3)]
    state = state[:top] + [(f"{len(state) - top} other specs", rest)]
  groups.clear()
  for a in trainer.trainable.batch_spec(batch_size).values():
    add(_spec_text(trainer.batch_sharding.spec), a, trainer.batch_sharding)
  rows = [(f"state {k}", g) for k, g in state] + [(f"batch {k}", g) for k, g in groups.items()]
  return tuple(f"{name}: {int(n)} arrays, {total / GIB:.3f} GiB, {local / GIB:.3f} GiB per chip"
               for name, (n, total, local) in rows)


def check(config: ml_collections.ConfigDict, topology: str, *,
          mesh: Mapping[str, int] | None = None,
          chips_per_host_bounds: Sequence[int] | None = None, num_slices: int = 1) -> Readiness:
  """Compiles the pretraining step of `config` for `topology` and judges whether it fits and
  whether every host can feed its devices.

  Bad input (an unknown topology, a mesh that does not divide its chips)
  raises ValueError before anything is compiled. A step that does not fit, or a batch that the
  hosts cannot feed, is a verdict, not an error: XLA's refusal is read for the memory it needed,
  and the placement's reason names the axis and the process.
  """
  topo = parse_topology(topology)
  if num_slices < 1:
    raise ValueError(f"--num_slices={num_slices}: expected at least 1")
  config = with_mesh(config, mesh)
  where = topo.name + (f" x {num_slices} slices" if num_slices > 1 else "")
  chips = topo.chips * num_slices
  sizes = sharding.mesh_shape(config.mesh, chips, f"{where} ({chips} chips)")
  devices = topology_devices(topo.name, chips_per_host_bounds, num_slices)
  kind = devices[0].device_kind
  peak = flops_lib.peak_flops(kind)
  if peak is None:
    raise ValueError(f"no peak FLOP/s known for device kind {kind!r}; add it to "
                     f"vbert_jax.flops.PEAK_BF16_FLOPS")
  device_mesh = sharding.make_mesh(config.mesh, devices, where=where)
  common = dict(topology=topo, mesh=dict(zip(sharding.MESH_AXES, sizes)),
                num_devices=len(devices), device_kind=kind,
                hbm_bytes=topo.hbm_bytes * chips // len(devices),
                model_flops=float(pretrain_lib.make_trainable(config).train_flops(config.batch_size)),
                peak_flops=peak, bandwidth=HBM_BYTES_PER_S[topo.generation],
                num_slices=num_slices, scanned=bool(config.model.scan_layers),
                axes=sharding.axis_placement(device_mesh))
  try:
    placement = sharding.input_placement(
        config.batch_size, device_mesh, sharding.make_rules(config.sharding_rules),
        micro_steps=int(config.grad_accum_steps), where=where)
  except ValueError as e:
    return Readiness(**common, shardings=(), placement=str(e), feedable=False)
  trainer = train.Trainer(pretrain_lib.make_trainable(config), config, device_mesh)
  common.update(shardings=sharding_summary(trainer, config.batch_size),
                placement=placement.summary())
  try:
    compiled = compile_lowered(trainer.lower_train_step())
  except jax.errors.JaxRuntimeError as e:
    oom = parse_oom(str(e))
    if oom is None:
      raise
    return Readiness(**common, required_bytes=oom[0], error=str(e).splitlines()[0])
  return Readiness(**common, compiled=compiled,
                   report=compile_report(compiled, devices, where))


# ---------------------------------------------------------------------------------------------
# Command line.


def _define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Pretraining config file and arguments.",
                                  lock_config=True)
  flags.DEFINE_string("topology", "v5e:2x2", "TPU topology: v5e:2x2, v5e:4x4, v4:2x2x1, "
                      "v5p:2x2x2, v6e:2x2, ...")
  flags.DEFINE_string("mesh", "", "Mesh axes overriding config.mesh, e.g. data=-1,fsdp=4.")
  flags.DEFINE_list("chips_per_host_bounds", [], "Chips per host along x,y,z (default: 2,2,1 "
                    "where the slice is that large).")
  flags.DEFINE_integer("num_slices", 1, "Slices of --topology joined over the data-center "
                       "network: data parallelism spans them, fsdp and tensor stay inside one.")


def main(argv: Sequence[str]) -> None:
  """Prints the verdict; exits 1 when the step does not fit or cannot be fed, 2 on bad
  input."""
  console.setup()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  fv = flags.FLAGS
  config = fv.config
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/pretrain.py:variant=base")
  try:
    result = check(config, fv.topology, mesh=parse_mesh(fv.mesh),
                   chips_per_host_bounds=[int(x) for x in fv.chips_per_host_bounds] or None,
                   num_slices=fv.num_slices)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print("\n".join(result.lines()), flush=True)
  if not result.feedable:
    print(f"error: the hosts of {result.topology.name} cannot feed their devices: "
          f"{result.placement}", file=sys.stderr)
    sys.exit(1)
  if not result.fits:
    name = config.get("variant", "the config")
    at_least = "at least " if result.report is None else ""
    print(f"error: the train step of {name} (batch {config.batch_size}, max_len "
          f"{config.max_len}) does not fit {result.topology.name}: it needs {at_least}"
          f"{result.needed_bytes / GIB:.2f} GiB per chip, a chip has "
          f"{result.hbm_bytes / GIB:.0f} GiB. Shard more (--mesh=fsdp=N), rematerialise "
          f"(--config.model.remat=full), use bfloat16, or shrink the batch.", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
