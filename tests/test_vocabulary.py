"""The visual vocabulary file: fit from a features folder, save/load, assign, inverse lookups,
embedding init, the fit and grid CLIs, and the demo world's tree-vs-exhaustive mismatch rate."""

import fractions
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import fixtures_world as fw
from vbert_jax.video import features_io
from vbert_jax.vocab import fit, grid, kmeans, vocabulary
from helpers import clustering

REPO = pathlib.Path(__file__).resolve().parents[1]


def write_folder(folder, sizes, dim=8, seed=0, groups=9, spread=30.0):
  """Videos whose clips come from `groups` well-separated blobs; returns all rows in order."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(groups, dim)) * spread
  rows = []
  for i, n in enumerate(sizes):
    f = (centres[rng.integers(0, groups, n)] + rng.normal(size=(n, dim))).astype(np.float32)
    rows.append(f)
    starts = np.arange(n) * 1.5 + 0.25 * i
    features_io.save_features(folder, features_io.VideoFeatures(
        f"video{i:02d}", f"/data/video{i:02d}.mp4", f, starts, starts + 1.5, "mean", 64))
  return np.concatenate(rows)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
  folder = tmp_path_factory.mktemp("features")
  x = write_folder(folder, [7, 12, 3, 9, 15, 6, 11, 8])
  cfg = kmeans.KMeansConfig(depth=2, branching=3, iterations=20, seed=1)
  vocab = vocabulary.VisualVocabulary.fit(folder, cfg, nearest_per_leaf=4)
  return folder, x, vocab


def test_fit_records_settings_and_statistics(fitted):
  _, x, vocab = fitted
  assert (vocab.depth, vocab.branching, vocab.seed, vocab.iterations, vocab.size) == (2, 3, 1, 20,
                                                                                       9)
  assert (vocab.dim, vocab.count) == (8, len(x))
  np.testing.assert_allclose(vocab.mean, x.astype(np.float64).mean(0), atol=1e-5)
  np.testing.assert_allclose(vocab.std, x.astype(np.float64).std(0), rtol=1e-5)
  tokens = vocab.assign(x)
  np.testing.assert_array_equal(vocab.leaf_counts, np.bincount(tokens, minlength=9))
  assert tokens.dtype == np.int32 and tokens.min() >= 0 and tokens.max() < 9
  np.testing.assert_array_equal(tokens, clustering.brute_force_leaf(x, vocab.leaves))


def test_videos_of_every_length_share_a_few_compiled_searches(fitted):
  """A dataset build assigns one video at a time: its clip count must not compile a program of
  its own. Every length from 1 to 10,000 clips falls in one of at most 8 batch sizes, and a
  4 x 12 tree compiles one search per size; each video's tokens are those of the same rows
  searched among others."""
  assert len({kmeans.batch_rows(n, kmeans.ASSIGN_BATCH, 8) for n in range(1, 10_001)}) <= 8
  assert [kmeans.batch_rows(n, 1000, 8) for n in (1, 256, 257, 999, 5000)] == [
      256, 256, 512, 1000, 1000]
  rng = np.random.default_rng(0)
  dim = 8
  centroids = [rng.normal(size=(12 ** level, 12, dim)).astype(np.float32) for level in range(4)]
  index = kmeans.TreeIndex(centroids, np.zeros(dim, np.float32), distance=False)
  x = rng.normal(size=(4097, dim)).astype(np.float32)
  everything = index.search(x)[0]
  lengths = [1, 2, 199, 256, 257, 1000, 4097]
  kmeans._descend_fn.cache_clear()  # pylint: disable=protected-access
  for n in lengths:
    np.testing.assert_array_equal(index.search(x[:n])[0], everything[:n])
  sizes = {kmeans.batch_rows(n, kmeans.ASSIGN_BATCH, 8) for n in lengths}
  compiled = kmeans._descend_fn.cache_info().currsize  # pylint: disable=protected-access
  assert compiled == len(sizes) == 4
  # The fitted vocabulary, on lengths 1..300: the brute-force nearest leaves, two programs.
  _, x, vocab = fitted
  kmeans._descend_fn.cache_clear()  # pylint: disable=protected-access
  for n in range(1, 301):
    rows = x[rng.integers(0, len(x), n)]
    np.testing.assert_array_equal(vocab.assign(rows),
                                  clustering.brute_force_leaf(rows, vocab.leaves))
  assert kmeans._descend_fn.cache_info().currsize == 2  # pylint: disable=protected-access


def test_save_load_round_trip(fitted, tmp_path):
  _, x, vocab = fitted
  path = vocab.save(tmp_path / "sub" / "vocab.npz")
  assert [p.name for p in path.parent.iterdir()] == ["vocab.npz"]  # no temporary left behind
  loaded = vocabulary.VisualVocabulary.load(path)
  for a, b in zip(vocab.centroids, loaded.centroids):
    np.testing.assert_array_equal(a, b)
  for key in ("depth", "branching", "seed", "iterations", "tol", "dim", "count"):
    assert getattr(loaded, key) == getattr(vocab, key), key
  np.testing.assert_array_equal(loaded.assign(x), vocab.assign(x))
  for t in range(9):
    assert loaded.nearest_clips(t, 4) == vocab.nearest_clips(t, 4)


def test_nearest_clips_are_the_closest_clips_of_the_token(fitted):
  folder, x, vocab = fitted
  src = kmeans.FolderSource(folder)
  tokens, dist = vocab.assign_with_distance(x)
  checked = 0
  for t in range(vocab.size):
    refs = vocab.nearest_clips(t, 4)
    mine = np.flatnonzero(tokens == t)
    assert len(refs) == min(4, len(mine))
    want = mine[np.argsort(dist[mine], kind="stable")][:4]
    rows = [int(src.offsets[src.video_ids.index(r.video_id)] + r.clip) for r in refs]
    # Clips at equal distance (the two rows of a two-row cluster) may come in either order.
    np.testing.assert_allclose(dist[rows], dist[want], rtol=1e-6)
    for ref, row in zip(refs, rows):
      assert tokens[row] == t and ref == src.clip_ref(row)
      vf = features_io.load_features(features_io.feature_path(folder, ref.video_id))
      assert ref.start == vf.starts[ref.clip] and ref.end == vf.ends[ref.clip]
      assert vocab.assign(vf.features[ref.clip:ref.clip + 1])[0] == t
      checked += 1
  assert checked >= 9
  assert vocab.nearest_clips(int(np.argmax(vocab.leaf_counts)), 2)[0].source.startswith("/data/")


def test_centroid_and_token_range(fitted):
  _, _, vocab = fitted
  np.testing.assert_array_equal(vocab.centroid(5), vocab.centroids[1][1, 2])
  with pytest.raises(ValueError, match=r"visual token 9 is outside \[0, 9\)"):
    vocab.centroid(9)
  with pytest.raises(ValueError, match=r"visual token -1 is outside"):
    vocab.nearest_clips(-1)
  top = vocab.most_frequent(3)
  assert list(vocab.leaf_counts[top]) == sorted(vocab.leaf_counts, reverse=True)[:3]


def test_wrong_width_names_both_widths(fitted):
  _, _, vocab = fitted
  with pytest.raises(ValueError, match=r"features have width 5 .*expects width 8"):
    vocab.assign(np.zeros((3, 5), np.float32))
  assert vocab.assign(np.zeros((0, 8), np.float32)).shape == (0,)


def test_newer_format_version_names_both_versions(fitted, tmp_path):
  _, _, vocab = fitted
  path = vocab.save(tmp_path / "vocab.npz")
  with np.load(path) as z:
    arrays = dict(z)
  arrays["format_version"] = np.int32(vocabulary.FORMAT_VERSION + 1)
  np.savez(tmp_path / "newer.npz", **arrays)
  with pytest.raises(ValueError, match=rf"newer.npz: vocabulary format version "
                     rf"{vocabulary.FORMAT_VERSION + 1} is newer than this code reads \(version "
                     rf"{vocabulary.FORMAT_VERSION}\)"):
    vocabulary.VisualVocabulary.load(tmp_path / "newer.npz")
  del arrays["centroids_1"]
  arrays["format_version"] = np.int32(vocabulary.FORMAT_VERSION)
  np.savez(tmp_path / "partial.npz", **arrays)
  with pytest.raises(ValueError, match="partial.npz: vocabulary file lacks key 'centroids_1'"):
    vocabulary.VisualVocabulary.load(tmp_path / "partial.npz")
  (tmp_path / "junk.npz").write_bytes(b"junk")
  with pytest.raises(ValueError, match="junk.npz: not a readable vocabulary file"):
    vocabulary.VisualVocabulary.load(tmp_path / "junk.npz")


def test_l2_vocabulary_clusters_directions_and_assigns_any_length(tmp_path):
  # Three directions, each at lengths spread over two orders of magnitude: raw k-means splits
  # on length, l2 on direction.
  rng = np.random.default_rng(4)
  axes = np.eye(8, dtype=np.float32)[:3] * 10
  label = rng.integers(0, 3, 120)
  length = np.exp(rng.uniform(np.log(0.1), np.log(10), 120)).astype(np.float32)
  x = (axes[label] + rng.normal(size=(120, 8)).astype(np.float32)) * length[:, None]
  cfg = kmeans.KMeansConfig(depth=1, branching=3, iterations=20, seed=0)
  l2 = vocabulary.VisualVocabulary.fit(x, cfg, nearest_per_leaf=2, normalize="l2")
  raw = vocabulary.VisualVocabulary.fit(x, cfg, nearest_per_leaf=2)
  assert clustering.adjusted_rand_index(l2.assign(x), label) == 1.0
  assert clustering.adjusted_rand_index(raw.assign(x), label) < 0.5
  norms = np.linalg.norm(l2.leaves, axis=1)  # means of unit rows: inside the unit ball
  assert np.all(norms <= 1 + 1e-5) and np.all(norms > 0.9), norms
  # A clip's token does not depend on its feature's length, and matches brute force on unit rows.
  np.testing.assert_array_equal(l2.assign(x * 7.5), l2.assign(x))
  unit = x / np.linalg.norm(x, axis=1, keepdims=True)
  np.testing.assert_array_equal(l2.assign(x), clustering.brute_force_leaf(unit, l2.leaves))
  loaded = vocabulary.VisualVocabulary.load(l2.save(tmp_path / "l2.npz"))
  assert loaded.normalize == "l2"
  np.testing.assert_array_equal(loaded.assign(x), l2.assign(x))
  with pytest.raises(ValueError, match=r"normalize='l1': expected one of \('none', 'l2', "):
    vocabulary.VisualVocabulary.fit(x, cfg, normalize="l1")


def test_standardized_vocabulary_clusters_low_variance_dimensions(tmp_path):
  # Three clusters about 1 apart in four dimensions (std 0.05), beside a dimension of pure
  # noise with std 10: raw k-means splits the noise, standardised k-means the clusters.
  rng = np.random.default_rng(5)
  label = rng.integers(0, 3, 150)
  centers = rng.choice([-0.5, 0.5], size=(3, 4))
  x = np.zeros((150, 6), np.float32)
  x[:, :4] = centers[label] + rng.normal(0, 0.05, (150, 4))
  x[:, 4] = rng.normal(0, 10, 150)
  x[:, 5] = 3.0  # a constant dimension: centred, never divided by zero
  cfg = kmeans.KMeansConfig(depth=1, branching=3, iterations=30, seed=0)
  std = vocabulary.VisualVocabulary.fit(x, cfg, nearest_per_leaf=2, normalize="standardize")
  raw = vocabulary.VisualVocabulary.fit(x, cfg, nearest_per_leaf=2)
  assert clustering.adjusted_rand_index(raw.assign(x), label) < 0.5
  assert clustering.adjusted_rand_index(std.assign(x), label) == 1.0
  np.testing.assert_allclose(std.input_mean, x.mean(0, dtype=np.float64), rtol=1e-6)
  np.testing.assert_allclose(std.input_std, x.std(0, dtype=np.float64), rtol=1e-4, atol=1e-6)
  assert std.input_std[5] == 0
  z = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1)
  np.testing.assert_allclose(std.mean, z.mean(0), atol=1e-5)  # statistics of the fitted space
  np.testing.assert_array_equal(std.assign(x), clustering.brute_force_leaf(z, std.leaves))
  loaded = vocabulary.VisualVocabulary.load(std.save(tmp_path / "std.npz"))
  assert loaded.normalize == "standardize"
  np.testing.assert_array_equal(loaded.input_std, std.input_std)
  np.testing.assert_array_equal(loaded.assign(x), std.assign(x))
  with np.load(tmp_path / "std.npz") as f:
    arrays = {k: v for k, v in f.items() if k != "input_std"}
  np.savez(tmp_path / "no_std.npz", **arrays)
  with pytest.raises(ValueError, match="no_std.npz: vocabulary file lacks key 'input_std'"):
    vocabulary.VisualVocabulary.load(tmp_path / "no_std.npz")


def test_version_1_file_loads_without_normalisation(fitted, tmp_path):
  _, x, vocab = fitted
  with np.load(vocab.save(tmp_path / "v2.npz")) as z:
    arrays = dict(z)
  assert str(arrays.pop("normalize")) == "none"
  arrays["format_version"] = np.int32(1)
  np.savez(tmp_path / "v1.npz", **arrays)
  old = vocabulary.VisualVocabulary.load(tmp_path / "v1.npz")
  assert old.normalize == "none"
  np.testing.assert_array_equal(old.assign(x), vocab.assign(x))


def test_visual_embedding_init(fitted, tmp_path):
  _, _, vocab = fitted
  emb = vocabulary.visual_embedding_init(vocab, 256, std=0.02, seed=3)
  assert emb.shape == (9, 256) and emb.dtype == np.float32
  assert float(emb.std()) == pytest.approx(0.02, rel=1e-5)
  np.testing.assert_array_equal(emb, vocabulary.visual_embedding_init(
      vocab.save(tmp_path / "v.npz"), 256, std=0.02, seed=3))
  assert not np.array_equal(emb, vocabulary.visual_embedding_init(vocab, 256, seed=4))
  # The projection keeps the geometry: pairwise distances stay proportional.
  leaves = vocab.leaves.astype(np.float64)
  iu = np.triu_indices(9, 1)
  d_in = np.linalg.norm(leaves[:, None] - leaves[None], axis=-1)[iu]
  d_out = np.linalg.norm(emb[:, None].astype(np.float64) - emb[None], axis=-1)[iu]
  assert np.corrcoef(d_in, d_out)[0, 1] > 0.95


def run_module(module, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                        cwd=REPO, env=env, timeout=600, check=False)


def test_fit_cli_writes_a_vocabulary_and_lists_skipped_files(tmp_path):
  folder = tmp_path / "features"
  x = write_folder(folder, [10, 20, 15, 5], dim=6, groups=4)
  (folder / "cut.npz").write_bytes(b"PK\x03\x04 truncated")
  out = run_module("vbert_jax.vocab.fit", f"--features={folder}", f"--out={tmp_path / 'v.npz'}",
                   "--depth=2", "--branching=2", "--nearest=3")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "50 clips of width 6 from 4 videos" in out.stdout
  assert "1 files skipped" in out.stdout and f"skipped {folder / 'cut.npz'}" in out.stdout
  vocab = vocabulary.VisualVocabulary.load(tmp_path / "v.npz")
  assert (vocab.size, vocab.count, vocab.nearest.video.shape) == (4, 50, (4, 3))
  assert clustering.adjusted_rand_index(vocab.assign(x), clustering.brute_force_leaf(x, vocab.leaves)) == 1
  bad = run_module("vbert_jax.vocab.fit", f"--features={tmp_path / 'none'}", "--out=x.npz")
  assert bad.returncode == 1 and "none: expected a features folder or a .npy" in bad.stderr


def test_fit_and_grid_flags_live_side_by_side(capsys):
  """Both commands define --out, in one process; each parse starts from its own defaults."""
  a = fit.parse_args(["--features=f", "--out=v.npz", "--depth", "2"])
  b = grid.parse_args(["--vocab=v.npz", "--out=g.png", "--tokens=3,17"])
  assert (a.out, a.depth, a.branching, a.normalize) == ("v.npz", 2, 12, "none")
  assert (b.out, b.tokens, b.top) == ("g.png", ["3", "17"], 12)
  assert fit.parse_args(["--features=f", "--out=w.npz"]).depth == 4
  with pytest.raises(SystemExit) as exit_info:
    fit.main(["--features=f"])
  assert exit_info.value.code == 2 and "--out" in capsys.readouterr().err


COLOURS = np.array([[220, 30, 30], [30, 200, 40], [40, 60, 230]], np.uint8)


def colour_video(folder, name, groups):
  """20 fps, one solid colour per 1.5 s clip: clip j shows COLOURS[groups[j]]."""
  def frame_fn(i, width, height):
    return np.broadcast_to(COLOURS[groups[i // 30]], (height, width, 3)).copy()
  return fw.write_video(folder / f"{name}.mp4", num_frames=30 * len(groups),
                        fps=fractions.Fraction(20), frame_fn=frame_fn).path


def test_grid_cli_shows_the_nearest_clips_middle_frames(tmp_path):
  from vbert_jax.video import reader
  videos = tmp_path / "videos"
  videos.mkdir()
  feats = tmp_path / "features"
  plan = {"a": [0, 1, 2], "b": [2, 2, 0], "c": [1, 0, 1, 2]}
  for name, groups in plan.items():
    path = colour_video(videos, name, groups)
    clips = list(reader.read_clips(path, size=32))
    f = np.stack([c.frames.reshape(-1, 3).mean(0) for c in clips]).astype(np.float32)
    features_io.save_features(feats, features_io.VideoFeatures(
        name, str(path), f, np.array([c.start for c in clips]), np.array([c.end for c in clips]),
        "mean", 32))
  vocab = vocabulary.VisualVocabulary.fit(feats, kmeans.KMeansConfig(depth=1, branching=3))
  vocab.save(tmp_path / "vocab.npz")
  out = run_module("vbert_jax.vocab.grid", f"--vocab={tmp_path / 'vocab.npz'}",
                   f"--out={tmp_path / 'grid.png'}", "--top=3", "--clips=3", "--tile=40")
  assert out.returncode == 0, out.stderr[-3000:]
  image = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB"))
  assert image.shape == (3 * 44, grid._LABEL_WIDTH + 3 * 44, 3)
  for row, token in enumerate(vocab.most_frequent(3)):
    refs = vocab.nearest_clips(int(token), 3)
    assert len(refs) == 3
    for col in range(3):
      tile = image[row * 44 + 10:row * 44 + 25, grid._LABEL_WIDTH + col * 44 + 10:
                   grid._LABEL_WIDTH + col * 44 + 30]
      group = plan[refs[col].video_id][refs[col].clip]
      assert np.abs(tile.reshape(-1, 3).mean(0) - COLOURS[group]).max() < 25, (row, col)


def test_grid_tiles_are_the_middle_frame_of_each_clip(tmp_path):
  """Frame i is grey level 4 * i: each tile's level names the frame that was drawn."""
  def frame_fn(i, width, height):
    return np.full((height, width, 3), 4 * i, np.uint8)
  path = fw.write_video(tmp_path / "ramp.mp4", num_frames=60, fps=fractions.Fraction(20),
                        frame_fn=frame_fn).path
  frames = grid.middle_frames({str(path): {0, 1}}, fps=20.0, clip_frames=30, tile=32)
  assert sorted(frames) == [(str(path), 0), (str(path), 1)]
  for clip in (0, 1):
    level = frames[(str(path), clip)].mean()
    assert abs(level - 4 * (30 * clip + 15)) < 3, (clip, level)  # frames 15 and 45


@pytest.mark.slow
def test_demo_world_tree_vs_exhaustive_mismatch_rate(tmp_path_factory):
  """Measured and reported: how often descending the tree misses the nearest leaf."""
  corpus = fw.small_corpus(tmp_path_factory)
  vocab = vocabulary.VisualVocabulary.fit(
      corpus.features_dir, kmeans.KMeansConfig(depth=3, branching=4, seed=0))
  src = kmeans.FolderSource(corpus.features_dir)
  x = src.read(0, src.num_rows)
  tree, tree_d = vocab.assign_with_distance(x)
  brute = clustering.brute_force_leaf(x, vocab.leaves)
  leaves = vocab.leaves.astype(np.float64)
  brute_d = ((x - leaves[brute]) ** 2).sum(1)
  mismatch = float(np.mean(tree != brute))
  excess = float(np.mean(tree_d) / np.mean(brute_d) - 1)
  print(f"demo world: {len(x)} clips, {vocab.size} tokens: tree leaf != nearest leaf for "
        f"{mismatch:.3f} of clips; mean squared distance {100 * excess:.2f}% above exhaustive")
  assert (tree_d >= brute_d * (1 - 1e-4) - 1e-4).all()
  assert 0 <= mismatch < 0.5
  assert (tree == vocab.assign(x)).all()
  # The grid of the demo world's tokens decodes the real videos.
  image = grid.draw_grid(vocab, vocab.most_frequent(4), clips=3, tile=32, fps=20.0,
                         clip_frames=30)
  assert image.size == (grid._LABEL_WIDTH + 3 * 36, 4 * 36)
  tiles = np.asarray(image)[:, grid._LABEL_WIDTH:]
  assert (tiles != 255).any(axis=-1).mean() > 0.5  # frames were pasted, not left blank
