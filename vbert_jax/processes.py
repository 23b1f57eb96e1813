"""What the processes of a multi-host run decide together, over JAX's coordination service.

Barriers and small exchanges (which checkpoint to restore, whether every process runs the same
config and code) go through the distributed runtime's key-value store, not device collectives: a
collective waits only seconds for a late process (gloo's 30 s on CPU), while a process that is
compiling or restoring can be minutes behind the others. A single process skips all of it.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.metadata
import json
import pathlib
from typing import Any, Mapping, Sequence

import jax
import orbax.checkpoint as ocp

TIMEOUT_S = 1800
# Versions that change numerics or formats: processes must agree on them as on the code.
AGREED_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "grain")
_uses: collections.Counter = collections.Counter()


def _key(name: str) -> str:
  # Keys are single-use; every process calls the same exchanges in the same order, so the count
  # of uses of a name agrees across processes.
  _uses[name] += 1
  return f"vbert_jax/{name}/{_uses[name]}"


def barrier(name: str, timeout_s: int = TIMEOUT_S) -> None:
  """Waits until every process arrives."""
  if jax.process_count() == 1:
    return
  client = ocp.multihost.get_jax_distributed_client()
  client.wait_at_barrier(_key(name), timeout_s * 1000)


def all_gather(name: str, value: str, timeout_s: int = TIMEOUT_S) -> list[str]:
  """Every process's `value`, in process order."""
  if jax.process_count() == 1:
    return [value]
  client = ocp.multihost.get_jax_distributed_client()
  key = _key(name)
  client.key_value_set(f"{key}/{jax.process_index()}", value)
  return [client.blocking_key_value_get(f"{key}/{i}", timeout_s * 1000)
          for i in range(jax.process_count())]


def code_version() -> str:
  """A digest of the vbert_jax sources this process imports."""
  root = pathlib.Path(__file__).resolve().parent
  digest = hashlib.sha256()
  for path in sorted(root.rglob("*.py")):
    digest.update(path.relative_to(root).as_posix().encode())
    digest.update(path.read_bytes())
  return digest.hexdigest()[:16]


def _flatten(value: Any, prefix: str) -> dict[str, str]:
  if isinstance(value, Mapping):
    out = {}
    for k in sorted(value):
      out.update(_flatten(value[k], f"{prefix}.{k}"))
    return out
  return {prefix: repr(value)}


def fingerprint(config: Any) -> dict[str, str]:
  """What must be the same on every process: the config key by key, the code, the packages."""
  out = _flatten(config.to_dict() if hasattr(config, "to_dict") else dict(config), "config")
  out["code version (vbert_jax sources)"] = code_version()
  for name in AGREED_PACKAGES:
    try:
      out[f"package {name}"] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[f"package {name}"] = "absent"
  return out


def first_difference(a: Mapping[str, str], b: Mapping[str, str]) -> str | None:
  for key in sorted(set(a) | set(b)):
    if a.get(key) != b.get(key):
      return key
  return None


def check_same_run(config: Any) -> None:
  """Stops every process, naming the key, when one runs another config or code than process 0."""
  prints: Sequence[dict[str, str]] = [
      json.loads(v) for v in all_gather("run_fingerprint", json.dumps(fingerprint(config)))]
  for index, theirs in enumerate(prints[1:], start=1):
    key = first_difference(prints[0], theirs)
    if key is not None:
      raise ValueError(f"process {index} runs with {key} = {theirs.get(key, 'unset')} but "
                       f"process 0 with {prints[0].get(key, 'unset')}: every process of a run "
                       f"must start from the same code and config")
