"""The per-video feature file: one `.npz` per video, written atomically.

Fields: `features` [clips, dim] (float16 or float32), `starts` / `ends` [clips] in seconds,
`source` (the video's path), `pooling` (how S3D's final map was pooled), `image_size`.

Paths go through `etils.epath`: a features folder may be a bucket (`gs://...`) where the
credentials allow it.
"""

from __future__ import annotations

import dataclasses
import zipfile

from etils import epath
import numpy as np

from vbert_jax import atomic

SUFFIX = ".npz"


@dataclasses.dataclass
class VideoFeatures:
  video_id: str
  source: str
  features: np.ndarray
  starts: np.ndarray
  ends: np.ndarray
  pooling: str
  image_size: int

  @property
  def num_clips(self) -> int:
    return int(self.features.shape[0])


def feature_path(folder, video_id: str) -> epath.Path:
  return epath.Path(folder) / f"{video_id}{SUFFIX}"


def save_features(folder, vf: VideoFeatures) -> epath.Path:
  """Writes to a temporary name, then renames, so a reader never sees a partial file."""
  if vf.features.ndim != 2 or len(vf.starts) != vf.num_clips or len(vf.ends) != vf.num_clips:
    raise ValueError(f"{vf.video_id}: features {vf.features.shape}, starts {len(vf.starts)}, "
                     f"ends {len(vf.ends)} do not agree")

  def write(tmp: str) -> None:
    with epath.Path(tmp).open("wb") as f:  # a file object: np.savez would add .npz to a name
      np.savez(f, features=vf.features, starts=np.asarray(vf.starts, np.float64),
               ends=np.asarray(vf.ends, np.float64), source=np.str_(vf.source),
               pooling=np.str_(vf.pooling), image_size=np.int32(vf.image_size))

  return atomic.write_atomic(feature_path(folder, vf.video_id), write)


def load_features(path) -> VideoFeatures:
  path = epath.Path(path)
  try:
    with path.open("rb") as f, np.load(f, allow_pickle=False) as z:
      return VideoFeatures(video_id=path.name[:-len(SUFFIX)], source=str(z["source"]),
                           features=z["features"], starts=z["starts"], ends=z["ends"],
                           pooling=str(z["pooling"]), image_size=int(z["image_size"]))
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path}: not a readable feature file ({e})") from e


@dataclasses.dataclass
class FeatureIndex:
  """A feature file without its features: what a corpus-wide pass needs to lay files out."""
  video_id: str
  source: str
  shape: tuple[int, ...]  # of `features`
  starts: np.ndarray
  ends: np.ndarray


def load_index(path) -> FeatureIndex:
  """The shape of `features` (from its .npy header, without reading the array) and the clip
  times; errors as `load_features`."""
  path = epath.Path(path)
  try:
    with path.open("rb") as file, np.load(file, allow_pickle=False) as z:
      with z.zip.open("features.npy") as f:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape = tuple(int(d) for d in read_header(f)[0])
      return FeatureIndex(path.name[:-len(SUFFIX)], str(z["source"]), shape, z["starts"],
                          z["ends"])
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path}: not a readable feature file ({e})") from e


def list_features(folder) -> list[epath.Path]:
  """Finished feature files in a folder, sorted; temporary files are not listed."""
  return sorted(p for p in epath.Path(folder).glob(f"*{SUFFIX}") if not p.name.startswith("."))
