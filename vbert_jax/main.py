"""Pretraining entry point.

    python -m vbert_jax.main --config=configs/pretrain.py:variant=tiny,runlocal --workdir=DIR
    python -m vbert_jax.main --config=configs/pretrain.py:variant=large --workdir=gs://b/run \
        --config.batch_size=256

Run the same command on every worker of a TPU pod: the processes find each other through the TPU
environment. Elsewhere, several processes join when given a coordinator, by flags
(--coordinator_address=host:port --num_processes=N --process_id=i) or by the environment
(JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID). A run resumes by itself from the
newest checkpoint in its workdir.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file and arguments, e.g. configs/pretrain.py:variant=tiny,runlocal",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the resolved "
                               "config go (local path or gs://).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, to join several processes.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def _tpu_pod() -> bool:
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return "," in hosts or bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  return int(value) if value not in (None, "") else None


def initialize_distributed() -> None:
  """Joins the other processes, before anything touches the devices."""
  address = _COORDINATOR.value or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if address:
    num = _NUM_PROCESSES.value if _NUM_PROCESSES.value is not None else _env_int(
        "JAX_NUM_PROCESSES")
    pid = _PROCESS_ID.value if _PROCESS_ID.value is not None else _env_int("JAX_PROCESS_ID")
    # CPU processes exchange data through gloo; other backends ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(address, num_processes=num, process_id=pid)
  elif _tpu_pod():
    jax.distributed.initialize()  # the TPU environment names the coordinator and the workers
  else:
    return
  logging.info("process %d of %d, %d local of %d devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with a mistyped `--config.a.b=v` key named in the error."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    missing = str(e).strip("\"'")
    culprit = next((a for a in argv[1:] if a.startswith("--config.")
                    and missing in a.split("=", 1)[0].split(".")), "a --config override")
    raise flags.IllegalFlagValueError(
        f"unknown config key {missing!r} in {culprit}: the config is locked; check the spelling "
        f"against the config file") from e


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/pretrain.py:variant=tiny")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required: a directory for checkpoints and metrics")
  initialize_distributed()
  from vbert_jax import train  # pylint: disable=g-import-not-at-top
  result = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  state = "preempted" if result.preempted else "finished"
  logging.info("%s at step %d", state, result.step)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
