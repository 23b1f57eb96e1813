"""What a command prints: its own progress, files and warnings; library chatter goes to a log file.

Left alone, a short pretraining run prints more of Orbax's INFO lines about its own internals than
lines of its own, and on a machine without a TPU, libtpu prints errors about the TPU it cannot
find. Commands call `setup()` first: the console then keeps vbert_jax's INFO lines and every
library's warnings. `log_to(path)` writes every record, chatter included, to a file (a run's
`log.txt`).
"""

from __future__ import annotations

import contextlib
import glob
import logging as py_logging
import os
import pathlib
from typing import Iterator

from absl import logging
import jax

_PACKAGE = f"{os.sep}vbert_jax{os.sep}"
# libtpu is loaded to describe TPU topologies for ahead-of-time compilation, also where there is
# no TPU; these tell it so, and it then looks for no metadata server, accelerator or workers.
_NO_TPU_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": "v5litepod-4",
               "TPU_WORKER_HOSTNAMES": "localhost", "TPU_STDERR_LOG_LEVEL": "3",
               "TPU_MIN_LOG_LEVEL": "3"}


def has_tpu() -> bool:
  """Whether this machine has TPU chips (a Cloud TPU VM, or a GKE TPU node)."""
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def _has_gpu() -> bool:
  return bool(glob.glob("/dev/nvidia[0-9]*"))


class _OwnLines(py_logging.Filter):
  """The run's own INFO lines and anyone's warnings."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or _PACKAGE in record.pathname


_FILTER = _OwnLines()


def setup() -> None:
  """Before JAX starts: no probing for accelerators the machine lacks, and a console that shows
  the command's own lines (see the module doc)."""
  # TensorFlow (here for TFDS and TensorBoard files only) announces its oneDNN kernels on import.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  if not has_tpu():
    for key, value in _NO_TPU_ENV.items():
      os.environ.setdefault(key, value)
    if not jax.config.jax_platforms and not _has_gpu():
      jax.config.update("jax_platforms", "cpu")
  logging.set_verbosity(logging.INFO)
  handler = logging.get_absl_handler()
  if _FILTER not in handler.filters:
    handler.addFilter(_FILTER)


@contextlib.contextmanager
def log_to(path: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Every log record (the libraries' too) also goes to `path` while the context is open."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  handler = py_logging.FileHandler(path)
  handler.setFormatter(logging.PythonFormatter())
  root = py_logging.getLogger()
  root.addHandler(handler)
  try:
    yield path
  finally:
    root.removeHandler(handler)
    handler.close()
