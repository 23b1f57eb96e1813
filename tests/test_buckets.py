"""A corpus in a bucket: pairing, transcripts and feature files go through `etils.epath`.

epath's own test double (`epath.testing.mock_epath`) serves `gs://bucket/...` from a local
folder, and records every path that reaches it: the records made from the bucket must equal those
made from the same files on disk, and every file must have been read as a `gs://` path.
"""

from __future__ import annotations

import pathlib
import shutil
from unittest import mock

import numpy as np
import pytest
from etils import epath
from etils.epath import gpath
from etils.epath import testing as epath_testing

from vbert_jax import align
from vbert_jax import records
from vbert_jax.video import features_io

REPO = pathlib.Path(__file__).resolve().parents[1]
DUMMY = REPO / "data" / "videobert" / "dummy_data"
BUCKET = "gs://bucket"


@pytest.fixture
def bucket(tmp_path):
  """gs://bucket/... served from tmp_path/bucket; yields the list of gs:// paths touched."""
  root = tmp_path / "bucket"
  root.mkdir()
  touched: list[str] = []

  def local(path) -> str:
    text = str(path)
    if not text.startswith(BUCKET):
      return text
    touched.append(text)
    return str(root) + text[len(BUCKET):]

  def remote(path: str) -> str:
    return BUCKET + path[len(str(root)):] if path.startswith(str(root)) else path

  def on_local(original, path, *args, **kwargs):
    return original(local(path), *args, **kwargs)

  def glob(original, pattern):
    return [remote(p) for p in original(local(pattern))]

  def replace(original, path, dst, *args, **kwargs):
    return original(local(path), local(dst), *args, **kwargs)

  # With TensorFlow installed, epath 1.15 sends gs:// to its TF backend before it looks at the
  # table that mock_epath replaces.
  with mock.patch.object(gpath, "_is_tf_installed", lambda: False), epath_testing.mock_epath(
      open=on_local, exists=on_local, isdir=on_local, listdir=on_local, makedirs=on_local,
      mkdir=on_local, remove=on_local, stat=on_local, glob=glob, replace=replace,
      rename=replace):
    yield root, touched


def test_records_from_a_bucket_equal_those_from_disk(bucket):
  root, touched = bucket
  for name in ("transcripts", "features"):
    shutil.copytree(DUMMY / name, root / "corpus" / name)
  settings = records.RecordSettings(
      vocabulary=str(DUMMY / "visual_vocab.npz"), tokenizer="wordpiece",
      tokenizer_file=str(DUMMY / "vocab.txt"))
  maker = settings.maker()

  def make_all(corpus: str) -> dict[str, align.VideoRecord]:
    pairing = records.pair_inputs(f"{corpus}/transcripts", features_dir=f"{corpus}/features")
    return {item.video_id: maker.make(item) for item in pairing.items}, pairing

  on_disk, disk_pairing = make_all(str(DUMMY))
  in_bucket, pairing = make_all(f"{BUCKET}/corpus")
  assert sorted(in_bucket) == sorted(on_disk) == ["vid_a", "vid_b", "vid_c", "vid_d", "vid_e"]
  for vid, record in on_disk.items():
    for key in align.VideoRecord.ARRAY_FIELDS:
      np.testing.assert_array_equal(getattr(in_bucket[vid], key), getattr(record, key))
  # Every file was named and read as a bucket path, not as a mangled local one ("gs:/bucket").
  assert all(item.transcript is None or item.transcript.startswith(f"{BUCKET}/corpus/")
             for item in pairing.items)
  assert [pathlib.Path(p).name for p in pairing.transcripts_without_video] == ["orphan.vtt"]
  assert len(disk_pairing.transcripts_without_video) == 1
  for vid in ("vid_a", "vid_e"):
    assert f"{BUCKET}/corpus/features/{vid}.npz" in touched
  assert f"{BUCKET}/corpus/transcripts/vid_a.vtt" in touched


def test_feature_files_are_written_to_a_bucket_whole(bucket):
  root, touched = bucket
  vf = features_io.VideoFeatures("v1", "/videos/v1.mp4", np.ones((3, 4), np.float16),
                                 np.arange(3) * 1.5, np.arange(3) * 1.5 + 1.5, "mean", 112)
  path = features_io.save_features(f"{BUCKET}/features", vf)
  assert str(path) == f"{BUCKET}/features/v1.npz"
  assert sorted(p.name for p in (root / "features").iterdir()) == ["v1.npz"]  # no temp left
  assert any(p.startswith(f"{BUCKET}/features/.v1.npz.") for p in touched)  # written aside
  listed = features_io.list_features(f"{BUCKET}/features")
  assert [str(p) for p in listed] == [f"{BUCKET}/features/v1.npz"]
  back = features_io.load_features(listed[0])
  np.testing.assert_array_equal(back.features, vf.features)
  assert features_io.load_index(listed[0]).shape == (3, 4)
  assert isinstance(listed[0], epath.Path)
