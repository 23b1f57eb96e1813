"""Folders that one test process builds and every process of the session reads.

Under pytest-xdist each worker is a process of its own, so a session-scoped fixture would build its
world once per worker. `build_once` builds it once for the whole session instead: the first worker
to ask builds under an exclusive lock, the others wait on the lock and read the finished folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import shutil
from typing import Callable, Iterator

import pytest

DONE = ".built"


def session_root(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
  """The folder that every worker of this session shares (pytest's base temp of the session)."""
  root = tmp_path_factory.getbasetemp()
  return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


@contextlib.contextmanager
def _locked(path: pathlib.Path) -> Iterator[None]:
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def build_once(tmp_path_factory: pytest.TempPathFactory, name: str,
               build: Callable[[pathlib.Path], None]) -> pathlib.Path:
  """`root/name`, built by `build(folder)` in the first process that asks; a build that failed
  part-way is started again from an empty folder."""
  folder = session_root(tmp_path_factory) / name
  with _locked(folder.with_name(name + ".lock")):
    if not (folder / DONE).exists():
      shutil.rmtree(folder, ignore_errors=True)
      folder.mkdir(parents=True)
      build(folder)
      (folder / DONE).touch()
  return folder
