"""Small model files as msgpack payloads that carry a format tag and version.

The S3D weights and the punctuation model are single files that users move between machines and
code versions. A tag says what a file is, so that a mix-up is named rather than misread, and a
version says whether this code can read it.
"""

from __future__ import annotations

from typing import Any

from etils import epath
from flax import serialization
import jax
import numpy as np

from vbert_jax import atomic


def write(path, tag: str, version: int, payload: dict[str, Any]) -> epath.Path:
  """Writes `payload` (device arrays brought to the host) with its tag and version, atomically."""
  path = epath.Path(path)
  host = jax.tree.map(lambda x: np.asarray(x) if isinstance(x, jax.Array) else x, payload)
  data = serialization.msgpack_serialize({"format": tag, "version": version, **host})
  atomic.write_atomic(path, lambda tmp: epath.Path(tmp).write_bytes(data))  # makes the folder
  return path


def read(path, tag: str, newest: int, what: str, how_to_make: str) -> tuple[dict[str, Any], int]:
  """(payload, its version) of a file written by `write` with `tag`, at version <= `newest`;
  anything else is refused with a ValueError naming the file and what was expected. `what`
  names the kind of file ("punctuation model"); `how_to_make` says how to get one."""
  path = epath.Path(path)
  try:
    payload = serialization.msgpack_restore(path.read_bytes())
  except (OSError, ValueError, TypeError) as e:
    raise ValueError(f"{path}: not a readable {what} file ({e})") from e
  if not isinstance(payload, dict) or payload.get("format") != tag:
    raise ValueError(f"{path}: not a vbert_jax {what} file (expected format tag {tag!r}; "
                     f"{how_to_make})")
  version = payload.get("version", 0)
  if not isinstance(version, int) or version > newest:
    raise ValueError(f"{path}: {what} format version {version} is newer than this code reads "
                     f"(version {newest}); update vbert_jax")
  return payload, version
