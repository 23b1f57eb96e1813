"""The visual vocabulary: a fitted k-means tree whose leaves are VideoBERT's visual tokens.

One versioned `.npz` file holds the centroid tree (level l: [branching**l, branching, dim]), the
fit settings, feature statistics (dim, count, mean, std), the number of training clips per leaf,
and for the inverse lookup the training clips nearest each leaf: the clips assigned to the leaf,
closest first, with their video id, source path, clip index and start/end times.

Tokens are leaf indices in [0, branching**depth): the path of child indices read as a number in
base `branching`, most significant first. `assign` descends the tree (jit-compiled, batched,
sharded over local devices); `centroid` and `nearest_clips` go the other way.

`normalize` ("none", "l2" or "standardize", recorded in the file) is applied to features before
the fit and before every assignment: with "l2" the tree clusters the directions of the features,
not their lengths. (With randomly initialised S3D weights a clip's feature length follows its
brightness and contrast, and k-means on raw features then spends most of its leaves on that.)
"standardize" subtracts the training features' per-dimension mean and divides by their standard
deviation (both kept in the file as `input_mean` / `input_std`), so that a few high-variance
dimensions do not decide every split. Centroids, distances and the feature statistics `mean` /
`std` are in the normalised space.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Callable

import numpy as np

from vbert_jax import atomic
from vbert_jax.vocab import kmeans

# Version 2 added `normalize`; version 1 files load with normalize="none". Version 3 added
# normalize="standardize" with its `input_mean` / `input_std`.
FORMAT_VERSION = 3
NORMALIZE = ("none", "l2", "standardize")
_SETTINGS = ("depth", "branching", "seed", "iterations", "tol", "dim", "count")


@dataclasses.dataclass
class NearestClips:
  """For every leaf, up to `per_leaf` training clips assigned to it, nearest first."""
  video: np.ndarray  # [V, m] int32 index into `video_ids`; -1 marks an empty slot
  clip: np.ndarray  # [V, m] int32 clip index within the video (row index for an array)
  start: np.ndarray  # [V, m] float64 seconds (NaN when unknown)
  end: np.ndarray  # [V, m] float64
  dist: np.ndarray  # [V, m] float32 squared distance to the leaf centroid
  video_ids: list[str]
  sources: list[str]


@dataclasses.dataclass
class VisualVocabulary:
  centroids: list[np.ndarray]
  depth: int
  branching: int
  seed: int
  iterations: int
  tol: float
  dim: int
  count: int
  mean: np.ndarray  # [dim] float64
  std: np.ndarray  # [dim] float64
  leaf_counts: np.ndarray  # [V] int64 training clips per leaf
  nearest: NearestClips
  normalize: str = "none"  # one of NORMALIZE, applied before fitting and assigning
  # Raw-feature statistics that normalize="standardize" divides by ([dim] float64; else None).
  input_mean: np.ndarray | None = None
  input_std: np.ndarray | None = None
  # Prepared descents (kmeans.TreeIndex) by (distance, mesh), made on first use.
  _indexes: dict = dataclasses.field(default_factory=dict, init=False, repr=False,
                                     compare=False)

  @property
  def size(self) -> int:
    return self.branching**self.depth

  @property
  def leaves(self) -> np.ndarray:
    """Leaf centroids [size, dim], row t is token t."""
    return self.centroids[-1].reshape(self.size, self.dim)

  # --------------------------------------------------------------------------- fitting

  @classmethod
  def fit(cls, features, config: kmeans.KMeansConfig = kmeans.KMeansConfig(), *,
          nearest_per_leaf: int = 8, normalize: str = "none", mesh=None,
          log: Callable[[str], None] | None = None, on_iteration=None) -> "VisualVocabulary":
    """Fits to a features folder, a .npy array path, an array or a `FeatureSource`."""
    _check_normalize(normalize)
    source = features if hasattr(features, "num_rows") else kmeans.open_source(features)
    input_mean = input_std = None
    fitted = source
    if normalize == "l2":
      fitted = _Mapped(source, unit_rows)
    elif normalize == "standardize":
      input_mean, input_std = kmeans.feature_stats(source)
      fitted = _Mapped(source, lambda x: standardize(x, input_mean, input_std))
    tree = kmeans.fit_tree(fitted, config, mesh=mesh, log=log, on_iteration=on_iteration)
    return cls(
        centroids=tree.centroids, depth=config.depth, branching=config.branching,
        seed=config.seed, iterations=config.iterations, tol=config.tol, dim=source.dim,
        count=tree.num_rows, mean=tree.mean, std=tree.std,
        leaf_counts=np.bincount(tree.leaf, minlength=config.branching**config.depth),
        nearest=_nearest_clips(source, tree.leaf, tree.leaf_dist,
                               config.branching**config.depth, nearest_per_leaf),
        normalize=normalize, input_mean=input_mean, input_std=input_std)

  # --------------------------------------------------------------------------- file

  def save(self, path) -> pathlib.Path:
    """Writes atomically (temporary name, then rename)."""
    arrays = {"format_version": np.int32(FORMAT_VERSION), "mean": self.mean, "std": self.std,
              "leaf_counts": self.leaf_counts, "normalize": np.str_(self.normalize)}
    if self.normalize == "standardize":
      arrays.update(input_mean=self.input_mean, input_std=self.input_std)
    arrays.update({key: np.asarray(getattr(self, key)) for key in _SETTINGS})
    arrays.update({f"centroids_{i}": c.astype(np.float32) for i, c in enumerate(self.centroids)})
    nc = self.nearest
    arrays.update(nearest_video=nc.video, nearest_clip=nc.clip, nearest_start=nc.start,
                  nearest_end=nc.end, nearest_dist=nc.dist,
                  video_ids=np.array(nc.video_ids, dtype=np.str_).reshape(-1),
                  sources=np.array(nc.sources, dtype=np.str_).reshape(-1))

    def write(tmp: str) -> None:
      with open(tmp, "wb") as f:
        np.savez(f, **arrays)

    return atomic.write_atomic(path, write)

  @classmethod
  def load(cls, path) -> "VisualVocabulary":
    path = pathlib.Path(path)
    try:
      z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
      raise ValueError(f"{path}: not a readable vocabulary file ({e})") from e
    with z:
      if "format_version" not in z.files:
        raise ValueError(f"{path}: not a vocabulary file (no 'format_version' key)")
      version = int(z["format_version"])
      if version > FORMAT_VERSION:
        raise ValueError(f"{path}: vocabulary format version {version} is newer than this "
                         f"code reads (version {FORMAT_VERSION}); update vbert_jax")

      def get(key):
        if key not in z.files:
          raise ValueError(f"{path}: vocabulary file lacks key {key!r}")
        return z[key]

      settings = {key: get(key).item() for key in _SETTINGS}
      centroids = [get(f"centroids_{i}") for i in range(int(settings["depth"]))]
      nearest = NearestClips(
          video=get("nearest_video"), clip=get("nearest_clip"), start=get("nearest_start"),
          end=get("nearest_end"), dist=get("nearest_dist"),
          video_ids=[str(s) for s in get("video_ids")], sources=[str(s) for s in get("sources")])
      normalize = str(get("normalize")) if version >= 2 else "none"
      inputs = ({"input_mean": get("input_mean"), "input_std": get("input_std")}
                if normalize == "standardize" else {})
      vocab = cls(centroids=centroids, mean=get("mean"), std=get("std"),
                  leaf_counts=get("leaf_counts"), nearest=nearest, normalize=normalize,
                  **inputs, **settings)
    vocab._check(path)
    return vocab

  def _check(self, path) -> None:
    _check_normalize(self.normalize, f"{path}: ")
    if self.normalize == "standardize":
      for key in ("input_mean", "input_std"):
        shape = np.shape(getattr(self, key))
        if shape != (self.dim,):
          raise ValueError(f"{path}: {key} has shape {shape}, expected ({self.dim},)")
    for level, c in enumerate(self.centroids):
      want = (self.branching**level, self.branching, self.dim)
      if c.shape != want:
        raise ValueError(f"{path}: centroids_{level} has shape {c.shape}, expected {want}")

  # --------------------------------------------------------------------------- lookups

  def assign(self, features, *, batch_size: int = kmeans.ASSIGN_BATCH, mesh=None) -> np.ndarray:
    """Visual tokens int32 [N] in [0, size) for features [N, dim] (leaf of the tree descent)."""
    return self._descend(features, batch_size, mesh, distance=False)[0]

  def assign_with_distance(self, features, *, batch_size: int = kmeans.ASSIGN_BATCH, mesh=None):
    """(tokens int32 [N], squared distance to the token's centroid float32 [N])."""
    return self._descend(features, batch_size, mesh, distance=True)

  def _descend(self, features, batch_size: int, mesh, distance: bool):
    x = self._prepare(features)
    if x.shape[0] == 0:
      return np.zeros(0, np.int32), np.zeros(0, np.float32) if distance else None
    mesh = mesh or kmeans.default_mesh()
    key = (distance, mesh)
    if key not in self._indexes:
      self._indexes[key] = kmeans.TreeIndex(self.centroids, self.mean, mesh=mesh,
                                            distance=distance)
    return self._indexes[key].search(x, batch_size)

  def _prepare(self, features) -> np.ndarray:
    """Features [N, dim] as the tree was fitted on them (normalised as it says)."""
    x = np.asarray(features)
    if x.ndim != 2 or x.shape[1] != self.dim:
      width = x.shape[-1] if x.ndim else "scalar"
      raise ValueError(f"features have width {width} (shape {x.shape}); this vocabulary expects "
                       f"width {self.dim} ([N, {self.dim}])")
    if self.normalize == "l2":
      return unit_rows(x)
    if self.normalize == "standardize":
      return standardize(x, self.input_mean, self.input_std)
    return x

  def centroid(self, token: int) -> np.ndarray:
    """The leaf centroid [dim] of a visual token."""
    return self.leaves[self._token(token)]

  def nearest_clips(self, token: int, k: int = 8) -> list[kmeans.ClipRef]:
    """Up to k training clips nearest the token's centroid (among those assigned to it)."""
    t = self._token(token)
    nc = self.nearest
    out = []
    for j in range(min(k, nc.video.shape[1])):
      v = int(nc.video[t, j])
      if v < 0:
        break
      out.append(kmeans.ClipRef(nc.video_ids[v], nc.sources[v], int(nc.clip[t, j]),
                                float(nc.start[t, j]), float(nc.end[t, j])))
    return out

  def most_frequent(self, n: int) -> np.ndarray:
    """The n tokens with the most training clips, most frequent first."""
    return np.argsort(-self.leaf_counts, kind="stable")[:n].astype(np.int32)

  def _token(self, token: int) -> int:
    t = int(token)
    if not 0 <= t < self.size:
      raise ValueError(f"visual token {token} is outside [0, {self.size})")
    return t


def _check_normalize(normalize: str, where: str = "") -> None:
  if normalize not in NORMALIZE:
    raise ValueError(f"{where}normalize={normalize!r}: expected one of {NORMALIZE}")


def unit_rows(x: np.ndarray) -> np.ndarray:
  """Rows scaled to unit L2 norm (float32); all-zero rows stay zero."""
  x = np.asarray(x, np.float32)
  norm = np.linalg.norm(x, axis=1, keepdims=True)
  return x / np.where(norm > 0, norm, 1.0)


def standardize(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """(x - mean) / std per dimension (float32); a constant dimension is only centred."""
  scale = np.where(std > 0, std, 1.0)
  return ((np.asarray(x, np.float64) - mean) / scale).astype(np.float32)


class _Mapped:
  """A `kmeans.FeatureSource` whose rows are those of `source` put through `fn`."""

  def __init__(self, source, fn: Callable[[np.ndarray], np.ndarray]):
    self.source, self.fn = source, fn
    self.num_rows, self.dim = source.num_rows, source.dim

  def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
    rows = self.fn(self.source.read(start, stop))
    if out is None:
      return rows
    out[...] = rows
    return out

  def take(self, rows: np.ndarray) -> np.ndarray:
    return self.fn(self.source.take(rows))



def _nearest_clips(source, leaf: np.ndarray, dist: np.ndarray, size: int,
                   per_leaf: int) -> NearestClips:
  order = np.lexsort((dist, leaf))
  sl = leaf[order]
  first = np.searchsorted(sl, np.arange(size))
  rank = np.arange(len(order)) - first[sl]
  keep = rank < per_leaf
  rows, slot_leaf, slot = order[keep], sl[keep], rank[keep]
  shape = (size, per_leaf)
  video = np.full(shape, -1, np.int32)
  clip = np.full(shape, -1, np.int32)
  start = np.full(shape, np.nan)
  end = np.full(shape, np.nan)
  near = np.full(shape, np.inf, np.float32)
  near[slot_leaf, slot] = dist[rows]
  if isinstance(source, kmeans.FolderSource):
    files = np.searchsorted(source.offsets, rows, side="right") - 1
    video[slot_leaf, slot] = files
    clip[slot_leaf, slot] = rows - source.offsets[files]
    refs = [source.clip_ref(int(r)) for r in rows]
    start[slot_leaf, slot] = [r.start for r in refs]
    end[slot_leaf, slot] = [r.end for r in refs]
    video_ids, sources = list(source.video_ids), list(source.sources)
  else:  # rows of one array: the "video" is the array, the clip index is the row
    video[slot_leaf, slot] = 0
    clip[slot_leaf, slot] = rows
    name = str(getattr(source, "name", "array"))
    video_ids, sources = [pathlib.Path(name).stem], [name]
  return NearestClips(video, clip, start, end, near, video_ids, sources)


def visual_embedding_init(vocab, hidden_size: int, *, std: float = 0.02, seed: int = 0,
                          dtype=np.float32) -> np.ndarray:
  """Initial visual embedding rows [size, hidden_size] from the leaf centroids.

  The centred centroids are multiplied by a seeded Gaussian random projection (which keeps
  their relative distances, Johnson-Lindenstrauss) and scaled so the rows' values have standard
  deviation `std`, the model's initializer range. Row t belongs to visual token t.
  """
  if not isinstance(vocab, VisualVocabulary):
    vocab = VisualVocabulary.load(vocab)
  if hidden_size < 1 or std <= 0:
    raise ValueError(f"hidden_size must be >= 1 and std > 0, got {hidden_size} and {std}")
  leaves = vocab.leaves.astype(np.float64) - vocab.mean
  proj = np.random.default_rng(seed).standard_normal((vocab.dim, hidden_size))
  rows = leaves @ proj / np.sqrt(vocab.dim)
  scale = rows.std()
  rows = rows * (std / scale) if scale > 0 else rows
  return rows.astype(dtype)
