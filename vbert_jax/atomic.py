"""Writing a file so that a reader never sees it half-written, even if the writer dies."""

from __future__ import annotations

import os
import pathlib
import tempfile
from typing import Callable
import uuid

from etils import epath


def _file_mode() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return 0o666 & ~mask


def write_atomic(path, write: Callable[[str], None]) -> pathlib.Path | epath.Path:
  """Calls write(tmp) on a temporary name in the same folder, then renames it to `path`.

  On any failure the temporary file is removed and `path` is left as it was. In a bucket
  (`gs://...`, through `etils.epath`; `write` must write through epath too) the rename is the
  store's, and readers skip the temporary name, which starts with a dot.
  """
  if "://" in str(path):
    return _write_remote(epath.Path(path), write)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  os.close(fd)
  try:
    write(tmp)
    os.chmod(tmp, _file_mode())  # mkstemp makes files private; these are ordinary outputs
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return path


def _write_remote(path: epath.Path, write: Callable[[str], None]) -> epath.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
  try:
    write(str(tmp))
    tmp.replace(path)
  except BaseException:
    if tmp.exists():
      tmp.unlink()
    raise
  return path
