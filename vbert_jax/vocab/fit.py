"""Fits the visual vocabulary to a folder of per-video features and writes the vocabulary file.

  python -m vbert_jax.vocab.fit --features=FEATDIR --out=vocab.npz --depth=4 --branching=12

`--features` is a folder written by the feature extractor (or a [rows, dim] .npy array, read
memory-mapped). Rows are streamed in chunks, so the features need not fit in memory. Files that
cannot be read, or whose width differs, are skipped and listed in the final summary.
"""

from __future__ import annotations

import sys
import time
import types
from typing import Sequence

from absl import flags
import numpy as np
import tqdm

from vbert_jax import cli
from vbert_jax import console
from vbert_jax.vocab import kmeans, vocabulary


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("features", None, "Features folder or .npy array.", flag_values=fv)
  flags.DEFINE_string("out", None, "Vocabulary file to write (.npz).", flag_values=fv)
  flags.DEFINE_integer("depth", 4, "Levels of the k-means tree.", flag_values=fv)
  flags.DEFINE_integer("branching", 12, "Children per node.", flag_values=fv)
  flags.DEFINE_integer("iterations", 20, "Most Lloyd iterations per level.", flag_values=fv)
  flags.DEFINE_float("tol", 1e-4, "Stop a level when inertia falls by at most this fraction.",
                     flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Seed of the k-means++ seeding.", flag_values=fv)
  flags.DEFINE_integer("chunk_size", 65536, "Rows per streamed chunk.", flag_values=fv)
  flags.DEFINE_integer("seed_sample", 128, "Most rows of a node that k-means++ seeding chooses "
                       "among (at least --branching).", flag_values=fv)
  flags.DEFINE_integer("nearest", 8, "Training clips kept per token for lookups.",
                       flag_values=fv)
  flags.DEFINE_enum("normalize", "none", list(vocabulary.NORMALIZE),
                    "Feature transform before fitting and assigning: none; l2 (unit-length "
                    "rows: clusters of directions, not lengths); or standardize (each dimension "
                    "to zero mean and unit variance over the training features).",
                    flag_values=fv)
  flags.mark_flag_as_required("features", flag_values=fv)
  flags.mark_flag_as_required("out", flag_values=fv)


def parse_args(argv: Sequence[str] | None = None) -> types.SimpleNamespace:
  return cli.parse(define_flags, argv, __doc__)


def run(features: str, out: str, config: kmeans.KMeansConfig, nearest: int,
        normalize: str = "none") -> int:
  t0 = time.time()
  source = kmeans.open_source(features)
  print(f"features: {features}: {source.num_rows} clips of width {source.dim}"
        + (f" from {len(source.paths)} videos" if isinstance(source, kmeans.FolderSource)
           else ""), flush=True)
  bar = tqdm.tqdm(total=config.depth * (config.iterations + 1), unit="pass",
                  desc="k-means", file=sys.stderr)
  seen = {"level": 0, "passes": 0}

  def on_iteration(level, iteration, inertia, changed):
    if level != seen["level"]:  # a level that converged early: jump to the next level's start
      bar.update(level * (config.iterations + 1) - seen["passes"])
      seen.update(level=level, passes=level * (config.iterations + 1))
    bar.update(1)
    seen["passes"] += 1
    bar.set_postfix(level=level, inertia=f"{inertia:.4g}", changed=changed)

  vocab = vocabulary.VisualVocabulary.fit(source, config, nearest_per_leaf=nearest,
                                          normalize=normalize, log=bar.write,
                                          on_iteration=on_iteration)
  bar.update(bar.total - bar.n)
  bar.close()
  vocab.save(out)
  used = int(np.count_nonzero(vocab.leaf_counts))
  print(f"wrote {out}: {vocab.size} tokens ({used} used by training clips), depth "
        f"{config.depth}, branching {config.branching}, normalize {normalize}, "
        f"{time.time() - t0:.1f} s")
  skipped = getattr(source, "skipped", [])
  print(f"summary: {source.num_rows} clips used, {len(skipped)} files skipped")
  for path, reason in skipped:
    print(f"  skipped {path}: {reason}")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  console.setup()
  config = kmeans.KMeansConfig(depth=args.depth, branching=args.branching,
                               iterations=args.iterations, tol=args.tol, seed=args.seed,
                               chunk_size=args.chunk_size, seed_sample=args.seed_sample)
  try:
    config.validate()
    return run(args.features, args.out, config, args.nearest, args.normalize)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
