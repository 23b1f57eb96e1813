"""Decode functions for the worker tests, imported by name in the spawned worker processes.

`read_clips` behaves as `reader.read_clips` except on files whose name says otherwise:
`*_killed_*` gets SIGKILL after its first clip, `*_exits_*` leaves with os._exit(3) before any
clip, `*_raises_*` raises RuntimeError after its first clip, `*_hangs_*` sleeps for an hour after
its first clip. A real crash or hang, not a simulated one: the worker process is gone or stuck.
"""

from __future__ import annotations

import os
import pathlib
import signal
import time

from vbert_jax.video import reader


def read_clips(path, **kw):
  name = pathlib.Path(path).name
  if "_exits_" in name:
    os._exit(3)  # pylint: disable=protected-access
  clips = reader.read_clips(path, **kw)
  faulty = any(k in name for k in ("_killed_", "_raises_", "_hangs_"))
  return _faulty(name, clips) if faulty else clips


def _faulty(name: str, clips):
  for i, clip in enumerate(clips):
    if i == 1:
      if "_killed_" in name:
        os.kill(os.getpid(), signal.SIGKILL)
      if "_hangs_" in name:
        time.sleep(3600)
      raise RuntimeError(f"decoder broke in {name}")
    yield clip
