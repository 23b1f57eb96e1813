"""Writing a file so that a reader never sees it half-written, even if the writer dies."""

from __future__ import annotations

import os
import pathlib
import tempfile
from typing import Callable


def _file_mode() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return 0o666 & ~mask


def write_atomic(path, write: Callable[[str], None]) -> pathlib.Path:
  """Calls write(tmp) on a temporary name in the same folder, then renames it to `path`.

  On any failure the temporary file is removed and `path` is left as it was.
  """
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
