"""Fits the visual vocabulary to a folder of per-video features and writes the vocabulary file.

  python -m vbert_jax.vocab.fit --features=FEATDIR --out=vocab.npz --depth=4 --branching=12

`--features` is a folder written by the feature extractor (or a [rows, dim] .npy array, read
memory-mapped). Rows are streamed in chunks, so the features need not fit in memory. Files that
cannot be read, or whose width differs, are skipped and listed in the final summary.
"""

from __future__ import annotations

import sys
import time

from absl import app, flags
import numpy as np
import tqdm

from vbert_jax import console
from vbert_jax.vocab import kmeans, vocabulary

_FEATURES = flags.DEFINE_string("features", None, "Features folder or .npy array.")
_OUT = flags.DEFINE_string("out", None, "Vocabulary file to write (.npz).")
_DEPTH = flags.DEFINE_integer("depth", 4, "Levels of the k-means tree.")
_BRANCHING = flags.DEFINE_integer("branching", 12, "Children per node.")
_ITERATIONS = flags.DEFINE_integer("iterations", 20, "Most Lloyd iterations per level.")
_TOL = flags.DEFINE_float("tol", 1e-4, "Stop a level when inertia falls by at most this fraction.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the k-means++ seeding.")
_CHUNK = flags.DEFINE_integer("chunk_size", 65536, "Rows per streamed chunk.")
_SEED_SAMPLE = flags.DEFINE_integer("seed_sample", 128, "Most rows of a node that k-means++ "
                                    "seeding chooses among (at least --branching).")
_NEAREST = flags.DEFINE_integer("nearest", 8, "Training clips kept per token for lookups.")
_NORMALIZE = flags.DEFINE_enum("normalize", "none", list(vocabulary.NORMALIZE),
                               "Feature transform before fitting and assigning: none; l2 "
                               "(unit-length rows: clusters of directions, not lengths); or "
                               "standardize (each dimension to zero mean and unit variance "
                               "over the training features).")


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


def main(argv) -> None:
  del argv
  console.setup()
  if not _FEATURES.value or not _OUT.value:
    raise app.UsageError("--features and --out are required")
  config = kmeans.KMeansConfig(depth=_DEPTH.value, branching=_BRANCHING.value,
                               iterations=_ITERATIONS.value, tol=_TOL.value, seed=_SEED.value,
                               chunk_size=_CHUNK.value, seed_sample=_SEED_SAMPLE.value)
  try:
    config.validate()
    code = run(_FEATURES.value, _OUT.value, config, _NEAREST.value, _NORMALIZE.value)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    code = 1
  sys.exit(code)


if __name__ == "__main__":
  app.run(main)
