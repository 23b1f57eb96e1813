"""How long a dataset's examples are, and the lengths that suit them.

    python -m vbert_jax.lengths --config=configs/pretrain.py:variant=base \
        --config.input.tfds_name=videobert/bert --config.input.data_dir=DIR [--examples=4096]

draws examples from the train split exactly as training does (regimes, windows, subsampling),
cut only by the position table, and prints their length distribution, the padding that one
example per row at a percentile length leaves, and the padding of packed rows
(`vbert_jax.packing`'s rule, simulated on the drawn lengths in stream order).

With `config.input.length_percentile` set (say 99), a run measures its train split at start and
sets `config.input.max_example_len` (and, with one example per row, `config.max_len`) to that
percentile of the lengths, rounded up to a multiple of 8 and at most the position table: longer
examples are cut, and counted in the metrics (`examples_truncated`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags
import numpy as np

from vbert_jax import console
from vbert_jax import input_pipeline
from vbert_jax import synthetic

ROUND_TO = 8
PERCENTILES = (50, 90, 95, 99, 99.9)


@dataclasses.dataclass(frozen=True)
class LengthStats:
  """Tokens of each example drawn (in stream order), and how many the position table cut."""
  lengths: np.ndarray
  cut: int
  limit: int  # the position table: the longest an example may be

  def percentile(self, q: float) -> int:
    return int(math.ceil(np.percentile(self.lengths, q)))

  def suggest(self, q: float) -> int:
    """The q-th percentile rounded up to a multiple of 8, at most the position table."""
    return min(self.limit, -(-self.percentile(q) // ROUND_TO) * ROUND_TO)

  def pad_fraction(self, max_len: int, pack_examples: int = 1) -> float:
    """The padding share of rows of `max_len` tokens holding up to `pack_examples` examples,
    each cut to `max_len`; packed rows take stream candidates in order while they fit."""
    lengths = np.minimum(self.lengths, max_len)
    if pack_examples == 1:
      return float(1 - lengths.mean() / max_len)
    filled = []
    for start in range(0, len(lengths) - pack_examples + 1, pack_examples):
      total = 0
      for n in lengths[start:start + pack_examples]:
        if total + n > max_len:
          break
        total += n
      filled.append(total)
    return float(1 - np.mean(filled) / max_len)

  def summary(self) -> str:
    qs = ", ".join(f"p{q:g} {self.percentile(q)}" for q in PERCENTILES)
    return (f"{len(self.lengths)} examples: mean {self.lengths.mean():.1f} tokens, {qs}, max "
            f"{self.lengths.max()}; {self.cut} cut by the position table ({self.limit})")


def _unpacked(config: ml_collections.ConfigDict, limit: int, batch_size: int) -> Any:
  """The train split's example stream, one example per row of `limit` tokens."""
  config = copy.deepcopy(config)
  with config.unlocked():
    config.max_len, config.input.pack_examples, config.input.max_example_len = limit, 1, 0
  if config.input.source == "synthetic":
    return synthetic.from_config(config, "train", batch_size=batch_size)
  source = input_pipeline.open_tfds_source(config, "train")
  return input_pipeline.make_pipeline(config, source, split="train", batch_size=batch_size,
                                      worker_count=0)


def from_batches(batches: Sequence[Any], limit: int) -> LengthStats:
  """The lengths of unpacked batches' examples, in order, and how many were cut."""
  sizes = np.concatenate([(np.asarray(b["input_mask"]) > 0).sum(axis=1) for b in batches])
  cut = int(sum(np.asarray(b["truncated"]).sum() for b in batches))
  return LengthStats(sizes.astype(np.int64), cut, limit)


def measure(config: ml_collections.ConfigDict, num_examples: int = 2048,
            batch_size: int = 256) -> LengthStats:
  """Lengths of the first `num_examples` examples of the train split, as training draws them."""
  limit = int(config.model.max_position_embeddings)
  stream = _unpacked(config, limit, batch_size)
  try:
    batches = [next(stream) for _ in range(-(-num_examples // batch_size))]
  finally:
    getattr(stream, "close", lambda: None)()
  stats = from_batches(batches, limit)
  # The cut count covers the whole batches drawn; the lengths, the first num_examples.
  return dataclasses.replace(stats, lengths=stats.lengths[:num_examples])


def apply_percentile(config: ml_collections.ConfigDict) -> LengthStats | None:
  """Sets max_example_len (and max_len without packing) from `input.length_percentile`."""
  q = float(config.input.get("length_percentile", 0.0) or 0.0)
  if q <= 0:
    return None
  if not 0 < q <= 100:
    raise ValueError(f"config.input.length_percentile={q}: expected a percentile in (0, 100]")
  stats = measure(config)
  chosen = stats.suggest(q)
  with config.unlocked():
    config.input.max_example_len = chosen
    if int(config.input.get("pack_examples", 1)) == 1:
      config.max_len = chosen
  if chosen > config.max_len:
    raise ValueError(f"config.input.length_percentile={q:g} gives examples of up to {chosen} "
                     f"tokens, longer than a row (config.max_len={config.max_len})")
  logging.info("example lengths of the train split: %s; p%g -> max_example_len %d%s",
               stats.summary(), q, chosen,
               "" if int(config.input.get("pack_examples", 1)) > 1 else " and max_len")
  return stats


def report(stats: LengthStats, row_lengths: Sequence[int], pack_examples: Sequence[int]) -> str:
  lines = [stats.summary(), "one example per row:"]
  for q in (95, 99, 100):
    n = stats.suggest(q)
    lines.append(f"  max_len {n:4d} (p{q:g}): padding {stats.pad_fraction(n):.1%}, "
                 f"{(stats.lengths > n).mean():.1%} of examples cut")
  lines.append("packed rows (padding):")
  for n in row_lengths:
    cells = ", ".join(f"{e} places {stats.pad_fraction(n, e):.1%}" for e in pack_examples)
    lines.append(f"  max_len {n:4d}: {cells}")
  return "\n".join(lines)


def _define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Pretraining config file and arguments.",
                                  lock_config=True)
  flags.DEFINE_integer("examples", 4096, "examples to draw")
  flags.DEFINE_list("row_lengths", ["128", "256", "512"], "row lengths to simulate packing at")
  flags.DEFINE_list("pack_examples", ["8", "16", "32"], "places per row to simulate")


def main(argv: Sequence[str]) -> None:
  console.setup()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  fv = flags.FLAGS
  if fv.config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/pretrain.py:variant=base")
  stats = measure(fv.config, fv.examples)
  print(report(stats, [int(n) for n in fv.row_lengths], [int(e) for e in fv.pack_examples]))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
