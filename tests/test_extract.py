"""Feature extraction: batched S3D over devices, per-video files, resume, bad input, sharding,
and how well random-init S3D features separate the demo world's steps (1-NN)."""

from __future__ import annotations

import fractions
import glob
import multiprocessing
import os
import pathlib
import re
import shutil

import jax
import numpy as np
import pytest

import fixtures_world as fw
from helpers import decode_faults
from vbert_jax.demo.world import corpus as demo_corpus
from vbert_jax.demo import world as demo_world
from vbert_jax.video import decode_pool
from vbert_jax.video import extract
from vbert_jax.video import features_io
from vbert_jax.video import reader
from vbert_jax.video import s3d

F = fractions.Fraction
SIZE = 64
BATCH = fw.EXTRACT_BATCH
X264 = {"crf": "18", "preset": "ultrafast"}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
  folder = tmp_path_factory.mktemp("media")
  good = {
      "three_clips": fw.write_video(folder / "three_clips.mp4", fps=F(25), num_frames=120,
                                    options=X264),  # 4.8 s
      "one_clip": fw.write_video(folder / "one_clip.webm", fps=F(30), num_frames=50,
                                 codec="libvpx-vp9", options={"deadline": "realtime",
                                                              "cpu-used": "8"}),
      "too_short": fw.write_video(folder / "too_short.mp4", fps=F(20), num_frames=20,
                                  options=X264),
  }
  bad = fw.write_bad_files(folder / "bad", good["three_clips"].path)
  return folder, good, bad


@pytest.fixture(scope="module")
def variables():
  return s3d.init_params(0, SIZE)


def _direct(variables, paths) -> np.ndarray:
  """The compiled S3D step applied to the clips of `paths` in one batch, without the
  extractor's decoding thread, batch assembly across videos or bookkeeping."""
  clips = np.stack([c.frames for p in paths for c in reader.read_clips(p, size=SIZE)])
  run, per_batch = extract.make_embedder(variables, BATCH)
  assert len(clips) <= per_batch
  return np.asarray(run(clips))[:len(clips)]


def test_extracts_every_video_and_skips_bad_ones(media, variables, tmp_path, capsys):
  folder, good, bad = media
  paths = [v.path for v in good.values()] + list(bad.values())
  summary = extract.extract_features(paths, tmp_path, variables=variables, image_size=SIZE,
                                     batch_size=BATCH, dtype="float32", progress=False)
  print(summary.format())
  assert sorted(summary.written) == ["one_clip", "three_clips", "too_short"]
  assert summary.no_clips == ["too_short"] and summary.num_clips == 4
  assert not summary.random_weights
  reasons = dict(summary.skipped)
  assert set(reasons) == {str(p) for p in bad.values()}
  assert "empty file" in reasons[str(bad["empty"])]
  assert "no video stream" in reasons[str(bad["audio_only"])]
  assert "not a readable media file" in reasons[str(bad["truncated"])]
  text = summary.format()
  for path, reason in summary.skipped:
    assert f"skipped {path}: {reason}" in text
  # Only finished files, and no partial output for the bad inputs.
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "one_clip.npz", "three_clips.npz", "too_short.npz"]

  vf = features_io.load_features(tmp_path / "three_clips.npz")
  assert vf.features.shape == (3, 1024) and vf.features.dtype == np.float32
  np.testing.assert_allclose(vf.starts, [0.0, 1.5, 3.0])
  np.testing.assert_allclose(vf.ends, [1.5, 3.0, 4.5])
  assert vf.source == str(good["three_clips"].path) and vf.image_size == SIZE
  assert vf.pooling == s3d.pooling_mode(30, SIZE, SIZE)
  # Each row is its own clip's feature, whatever shared its batch.
  names = ("three_clips", "one_clip")
  got = np.concatenate([features_io.load_features(tmp_path / f"{n}.npz").features for n in names])
  want = _direct(variables, [good[n].path for n in names])
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
  assert features_io.load_features(tmp_path / "too_short.npz").features.shape == (0, 1024)


def test_resumes_without_redoing(media, variables, tmp_path):
  _, good, _ = media
  paths = [good["one_clip"].path, good["three_clips"].path]
  first = extract.extract_features(paths[:1], tmp_path, variables=variables, image_size=SIZE,
                                   batch_size=BATCH, progress=False)
  assert first.written == ["one_clip"]
  mtime = (tmp_path / "one_clip.npz").stat().st_mtime_ns
  second = extract.extract_features(paths, tmp_path, variables=variables, image_size=SIZE,
                                    batch_size=BATCH, progress=False)
  assert second.already_done == ["one_clip"] and second.written == ["three_clips"]
  assert (tmp_path / "one_clip.npz").stat().st_mtime_ns == mtime
  assert features_io.load_features(tmp_path / "three_clips.npz").features.dtype == np.float16


def test_shards_split_the_list(media, variables, tmp_path):
  _, good, _ = media
  paths = [v.path for v in good.values()]
  written = []
  for i in range(2):
    s = extract.extract_features(paths, tmp_path / str(i), variables=variables, image_size=SIZE,
                                 batch_size=BATCH, shard_index=i, num_shards=2, progress=False)
    written.append(set(s.written))
  assert written[0].isdisjoint(written[1])
  assert written[0] | written[1] == {"one_clip", "three_clips", "too_short"}
  assert len(written[0]) == 2  # sorted list, every second file
  with pytest.raises(ValueError, match="shard_index 2 / num_shards 2"):
    extract.extract_features(paths, tmp_path, shard_index=2, num_shards=2)


def test_shards_default_to_the_jax_process_and_progress_shows(media, variables, tmp_path,
                                                             monkeypatch, capsys):
  """Host 1 of 2 (as JAX reports it) takes every second video of the sorted list, and the
  progress bar counts the videos."""
  _, good, _ = media
  paths = [v.path for v in good.values()]
  monkeypatch.setattr(extract.jax, "process_index", lambda: 1)
  monkeypatch.setattr(extract.jax, "process_count", lambda: 2)
  s = extract.extract_features(paths, tmp_path, variables=variables, image_size=SIZE,
                               batch_size=BATCH, progress=True)
  second = sorted(p.stem for p in sorted(paths)[1::2])
  assert sorted(s.written) == second
  err = capsys.readouterr().err
  assert "S3D features" in err and f"{len(second)}/{len(second)}" in err, err[-500:]


def test_duplicate_ids_and_bad_dtype(media, variables, tmp_path):
  _, good, _ = media
  copy = tmp_path / "other" / "three_clips.mkv"
  copy.parent.mkdir()
  copy.write_bytes(good["too_short"].path.read_bytes())
  s = extract.extract_features([good["three_clips"].path, copy], tmp_path / "out",
                               variables=variables, image_size=SIZE, batch_size=BATCH,
                               progress=False)
  assert len(s.written) == 1 and len(s.skipped) == 1
  assert "duplicate video id 'three_clips'" in s.skipped[0][1]
  with pytest.raises(ValueError, match="dtype 'int8'"):
    extract.extract_features([copy], tmp_path / "x", dtype="int8")


def test_cli_random_weights_warning_and_weights_file(media, tmp_path, capsys):
  folder, good, _ = media
  args = [f"--videos={folder}/*.mp4", f"--videos={folder}/*.webm", f"--out={tmp_path}/a",
          f"--image_size={SIZE}", f"--batch_size={BATCH}", "--no_progress"]
  assert extract.main(args) == 0
  out, err = capsys.readouterr()
  assert "RANDOMLY INITIALISED S3D" in err
  assert "extracted 3 videos (4 clips" in out and "[RANDOM S3D WEIGHTS]" in out
  # The same random weights saved to a file give the same features, without the warning.
  weights = s3d.save_params(tmp_path / "s3d.msgpack", s3d.init_params(0, SIZE))
  list_file = tmp_path / "videos.txt"
  list_file.write_text(f"{good['three_clips'].path}\n")
  assert extract.main([f"--videos={list_file}", f"--out={tmp_path}/b", f"--s3d_weights={weights}",
                       f"--image_size={SIZE}", f"--batch_size={BATCH}", "--no_progress"]) == 0
  out, err = capsys.readouterr()
  assert "RANDOM" not in err + out and "extracted 1 videos (3 clips" in out
  a = features_io.load_features(tmp_path / "a" / "three_clips.npz").features
  b = features_io.load_features(tmp_path / "b" / "three_clips.npz").features
  np.testing.assert_array_equal(a, b)
  assert a.dtype == np.float16
  assert extract.main([f"--videos={folder}/*.avi", f"--out={tmp_path}/c"]) == 2
  assert "matches no file" in capsys.readouterr().err


def test_uses_every_local_device(variables):
  n = jax.local_device_count()
  run, per_batch = extract.make_embedder(variables, batch_size=BATCH - n + 1)
  assert per_batch == BATCH  # rounded up to a multiple of the device count
  out = run(np.zeros((2, 30, SIZE, SIZE, 3), np.uint8))
  assert out.shape == (per_batch, 1024)
  assert len(out.sharding.device_set) == n


def _nearest_neighbour(train: np.ndarray, test: np.ndarray) -> np.ndarray:
  """Index of each test row's most cosine-similar train row."""
  a = train / np.linalg.norm(train, axis=1, keepdims=True)
  b = test / np.linalg.norm(test, axis=1, keepdims=True)
  return np.argmax(b @ a.T, axis=1)


def test_random_s3d_features_separate_the_steps(tmp_path_factory):
  """1-NN over held-out videos: the ceiling that zero-shot results are compared with."""
  clips = demo_corpus.load_clips(fw.small_corpus(tmp_path_factory))
  train, val = ~clips.is_val, clips.is_val
  assert val.sum() >= 30 and train.sum() >= 60
  nearest = _nearest_neighbour(clips.features[train], clips.features[val])
  verb_acc = float(np.mean(clips.verbs[train][nearest] == clips.verbs[val]))
  noun_acc = float(np.mean(clips.nouns[train][nearest] == clips.nouns[val]))
  verb_chance = 1 / len(demo_world.VERBS)
  noun_chance = 1 / len(demo_world.NOUNS)
  print(f"1-NN on {val.sum()} held-out clips ({train.sum()} train), random-init S3D at {SIZE} px: "
        f"verb {verb_acc:.3f} (chance {verb_chance:.3f}), noun {noun_acc:.3f} "
        f"(chance {noun_chance:.3f})")
  assert verb_acc >= 2 * verb_chance
  assert noun_acc >= 2 * noun_chance


def test_failure_after_some_batches_leaves_no_file(media, variables, tmp_path, monkeypatch):
  """A video that breaks after 20 clips (one full batch already computed) is skipped whole,
  and the video decoded after it is unaffected."""
  _, good, _ = media
  real_read = reader.read_clips

  def read_clips(path, **kw):
    if "breaks" not in str(path):
      yield from real_read(path, **kw)
      return
    for i in range(20):
      frames = np.full((30, SIZE, SIZE, 3), i * 10, np.uint8)
      yield reader.Clip(frames, 1.5 * i, 1.5 * i + 1.5, i)
    raise reader.VideoReadError(path, "decoding failed near 30.00 s (FFmpeg: test)")

  monkeypatch.setattr(extract.reader, "read_clips", read_clips)
  broken = tmp_path / "a_breaks.mp4"
  s = extract.extract_features([broken, good["three_clips"].path], tmp_path / "out",
                               variables=variables, image_size=SIZE, batch_size=BATCH,
                               dtype="float32", progress=False)
  assert s.skipped == [(str(broken), "decoding failed near 30.00 s (FFmpeg: test)")]
  assert s.written == ["three_clips"] and s.num_clips == 3
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["three_clips.npz"]
  got = features_io.load_features(tmp_path / "out" / "three_clips.npz").features
  np.testing.assert_allclose(got, _direct(variables, [good["three_clips"].path]), rtol=2e-4,
                             atol=2e-4 * np.abs(got).max())


# ------------------------------------------------------------------------ decode worker processes


@pytest.fixture(scope="module")
def many(media, tmp_path_factory):
  """Nine videos (20 clips, so batches of 16 straddle videos) and two bad files, by name in the
  order the extractor sorts them."""
  _, good, bad = media
  folder = tmp_path_factory.mktemp("many")
  sources = {"three_clips": good["three_clips"].path, "one_clip": good["one_clip"].path,
             "too_short": good["too_short"].path, "truncated": bad["truncated"],
             "empty": bad["empty"]}
  names = ["a_three_clips", "b_one_clip", "c_three_clips", "d_truncated", "e_three_clips",
           "f_too_short", "g_three_clips", "h_one_clip", "i_three_clips", "j_empty",
           "k_three_clips"]
  paths = []
  for name in names:
    source = sources[name.split("_", 1)[1]]
    paths.append(folder / f"{name}{source.suffix}")
    shutil.copyfile(source, paths[-1])
  return paths


@pytest.fixture(scope="module")
def many_reference(many, variables, tmp_path_factory):
  """`many` extracted in this process's thread (no workers): (folder, summary)."""
  folder = tmp_path_factory.mktemp("many_reference")
  return folder, _run(many, folder, variables)


def _run(paths, out, variables, **kw):
  return extract.extract_features(paths, out, variables=variables, image_size=SIZE,
                                   batch_size=BATCH, dtype="float32", progress=False, **kw)


def _files(folder) -> dict[str, features_io.VideoFeatures]:
  return {p.stem: features_io.load_features(p) for p in sorted(folder.glob("*.npz"))}


def _assert_same_files(a, b):
  fa, fb = _files(a), _files(b)
  assert sorted(fa) == sorted(fb)
  for key in fa:
    for field in ("features", "starts", "ends"):
      x, y = getattr(fa[key], field), getattr(fb[key], field)
      assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), (key, field)
    assert fa[key].source == fb[key].source


def _our_shared_memory() -> list[str]:
  return glob.glob(f"/dev/shm/{decode_pool.SHM_PREFIX}{os.getpid()}_*")


def test_reader_threads_option_gives_the_same_clips(media):
  path = media[1]["three_clips"].path
  auto = list(reader.read_clips(path, size=SIZE))
  single = list(reader.read_clips(path, size=SIZE, threads=1))
  assert len(auto) == len(single) == 3
  for a, b in zip(auto, single):
    np.testing.assert_array_equal(a.frames, b.frames)
    assert (a.start, a.end, a.index) == (b.start, b.end, b.index)
  with pytest.raises(ValueError, match="threads=0"):
    reader.read_clips(path, threads=0)


def test_decode_workers_write_the_same_files(many, many_reference, variables, tmp_path):
  """0 (in-process), 1 and 2 workers fill the same batches: the files are equal to the bit."""
  folder, summary = many_reference
  summaries = {n: _run(many, tmp_path / str(n), variables, decode_workers=n, decode_slots=4)
               for n in (1, 2)}
  for n in (1, 2):
    _assert_same_files(folder, tmp_path / str(n))
    assert summaries[n].skipped == summary.skipped
    assert summaries[n].written == summary.written
  assert len(summaries[2].written) == 9 and summaries[2].num_clips == 20
  assert {os.path.basename(p) for p, _ in summaries[2].skipped} == {"d_truncated.mp4",
                                                                   "j_empty.mp4"}
  assert not _our_shared_memory() and not multiprocessing.active_children()


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
def test_stopped_run_frees_shared_memory_and_resumes_alike(many, many_reference, variables,
                                                           tmp_path, monkeypatch, error):
  """Ctrl-C (or a failed write) after two files: the workers and their shared memory are gone,
  and the finished files stay; after Ctrl-C, resuming with 1 or 2 workers writes the same
  files."""
  real_write = extract._write
  seen = []

  def write(*args, **kw):
    seen.append(_our_shared_memory())
    if len(seen) == 3:
      raise error("stopped here")
    real_write(*args, **kw)

  monkeypatch.setattr(extract, "_write", write)
  with pytest.raises(error, match="stopped here"):
    _run(many, tmp_path / "part", variables, decode_workers=2, decode_slots=4)
  monkeypatch.undo()
  assert len(seen[0]) == 2  # one block per worker while it ran
  assert not _our_shared_memory() and not multiprocessing.active_children()
  assert sorted(p.name for p in (tmp_path / "part").iterdir()) == ["a_three_clips.npz",
                                                                   "b_one_clip.npz"]
  if error is not KeyboardInterrupt:
    return
  for n in (1, 2):
    shutil.copytree(tmp_path / "part", tmp_path / f"resumed{n}")
    s = _run(many, tmp_path / f"resumed{n}", variables, decode_workers=n, decode_slots=4)
    assert s.already_done == ["a_three_clips", "b_one_clip"] and len(s.written) == 7
  _assert_same_files(tmp_path / "resumed1", tmp_path / "resumed2")
  # Other batches than a run from the start, so the same features only up to rounding.
  whole, resumed = _files(many_reference[0]), _files(tmp_path / "resumed2")
  assert sorted(whole) == sorted(resumed)
  for key, vf in whole.items():
    np.testing.assert_array_equal(vf.starts, resumed[key].starts)
    np.testing.assert_allclose(resumed[key].features, vf.features, rtol=2e-4,
                               atol=2e-4 * max(1.0, float(np.abs(vf.features).max(initial=0))))


def test_dead_worker_fails_its_video_and_is_replaced(many, media, variables, tmp_path):
  """A worker killed by SIGKILL in the middle of a video, one that exits before its first clip,
  a decode function that raises and one that hangs: each fails its own video, named with the
  reason; a new worker decodes the videos after the ones that killed it (or that it was killed
  on); nothing partial is written."""
  folder = tmp_path / "videos"
  folder.mkdir()
  for path in many:
    shutil.copyfile(path, folder / path.name)
  three = media[1]["three_clips"].path
  # Sorted among the others: worker 0 dies on video 2, worker 1 on video 5 and hangs on video 11
  # (of 15).
  faulty = {name: folder / name
            for name in ("c_killed_.mp4", "e_exits_.mp4", "g_raises_.mp4", "i_hangs_.mp4")}
  for path in faulty.values():
    shutil.copyfile(three, path)
  paths = sorted(folder.iterdir())
  # A clip of these small videos decodes in milliseconds; 5 s is a hang even on a busy machine.
  runs = {n: _run(paths, tmp_path / str(n), variables, decode_workers=n, decode_slots=4,
                  decode=decode_faults.read_clips, decode_stall_seconds=5) for n in (1, 2)}
  s = runs[2]
  reasons = {pathlib.Path(p).name: reason for p, reason in s.skipped}
  assert sorted(reasons) == ["c_killed_.mp4", "d_truncated.mp4", "e_exits_.mp4",
                             "g_raises_.mp4", "i_hangs_.mp4", "j_empty.mp4"]
  assert re.fullmatch(r"the decode worker died while reading c_killed_\.mp4 \(pid \d+ was "
                      r"killed by SIGKILL\); a new worker took over its remaining videos",
                      reasons["c_killed_.mp4"])
  assert re.search(r"died while reading e_exits_\.mp4 \(pid \d+ exited with status 3\)",
                   reasons["e_exits_.mp4"])
  assert reasons["g_raises_.mp4"] == "RuntimeError: decoder broke in g_raises_.mp4"
  assert reasons["i_hangs_.mp4"] == ("the decode worker made no progress on i_hangs_.mp4 for 5 s "
                                     "and was killed; a new worker took over its remaining videos")
  good = [p.stem for p in many if "truncated" not in p.name and "empty" not in p.name]
  assert sorted(s.written) == good and s.num_clips == 20
  assert sorted(p.stem for p in (tmp_path / "2").iterdir()) == good
  without_pids = [[(p, re.sub(r"pid \d+", "pid", r)) for p, r in runs[n].skipped] for n in (1, 2)]
  assert without_pids[0] == without_pids[1]
  _assert_same_files(tmp_path / "1", tmp_path / "2")
  assert not _our_shared_memory() and not multiprocessing.active_children()


def test_pool_settings_are_checked_before_any_worker_starts(many):
  for kw in (dict(workers=0, slots=4), dict(workers=2, slots=0),
             dict(workers=2, slots=4, stall_seconds=0.0)):
    with pytest.raises(ValueError, match="expected at least 1 worker and 1 slot, and a positive "
                                         "stall limit"):
      decode_pool.DecodePool(many, **kw)
  assert not _our_shared_memory() and not multiprocessing.active_children()


def test_cli_decode_workers(many, tmp_path, capsys):
  args = [f"--videos={many[0].parent}/*", f"--image_size={SIZE}", f"--batch_size={BATCH}",
          "--no_progress"]
  assert extract.main(args + [f"--out={tmp_path}/a", "--decode_workers=2"]) == 0
  out, _ = capsys.readouterr()
  assert "extracted 9 videos (20 clips" in out and "2 skipped" in out
  # Slots that /dev/shm cannot hold are refused before any worker starts.
  assert extract.main(args + [f"--out={tmp_path}/b", "--decode_workers=2",
                              f"--decode_slots={10**9}"]) == 2
  err = capsys.readouterr().err
  assert "shared memory: 2 decode workers x 1000000000 slots need" in err and "--shm-size" in err
  assert not (tmp_path / "b").exists() or not list((tmp_path / "b").iterdir())
