"""Hierarchical k-means: planted clusters, tree vs exhaustive assignment, determinism, streaming
from disk, all devices, small nodes, empty clusters and bad inputs."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from vbert_jax.video import features_io
from vbert_jax.vocab import kmeans
from helpers import clustering


def planted_tree(depth: int, branching: int, dim: int, per_leaf: int, seed: int = 0,
                 spread: float = 8.0):
  """Points around the leaves of a planted tree: each level's offsets are `spread` times smaller
  than its parent's, so every level's clusters are well separated. Returns (x, leaf labels)."""
  rng = np.random.default_rng(seed)
  centres = np.zeros((1, dim))
  scale = spread**depth
  for _ in range(depth):
    offsets = rng.normal(size=(len(centres), branching, dim)) * scale
    centres = (centres[:, None, :] + offsets).reshape(-1, dim)
    scale /= spread
  labels = np.repeat(np.arange(len(centres)), per_leaf)
  x = centres[labels] + rng.normal(size=(len(labels), dim)) * 0.05 * spread
  perm = rng.permutation(len(labels))
  return x[perm].astype(np.float32), labels[perm]


def one_device_mesh() -> Mesh:
  return Mesh(np.array(jax.local_devices()[:1]), (kmeans.AXIS,))


# ---------------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("nodes,bsize,dim,k", [(1, 16, 16, 3), (1, 256, 16, 3),
                                               (1, 1024, 64, 12), (2, 256, 32, 4),
                                               (12, 16, 64, 12), (12, 128, 64, 12)])
def test_block_distances_match_numpy(nodes, bsize, dim, k):
  # (1, 256+) is the shape an algebraically equal form was miscompiled at; blocks of 128+ rows
  # take the rows' norms from the block builder, thinner ones sum them in the kernel.
  rng = np.random.default_rng(nodes * 1000 + bsize)
  nb = 8
  xb = rng.normal(size=(nb, bsize, dim)).astype(np.float32)
  cents = rng.normal(size=(nodes, k, dim)).astype(np.float32)
  bnode = np.sort(rng.integers(0, nodes, nb)).astype(np.int32)
  want = ((xb[:, :, None, :].astype(np.float64) - cents[bnode][:, None]) ** 2).sum(-1)
  got = np.asarray(jax.jit(kmeans._block_dist)(xb, bnode, cents, kmeans._norms(cents)))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3 * want.max())
  _, _, _, assign = kmeans._kernels(one_device_mesh())
  valid = rng.random((nb, bsize)) < 0.9
  lab, mind = assign(xb, valid, (xb * xb).sum(-1), bnode, cents, kmeans._norms(cents))
  np.testing.assert_array_equal(np.asarray(lab), want.argmin(-1))
  np.testing.assert_allclose(np.asarray(mind), np.where(valid, want.min(-1), 0), rtol=1e-4,
                             atol=1e-3 * want.max())


def test_sums_follow_the_rows_that_move():
  """Incremental Lloyd statistics: after rows move between children, every child's centroid is
  the mean of its rows (relative to its node), and an emptied child keeps its centroid."""
  rng = np.random.default_rng(2)
  x = rng.normal(size=(300, 5)).astype(np.float32)
  mesh = one_device_mesh()
  chunks = kmeans._Chunks(kmeans.ArraySource(x), 64, mesh, np.zeros(5))  # 5 chunks
  node = rng.integers(0, 3, 300).astype(np.int32)
  parent = rng.normal(size=(3, 5)).astype(np.float32)
  sums = kmeans._Sums(3, 4, 5)
  label = rng.integers(0, 4, 300).astype(np.int32)
  rows = np.arange(300)
  keys = sums.move(chunks, rows, node, np.full(300, -1), label)
  assert sorted(keys) == sorted(np.unique(node * 4 + label))
  moved = np.sort(rng.choice(300, 40, replace=False))
  new = label.copy()
  new[moved] = rng.integers(0, 4, 40)
  new[node == 2] = 0  # children 1-3 of node 2 lose all their rows
  moved = np.flatnonzero(new != label)
  sums.move(chunks, moved, node, label[moved], new[moved])
  cents = np.full((3, 4, 5), 7.0, np.float32)
  sums.update(cents, np.arange(12), parent)
  for nd in range(3):
    for c in range(4):
      sel = (node == nd) & (new == c)
      want = x[sel].astype(np.float64).mean(0) - parent[nd] if sel.any() else np.full(5, 7.0)
      np.testing.assert_allclose(cents[nd, c], want, rtol=1e-5, atol=1e-5)
  assert sums.counts.reshape(3, 4)[2].tolist() == [int(np.sum(node == 2)), 0, 0, 0]


def test_a_repeated_child_never_wins_an_assignment():
  """A child equal bit for bit to an earlier one of its node gets +inf, so ties cannot depend on
  rounding; a child equal to another node's child is not a repeat."""
  rng = np.random.default_rng(3)
  cents = rng.normal(size=(2, 4, 8)).astype(np.float32)
  cents[0, 3] = cents[0, 1]
  cents[1, 0] = cents[0, 2]
  norms = np.asarray(kmeans._norms(cents))
  assert np.isinf(norms[0, 3]) and np.isfinite(norms[0, :3]).all() and np.isfinite(norms[1]).all()
  xb = np.repeat(cents[0, 1][None, None], 4, axis=1)  # rows exactly at the repeated point
  d = np.asarray(kmeans._block_dist(xb, np.zeros(1, np.int32), cents, norms))
  assert (d.argmin(-1) == 1).all()


@pytest.mark.parametrize("layout", ["device", "host"])
def test_blocks_hold_every_row_once_and_never_mix_nodes(layout):
  rng = np.random.default_rng(0)
  n, nodes, bsize = 200, 7, 16
  x = rng.normal(size=(n, 4)).astype(np.float32)
  node = rng.integers(0, nodes, n).astype(np.int32)
  node[:3] = 2  # uneven sizes
  valid = np.arange(n) < 190
  if layout == "device":  # the assignment's grouping, one level at a time
    nb = -(-n // bsize) + nodes
    xb, vb, bnode, gidx = jax.jit(lambda *a: kmeans._local_blocks(
        *a, nodes=nodes, nb=nb, bsize=bsize))(x, node, valid)
    xb, vb, bnode, gidx = map(np.asarray, (xb, vb, bnode, gidx))
  else:  # the fit's: row indices on the host, the rows gathered on the devices
    gidx, bnode = kmeans._layout(node, valid, bsize, ndev=1)
    assert len(bnode) % kmeans._GROUP == 0
    make, _, _, _ = kmeans._kernels(one_device_mesh())
    xb, vb, xn = map(np.asarray, make(x, gidx, bnode, np.zeros((nodes, 4), np.float32)))
    np.testing.assert_allclose(xn, (xb * xb).sum(-1), rtol=1e-6)
  rows = gidx[vb]
  assert sorted(rows.tolist()) == list(range(190))
  np.testing.assert_array_equal(xb[vb], x[rows])
  block_of_row = np.broadcast_to(bnode[:, None], vb.shape)[vb]
  np.testing.assert_array_equal(block_of_row, node[rows])
  assert (xb[~vb] == 0).all()


def test_root_blocks_are_the_gathered_blocks():
  # The root level reshapes its rows into blocks instead of gathering them.
  rng = np.random.default_rng(3)
  x = rng.normal(size=(100, 8)).astype(np.float32) * 7
  parent = rng.normal(size=(1, 8)).astype(np.float32)
  gidx, bnode = kmeans._layout(np.zeros(100, np.int32), None, 32, ndev=1, bucket=False)
  make, contiguous, _, _ = kmeans._kernels(one_device_mesh())
  gathered = [np.asarray(a) for a in make(x, gidx, bnode, parent)]
  reshaped = [np.asarray(a) for a in contiguous(x, parent, len(bnode), 32)]
  assert gathered[0].shape == (4, 32, 8)
  np.testing.assert_array_equal(gathered[0], reshaped[0])
  np.testing.assert_array_equal(gathered[1], reshaped[1])
  np.testing.assert_allclose(gathered[2], reshaped[2], rtol=1e-6)  # summed in another fusion


# ---------------------------------------------------------------------------------- the fit


@pytest.fixture(scope="module")
def planted():
  return planted_tree(depth=2, branching=4, dim=24, per_leaf=60, seed=1)


@pytest.fixture(scope="module")
def planted_fit(planted):
  x, _ = planted
  cfg = kmeans.KMeansConfig(depth=2, branching=4, iterations=30, seed=0, chunk_size=4096)
  return kmeans.fit_tree(x, cfg)


def test_recovers_planted_clusters(planted, planted_fit):
  x, labels = planted
  ari = clustering.adjusted_rand_index(labels, planted_fit.leaf)
  print(f"adjusted Rand index on {len(x)} points, 16 planted leaves: {ari:.4f}")
  assert ari >= 0.99
  assert [c.shape for c in planted_fit.centroids] == [(1, 4, 24), (4, 4, 24)]
  np.testing.assert_allclose(planted_fit.mean, x.astype(np.float64).mean(0), rtol=1e-6,
                             atol=1e-6)


def test_flat_mixture_recovered():
  rng = np.random.default_rng(3)
  centres = rng.normal(size=(10, 16)) * 10
  labels = rng.integers(0, 10, 1500)
  x = (centres[labels] + rng.normal(size=(1500, 16))).astype(np.float32)
  fit = kmeans.fit_tree(x, kmeans.KMeansConfig(depth=1, branching=10, seed=2))
  assert clustering.adjusted_rand_index(labels, fit.leaf) >= 0.99


def test_tree_assignment_equals_brute_force_nearest_leaf(planted, planted_fit):
  x, _ = planted
  leaves = planted_fit.centroids[-1].reshape(-1, x.shape[1])
  brute = clustering.brute_force_leaf(x, leaves)
  leaf, dist = kmeans.descend(x, planted_fit.centroids, planted_fit.mean, batch_size=256)
  np.testing.assert_array_equal(leaf, brute)
  # Without distances the last level skips its within-node pass; the leaves are the same.
  alone, none = kmeans.descend(x, planted_fit.centroids, planted_fit.mean, batch_size=256,
                               distance=False)
  np.testing.assert_array_equal(alone, leaf)
  assert none is None
  np.testing.assert_array_equal(leaf, planted_fit.leaf)
  want = ((x.astype(np.float64) - leaves[leaf]) ** 2).sum(1)
  np.testing.assert_allclose(dist, want, rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(planted_fit.leaf_dist, want, rtol=1e-3, atol=1e-3)
  assert planted_fit.inertia[-1] == pytest.approx(want.sum(), rel=1e-4)


def test_tree_index_finds_the_nearest_leaf_on_every_search(planted, planted_fit):
  x, _ = planted
  leaves = planted_fit.centroids[-1].reshape(-1, x.shape[1])
  index = kmeans.TreeIndex(planted_fit.centroids, planted_fit.mean)
  # One prepared tree, several searches: batch size and row order change nothing.
  leaf, dist = index.search(x, batch_size=256)
  np.testing.assert_array_equal(leaf, clustering.brute_force_leaf(x, leaves))
  again, dist_again = index.search(x[::-1], batch_size=1000)
  np.testing.assert_array_equal(again[::-1], leaf)
  np.testing.assert_allclose(dist_again[::-1], dist, rtol=1e-3, atol=1e-3)
  want = ((x.astype(np.float64) - leaves[leaf]) ** 2).sum(1)
  np.testing.assert_allclose(dist, want, rtol=1e-3, atol=1e-3)
  with pytest.raises(ValueError, match=f"expects \\[N, {x.shape[1]}\\]"):
    index.search(x[:, :-1])


def test_deterministic_for_a_seed():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(700, 8)).astype(np.float32)  # no structure: the seed decides
  cfg = kmeans.KMeansConfig(depth=2, branching=3, iterations=10, seed=7, chunk_size=4096)
  a, b = kmeans.fit_tree(x, cfg), kmeans.fit_tree(x, cfg)
  for ca, cb in zip(a.centroids, b.centroids):
    np.testing.assert_array_equal(ca, cb)
  np.testing.assert_array_equal(a.leaf, b.leaf)
  c = kmeans.fit_tree(x, kmeans.KMeansConfig(depth=2, branching=3, iterations=10, seed=8,
                                             chunk_size=4096))
  assert not np.array_equal(a.centroids[0], c.centroids[0])


def test_fit_ends_at_a_fixed_point_of_lloyd_at_every_level():
  # With tol=0 every node iterates until its assignment stops changing (nodes that settle early
  # leave the passes): each centroid is then the mean of its rows, and each row's child is the
  # nearest child of its node.
  rng = np.random.default_rng(11)
  x = rng.normal(size=(900, 6)).astype(np.float32)
  fit = kmeans.fit_tree(x, kmeans.KMeansConfig(depth=3, branching=3, iterations=200, tol=0.0,
                                               seed=4))
  assert max(fit.iterations_run) < 200
  x64 = x.astype(np.float64)
  for level, cents in enumerate(fit.centroids):
    node = fit.leaf // 3**(3 - level)  # node of each row at this level ...
    child = fit.leaf // 3**(2 - level) % 3  # ... and its child there
    d = ((x64[:, None, :] - cents[node]) ** 2).sum(-1)
    np.testing.assert_array_equal(child, d.argmin(1))
    for nd in np.unique(node):
      for c in np.unique(child[node == nd]):
        rows = (node == nd) & (child == c)
        np.testing.assert_allclose(cents[nd, c], x64[rows].mean(0), rtol=1e-4, atol=1e-4)


def test_streaming_from_disk_matches_in_memory(planted, tmp_path):
  x, _ = planted
  x16 = x.astype(np.float16)
  np.save(tmp_path / "features.npy", x16)
  cfg = kmeans.KMeansConfig(depth=2, branching=4, iterations=30, seed=0)
  in_memory = kmeans.fit_tree(x16.astype(np.float32), cfg)
  # 7 chunks of 144 rows (8 devices x 18), the last one partial.
  streamed = kmeans.fit_tree(str(tmp_path / "features.npy"),
                             kmeans.KMeansConfig(depth=2, branching=4, iterations=30, seed=0,
                                                 chunk_size=140))
  assert streamed.num_rows == len(x)
  np.testing.assert_array_equal(streamed.leaf, in_memory.leaf)
  for level in range(2):
    np.testing.assert_allclose(streamed.centroids[level], in_memory.centroids[level],
                               rtol=1e-4, atol=1e-3)
  assert streamed.inertia[-1] == pytest.approx(in_memory.inertia[-1], rel=1e-4)


def test_float16_array_source_reads_into_a_given_float32_array(tmp_path):
  x = np.random.default_rng(1).normal(size=(9, 5)).astype(np.float16)
  np.save(tmp_path / "x.npy", x)
  src = kmeans.ArraySource.from_npy(tmp_path / "x.npy")
  out = np.full((6, 5), np.nan, np.float32)
  assert src.read(2, 8, out=out) is out
  np.testing.assert_array_equal(out, x[2:8].astype(np.float32))
  np.testing.assert_array_equal(src.read(2, 8), out)


def test_features_folder_source_streams_every_clip(tmp_path, monkeypatch):
  """The folder is laid out from the files' headers; the arrays are read by the passes."""
  rng = np.random.default_rng(0)
  parts = []
  for i, n in enumerate([5, 1, 9, 4]):
    f = rng.normal(size=(n, 6)).astype(np.float16)
    parts.append(f.astype(np.float32))
    features_io.save_features(tmp_path, features_io.VideoFeatures(
        f"v{i}", f"/videos/v{i}.mp4", f, np.arange(n) * 1.5, np.arange(n) * 1.5 + 1.5, "mean",
        64))
  (tmp_path / "broken.npz").write_bytes(b"not a zip")
  features_io.save_features(tmp_path, features_io.VideoFeatures(
      "wide", "/videos/wide.mp4", np.zeros((3, 7), np.float32), np.zeros(3), np.ones(3),
      "mean", 64))
  (tmp_path / "cut.npz").write_bytes((tmp_path / "v0.npz").read_bytes()[:-40])  # truncated
  load = features_io.load_features
  with monkeypatch.context() as m:
    m.setattr(features_io, "load_features", lambda path: pytest.fail(f"{path} read whole"))
    src = kmeans.FolderSource(tmp_path)
  assert kmeans.features_io.load_features is load
  for path in src.paths:
    index, whole = features_io.load_index(path), load(path)
    assert index.shape == whole.features.shape and index.video_id == whole.video_id
    np.testing.assert_array_equal(index.ends, whole.ends)
  want = np.concatenate(parts)
  assert (src.num_rows, src.dim) == (19, 6)
  np.testing.assert_array_equal(src.read(3, 17), want[3:17])
  out = np.full((14, 6), np.nan, np.float32)
  assert src.read(3, 17, out=out) is out
  np.testing.assert_array_equal(out, want[3:17])
  rows = np.array([18, 0, 6, 5, 6])
  np.testing.assert_array_equal(src.take(rows), want[rows])
  ref = src.clip_ref(7)
  assert (ref.video_id, ref.source, ref.clip, ref.start, ref.end) == (
      "v2", "/videos/v2.mp4", 1, 1.5, 3.0)
  reasons = dict(src.skipped)
  for name in ("broken.npz", "cut.npz"):
    assert "not a readable feature file" in reasons[str(tmp_path / name)]
  assert reasons[str(tmp_path / "wide.npz")] == "feature width 7, expected 6"


def test_all_devices_give_the_single_device_result(planted, planted_fit):
  x, _ = planted
  assert jax.local_device_count() == 8
  cfg = kmeans.KMeansConfig(depth=2, branching=4, iterations=30, seed=0, chunk_size=4096)
  single = kmeans.fit_tree(x, cfg, mesh=one_device_mesh())
  np.testing.assert_array_equal(single.leaf, planted_fit.leaf)
  assert single.inertia[-1] == pytest.approx(planted_fit.inertia[-1], rel=1e-4)


def test_nodes_with_fewer_points_than_branches_keep_a_complete_tree():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(20, 5)).astype(np.float32)
  fit = kmeans.fit_tree(x, kmeans.KMeansConfig(depth=3, branching=6, iterations=10, seed=0))
  assert [c.shape for c in fit.centroids] == [(1, 6, 5), (6, 6, 5), (36, 6, 5)]
  assert all(np.isfinite(c).all() for c in fit.centroids)
  # Every point ends up alone (or with its duplicates) in a leaf: no leaf error remains.
  np.testing.assert_allclose(fit.leaf_dist, 0, atol=1e-5)
  assert len(np.unique(fit.leaf)) == 20
  leaf, _ = kmeans.descend(x, fit.centroids, fit.mean)
  np.testing.assert_array_equal(leaf, fit.leaf)
  # A node without points (below a repeated child) copies its own centroid to all children.
  level1 = fit.centroids[1]
  counts = np.bincount(fit.leaf // 6, minlength=36)
  empty = np.flatnonzero(counts == 0)
  assert len(empty) > 0
  for node in empty:
    parent = fit.centroids[1].reshape(-1, 5)[node]
    np.testing.assert_allclose(fit.centroids[2][node], np.broadcast_to(parent, (6, 5)),
                               atol=1e-5)
  assert level1.shape == (6, 6, 5)


def test_empty_cluster_moves_to_the_farthest_point_of_its_node():
  x = np.array([[0.0], [1.0], [10.0], [50.0], [51.0], [90.0]], np.float32)
  chunks = kmeans._Chunks(kmeans.ArraySource(x), 64, one_device_mesh(), np.zeros(1))
  node = np.array([0, 0, 0, 1, 1, 1])
  dist = np.array([0.0, 1.0, 4.0, 0.0, 1.0, 9.0], np.float32)
  cents = np.zeros((2, 3, 1), np.float32)
  counts = np.array([[3, 0, 0], [3, 0, 5]])
  parent = np.array([[0.0], [40.0]], np.float32)
  label = np.array([0, 0, 0, 2, 0, 2])
  moved = kmeans._reseed_empty(cents, counts, node, label, dist, chunks, parent)
  assert moved.tolist() == [True, True]
  np.testing.assert_array_equal(cents[0, :, 0], [0.0, 10.0, 1.0])
  np.testing.assert_array_equal(cents[1, :, 0], [0.0, 50.0, 0.0])  # 90, relative to 40
  # A row alone in its cluster is not moved to: that would only repeat it.
  cents[:] = 0
  counts = np.array([[3, 0, 0], [3, 0, 1]])
  label = np.array([0, 0, 0, 0, 0, 2])
  moved = kmeans._reseed_empty(cents, counts, node, label, dist, chunks, parent,
                               skip=np.array([True, False]))
  assert moved.tolist() == [False, True]
  np.testing.assert_array_equal(cents[0, :, 0], [0.0, 0.0, 0.0])  # skipped
  np.testing.assert_array_equal(cents[1, :, 0], [0.0, 11.0, 0.0])  # 51, not 90


# ---------------------------------------------------------------------------------- helpers


def test_adjusted_rand_index_reference_values():
  # Values from scikit-learn's adjusted_rand_score documentation.
  assert clustering.adjusted_rand_index([0, 0, 1, 1], [1, 1, 0, 0]) == pytest.approx(1.0)
  assert clustering.adjusted_rand_index([0, 0, 1, 2], [0, 0, 1, 1]) == pytest.approx(0.5714285714)
  assert clustering.adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(-0.5)
  assert clustering.adjusted_rand_index([0, 0, 0, 0], [0, 1, 2, 3]) == pytest.approx(0.0)


# ---------------------------------------------------------------------------------- bad input


def test_bad_inputs_are_named(tmp_path):
  with pytest.raises(ValueError, match=r"features must be \[rows, dim\], got shape \(5,\)"):
    kmeans.ArraySource(np.zeros(5, np.float32))
  with pytest.raises(ValueError, match="float16/float32, got int64"):
    kmeans.ArraySource(np.zeros((5, 2), np.int64))
  (tmp_path / "notes.txt").write_text("x")
  with pytest.raises(ValueError, match="notes.txt: expected a features folder or a .npy"):
    kmeans.open_source(tmp_path / "notes.txt")
  (tmp_path / "bad.npy").write_bytes(b"garbage")
  with pytest.raises(ValueError, match="bad.npy: not a readable .npy"):
    kmeans.open_source(tmp_path / "bad.npy")
  with pytest.raises(ValueError, match="empty: no readable feature files"):
    (tmp_path / "empty").mkdir()
    kmeans.open_source(tmp_path / "empty")
  with pytest.raises(ValueError, match="k-means depth must be at least 1, got 0"):
    kmeans.fit_tree(np.zeros((4, 2), np.float32), kmeans.KMeansConfig(depth=0))
  with pytest.raises(ValueError, match="branching must be at least 2, got 1"):
    kmeans.fit_tree(np.zeros((4, 2), np.float32), kmeans.KMeansConfig(branching=1))
  with pytest.raises(ValueError, match=r"seed_sample must be at least branching \(12\), got 4"):
    kmeans.fit_tree(np.zeros((4, 2), np.float32), kmeans.KMeansConfig(seed_sample=4))
  x = np.zeros((10, 3), np.float32)
  x[6, 1] = np.nan
  with pytest.raises(ValueError, match="feature row 6 is not finite"):
    kmeans.fit_tree(x, kmeans.KMeansConfig(depth=1, branching=2))
