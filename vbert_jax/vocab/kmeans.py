"""Hierarchical k-means in JAX: a tree of `depth` levels with `branching` children per node.

Level l splits each of its branching**l nodes into `branching` clusters, and all nodes of a level
are fitted together. A point only needs the distances to its own node's children, so the points
are grouped by node into fixed-size blocks (a block never mixes two nodes): the distances are one
batched matrix product of [blocks, block_size, D] with the blocks' centroids [blocks, k, D], and
the new centroids are one segment sum of per-block sums. That is N*k*D work per Lloyd iteration
at every level, whatever the number of nodes.

Rows are streamed from a `FeatureSource` (an array, a memory-mapped .npy, or a folder of per-video
feature files) in chunks of static shape, and every chunk is split over a 1-D mesh of all local
devices; Lloyd statistics are summed over chunks and devices. A source that fits in one chunk
stays on the devices for the whole fit. Within a level, rows are taken relative to their node's
centroid, so float32 distances stay accurate deep in the tree.

Per level: greedy k-means++ seeding (sampling on the host with a seeded numpy generator,
distances on the devices), then Lloyd iterations until the assignment stops changing, the
relative drop in inertia is at most `tol`, or `iterations` updates were made. Nodes are
independent problems, so a node whose assignment did not change is at a fixed point and leaves
the later passes. An empty cluster is re-seeded with the point of its node farthest from its
centroid.

Nodes with fewer distinct points than `branching`: seeding takes each distinct point once and then
repeats points, so every node keeps `branching` children and the tree stays complete; ties in the
assignment go to the lowest child index, so the assignment stays well defined. A node without
any points (below a repeated child) gets `branching` copies of its own centroid.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import zipfile
from typing import Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vbert_jax.video import features_io

AXIS = "data"
HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- sources


class FeatureSource(Protocol):
  """Rows of features, read in ranges or by index, always returned as float32."""
  num_rows: int
  dim: int

  def read(self, start: int, stop: int) -> np.ndarray:
    ...

  def take(self, rows: np.ndarray) -> np.ndarray:
    ...


class ArraySource:
  """An in-memory array or a memory-mapped .npy file ([rows, dim], float16 or float32)."""

  def __init__(self, array: np.ndarray, name: str = "array"):
    if array.ndim != 2:
      raise ValueError(f"{name}: features must be [rows, dim], got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
      raise ValueError(f"{name}: features must be float16/float32, got {array.dtype}")
    self.array, self.name = array, name
    self.num_rows, self.dim = int(array.shape[0]), int(array.shape[1])

  @classmethod
  def from_npy(cls, path) -> "ArraySource":
    try:
      array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
      raise ValueError(f"{path}: not a readable .npy feature array ({e})") from e
    return cls(array, name=str(path))

  def read(self, start: int, stop: int) -> np.ndarray:
    return np.asarray(self.array[start:stop], np.float32)

  def take(self, rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, np.int64)
    order = np.argsort(rows, kind="stable")  # sorted reads are kinder to a memory map
    out = np.empty((len(rows), self.dim), np.float32)
    out[order] = self.array[rows[order]]
    return out


@dataclasses.dataclass(frozen=True)
class ClipRef:
  """Where a feature row came from: a video of the features folder and one of its clips."""
  video_id: str
  source: str
  clip: int
  start: float
  end: float


class FolderSource:
  """All clips of a folder of per-video feature files (vbert_jax.video.features_io), in order.

  Unreadable files and files whose width differs from the first readable one are skipped; each
  is listed with its reason in `skipped`.
  """

  def __init__(self, folder, dim: int | None = None):
    self.folder = pathlib.Path(folder)
    if not self.folder.is_dir():
      raise ValueError(f"{self.folder}: features folder does not exist")
    self.paths, self.video_ids, self.sources, self.skipped = [], [], [], []
    self._starts, self._ends, counts = [], [], []
    for path in features_io.list_features(self.folder):
      try:
        vf = features_io.load_features(path)
      except ValueError as e:
        self.skipped.append((str(path), str(e)))
        continue
      except (zipfile.BadZipFile, EOFError) as e:  # a truncated .npz gets past load_features
        self.skipped.append((str(path), f"not a readable feature file ({e})"))
        continue
      if vf.features.ndim != 2 or vf.num_clips == 0:
        self.skipped.append((str(path), f"no clips (features shape {vf.features.shape})"))
        continue
      width = int(vf.features.shape[1])
      dim = width if dim is None else dim
      if width != dim:
        self.skipped.append((str(path), f"feature width {width}, expected {dim}"))
        continue
      self.paths.append(path)
      self.video_ids.append(vf.video_id)
      self.sources.append(vf.source)
      self._starts.append(np.asarray(vf.starts, np.float64))
      self._ends.append(np.asarray(vf.ends, np.float64))
      counts.append(vf.num_clips)
    if not self.paths:
      raise ValueError(f"{self.folder}: no readable feature files "
                       f"(expected *{features_io.SUFFIX} from the feature extractor)")
    self.dim = int(dim)
    self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    self.num_rows = int(self.offsets[-1])
    self._cache: tuple[int, np.ndarray] | None = None

  def _file(self, i: int) -> np.ndarray:
    if self._cache is None or self._cache[0] != i:
      self._cache = (i, np.asarray(features_io.load_features(self.paths[i]).features,
                                   np.float32))
    return self._cache[1]

  def read(self, start: int, stop: int) -> np.ndarray:
    out = np.empty((stop - start, self.dim), np.float32)
    first = int(np.searchsorted(self.offsets, start, side="right")) - 1
    i, pos = first, start
    while pos < stop:
      lo, hi = self.offsets[i], self.offsets[i + 1]
      take = min(stop, hi) - pos
      out[pos - start:pos - start + take] = self._file(i)[pos - lo:pos - lo + take]
      pos += take
      i += 1
    return out

  def take(self, rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, np.int64)
    out = np.empty((len(rows), self.dim), np.float32)
    files = np.searchsorted(self.offsets, rows, side="right") - 1
    for i in np.unique(files):
      sel = files == i
      out[sel] = self._file(int(i))[rows[sel] - self.offsets[i]]
    return out

  def clip_ref(self, row: int) -> ClipRef:
    i = int(np.searchsorted(self.offsets, row, side="right")) - 1
    c = int(row - self.offsets[i])
    return ClipRef(self.video_ids[i], self.sources[i], c, float(self._starts[i][c]),
                   float(self._ends[i][c]))


def open_source(features) -> FeatureSource:
  """An array, a .npy path (memory-mapped) or a features folder, as a `FeatureSource`."""
  if isinstance(features, np.ndarray):
    return ArraySource(features)
  path = pathlib.Path(features)
  if path.is_dir():
    return FolderSource(path)
  if path.suffix == ".npy":
    return ArraySource.from_npy(path)
  raise ValueError(f"{path}: expected a features folder or a .npy array of [rows, dim]")


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class KMeansConfig:
  depth: int = 4
  branching: int = 12
  iterations: int = 20  # most Lloyd updates per level
  tol: float = 1e-4  # a level stops when inertia falls by at most this fraction; 0: fixed point
  seed: int = 0
  chunk_size: int = 65536  # rows per streamed chunk (rounded up to a multiple of the devices)

  def validate(self) -> None:
    for key in ("depth", "branching", "iterations", "chunk_size"):
      if getattr(self, key) < 1:
        raise ValueError(f"k-means {key} must be at least 1, got {getattr(self, key)}")
    if self.branching < 2:
      raise ValueError(f"k-means branching must be at least 2, got {self.branching}")
    if self.tol < 0:
      raise ValueError(f"k-means tol must be >= 0, got {self.tol}")


@dataclasses.dataclass
class TreeFit:
  """A fitted tree. Level l of `centroids` is [branching**l, branching, D] (float32)."""
  centroids: list[np.ndarray]
  leaf: np.ndarray  # [N] int32: leaf of every training row
  leaf_dist: np.ndarray  # [N] float32: squared distance of every row to its leaf centroid
  inertia: list[float]  # per level: sum of squared distances to the level's centroids
  iterations_run: list[int]
  mean: np.ndarray  # [D] float64 feature mean
  std: np.ndarray  # [D] float64 feature standard deviation
  num_rows: int


def default_mesh() -> Mesh:
  return Mesh(np.array(jax.local_devices()), (AXIS,))


# ----------------------------------------------------------------------------- device kernels


def _block_size(rows: int, nodes: int) -> int:
  """About half a node's rows per block, as a power of two in [16, 1024]."""
  per_node = max(rows // max(nodes, 1) // 2, 1)
  return int(min(max(1 << (per_node.bit_length() - 1), 16), 1024))


def _bucket(n: int, multiple: int = 8) -> int:
  """Rounds up within 1/8 so that block counts, hence compiled shapes, repeat across levels."""
  n = max(n, 1)
  step = max(multiple, 1 << max(n.bit_length() - 4, 0))
  return -(-n // step) * step


def _local_blocks(x, node, valid, *, nodes: int, nb: int, bsize: int):
  """Groups one device's rows by node into `nb` blocks of `bsize` rows (padding is invalid)."""
  n = x.shape[0]
  key = jnp.where(valid, node, nodes)
  order = jnp.argsort(key, stable=True)
  skey = key[order]
  count = jnp.bincount(key, length=nodes + 1)[:nodes]
  blocks = (count + bsize - 1) // bsize
  block_end = jnp.cumsum(blocks)
  first_block = block_end - blocks
  first_row = jnp.cumsum(count) - count
  skey_c = jnp.minimum(skey, nodes - 1)
  rank = jnp.arange(n) - first_row[skey_c]
  slot = (first_block[skey_c] + rank // bsize) * bsize + rank % bsize
  slot = jnp.where(skey < nodes, slot, nb * bsize)
  gidx = jnp.full((nb * bsize,), n, jnp.int32).at[slot].set(order.astype(jnp.int32),
                                                            mode="drop")
  xb = jnp.take(x, gidx, axis=0, mode="fill", fill_value=0).reshape(nb, bsize, -1)
  vb = (gidx < n).reshape(nb, bsize)
  bnode = jnp.minimum(jnp.searchsorted(block_end, jnp.arange(nb), side="right"), nodes - 1)
  return xb, vb, bnode.astype(jnp.int32), gidx.reshape(nb, bsize)


def _duplicate_penalty(cents):
  """[nodes, k]: +inf for a child that repeats an earlier child of its node bit for bit, else 0.

  A node with fewer points than branches repeats points as children. Which of two equal
  centroids wins an argmin then depends on the matmul's rounding, which differs with batch and
  device shapes; taking the repeats out makes "ties go to the lowest child" hold everywhere.
  Children are compared by two exact integer hashes of their bits.
  """
  bits = jax.lax.bitcast_convert_type(cents, jnp.uint32)
  mult = np.random.default_rng(0).integers(1, 2**32, (2, cents.shape[-1]), dtype=np.uint64)
  h1 = jnp.sum(bits * jnp.asarray(mult[0] | 1, jnp.uint32), axis=-1, dtype=jnp.uint32)
  h2 = jnp.sum(bits * jnp.asarray(mult[1] | 1, jnp.uint32), axis=-1, dtype=jnp.uint32)
  same = (h1[:, :, None] == h1[:, None, :]) & (h2[:, :, None] == h2[:, None, :])
  k = cents.shape[1]
  earlier = jnp.arange(k)[None, :] < jnp.arange(k)[:, None]  # [j, i]: i < j
  dup = jnp.any(same & earlier[None], axis=-1)
  return jnp.where(dup, jnp.inf, 0.0).astype(cents.dtype)


@jax.jit
def _norms(cents):
  """[nodes, k] squared norms of the children, +inf for repeats: what `_block_dist` adds."""
  return jnp.sum(cents * cents, axis=-1) + _duplicate_penalty(cents)


def _block_dist(xb, bnode, cents, norms=None):
  """Squared distances [nb, bsize, k] of every block row to its node's children.

  `norms` [nodes, k] (from `_norms`, once per set of centroids) are gathered rather than summed
  from the gathered centroids: that algebraically equal form is miscompiled by XLA:CPU 0.10.2
  (YNNPACK fusion) when a level has a single node and blocks of 256+ rows (tests/test_kmeans.py
  checks both). Without `norms` (seeding candidates) repeats are not taken out.
  """
  norms = jnp.sum(cents * cents, axis=-1) if norms is None else norms
  cn = norms[bnode]
  dots = jnp.einsum("nbd,nkd->nbk", xb, cents[bnode], precision=HIGHEST)
  xn = jnp.sum(xb * xb, axis=-1)
  return cn[:, None, :] - 2.0 * dots + xn[..., None]


def _local_stats(xb, vb, bnode, cents, norms, *, nodes: int):
  k = cents.shape[1]
  d = _block_dist(xb, bnode, cents, norms)
  lab = jnp.argmin(d, axis=-1).astype(jnp.int32)  # ties -> lowest child
  mind = jnp.where(vb, jnp.maximum(jnp.min(d, axis=-1), 0.0), 0.0)
  onehot = ((lab[..., None] == jnp.arange(k)) & vb[..., None]).astype(xb.dtype)
  bsum = jnp.einsum("nbk,nbd->nkd", onehot, xb, precision=HIGHEST)
  sums = jax.ops.segment_sum(bsum, bnode, nodes, indices_are_sorted=True)
  counts = jax.ops.segment_sum(onehot.sum(1), bnode, nodes, indices_are_sorted=True)
  sums, counts, inertia = jax.lax.psum((sums, counts, mind.sum()), AXIS)
  return lab, mind, sums, counts, inertia


def _local_candidate_dist(xb, vb, bnode, cands):
  """Squared distances [nb, bsize, L] of every row to its node's L seeding candidates."""
  return jnp.where(vb[..., None], jnp.maximum(_block_dist(xb, bnode, cands), 0.0), jnp.inf)


@functools.lru_cache(maxsize=None)
def _kernels(mesh: Mesh, nodes: int, nb: int, bsize: int):
  """Jitted block builder, Lloyd statistics and seeding distances for one level's shapes."""
  rows, rep = P(AXIS), P()
  smap = functools.partial(jax.shard_map, mesh=mesh, check_vma=False)

  def blocks(x, node, valid, parent):
    xb, vb, bnode, gidx = _local_blocks(x, node, valid, nodes=nodes, nb=nb, bsize=bsize)
    # Rows relative to their node's centroid: distances within a node stay accurate in float32
    # however far the node is from the origin.
    xb = jnp.where(vb[..., None], xb - parent[bnode][:, None, :], 0.0)
    # Row index within the chunk, for mapping block results back on the host.
    gidx = jnp.where(vb, gidx + jax.lax.axis_index(AXIS) * x.shape[0], -1)
    return xb, vb, bnode, gidx

  make = jax.jit(smap(blocks, in_specs=(rows, rows, rows, rep), out_specs=(rows,) * 4))
  stats = jax.jit(smap(functools.partial(_local_stats, nodes=nodes),
                       in_specs=(rows, rows, rows, rep, rep),
                       out_specs=(rows, rows, rep, rep, rep)))
  seed = jax.jit(smap(_local_candidate_dist, in_specs=(rows, rows, rows, rep),
                      out_specs=rows))
  return make, stats, seed


@jax.jit
def _update(sums, counts, cents):
  new = sums / jnp.maximum(counts, 1.0)[..., None]
  return jnp.where((counts > 0)[..., None], new, cents)


# ----------------------------------------------------------------------------- fitting


class _Chunks:
  """The source as chunks of a static row count, centred by the feature mean, on the mesh."""

  def __init__(self, source: FeatureSource, chunk_size: int, mesh: Mesh, mean: np.ndarray):
    self.source, self.mesh = source, mesh
    ndev = mesh.size
    self.size = -(-min(chunk_size, source.num_rows) // ndev) * ndev
    self.ranges = [(s, min(s + self.size, source.num_rows))
                   for s in range(0, source.num_rows, self.size)]
    self.mean = mean.astype(np.float32)
    self.sharding = NamedSharding(mesh, P(AXIS))
    self._resident = self._load(0) if len(self.ranges) == 1 else None

  def _load(self, i: int):
    start, stop = self.ranges[i]
    x = np.zeros((self.size, self.source.dim), np.float32)
    x[:stop - start] = self.source.read(start, stop)
    x[:stop - start] -= self.mean
    return jax.device_put(x, self.sharding)

  def x(self, i: int):
    return self._resident if self._resident is not None else self._load(i)

  def node_valid(self, i: int, node: np.ndarray, active: np.ndarray | None):
    start, stop = self.ranges[i]
    nd = np.zeros(self.size, np.int32)
    nd[:stop - start] = node[start:stop]
    valid = np.arange(self.size) < stop - start
    if active is not None:
      valid &= active[nd]
    return (jax.device_put(nd, self.sharding), jax.device_put(valid, self.sharding))


class _LevelPass:
  """One level's chunks grouped into blocks; blocks stay on device when there is one chunk.

  Only the rows of active nodes are grouped: a node whose assignment stopped changing is at a
  fixed point of Lloyd's iteration and drops out of later passes.
  """

  def __init__(self, chunks: _Chunks, node: np.ndarray, nodes: int, parent: np.ndarray):
    self.chunks, self.node, self.nodes, self.parent = chunks, node, nodes, parent
    self._parent = jax.device_put(parent, NamedSharding(chunks.mesh, P()))
    self.bsize = _block_size(chunks.size // chunks.mesh.size, nodes)
    self.active: np.ndarray | None = None
    self._set_blocks(_bucket(self._need(None)))

  def _need(self, active: np.ndarray | None) -> int:
    """The most blocks any device needs for any chunk."""
    ndev, need = self.chunks.mesh.size, 1
    for start, stop in self.chunks.ranges:
      nd = np.full(self.chunks.size, -1, np.int64)
      nd[:stop - start] = self.node[start:stop]
      if active is not None:
        nd[nd >= 0] = np.where(active[nd[nd >= 0]], nd[nd >= 0], -1)
      for part in nd.reshape(ndev, -1):
        cnt = np.bincount(part[part >= 0], minlength=self.nodes)
        need = max(need, int(np.sum(-(-cnt // self.bsize))))
    return need

  def _set_blocks(self, nb: int) -> None:
    self.nb = nb
    self.make, self.stats_fn, self.seed_fn = _kernels(self.chunks.mesh, self.nodes, nb,
                                                      self.bsize)
    self._cached, self._cached_rows = None, 0

  def restrict(self, active: np.ndarray) -> None:
    """Later passes visit only the rows of nodes where `active` [nodes] is set."""
    self.active = active
    need = self._need(active)
    if need <= self.nb // 2:  # shrink by powers of two: few shapes to compile
      self._set_blocks(max(8, 1 << (need - 1).bit_length()))
    elif self._cached is not None:
      rows = int(np.count_nonzero(active[self.node]))
      if rows < 0.7 * self._cached_rows:
        self._cached = None

  def blocks(self, i: int):
    if self._cached is not None:
      return self._cached
    nd, valid = self.chunks.node_valid(i, self.node, self.active)
    out = self.make(self.chunks.x(i), nd, valid, self._parent)
    if len(self.chunks.ranges) == 1:
      self._cached = out
      self._cached_rows = len(self.node) if self.active is None else int(
          np.count_nonzero(self.active[self.node]))
    return out

  def _scatter(self, i: int, gidx, values, out: np.ndarray) -> None:
    g = np.asarray(gidx).reshape(-1)
    keep = g >= 0
    values = np.asarray(values).reshape((len(g),) + out.shape[1:])
    out[self.chunks.ranges[i][0] + g[keep]] = values[keep]

  def lloyd(self, cents, labels: np.ndarray, dist: np.ndarray):
    """Assigns the active rows (into `labels`/`dist`) and returns their summed statistics."""
    total = None
    norms = _norms(cents)
    for i in range(len(self.chunks.ranges)):
      xb, vb, bnode, gidx = self.blocks(i)
      lab, mind, sums, counts, inertia = self.stats_fn(xb, vb, bnode, cents, norms)
      self._scatter(i, gidx, lab, labels)
      self._scatter(i, gidx, mind, dist)
      part = (sums, counts, inertia)
      total = part if total is None else jax.tree.map(jnp.add, total, part)
    return total

  def candidate_dist(self, cands, out: np.ndarray) -> None:
    """Distances [N, L] of every row to its node's candidates `cands` [nodes, L, D]."""
    for i in range(len(self.chunks.ranges)):
      xb, vb, bnode, gidx = self.blocks(i)
      self._scatter(i, gidx, self.seed_fn(xb, vb, bnode, cands), out)


class _NodeSampler:
  """Draws one row per node with probability proportional to a weight, for all nodes at once.

  Rows are sorted by node once per level; a round is then one cumulative sum and a binary search
  per draw (inverse-CDF sampling), rather than a sort per draw.
  """

  def __init__(self, node: np.ndarray, nodes: int):
    self.order = np.argsort(node, kind="stable")
    self.bounds = np.searchsorted(node[self.order], np.arange(nodes + 1))
    self.count = np.diff(self.bounds)
    self.nodes = nodes

  def draw(self, weight: np.ndarray | None, u: np.ndarray) -> np.ndarray:
    """Rows [trials, nodes] (-1 for a node without rows) for uniforms `u` [trials, nodes].

    Rows of weight 0 (points that are already centres) are drawn only in a node whose rows all
    have weight 0, uniformly then, so a node repeats a point only when it must; `weight=None`
    draws uniformly.
    """
    lo, hi = self.bounds[:-1], self.bounds[1:]
    uniform = lo + np.minimum((u * self.count).astype(np.int64), np.maximum(self.count - 1, 0))
    if weight is None:
      pos = uniform
    else:
      cw = np.concatenate([[0.0], np.cumsum(weight[self.order], dtype=np.float64)])
      base, total = cw[lo], cw[hi] - cw[lo]
      # The first sorted row whose cumulative weight exceeds the target (zero weights never do).
      pos = np.searchsorted(cw, base + u * total, side="right") - 1
      pos = np.where(total > 0, np.clip(pos, lo, np.maximum(hi - 1, lo)), uniform)
    rows = self.order[np.minimum(pos, len(self.order) - 1)]
    return np.where(self.count > 0, rows, -1)


def _relative(source: FeatureSource, rows: np.ndarray, mean: np.ndarray, parent: np.ndarray
              ) -> np.ndarray:
  """Rows relative to their node's centroid, rounded exactly as the device blocks round them.

  A centroid seeded on a row then equals, bit for bit, the mean of that row alone, so a point
  repeated as two children gives two identical centroids (see `_duplicate_penalty`).
  """
  return (source.take(rows) - mean.astype(np.float32)) - parent


def _seed_level(lp: _LevelPass, source: FeatureSource, mean: np.ndarray, k: int,
                rng: np.random.Generator) -> np.ndarray:
  """Greedy k-means++ in every node at once; centroids relative to their node's centroid.

  Each round draws `trials` candidates per node with probability proportional to the squared
  distance to the node's nearest chosen centre (the first round: uniformly) and keeps the one
  that lowers the node's potential most, as scikit-learn's k-means++ does.
  """
  node, nodes, n = lp.node, lp.nodes, len(lp.node)
  trials = 2 + int(math.log(k))
  sampler = _NodeSampler(node, nodes)
  cents = np.zeros((nodes, k, source.dim), np.float32)  # a node without rows: its own centroid
  dmin = np.full(n, np.inf, np.float32)
  dcand = np.empty((n, trials), np.float32)
  for r in range(k):
    rows = sampler.draw(None if r == 0 else dmin, rng.random((trials, nodes)))
    cands = np.zeros((nodes, trials, source.dim), np.float32)
    has = rows >= 0
    if has.any():
      nd, t = np.nonzero(has.T)
      cands[nd, t] = _relative(source, rows.T[nd, t], mean, lp.parent[nd])
    lp.candidate_dist(jnp.asarray(cands), dcand)
    new_min = np.minimum(dmin[:, None], dcand)
    potential = np.stack([np.bincount(node, weights=new_min[:, t], minlength=nodes)
                          for t in range(trials)], axis=1)
    best = np.argmin(potential, axis=1)
    cents[:, r] = cands[np.arange(nodes), best]
    dmin = new_min[np.arange(n), best[node]]
  return cents


def _reseed_empty(cents: np.ndarray, counts: np.ndarray, node: np.ndarray, dist: np.ndarray,
                  source: FeatureSource, mean: np.ndarray, parent: np.ndarray) -> np.ndarray:
  """Moves empty clusters onto the rows of their node farthest from their centroid.

  `cents` [nodes, k, D] is relative: a row r becomes `source.take(r) - mean - parent[node]`. Returns
  the nodes [nodes] bool where a centroid moved.
  """
  empty = counts == 0
  touched = np.zeros(len(counts), bool)
  if not empty.any():
    return touched
  nodes_e = np.flatnonzero(empty.any(1))
  sel = np.isin(node, nodes_e) & (dist > 0)
  rows = np.flatnonzero(sel)
  order = np.lexsort((-dist[rows], node[rows]))
  rows, sn = rows[order], node[rows][order]
  starts = np.searchsorted(sn, nodes_e)
  stops = np.searchsorted(sn, nodes_e, side="right")
  moved_rows, moved_at = [], []
  for nd, lo, hi in zip(nodes_e, starts, stops):
    slots = np.flatnonzero(empty[nd])
    m = min(len(slots), hi - lo)
    moved_rows.extend(rows[lo:lo + m])
    moved_at.extend((nd, s) for s in slots[:m])
  if moved_rows:
    new = _relative(source, np.asarray(moved_rows), mean,
                    parent[[nd for nd, _ in moved_at]])
    for (nd, s), v in zip(moved_at, new):
      cents[nd, s] = v
      touched[nd] = True
  return touched


def fit_tree(features, config: KMeansConfig = KMeansConfig(), *, mesh: Mesh | None = None,
             log: Callable[[str], None] | None = None,
             on_iteration: Callable[[int, int, float, int], None] | None = None) -> TreeFit:
  """Fits the tree to `features` (an array, a .npy path, a features folder or a source).

  `log` receives one line per level; `on_iteration(level, iteration, inertia, changed)` is called
  after every assignment pass (for progress bars).
  """
  config.validate()
  source = features if hasattr(features, "num_rows") else open_source(features)
  if source.num_rows < 1:
    raise ValueError("k-means: no feature rows to fit")
  mesh = mesh or default_mesh()
  log = log or (lambda _: None)
  mean, std = feature_stats(source, config.chunk_size)
  chunks = _Chunks(source, config.chunk_size, mesh, mean)
  n, k = source.num_rows, config.branching
  node = np.zeros(n, np.int32)
  labels = np.zeros(n, np.int32)
  dist = np.zeros(n, np.float32)
  parent = np.zeros((1, source.dim), np.float32)  # node centroids, less the mean
  out_cents, inertias, iters = [], [], []
  for level in range(config.depth):
    nodes = k**level
    lp = _LevelPass(chunks, node, nodes, parent)
    rng = np.random.default_rng([config.seed, level])
    cents_np = _seed_level(lp, source, mean, k, rng)
    cents = jnp.asarray(cents_np)
    prev_labels = np.full(n, -1, np.int32)
    prev_inertia, done = np.inf, 0
    active = np.ones(nodes, bool)
    while True:
      sums, counts, _ = lp.lloyd(cents, labels, dist)
      inertia = float(dist.sum(dtype=np.float64))  # frozen nodes' rows keep their distances
      moved = labels != prev_labels
      changed = int(np.count_nonzero(moved))
      if on_iteration is not None:
        on_iteration(level, done, inertia, changed)
      converged = changed == 0 or prev_inertia - inertia <= config.tol * inertia
      if converged or done == config.iterations:
        break
      cents = _update(sums, counts, cents)  # nodes without rows in the pass keep theirs
      counts_np = np.array(counts)
      counts_np[~active] = 1  # frozen nodes have no rows in the pass, not empty clusters
      next_active = np.bincount(node[moved], minlength=nodes) > 0
      if (counts_np == 0).any():
        cents_np = np.array(cents)
        reseeded = _reseed_empty(cents_np, counts_np, node, dist, source, mean, parent)
        if reseeded.any():
          cents = jnp.asarray(cents_np)
          next_active |= reseeded
      active = next_active
      lp.restrict(active)
      prev_labels[:] = labels
      prev_inertia = inertia
      done += 1
    log(f"level {level}: {nodes} nodes, {done} iterations, inertia {inertia:.6g}")
    cents_np = np.asarray(cents) + parent[:, None, :]
    out_cents.append(cents_np + mean.astype(np.float32))
    inertias.append(inertia)
    iters.append(done)
    node = node * k + labels
    parent = cents_np.reshape(-1, source.dim)
  return TreeFit(out_cents, node.astype(np.int32), dist.copy(), inertias, iters, mean, std, n)


def feature_stats(source: FeatureSource, chunk_size: int = 65536):
  """Mean and standard deviation per dimension (float64), in one streamed pass."""
  total = np.zeros(source.dim, np.float64)
  total_sq = np.zeros(source.dim, np.float64)
  step = min(chunk_size, 16384)
  for start in range(0, source.num_rows, step):
    x = source.read(start, min(start + step, source.num_rows))
    if not np.isfinite(x).all():
      bad = start + int(np.flatnonzero(~np.isfinite(x).all(1))[0])
      raise ValueError(f"k-means: feature row {bad} is not finite; expected finite features")
    total += x.sum(0, dtype=np.float64)
    total_sq += np.einsum("ij,ij->j", x, x, dtype=np.float64)
  mean = total / source.num_rows
  var = np.maximum(total_sq / source.num_rows - mean * mean, 0.0)
  return mean, np.sqrt(var)


# ----------------------------------------------------------------------------- assignment


def _local_descend(x, *levels, batch_rows: int):
  """Leaf and squared leaf distance of every row, descending one level at a time.

  `levels` repeats (children relative to their node [nodes, k, D], their `_norms` [nodes, k],
  node centroids [nodes, D]).
  """
  n = x.shape[0]
  node = jnp.zeros(n, jnp.int32)
  valid = jnp.ones(n, bool)
  mind = jnp.zeros(n, x.dtype)
  for cents, norms, parent in zip(levels[::3], levels[1::3], levels[2::3]):
    nodes, k = cents.shape[0], cents.shape[1]
    if nodes == 1:  # the root: every row in one block, no grouping needed
      d = _block_dist((x - parent)[None], jnp.zeros(1, jnp.int32), cents, norms)[0]
      node = jnp.argmin(d, axis=-1).astype(jnp.int32)
      mind = jnp.min(d, axis=-1)
      continue
    bsize = _block_size(batch_rows, nodes)
    nb = -(-n // bsize) + min(nodes, n)
    xb, vb, bnode, gidx = _local_blocks(x, node, valid, nodes=nodes, nb=nb, bsize=bsize)
    d = _block_dist(xb - parent[bnode][:, None, :], bnode, cents, norms)
    lab = jnp.argmin(d, axis=-1).astype(jnp.int32)
    flat = gidx.reshape(-1)
    lab_rows = jnp.zeros(n, jnp.int32).at[flat].set(lab.reshape(-1), mode="drop")
    mind = jnp.zeros(n, x.dtype).at[flat].set(jnp.min(d, -1).reshape(-1), mode="drop")
    node = node * k + lab_rows
  return node, jnp.maximum(mind, 0.0)


@functools.lru_cache(maxsize=None)
def _descend_fn(mesh: Mesh, depth: int, batch_rows: int):
  rows, rep = P(AXIS), P()
  fn = functools.partial(_local_descend, batch_rows=batch_rows)
  return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(rows,) + (rep,) * (3 * depth),
                               out_specs=(rows, rows), check_vma=False))


def descend(x: np.ndarray, centroids: Sequence, center: np.ndarray, *, batch_size: int = 32768,
            mesh: Mesh | None = None):
  """Leaf token [N] int32 and squared distance [N] float32 of every row of `x` ([N, D])."""
  mesh = mesh or default_mesh()
  ndev = mesh.size
  n = x.shape[0]
  batch = -(-min(batch_size, max(n, 1)) // ndev) * ndev
  center = np.asarray(center, np.float32)
  replicated = NamedSharding(mesh, P())
  levels, parent = [], np.zeros((1, x.shape[1]), np.float32)
  for c in centroids:
    c = np.asarray(c, np.float32) - center
    rel = jax.device_put(c - parent[:, None, :], replicated)
    levels += [rel, jax.device_put(_norms(rel), replicated), jax.device_put(parent, replicated)]
    parent = c.reshape(-1, x.shape[1])
  fn = _descend_fn(mesh, len(centroids), batch // ndev)
  sharding = NamedSharding(mesh, P(AXIS))
  leaf = np.empty(n, np.int32)
  dist = np.empty(n, np.float32)
  pending = []
  for start in range(0, n, batch):
    stop = min(start + batch, n)
    xb = np.zeros((batch, x.shape[1]), np.float32)
    xb[:stop - start] = x[start:stop]
    xb[:stop - start] -= center
    pending.append((start, stop, fn(jax.device_put(xb, sharding), *levels)))
    if len(pending) > 1:  # keep one batch in flight while the next is prepared
      _drain(pending.pop(0), leaf, dist)
  for item in pending:
    _drain(item, leaf, dist)
  return leaf, dist


def _drain(item, leaf: np.ndarray, dist: np.ndarray) -> None:
  start, stop, (lf, ds) = item
  leaf[start:stop] = np.asarray(lf)[:stop - start]
  dist[start:stop] = np.asarray(ds)[:stop - start]


def brute_force_leaf(x: np.ndarray, leaves: np.ndarray) -> np.ndarray:
  """Nearest leaf centroid of every row by exhaustive search (numpy; for checks)."""
  x = np.asarray(x, np.float64)
  leaves = np.asarray(leaves, np.float64)
  d = (x * x).sum(1)[:, None] - 2 * x @ leaves.T + (leaves * leaves).sum(1)[None]
  return np.argmin(d, axis=1).astype(np.int32)


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
  """Adjusted Rand index of two labelings (Hubert and Arabie, 1985)."""
  a = np.unique(np.asarray(a), return_inverse=True)[1]
  b = np.unique(np.asarray(b), return_inverse=True)[1]
  table = np.zeros((a.max() + 1, b.max() + 1), np.int64)
  np.add.at(table, (a, b), 1)

  def pairs(v):
    v = np.asarray(v, np.float64)
    return float((v * (v - 1) / 2).sum())

  index = pairs(table)
  rows, cols, total = pairs(table.sum(1)), pairs(table.sum(0)), pairs([len(a)])
  expected = rows * cols / total if total else 0.0
  top = (rows + cols) / 2
  return 1.0 if top == expected else (index - expected) / (top - expected)
