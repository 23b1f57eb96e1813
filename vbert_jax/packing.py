"""Packing: several examples share one row of a batch, each attending only to itself.

VideoBERT's examples are short (a sentence or two and their clips: tens of tokens), so one
example per row of a few hundred tokens would make most of every batch padding. A packed row
holds examples one after another:

    input_ids      [L]  the examples' tokens, then padding
    segment_ids    [L]  token types, per example (text 0, video 1)
    position_ids   [L]  positions, per example (each starts at 0)
    input_mask     [L]  the example a token belongs to: 1, 2, ..., k; 0 for padding
    cls_positions  [E]  where each example's [CLS] sits (LVA reads it)
    regime, lva_label, lva_weight, truncated  [E]  per example; regime -1 marks an empty place
    mlm_positions, mlm_ids, mlm_weights, mlm_example  [Pt]  the examples' text predictions, each
                        with the place (0..E-1) of the example it belongs to
    mvm_positions, mvm_ids, mvm_weights, mvm_example  [Pv]  the same for visual tokens

The model builds its attention mask from `input_mask` (a token sees the tokens of its own example
only), so a packed example gives the logits it would give alone in its own row.

Which examples a row holds is a function of the row alone, so that a row is still a pure function
of (seed, step, row) on any number of hosts: row s of the stream (global batch b, row r: s = b * B
+ r) owns the E candidate examples at stream positions s * E ... s * E + E - 1, and takes them in
order while they fit (tokens and prediction slots); the first that does not fit ends the row. The
candidates after it are not made. That stop favours short examples slightly (the one that ends a
row is longer than most), which `tests/test_packing.py` measures on the regime shares.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import numpy as np

from vbert_jax import masking as masking_lib

# Per-example fields of a row, with the value that marks an empty place.
EXAMPLE_FIELDS = {"regime": -1, "lva_label": 0, "lva_weight": 0.0, "truncated": 0,
                  "cls_positions": 0}
SLOT_FIELDS = ("positions", "ids", "weights", "example")


@dataclasses.dataclass(frozen=True)
class PackSpec:
  """The shape of a packed row: `max_len` tokens, up to `examples` examples, and its slots."""
  max_len: int
  examples: int
  text_slots: int
  video_slots: int

  def __post_init__(self):
    if min(self.max_len, self.examples, self.text_slots, self.video_slots) < 1:
      raise ValueError(f"packing: {self}; expected every size to be at least 1")

  @classmethod
  def for_masking(cls, max_len: int, examples: int,
                  masking: masking_lib.MaskingConfig) -> "PackSpec":
    """Slots that never run out: each example masks at most rate * n + 1 of its n tokens
    (BERT's floor of one, rounding halves up), so a row needs ceil(rate * max_len) + examples,
    and never more than `examples` times an example's own slots."""
    def slots(per_example: int) -> int:
      return max(1, min(examples * per_example,
                        math.ceil(masking.rate * max_len) + examples, max_len))
    return cls(max_len, examples, slots(masking.max_predictions_text),
               slots(masking.max_predictions_video))


def empty_row(spec: PackSpec, example_keys: Mapping[str, np.dtype] = ()) -> dict[str, np.ndarray]:
  """A row with no example: padding everywhere, empty places and slots."""
  row = {k: np.zeros(spec.max_len, np.int32)
         for k in ("input_ids", "segment_ids", "position_ids", "input_mask")}
  for name, fill in EXAMPLE_FIELDS.items():
    row[name] = np.full(spec.examples, fill, np.float32 if isinstance(fill, float) else np.int32)
  for name, dtype in dict(example_keys).items():  # extra per-example fields (debug)
    row[name] = np.full(spec.examples, -1, dtype)
  for prefix, n in (("mlm", spec.text_slots), ("mvm", spec.video_slots)):
    for field in SLOT_FIELDS:
      row[f"{prefix}_{field}"] = np.zeros(n, np.float32 if field == "weights" else np.int32)
  return row


def _real_slots(example: Mapping[str, np.ndarray], prefix: str) -> np.ndarray:
  return np.flatnonzero(np.asarray(example[f"{prefix}_weights"]) > 0)


def pack_row(make: Callable[[int], Mapping[str, Any]], spec: PackSpec, pad_id: int,
             extra_keys: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
  """One row from candidates `make(0)`, `make(1)`, ... (unpacked example dicts, as
  `sequence.Layout` and `masking.mask_example` make them), taken while they fit.

  `extra_keys`: scalar per-example fields copied to [E] arrays (-1 in empty places).
  """
  row, filled, slots = None, 0, {"mlm": 0, "mvm": 0}
  for place in range(spec.examples):
    ex = make(place)
    if row is None:
      row = empty_row(spec, {k: np.asarray(ex[k]).dtype for k in extra_keys})
      row["input_ids"][:] = pad_id
    n = int((np.asarray(ex["input_mask"]) > 0).sum())
    real = {p: _real_slots(ex, p) for p in slots}
    if n > spec.max_len:
      raise ValueError(f"packing: an example of {n} tokens exceeds the row of max_len="
                       f"{spec.max_len}")
    fits = (filled + n <= spec.max_len and slots["mlm"] + len(real["mlm"]) <= spec.text_slots
            and slots["mvm"] + len(real["mvm"]) <= spec.video_slots)
    if not fits:
      if place == 0:
        raise ValueError(f"packing: one example needs {len(real['mlm'])} text and "
                         f"{len(real['mvm'])} visual prediction slots; a row has "
                         f"{spec.text_slots} and {spec.video_slots}")
      break
    span = slice(filled, filled + n)
    for key in ("input_ids", "segment_ids", "position_ids"):
      row[key][span] = np.asarray(ex[key])[:n]
    row["input_mask"][span] = place + 1
    row["cls_positions"][place] = filled
    for key in ("regime", "lva_label", "lva_weight", "truncated", *extra_keys):
      row[key][place] = ex.get(key, 0)
    for prefix, chosen in real.items():
      at = slice(slots[prefix], slots[prefix] + len(chosen))
      row[f"{prefix}_positions"][at] = np.asarray(ex[f"{prefix}_positions"])[chosen] + filled
      row[f"{prefix}_ids"][at] = np.asarray(ex[f"{prefix}_ids"])[chosen]
      row[f"{prefix}_weights"][at] = np.asarray(ex[f"{prefix}_weights"])[chosen]
      row[f"{prefix}_example"][at] = place
      slots[prefix] += len(chosen)
    filled += n
  return row


def unpack_row(row: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
  """The examples of a packed row, each as it would sit alone at the start of a row of its own
  length (positions and slots relative to its [CLS]); per-example fields become scalars."""
  out = []
  for place in np.flatnonzero(np.asarray(row["regime"]) >= 0):
    span = np.flatnonzero(np.asarray(row["input_mask"]) == place + 1)
    start = int(row["cls_positions"][place])
    ex = {k: np.asarray(row[k])[span] for k in ("input_ids", "segment_ids", "position_ids")}
    ex["input_mask"] = np.ones(len(span), np.int32)
    ex.update({k: np.asarray(row[k])[place] for k in row
               if np.ndim(row[k]) == 1 and k not in ex and len(row[k]) == len(row["regime"])
               and not k.startswith(("mlm_", "mvm_"))})
    for prefix in ("mlm", "mvm"):
      mine = (np.asarray(row[f"{prefix}_example"]) == place) & (
          np.asarray(row[f"{prefix}_weights"]) > 0)
      ex[f"{prefix}_positions"] = np.asarray(row[f"{prefix}_positions"])[mine] - start
      ex[f"{prefix}_ids"] = np.asarray(row[f"{prefix}_ids"])[mine]
      ex[f"{prefix}_weights"] = np.asarray(row[f"{prefix}_weights"])[mine]
    out.append(ex)
  return out


def stack_rows(rows: list[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def example_lengths(input_mask: np.ndarray) -> np.ndarray:
  """The token count of every example of a batch (packed or not), in row order."""
  mask = np.asarray(input_mask)
  places = int(mask.max(initial=0))
  counts = np.stack([(mask == k + 1).sum(axis=-1) for k in range(places)], axis=-1) \
      if places else np.zeros(mask.shape[:-1] + (0,), np.int64)
  return counts[counts > 0]
