"""What every absl entry point shares: --config and --workdir, joining the other processes, and
flag parsing that names a mistyped config key.

Defining the flags once here lets several entry points live in one process (tests, notebooks).
"""

from __future__ import annotations

import os

from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
from absl import app

CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file and arguments, e.g. configs/pretrain.py:variant=tiny,runlocal",
    lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the resolved "
                              "config go (local path or gs://).")
COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                  "host:port of process 0, to join several processes.")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


DISTRIBUTED_ENV = "VBERT_DISTRIBUTED"


def _join_by_environment() -> bool:
  """Whether to start JAX's distributed runtime without a coordinator address.

  On a Cloud TPU VM JAX finds the other workers through the metadata server, whose answer
  environment variables rarely carry, so the launcher says so explicitly: VBERT_DISTRIBUTED=1
  (launch/run_tpu.sh sets it for every run on a TPU VM; 0 turns it off). Without it, a
  multi-worker or multi-slice environment (TPU_WORKER_HOSTNAMES, MEGASCALE_*) still joins.
  """
  value = os.environ.get(DISTRIBUTED_ENV, "").strip().lower()
  if value in ("1", "true", "yes"):
    return True
  if value in ("0", "false", "no"):
    return False
  if value:
    raise ValueError(f"${DISTRIBUTED_ENV}={value!r}: expected 1 or 0")
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return "," in hosts or bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  return int(value) if value not in (None, "") else None


def initialize_distributed() -> None:
  """Joins the other processes, before anything touches the devices.

  By flags (--coordinator_address, --num_processes, --process_id), by the environment
  (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), or on Cloud TPU VMs by JAX's own
  discovery (see `_join_by_environment`).
  """
  address = COORDINATOR.value or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if address:
    num = NUM_PROCESSES.value if NUM_PROCESSES.value is not None else _env_int(
        "JAX_NUM_PROCESSES")
    pid = PROCESS_ID.value if PROCESS_ID.value is not None else _env_int("JAX_PROCESS_ID")
    # CPU processes exchange data through gloo; other backends ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(address, num_processes=num, process_id=pid)
  elif _join_by_environment():
    jax.distributed.initialize()  # the TPU environment names the coordinator and the workers
  else:
    return
  logging.info("process %d of %d, %d local of %d devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with a mistyped `--config.a.b=v` key named in the error."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as error:
    e: BaseException = error
    # ml_collections wraps a KeyError("'key'\nDid you mean ...?") in an AttributeError.
    while e.args and isinstance(e.args[0], BaseException):
      e = e.args[0]
    detail = str(e.args[0]) if e.args else str(e)
    key = detail.split("\n")[0].strip("\"' ")
    culprit = next((a for a in argv[1:] if a.startswith("--config.")
                    and key in a.split("=", 1)[0].split(".")), "a --config override")
    hint = detail.split("\n", 1)[1] if "\n" in detail else ""
    raise flags.IllegalFlagValueError(
        f"unknown config key {key!r} in {culprit}: the config is locked; check the spelling "
        f"against the config file. {hint}".strip()) from error


def check_args(argv: list[str], example: str) -> tuple:
  """The config and workdir, or a usage error saying what is missing."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if CONFIG.value is None:
    raise app.UsageError(f"--config is required, e.g. --config={example}")
  if not WORKDIR.value:
    raise app.UsageError("--workdir is required: a directory for checkpoints and metrics")
  return CONFIG.value, WORKDIR.value
