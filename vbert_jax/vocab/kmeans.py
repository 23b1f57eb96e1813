"""Hierarchical k-means in JAX: a tree of `depth` levels with `branching` children per node.

Level l splits each of its branching**l nodes into `branching` clusters, and all nodes of a level
are fitted together. A point only needs the distances to its own node's children, so the points
are grouped by node into fixed-size blocks (a block never mixes two nodes; the block size is
chosen per level from the node sizes), and an assignment pass is one batched matrix product of
[blocks, block_size, D] with the blocks' centroids [blocks, k, D] on a 1-D mesh of all local
devices. The centroids live on the devices and only the children that changed are sent again.

Lloyd's update is incremental: the host keeps every child's sum and count of rows and, after a
pass, adds and takes away only the rows that changed child (one sparse product), then recomputes
the means of those children alone. Nodes are independent problems, so a node none of whose rows
moved is at a fixed point and leaves the later passes: a pass visits only the blocks of the
active nodes. Deep in the tree that is few nodes after the first passes, and far less than N*k*D
work per iteration.

Rows are streamed from a `FeatureSource` (an array, a memory-mapped .npy, or a folder of per-video
feature files) in chunks. A source that fits in one chunk is read once, and its level's blocks
are built once and stay on the devices; a larger one is read chunk by chunk in every pass, and
only the rows that moved are read again for the statistics. Within a level, rows are taken
relative to their node's centroid, so float32 distances stay accurate deep in the tree.

Per level: greedy k-means++ seeding on at most `seed_sample` rows of each node (`seeding`), then
Lloyd iterations until the assignment stops changing, the relative drop in inertia is at most
`tol`, or `iterations` updates were made. An empty cluster is re-seeded with the row of its node
farthest from its centroid among rows that share their cluster.

Nodes with fewer distinct points than `branching`: seeding takes each distinct point once and then
repeats points, so every node keeps `branching` children and the tree stays complete; repeated
children are kept out of the assignment and ties go to the lowest child index, so the assignment
stays well defined. A node without any points (below a repeated child) gets `branching` copies of
its own centroid.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Callable, Protocol, Sequence

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from scipy import sparse

from vbert_jax.video import features_io
from vbert_jax.vocab import seeding

AXIS = "data"
HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- sources


class FeatureSource(Protocol):
  """Rows of features, read in ranges or by index, always returned as float32; `read` fills
  `out` ([stop - start, dim] float32) when given, and returns it."""
  num_rows: int
  dim: int

  def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
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

  def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
    if out is None:
      return np.asarray(self.array[start:stop], np.float32)
    np.copyto(out, self.array[start:stop])  # float16 rows widen in place, with no float32 copy
    return out

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
    self.folder = epath.Path(folder)  # a local folder or a bucket
    if not self.folder.is_dir():
      raise ValueError(f"{self.folder}: features folder does not exist")
    self.paths, self.video_ids, self.sources, self.skipped = [], [], [], []
    self._starts, self._ends, counts = [], [], []
    for path in features_io.list_features(self.folder):
      try:  # the header only: the arrays are read by the passes that need them
        vf = features_io.load_index(path)
      except ValueError as e:
        self.skipped.append((str(path), str(e)))
        continue
      if len(vf.shape) != 2 or vf.shape[0] == 0:
        self.skipped.append((str(path), f"no clips (features shape {vf.shape})"))
        continue
      width = int(vf.shape[1])
      dim = width if dim is None else dim
      if width != dim:
        self.skipped.append((str(path), f"feature width {width}, expected {dim}"))
        continue
      self.paths.append(path)
      self.video_ids.append(vf.video_id)
      self.sources.append(vf.source)
      self._starts.append(np.asarray(vf.starts, np.float64))
      self._ends.append(np.asarray(vf.ends, np.float64))
      counts.append(vf.shape[0])
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

  def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
    out = np.empty((stop - start, self.dim), np.float32) if out is None else out
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
  seed_sample: int = 128  # most rows of a node that k-means++ seeding chooses among

  def validate(self) -> None:
    for key in ("depth", "branching", "iterations", "chunk_size"):
      if getattr(self, key) < 1:
        raise ValueError(f"k-means {key} must be at least 1, got {getattr(self, key)}")
    if self.branching < 2:
      raise ValueError(f"k-means branching must be at least 2, got {self.branching}")
    if self.tol < 0:
      raise ValueError(f"k-means tol must be >= 0, got {self.tol}")
    if self.seed_sample < self.branching:
      raise ValueError(f"k-means seed_sample must be at least branching ({self.branching}), "
                       f"got {self.seed_sample}")


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

_GROUP = 8  # block counts are bucketed to multiples of this per device


def _block_size(rows: int, nodes: int) -> int:
  """About half a node's rows per block, as a power of two in [16, 1024]."""
  per_node = max(rows // max(nodes, 1) // 2, 1)
  return int(min(max(1 << (per_node.bit_length() - 1), 16), 1024))


def _fit_block_size(count: np.ndarray) -> int:
  """Rows per block for nodes of `count` rows: the power of two in [32, 1024] with the least
  padded work, a row of a small block counting more (thin products run slower per row)."""
  sizes = 2 ** np.arange(5, 11)
  slots = np.array([np.sum(-(-count // b)) * b for b in sizes])
  return int(sizes[np.argmin(slots * (1 + 32 / sizes))])


def _bucket(n: int, multiple: int = 8) -> int:
  """Rounds up within 1/8 so that block counts, hence compiled shapes, repeat across passes."""
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


def _duplicate_penalty(cents: np.ndarray) -> np.ndarray:
  """[nodes, k]: +inf for a child that repeats an earlier child of its node bit for bit, else 0.

  A node with fewer points than branches repeats points as children. Which of two equal
  centroids wins an argmin then depends on the matmul's rounding, which differs with batch and
  device shapes; taking the repeats out makes "ties go to the lowest child" hold everywhere.
  A child is compared in full with the first earlier child of its node that agrees with it on a
  spread of 16 coordinates (with all such children only if that one differs).
  """
  bits = np.ascontiguousarray(cents, np.float32).view(np.uint32)
  probe = bits[..., ::max(1, bits.shape[-1] // 16)]
  k = cents.shape[1]
  earlier = np.arange(k)[None, :] < np.arange(k)[:, None]  # [j, i]: i < j
  maybe = np.all(probe[:, :, None] == probe[:, None, :], axis=-1) & earlier[None]
  nd, j = np.nonzero(maybe.any(-1))
  first = maybe[nd, j].argmax(-1)
  same = np.all(bits[nd, j] == bits[nd, first], axis=-1)
  for t in np.flatnonzero(~same):  # the probe matched a different child: compare with all
    same[t] = any(np.array_equal(bits[nd[t], j[t]], bits[nd[t], i])
                  for i in np.flatnonzero(maybe[nd[t], j[t]]))
  out = np.zeros(cents.shape[:2], np.float32)
  out[nd[same], j[same]] = np.inf
  return out


def _norms(cents: np.ndarray) -> np.ndarray:
  """[nodes, k] squared norms of the children, +inf for repeats: what `_block_dist` adds.

  Computed on the host, once per set of centroids, by the fit and the assignment alike.
  """
  cents = np.asarray(cents, np.float32)
  return np.einsum("nkd,nkd->nk", cents, cents) + _duplicate_penalty(cents)


def _block_dist(xb, bnode, cents, norms, xn=None):
  """Squared distances [nb, bsize, k] of every block row to its node's children.

  `norms` [nodes, k] (from `_norms`, once per set of centroids) are gathered rather than summed
  from the gathered centroids: that algebraically equal form is miscompiled by XLA:CPU 0.10.2
  (YNNPACK fusion) when a level has a single node and blocks of 256+ rows (tests/test_kmeans.py
  checks both). `xn` [nb, bsize], the rows' squared norms, is summed here when not given.
  """
  cn = norms[bnode]
  dots = jnp.einsum("nbd,nkd->nbk", xb, cents[bnode], precision=HIGHEST)
  xn = jnp.sum(xb * xb, axis=-1) if xn is None else xn
  return cn[:, None, :] - 2.0 * dots + xn[..., None]


def _local_assign(xb, vb, xn, bnode, cents, norms):
  """Nearest child [nb, bsize] (ties: the lowest) and its squared distance (0 at padding)."""
  # Measured on XLA:CPU: blocks of 128+ rows run about 1.6x faster with the rows' norms summed
  # once per level, thinner ones about 1.7x slower (the fusion around the product changes).
  d = _block_dist(xb, bnode, cents, norms, xn if xb.shape[1] >= 128 else None)
  lab = jnp.argmin(d, axis=-1).astype(jnp.int32)
  return lab, jnp.where(vb, jnp.maximum(jnp.min(d, axis=-1), 0.0), 0.0)


def _make_blocks(x, gidx, bnode, parent):
  """Rows `gidx` [nb, bsize] of `x` (-1: padding) relative to their node's centroid, with their
  validity and squared norms."""
  vb = gidx >= 0
  # Rows relative to their node's centroid: distances within a node stay accurate in float32
  # however far the node is from the origin.
  xb = jnp.take(x, jnp.maximum(gidx, 0), axis=0) - parent[bnode][:, None, :]
  xb = jnp.where(vb[..., None], xb, 0.0)
  return xb, vb, jnp.sum(xb * xb, axis=-1)


def _contiguous_blocks(x, parent, nb: int, bsize: int):
  """`_make_blocks` for a single node's rows in order: a reshape, where a gather costs about
  as much as four assignment passes of the root level."""
  xb = jnp.pad(x - parent[0], ((0, nb * bsize - x.shape[0]), (0, 0))).reshape(nb, bsize, -1)
  vb = (jnp.arange(nb * bsize) < x.shape[0]).reshape(nb, bsize)
  return xb, vb, jnp.sum(xb * xb, axis=-1)


def _select_blocks(xb, vb, xn, ids, keep):
  return xb[ids], vb[ids] & keep[:, None], xn[ids]


@functools.lru_cache(maxsize=None)
def _kernels(mesh: Mesh):
  """Jitted block builder, block selection and assignment, blocks split over the mesh."""
  rows, rep = NamedSharding(mesh, P(AXIS)), NamedSharding(mesh, P())
  make = jax.jit(_make_blocks, in_shardings=(rep, rows, rows, rep), out_shardings=(rows,) * 3)
  contiguous = jax.jit(_contiguous_blocks, static_argnums=(2, 3),
                       in_shardings=(rep, rep), out_shardings=(rows,) * 3)
  select = jax.jit(_select_blocks, in_shardings=(rows,) * 5, out_shardings=(rows,) * 3)
  assign = jax.jit(jax.shard_map(_local_assign, mesh=mesh, in_specs=(P(AXIS),) * 4 + (P(),) * 2,
                                 out_specs=(P(AXIS), P(AXIS)), check_vma=False))
  return make, contiguous, select, assign


# ----------------------------------------------------------------------------- fitting


class _Chunks:
  """The source as chunks of at most `size` rows, centred by the feature mean, on the host.

  A source that fits in one chunk is read once and also kept on the devices.
  """

  def __init__(self, source: FeatureSource, chunk_size: int, mesh: Mesh, mean: np.ndarray):
    self.source, self.mesh = source, mesh
    self.size = min(chunk_size, source.num_rows)
    self.ranges = [(s, min(s + self.size, source.num_rows))
                   for s in range(0, source.num_rows, self.size)]
    self.mean = mean.astype(np.float32)
    self.resident = len(self.ranges) == 1
    self._host = self.read(0) if self.resident else None
    self._device = self.put(self._host) if self.resident else None

  def read(self, i: int) -> np.ndarray:
    """Chunk i, centred, in a new aligned array (XLA:CPU uses an aligned array in place rather
    than copying it). The source reads into it: a float32 copy of a float16 chunk beside it was
    the streamed fit's peak of memory."""
    start, stop = self.ranges[i]
    out = self.source.read(start, stop, out=_aligned_empty((stop - start, self.source.dim)))
    out -= self.mean
    return out

  def put(self, x: np.ndarray):
    return jax.device_put(x, NamedSharding(self.mesh, P()))

  def host(self, i: int) -> np.ndarray:
    return self._host if self.resident else self.read(i)

  def device(self, i: int):
    return self._device if self.resident else self.put(self.read(i))

  def rows(self, rows: np.ndarray) -> np.ndarray:
    """Centred rows (a new array)."""
    return self._host[rows] if self.resident else self.source.take(rows) - self.mean

  def relative(self, rows: np.ndarray, parent: np.ndarray) -> np.ndarray:
    """Rows less their node's centroid `parent` [len(rows), D], rounded exactly as the device
    blocks round them: a centroid seeded on a row then equals, bit for bit, the mean of that row
    alone, so a point repeated as two children gives two identical centroids."""
    x = self.rows(rows)
    x -= parent
    return x

  def centred(self, rows: np.ndarray):
    """Yields (part, x, at) in pieces of at most one chunk, `rows` ascending: the rows `part`
    are rows `at` of the centred array `x`. A resident source yields its whole array, so that
    the rows are read where they lie rather than gathered first."""
    if self.resident:
      yield rows, self._host, rows
      return
    n = self.source.num_rows
    if len(rows) == n:  # every row: read in order, no gather
      for i, (start, stop) in enumerate(self.ranges):
        yield rows[start:stop], self.host(i), np.arange(stop - start)
      return
    for s in range(0, len(rows), self.size):
      part = rows[s:s + self.size]
      x = self.source.take(part)
      x -= self.mean
      yield part, x, np.arange(len(part))


def _layout(node: np.ndarray, keep: np.ndarray | None, bsize: int, ndev: int,
            bucket: bool = True):
  """Rows grouped by node into blocks: row indices [nb, bsize] (-1: padding) and block nodes.

  Only the rows where `keep` is set are placed; `nb` is a multiple of the devices, and bucketed
  (few shapes to compile) unless `bucket` is off.
  """
  rows = np.arange(len(node)) if keep is None else np.flatnonzero(keep)
  order = rows[np.argsort(node[rows], kind="stable")]
  uniq, first, count = np.unique(node[order], return_index=True, return_counts=True)
  blocks = -(-count // bsize)
  per_dev = -(-max(int(blocks.sum()), 1) // ndev)
  nb = ndev * (_bucket(per_dev, _GROUP) if bucket else per_dev)
  bnode = np.zeros(nb, np.int32)
  bnode[:blocks.sum()] = np.repeat(uniq, blocks)
  rank = np.arange(len(order)) - np.repeat(first, count)
  block = np.repeat(np.cumsum(blocks) - blocks, count) + rank // bsize
  gidx = np.full((nb, bsize), -1, np.int32)
  gidx[block, rank % bsize] = order
  return gidx, bnode


class _LevelPass:
  """Assignment passes of one level: rows of the active nodes to their nearest child.

  With a resident source the level's blocks are built once and a pass selects the blocks of the
  active nodes; otherwise every pass builds the blocks of each chunk's active rows.
  """

  def __init__(self, chunks: _Chunks, node: np.ndarray, nodes: int, parent: np.ndarray):
    self.chunks, self.node, self.nodes = chunks, node, nodes
    self.ndev = chunks.mesh.size
    count = np.bincount(node, minlength=nodes) * (chunks.size / len(node))
    self.bsize = _fit_block_size(np.ceil(count).astype(np.int64))
    self.make, self.contiguous, self.select, self.assign_fn = _kernels(chunks.mesh)
    self.parent = chunks.put(parent)
    self.full = self.picked = None
    if chunks.resident:
      gidx, bnode = _layout(node, None, self.bsize, self.ndev, bucket=False)
      if nodes == 1:
        blocks = self.contiguous(chunks.device(0), self.parent, len(bnode), self.bsize)
      else:
        blocks = self._blocks(0, gidx, bnode)
      self.full = (gidx, bnode, blocks)

  def _blocks(self, i: int, gidx: np.ndarray, bnode: np.ndarray):
    return self.make(self.chunks.device(i), gidx, bnode, self.parent)

  def _chunk_blocks(self, i: int, active: np.ndarray):
    """(row indices, block nodes, (xb, vb, xn)) of chunk i's rows of active nodes."""
    if self.full is not None:
      return self._resident_blocks(active)
    start, stop = self.chunks.ranges[i]
    node = self.node[start:stop]
    gidx, bnode = _layout(node, active[node], self.bsize, self.ndev)
    return np.where(gidx >= 0, gidx + start, -1), bnode, self._blocks(i, gidx, bnode)

  def _resident_blocks(self, active: np.ndarray):
    """The active nodes' blocks, from the last selection while it holds them all (the active
    nodes mostly shrink), else from the level's blocks. Gathering a block costs about as much as
    assigning it, so when most blocks are active the others are masked rather than gathered."""
    gidx, bnode, blocks = self.full
    need = np.count_nonzero(active[bnode] & (gidx[:, 0] >= 0))
    if self.picked is not None:
      pg, pb, _ = self.picked
      if np.count_nonzero(active[pb] & (pg[:, 0] >= 0)) == need:
        gidx, bnode, blocks = self.picked
    sel = np.flatnonzero(active[bnode] & (gidx[:, 0] >= 0))
    if len(sel) > 0.35 * len(bnode):
      mask = active[bnode][:, None]
      xb, vb, xn = blocks
      return np.where(mask, gidx, -1), bnode, (xb, vb & mask, xn)
    nb = self.ndev * _bucket(-(-max(len(sel), 1) // self.ndev), _GROUP)
    ids = np.zeros(nb, np.int32)
    ids[:len(sel)] = sel
    keep = np.arange(nb) < len(sel)
    self.picked = (np.where(keep[:, None], gidx[ids], -1), bnode[ids],
                   self.select(*blocks, ids, keep))
    return self.picked

  def put_centroids(self, cents: np.ndarray, repeat: np.ndarray, keys: np.ndarray | None = None):
    """Puts children `keys` (node * k + child; all when None) of `cents` on the devices.

    `repeat` [nodes, k] marks children that repeat an earlier child of their node (+inf norm).
    """
    if keys is None or len(keys) > cents.shape[0] * cents.shape[1] // 4:
      norms = np.einsum("nkd,nkd->nk", cents, cents) + np.where(repeat, np.inf, 0.0)
      self.cents, self.norms = self.chunks.put(cents), self.chunks.put(norms.astype(np.float32))
      return
    if len(keys) == 0:
      return
    pad = np.resize(keys, _bucket(len(keys)))  # repeats rewrite the same values
    values = cents.reshape(-1, cents.shape[-1])[pad]
    norms = np.einsum("nd,nd->n", values, values) + np.where(repeat.reshape(-1)[pad], np.inf, 0.0)
    self.cents, self.norms = _set_children(self.cents, self.norms, pad, values,
                                           norms.astype(np.float32))

  def assign(self, active: np.ndarray):
    """Rows of the active nodes with their nearest child and squared distance (host arrays)."""
    pending, out = [], []
    for i in range(len(self.chunks.ranges)):
      gidx, bnode, blocks = self._chunk_blocks(i, active)
      pending.append((gidx, self.assign_fn(*blocks, bnode, self.cents, self.norms)))
      if len(pending) > 1:  # read one chunk's results while the next one runs
        out.append(_gathered(*pending.pop(0)))
    out += [_gathered(*p) for p in pending]
    return tuple(np.concatenate(parts) for parts in zip(*out))


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _set_children(cents, norms, keys, values, key_norms):
  nodes, k, dim = cents.shape
  cents = cents.reshape(-1, dim).at[keys].set(values).reshape(nodes, k, dim)
  return cents, norms.reshape(-1).at[keys].set(key_norms).reshape(nodes, k)


def _gathered(gidx: np.ndarray, result):
  lab, mind = (np.asarray(r) for r in result)
  valid = gidx >= 0
  return gidx[valid], lab[valid], mind[valid]


class _Sums:
  """Per-child sums and counts of the centred rows, updated by the rows that moved.

  A Lloyd update needs the new means only of the clusters whose rows changed, so the sums are
  kept across passes and only the moved rows are added and taken away, in one sparse product.
  """

  def __init__(self, nodes: int, k: int, dim: int):
    self.k = k
    self.sums: np.ndarray | None = None  # [nodes * k, dim] float32, from the first move
    self.shape = (nodes * k, dim)
    self.counts = np.zeros(nodes * k, np.int64)

  def move(self, chunks: _Chunks, rows: np.ndarray, node: np.ndarray, old: np.ndarray,
           new: np.ndarray) -> np.ndarray:
    """Rows (ascending) leave child `old` (-1: none) of their node for child `new`.

    Returns the children whose statistics changed, as node * k + child.
    """
    changed = []
    for part, x, at in chunks.centred(rows):
      sel = np.searchsorted(rows, part)
      base = node[part] * self.k
      keep = old[sel] >= 0
      keys = np.concatenate([base + new[sel], (base + old[sel])[keep]])
      sign = np.concatenate([np.ones(len(part)), -np.ones(int(keep.sum()))])
      cols = np.concatenate([at, at[keep]])
      order = np.argsort(keys, kind="stable")
      keys, sign, cols = keys[order], sign[order], cols[order]
      starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
      uniq = keys[starts]
      if self.sums is None:
        # The first pass: a row for every child, so that the product is the sums themselves
        # (scattering a product of the children that got rows cost as much as the product).
        self.sums = self._product(sign, cols, np.searchsorted(keys, np.arange(self.shape[0] + 1)),
                                  self.shape[0], x)
      else:
        self.sums[uniq] += self._product(sign, cols, np.r_[starts, len(keys)], len(uniq), x)
      self.counts += np.bincount(keys, sign, minlength=len(self.counts)).astype(np.int64)
      changed.append(uniq)
    return np.unique(np.concatenate(changed)) if changed else np.zeros(0, np.int64)

  @staticmethod
  def _product(sign: np.ndarray, cols: np.ndarray, indptr: np.ndarray, children: int,
               x: np.ndarray) -> np.ndarray:
    """[children, D]: per child, its arriving rows of `x` (columns `cols`) less its departing
    ones, a sparse matrix of +1 and -1 times `x`; each child's rows are added in `cols` order."""
    moved = sparse.csr_matrix((sign.astype(np.float32), cols, indptr),
                              shape=(children, x.shape[0]))
    return moved @ x

  def update(self, cents: np.ndarray, keys: np.ndarray, parent: np.ndarray) -> None:
    """Children `keys` become the means of their rows (relative to the node); empty ones stay."""
    k, dim = self.k, cents.shape[-1]
    if len(keys) > len(self.counts) // 2:  # most children: whole-array operations, no gathers
      flat = cents.reshape(-1, dim)
      empty = np.flatnonzero(self.counts == 0)
      kept = flat[empty]
      count = np.maximum(self.counts, 1).astype(np.float32).reshape(-1, k, 1)
      np.divide(self.sums.reshape(cents.shape), count, out=cents)
      np.subtract(cents, parent[:, None, :], out=cents)
      flat[empty] = kept
      return
    flat = cents.reshape(-1, dim)
    counts = self.counts[keys]
    keys = keys[counts > 0]
    count = counts[counts > 0].astype(np.float32)[:, None]
    flat[keys] = self.sums[keys] / count - parent[keys // k]


def _reseed_empty(cents: np.ndarray, counts: np.ndarray, node: np.ndarray, label: np.ndarray,
                  dist: np.ndarray, chunks: _Chunks, parent: np.ndarray,
                  skip: np.ndarray | None = None) -> np.ndarray:
  """Moves empty clusters onto the rows of their node farthest from their centroid.

  Only rows that share their cluster and sit off its centroid are candidates: moving a centroid
  onto a row alone in its cluster would only repeat that row. Nodes where `skip` is set are left
  alone. `cents` [nodes, k, D] is relative: a row r becomes `chunks.relative`. Returns the nodes
  [nodes] bool where a centroid moved.
  """
  k = counts.shape[1]
  empty = counts == 0
  touched = np.zeros(len(counts), bool)
  want = empty.any(1) if skip is None else empty.any(1) & ~skip
  if not want.any():
    return touched
  nodes_e = np.flatnonzero(want)
  sel = np.isin(node, nodes_e) & (dist > 0) & (counts.reshape(-1)[node * k + label] > 1)
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
    new = chunks.relative(np.asarray(moved_rows), parent[[nd for nd, _ in moved_at]])
    for (nd, s), v in zip(moved_at, new):
      cents[nd, s] = v
      touched[nd] = True
  return touched


def _lloyd(lp: _LevelPass, cents: np.ndarray, parent: np.ndarray, config: KMeansConfig,
           report: Callable[[int, float, int], None]):
  """Lloyd's iterations of one level from `cents` (updated in place): (labels, dist, updates).

  Nodes are independent problems: a node none of whose rows moved is at a fixed point and
  leaves the later passes.
  """
  node, nodes, k = lp.node, lp.nodes, cents.shape[1]
  n = len(node)
  labels = np.full(n, -1, np.int32)
  dist = np.zeros(n, np.float32)
  sums = _Sums(nodes, k, cents.shape[-1])
  active = np.ones(nodes, bool)
  stale = np.zeros(nodes, bool)  # re-seeded without effect: not re-seeded again until it moves
  reseeded = np.zeros(nodes, bool)
  prev_inertia, done = np.inf, 0
  repeat = _duplicate_penalty(cents) > 0  # repeated children never win a row, so never move
  lp.put_centroids(cents, repeat)
  while True:
    rows, lab, mind = lp.assign(active)
    dist[rows] = mind
    moved = lab != labels[rows]
    rows, new = rows[moved], lab[moved]
    order = np.argsort(rows, kind="stable")
    rows, new = rows[order], new[order]
    old = labels[rows]
    labels[rows] = new
    inertia = float(dist.sum(dtype=np.float64))  # frozen nodes' rows keep their distances
    report(done, inertia, len(rows))
    converged = len(rows) == 0 or prev_inertia - inertia <= config.tol * inertia
    if converged or done == config.iterations:
      return labels, dist, done, inertia
    keys = sums.move(lp.chunks, rows, node, old, new)
    sums.update(cents, keys, parent)
    touched = np.zeros(nodes, bool)
    touched[keys // k] = True
    stale = (stale | (reseeded & ~touched)) & ~touched
    reseeded = _reseed_empty(cents, sums.counts.reshape(nodes, k), node, labels, dist,
                             lp.chunks, parent, skip=stale)
    if reseeded.any():
      moved_to = np.flatnonzero(reseeded)
      repeat[moved_to] = _duplicate_penalty(cents[moved_to]) > 0
      keys = np.union1d(keys, (moved_to[:, None] * k + np.arange(k)).reshape(-1))
    lp.put_centroids(cents, repeat, keys)
    active = touched | reseeded
    prev_inertia = inertia
    done += 1


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
  n, k, dim = source.num_rows, config.branching, source.dim
  node = np.zeros(n, np.int32)
  parent = np.zeros((1, dim), np.float32)  # node centroids, less the mean
  out_cents, inertias, iters = [], [], []
  for level in range(config.depth):
    nodes = k**level
    rng = np.random.default_rng([config.seed, level])
    seeds = seeding.seed_level(node, nodes, k, config.seed_sample, chunks.rows, rng)
    cents = np.zeros((nodes, k, dim), np.float32)  # a node without rows: its own centroid
    has = seeds[:, 0] >= 0
    cents[has] = chunks.rows(seeds[has].reshape(-1)).reshape(-1, k, dim) - parent[has][:, None]
    lp = _LevelPass(chunks, node, nodes, parent)

    def report(i, inertia, changed, level=level):
      if on_iteration is not None:
        on_iteration(level, i, inertia, changed)

    labels, dist, done, inertia = _lloyd(lp, cents, parent, config, report)
    log(f"level {level}: {nodes} nodes, {done} iterations, inertia {inertia:.6g}")
    cents += parent[:, None, :]
    out_cents.append(cents + mean.astype(np.float32))
    inertias.append(inertia)
    iters.append(done)
    node = node * k + labels
    parent = cents.reshape(-1, dim)
  return TreeFit(out_cents, node.astype(np.int32), dist.copy(), inertias, iters, mean, std, n)


def feature_stats(source: FeatureSource, chunk_size: int = 65536):
  """Mean and standard deviation per dimension (float64), in one streamed pass."""
  total = np.zeros(source.dim, np.float64)
  total_sq = np.zeros(source.dim, np.float64)
  step = min(chunk_size, 16384)
  for start in range(0, source.num_rows, step):
    x = source.read(start, min(start + step, source.num_rows))
    # float32 squares summed in float64 cannot overflow, so a column's sum is finite exactly
    # when its values are: the check costs no pass of its own over the rows.
    sq = np.einsum("ij,ij->j", x, x, dtype=np.float64)
    if not np.isfinite(sq).all():
      bad = start + int(np.flatnonzero(~np.isfinite(x).all(1))[0])
      raise ValueError(f"k-means: feature row {bad} is not finite; expected finite features")
    total += x.sum(0, dtype=np.float64)
    total_sq += sq
  mean = total / source.num_rows
  var = np.maximum(total_sq / source.num_rows - mean * mean, 0.0)
  return mean, np.sqrt(var)


# ----------------------------------------------------------------------------- assignment


def _local_descend(x, center, *levels, batch_rows: int, distance: bool):
  """Leaf [N] of every row, descending one level at a time, and with `distance` its squared
  distance [N] to the leaf.

  `x` [N, D] is taken relative to `center` [D] here rather than on the host, where making the
  centred copy cost more than the whole descent. `levels` holds, for each level, its children
  [nodes, k, D] relative to `center` and their `_norms` [nodes, k]; with `distance`, the last
  level's children are relative to their node instead, followed by the node centroids
  [nodes, D]. Rows are not re-centred on each node as the fit's are, since on XLA:CPU a pass
  over the rows costs about as much as a level's product; only the distances returned are taken
  within the node, where float32 keeps them accurate however far the node lies from `center`.
  """
  x = x - center
  n = x.shape[0]
  node = jnp.zeros(n, jnp.int32)
  valid = jnp.ones(n, bool)
  upper = levels[:-3] if distance else levels
  xn = jnp.sum(x * x, axis=-1) if upper else None
  depth = len(upper) // 2 + int(distance)
  for i in range(depth):
    within = distance and i == depth - 1
    cents, norms = levels[2 * i], levels[2 * i + 1]
    nodes, k = cents.shape[0], cents.shape[1]
    if nodes == 1:  # the root: every row in one block, no grouping needed
      xr, xnr = (x - levels[-1], None) if within else (x, xn)
      d = _block_dist(xr[None], jnp.zeros(1, jnp.int32), cents, norms,
                      None if xnr is None else xnr[None])[0]
      lab, mind = jnp.argmin(d, axis=-1).astype(jnp.int32), jnp.min(d, axis=-1)
    else:
      bsize = _block_size(batch_rows, nodes)
      nb = -(-n // bsize) + min(nodes, n)
      xb, _, bnode, gidx = _local_blocks(x, node, valid, nodes=nodes, nb=nb, bsize=bsize)
      if within:
        xb, xnb = xb - levels[-1][bnode][:, None, :], None
      else:  # as in `_local_assign`: thin blocks run faster with norms summed in the fusion
        xnb = jnp.take(xn, gidx, mode="fill", fill_value=0) if bsize >= 128 else None
      d = _block_dist(xb, bnode, cents, norms, xnb)
      flat = gidx.reshape(-1)
      lab = jnp.zeros(n, jnp.int32).at[flat].set(
          jnp.argmin(d, axis=-1).astype(jnp.int32).reshape(-1), mode="drop")
      mind = jnp.zeros(n, x.dtype).at[flat].set(jnp.min(d, -1).reshape(-1), mode="drop")
    node = node * k + lab
  return (node, jnp.maximum(mind, 0.0)) if distance else node


@functools.lru_cache(maxsize=None)
def _descend_fn(mesh: Mesh, depth: int, batch_rows: int, distance: bool):
  rows, rep = P(AXIS), P()
  fn = functools.partial(_local_descend, batch_rows=batch_rows, distance=distance)
  levels = 2 * depth + int(distance)
  return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(rows, rep) + (rep,) * levels,
                               out_specs=(rows, rows) if distance else rows, check_vma=False))


# Rows per assignment batch: deep levels group a batch's rows by node, and a node's products
# grow fatter with the batch (100,000 queries of the benchmark ran at 76k/s in batches of 32768,
# 108k/s in one).
ASSIGN_BATCH = 131072
# Smaller searches run in a power-of-two batch of at least this many rows: one video's clips
# (a few to a few thousand) would otherwise compile a new program for every distinct count.
MIN_ASSIGN_BATCH = 256


def batch_rows(n: int, batch_size: int, devices: int) -> int:
  """Rows of the batches that search `n` rows: `batch_size`, or the power of two at or above n
  (at least MIN_ASSIGN_BATCH) where that is smaller; a multiple of `devices` either way."""
  bucket = max(MIN_ASSIGN_BATCH, 1 << max(n - 1, 0).bit_length())
  return -(-min(batch_size, bucket) // devices) * devices


class TreeIndex:
  """A fitted tree prepared for descents: its levels are taken relative to the centre, their
  norms summed and put on the devices once, as a faiss index is built once and searched many
  times (for the benchmark's 20,736 leaves, 0.10 s against 0.74 s to assign 100,000 queries).
  With `distance`, `search` also returns each row's squared distance to its leaf."""

  def __init__(self, centroids: Sequence, center: np.ndarray, *, mesh: Mesh | None = None,
               distance: bool = True):
    self.mesh = mesh or default_mesh()
    self.depth, self.distance = len(centroids), distance
    center = np.asarray(center, np.float32)
    self.dim = center.shape[-1]
    replicated = NamedSharding(self.mesh, P())
    self._levels = [jax.device_put(a, replicated)
                    for a in _descend_levels(centroids, center, distance)]
    self._center = jax.device_put(center, replicated)

  def search(self, x: np.ndarray, batch_size: int = ASSIGN_BATCH):
    """Leaf token [N] int32 of every row of `x` ([N, D]) and, with `distance`, its squared
    distance [N] float32 to the leaf (else None)."""
    if x.ndim != 2 or x.shape[1] != self.dim:
      raise ValueError(f"tree search: rows of shape {x.shape}; this tree expects [N, {self.dim}]")
    ndev = self.mesh.size
    n = x.shape[0]
    batch = batch_rows(n, batch_size, ndev)
    fn = _descend_fn(self.mesh, self.depth, batch // ndev, self.distance)
    sharding = NamedSharding(self.mesh, P(AXIS))
    leaf = np.empty(n, np.int32)
    dist = np.empty(n, np.float32) if self.distance else None
    # Two reused staging buffers: the CPU backend reads an aligned host array in place, and
    # refilling pages already mapped costs a copy, where each fresh batch array cost page faults
    # (3x the copy, and more than the root level's product).
    staging = [_aligned_empty((batch, x.shape[1])) for _ in range(min(2, -(-n // batch)))]
    pending = []
    for i, start in enumerate(range(0, n, batch)):
      stop = min(start + batch, n)
      xb = staging[i % 2]
      xb[:stop - start] = x[start:stop]
      xb[stop - start:] = 0.0
      pending.append((start, stop, fn(jax.device_put(xb, sharding), self._center,
                                      *self._levels)))
      if len(pending) > 1:  # one batch in flight; draining the other frees its staging buffer
        _drain(pending.pop(0), leaf, dist)
    for item in pending:
      _drain(item, leaf, dist)
    return leaf, dist


def descend(x: np.ndarray, centroids: Sequence, center: np.ndarray, *,
            batch_size: int = ASSIGN_BATCH, mesh: Mesh | None = None, distance: bool = True):
  """Leaf token [N] int32 of every row of `x` ([N, D]) and, with `distance`, its squared
  distance [N] float32 to the leaf (else None; the leaves alone take one pass less). For many
  calls on one tree, a `TreeIndex` prepares the tree once."""
  index = TreeIndex(centroids, center, mesh=mesh, distance=distance)
  return index.search(x, batch_size)


def _descend_levels(centroids: Sequence, center: np.ndarray, distance: bool) -> list:
  """Host arrays for `_local_descend`: children relative to `center` and their norms, per
  level; with `distance`, the last level's relative to their node, and the node centroids."""
  dim = center.shape[-1]
  cents = [np.asarray(c, np.float32) - center for c in centroids]
  out = [a for c in (cents[:-1] if distance else cents) for a in (c, _norms(c))]
  if distance:
    parent = cents[-2].reshape(-1, dim) if len(cents) > 1 else np.zeros((1, dim), np.float32)
    rel = cents[-1] - parent[:, None, :]
    out += [rel, _norms(rel), parent]
  return out


def _aligned_empty(shape: tuple[int, int]) -> np.ndarray:
  """A float32 array on a 64-byte boundary, which XLA:CPU can use without copying it."""
  size = shape[0] * shape[1] * 4
  raw = np.empty(size + 64, np.uint8)
  offset = -raw.ctypes.data % 64
  return raw[offset:offset + size].view(np.float32).reshape(shape)


def _drain(item, leaf: np.ndarray, dist: np.ndarray | None) -> None:
  start, stop, out = item
  if dist is not None:
    out, ds = out
    dist[start:stop] = np.asarray(ds)[:stop - start]
  leaf[start:stop] = np.asarray(out)[:stop - start]
