"""A small demo corpus with S3D features: the shared starting point of tests and demos.

`build_small_corpus(folder)` writes a demo world and its per-video features (random-init S3D
unless variables are given) and `load_clips(corpus)` returns every clip's feature with its verb,
noun, video and split, labelled from the ground truth by step overlap.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from vbert_jax.demo.world import world
from vbert_jax.video import extract
from vbert_jax.video import features_io


@dataclasses.dataclass(frozen=True)
class Corpus:
  world_dir: pathlib.Path
  features_dir: pathlib.Path
  config: world.WorldConfig
  image_size: int


@dataclasses.dataclass
class Clips:
  features: np.ndarray  # float32 [N, D]
  verbs: np.ndarray  # int32 [N], index into VERBS
  nouns: np.ndarray  # int32 [N], index into NOUNS
  video: np.ndarray  # int32 [N], index into video_ids
  starts: np.ndarray
  ends: np.ndarray
  is_val: np.ndarray  # bool [N]
  video_ids: list[str]


def small_config(num_videos: int = 12, size: int = 64, seed: int = 0) -> world.WorldConfig:
  """Short recipes (3-5 steps), a third of the videos held out."""
  return world.WorldConfig(num_videos=num_videos, seed=seed, width=size, height=size,
                           steps_per_video=(3, 5), val_fraction=0.34)


def build_small_corpus(folder, config: world.WorldConfig | None = None,
                       image_size: int | None = None, batch_size: int = 16, variables=None,
                       progress: bool = False) -> Corpus:
  """Writes (or completes) `folder`/world and `folder`/features; both steps resume."""
  config = config or small_config()
  image_size = image_size or min(config.width, config.height)
  folder = pathlib.Path(folder)
  corpus = Corpus(folder / "world", folder / "features", config, image_size)
  manifest = world.generate_world(config, corpus.world_dir, progress=progress)
  paths = [corpus.world_dir / f"{v['video_id']}.mp4" for v in manifest["videos"]]
  summary = extract.extract_features(paths, corpus.features_dir, variables=variables,
                                     image_size=image_size, batch_size=batch_size,
                                     dtype="float32", shard_index=0, num_shards=1,
                                     progress=progress)
  if summary.skipped:
    raise RuntimeError(f"demo corpus in {folder}: videos failed: {summary.skipped}")
  return corpus


def load_clips(corpus: Corpus) -> Clips:
  parts = []
  ids = []
  for k, path in enumerate(features_io.list_features(corpus.features_dir)):
    vf = features_io.load_features(path)
    truth = world.load_truth(corpus.world_dir / f"{vf.video_id}.json")
    verbs, nouns = world.clip_labels(truth["steps"], vf.starts, vf.ends)
    ids.append(vf.video_id)
    parts.append((vf.features.astype(np.float32), verbs, nouns, np.full(len(verbs), k, np.int32),
                  vf.starts, vf.ends, np.full(len(verbs), truth["split"] == "val")))
  cat = [np.concatenate(col) for col in zip(*parts)]
  return Clips(*cat, video_ids=ids)
