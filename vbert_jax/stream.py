"""The global example stream that every input source follows.

Each source (generated tokens, the TFDS records, captioning pairs) is one deterministic stream of
examples per (seed, split). Global batch b holds stream positions [b * B, (b + 1) * B): row r is
example b * B + r. A process makes only the rows its devices hold (`sharding.process_rows`), so
which example sits at which row depends on the step alone, never on the device order or the
number of hosts. The state saved with a checkpoint is the stream position of the next batch, so
a run resumed on another number of hosts, or with another global batch size that divides the
position, continues the same stream.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np


class StreamMismatchError(ValueError):
  """A saved input state belongs to another stream (seed, split, dataset) than this run's."""


def check_rows(rows: Sequence[int] | None, batch_size: int, what: str) -> np.ndarray:
  """The global rows a process makes (all of them by default), checked against the batch."""
  if batch_size <= 0:
    raise ValueError(f"{what}: batch_size={batch_size}; expected a positive global batch size")
  out = np.arange(batch_size) if rows is None else np.asarray(rows, np.int64).reshape(-1)
  if not len(out) or out.min() < 0 or out.max() >= batch_size or (np.diff(out) <= 0).any():
    raise ValueError(f"{what}: rows {out.tolist()[:8]}... of a global batch of {batch_size}; "
                     f"expected distinct increasing rows in [0, {batch_size})")
  return out


def position_of(state: Mapping[str, Any], batch_size: int, what: str) -> int:
  """The stream position a saved state stands at; it must start a batch of this size.

  States written before positions were saved count batches (`step`) of the same size.
  """
  if "position" in state:
    position = int(state["position"])
  elif "step" in state:
    position = int(state["step"]) * batch_size
  else:
    raise StreamMismatchError(f"{what}: saved state {dict(state)} has no stream position")
  if position < 0 or position % batch_size:
    raise StreamMismatchError(f"{what}: saved position {position} does not start a global "
                              f"batch of {batch_size}; resume with a batch size that divides it")
  return position
