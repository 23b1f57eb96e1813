"""Ahead-of-time compilation of the real train step for a TPU topology that is not present.

With `libtpu` installed, JAX on a CPU machine can describe a TPU slice and compile for it: this
shows whether a config fits a pod (memory per chip) before anyone pays for one.

    python -m vbert_jax.aot --config=configs/pretrain.py:variant=large --topology=v5e:4x4
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import jax
import ml_collections
from jax.experimental import topologies

from vbert_jax import sharding
from vbert_jax import train

GIB = 1024 ** 3


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

  @property
  def peak_bytes(self) -> int:
    """Arguments + outputs + temporaries, minus the donated state that outputs reuse."""
    return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
            + self.generated_code_bytes)

  def summary(self) -> str:
    return (f"{self.topology} ({self.num_devices} x {self.device_kind}): "
            f"{self.peak_bytes / GIB:.2f} GiB per chip (arguments {self.argument_bytes / GIB:.2f}, "
            f"outputs {self.output_bytes / GIB:.2f}, donated {self.alias_bytes / GIB:.2f}, "
            f"temporaries {self.temp_bytes / GIB:.2f}), XLA counts {self.flops / 1e12:.2f} TFLOP per "
            f"chip (a scanned layer once)")


def topology_devices(topology: str = "v5e:2x2", chips_per_host_bounds: Sequence[int] = (2, 2, 1),
                     num_slices: int = 1) -> list[Any]:
  """Abstract TPU devices of a named topology, e.g. `v5e:2x2` or `v4:2x2x2`."""
  # Compiling needs no TPU; without this, a second process compiling at the same time fails on
  # libtpu's lockfile.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  desc = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                      chip_config_name="default",
                                      chips_per_host_bounds=tuple(chips_per_host_bounds),
                                      num_slices=num_slices)
  return list(desc.devices)


def compile_train_step(config: ml_collections.ConfigDict, devices: Sequence[Any],
                       topology: str = "") -> tuple[Any, CompileReport]:
  """Compiles the pretraining step of `config` over `devices`; returns it and its report."""
  mesh = sharding.make_mesh(config.mesh, devices)
  trainer = train.Trainer(train.videobert_task(config), config, mesh)
  compiled = trainer.lower_train_step().compile()
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX returns one dict per computation
    cost = cost[0] if cost else {}
  report = CompileReport(
      topology=topology, num_devices=len(devices), device_kind=devices[0].device_kind,
      argument_bytes=int(memory.argument_size_in_bytes),
      output_bytes=int(memory.output_size_in_bytes),
      alias_bytes=int(memory.alias_size_in_bytes),
      temp_bytes=int(memory.temp_size_in_bytes),
      generated_code_bytes=int(memory.generated_code_size_in_bytes),
      flops=float((cost or {}).get("flops", 0.0)))
  return compiled, report


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Pretraining config file and arguments.",
                                  lock_config=True)
  flags.DEFINE_string("topology", "v5e:2x2", "TPU topology name, e.g. v5e:2x2, v5e:4x4.")
  flags.DEFINE_list("chips_per_host_bounds", ["2", "2", "1"], "Chips per host along x,y,z.")
  flags.DEFINE_integer("num_slices", 1, "Number of slices.")


def main(argv: Sequence[str]) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  del argv
  fv = flags.FLAGS
  devices = topology_devices(fv.topology, [int(x) for x in fv.chips_per_host_bounds],
                             fv.num_slices)
  _, report = compile_train_step(fv.config, devices, fv.topology)
  print(report.summary())


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
