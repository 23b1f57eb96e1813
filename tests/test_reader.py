"""The clip reader on real encoded files: clip counts, clip times, pixels, bad input."""

from __future__ import annotations

import fractions
import math
import os

import numpy as np
import pytest

import fixtures_world as fw
from vbert_jax.video import reader

F = fractions.Fraction
SIZE = 32
OUT_STEP = F(1, 20)

# name -> how to write it; durations sit on both sides of clip boundaries (4.5 s is 3 clips).
CASES = {
    "h264_24fps.mp4": dict(fps=F(24), num_frames=100),  # 4.17 s
    "h264_25fps.mp4": dict(fps=F(25), num_frames=113),  # 4.52 s
    "h264_29.97fps.mp4": dict(fps=F(30000, 1001), num_frames=135),  # 4.5045 s
    "h264_30fps.mp4": dict(fps=F(30), num_frames=135),  # exactly 4.5 s
    "h264_60fps.mp4": dict(fps=F(60), num_frames=269),  # 4.483 s: the third clip is partial
    "h264_vfr.mkv": dict(vfr=True, num_frames=90),
    "vp9_20fps.webm": dict(fps=F(20), num_frames=61, codec="libvpx-vp9",
                           options={"lossless": "1", "deadline": "realtime", "cpu-used": "8"}),
    "h264_portrait_30fps.mp4": dict(fps=F(30), num_frames=50, width=48, height=64),
    "mpeg4_25fps.avi": dict(fps=F(25), num_frames=80, codec="mpeg4", options={"qscale": "2"}),
    "h264_30fps.mov": dict(fps=F(30), num_frames=100),
    "h264_short_1s.mp4": dict(fps=F(25), num_frames=25),  # shorter than a clip
}


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, fw.EncodedVideo]:
  folder = tmp_path_factory.mktemp("videos")
  out = {}
  for name, spec in CASES.items():
    spec = dict(spec)
    if spec.pop("vfr", False):
      times, end = fw.vfr_times_ms(spec["num_frames"], seed=3)
      spec.update(times_ms=times, end_ms=end)
    spec.setdefault("options", {"crf": "0", "preset": "ultrafast"})
    out[name] = fw.write_video(folder / name, **spec)
  return out


@pytest.mark.parametrize("name", list(CASES))
def test_clip_count_and_times(videos, name):
  video = videos[name]
  clips = list(reader.read_clips(video.path, size=SIZE))
  expected = math.floor(video.duration / F(3, 2))
  assert len(clips) == expected, (name, float(video.duration))
  for i, clip in enumerate(clips):
    assert clip.index == i
    assert clip.frames.shape == (30, SIZE, SIZE, 3) and clip.frames.dtype == np.uint8
    assert abs(clip.start - 1.5 * i) < float(video.frame_step) + 1e-9, (name, i, clip.start)
    assert clip.end == pytest.approx(clip.start + 1.5, abs=1e-9)
    # Each output frame shows the latest source frame at or before its time.
    out_times = [F(clip.start).limit_denominator(10**6) + j * OUT_STEP for j in range(30)]
    want = [max(k for k, t in enumerate(video.times) if t <= ot) for ot in out_times]
    got = fw.decode_index(clip.frames)
    np.testing.assert_array_equal(got % 256, np.array(want) % 256, err_msg=f"{name} clip {i}")


def test_short_video_yields_no_clips_without_error(videos):
  assert list(reader.read_clips(videos["h264_short_1s.mp4"].path, size=SIZE)) == []


def test_vfr_file_really_is_variable(videos):
  gaps = np.diff([float(t) for t in videos["h264_vfr.mkv"].times])
  assert gaps.min() < 0.03 and gaps.max() > 0.06


def test_resize_and_centre_crop_keep_rgb(tmp_path):
  """Short side to `size`, centre crop: the 8 outer columns (green) of a 64x48 frame are cut."""
  def frame(i, width, height):
    img = np.zeros((height, width, 3), np.uint8)
    img[:, :width // 2] = (220, 30, 30)
    img[:, width // 2:] = (30, 30, 220)
    img[:, :6] = img[:, -6:] = (30, 220, 30)
    return img
  video = fw.write_video(tmp_path / "colours.mp4", fps=F(20), num_frames=32, frame_fn=frame,
                         options={"crf": "0", "preset": "ultrafast"})
  for size in (24, 48, 96):
    (clip,) = reader.read_clips(video.path, size=size)
    f = clip.frames.astype(int)
    assert f.shape == (30, size, size, 3)
    left = f[:, :, 1:size // 2 - 2].mean((0, 1, 2))
    right = f[:, :, size // 2 + 2:-1].mean((0, 1, 2))
    assert left[0] > 180 and left[1] < 70 and left[2] < 70, (size, left)  # red, no green border
    assert right[2] > 180 and right[0] < 70 and right[1] < 70, (size, right)


def test_squash_mode_matches_torchvision_kinetics_transform(tmp_path):
  """`resize=R` follows torchvision's VideoClassification: R x R (aspect not kept), centre crop."""
  import av  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from torchvision.transforms import functional as tvf  # pylint: disable=g-import-not-at-top

  def frame(i, width, height):  # smooth, so the two bilinear filters agree closely
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([255 * x / width, 255 * y / height, 128 + 0 * x], -1).astype(np.uint8)
  video = fw.write_video(tmp_path / "wide.mp4", fps=F(20), num_frames=32, frame_fn=frame,
                         width=96, height=48, options={"crf": "0", "preset": "ultrafast"})
  (clip,) = reader.read_clips(video.path, size=32, resize=40)
  with av.open(str(video.path)) as container:
    first = next(container.decode(video=0)).to_ndarray(format="rgb24")
  ref = torch.from_numpy(first).permute(2, 0, 1)[None].float()
  ref = tvf.center_crop(tvf.resize(ref, [40, 40], antialias=False), [32, 32])
  ref = ref[0].permute(1, 2, 0).numpy()
  assert clip.frames.shape == (30, 32, 32, 3)
  assert np.abs(clip.frames[0].astype(float) - ref).mean() < 4.0
  # The short-side mode keeps the aspect: a horizontal gradient spans a narrower range.
  (short,) = reader.read_clips(video.path, size=32)
  span = lambda f: float(f[0, 16, -1, 0]) - float(f[0, 16, 0, 0])
  assert span(clip.frames) > 1.5 * span(short.frames)
  with pytest.raises(ValueError, match="resize=16"):
    reader.read_clips(video.path, size=32, resize=16)


def test_streams_without_holding_the_video(tmp_path):
  """30 s at 64 px would be 7 MB of frames; reading it peaks at a few clips."""
  import tracemalloc  # pylint: disable=g-import-not-at-top
  video = fw.write_video(tmp_path / "long.mp4", fps=F(20), num_frames=600, width=64, height=64,
                         options={"preset": "ultrafast"})
  tracemalloc.start()
  count = 0
  for clip in reader.read_clips(video.path, size=64):
    count += 1
    del clip
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  assert count == 20
  assert peak < 4 * 30 * 64 * 64 * 3, peak


# ------------------------------------------------------------------------------------ bad input


@pytest.fixture(scope="module")
def bad_files(videos, tmp_path_factory):
  return fw.write_bad_files(tmp_path_factory.mktemp("bad"), videos["h264_30fps.mp4"].path)


@pytest.mark.parametrize("kind,reason", [
    ("empty", "empty file"),
    ("not_media", "not a readable media file"),
    ("random_bytes", "not a readable media file"),
    ("truncated", "not a readable media file"),
    ("audio_only", "no video stream (streams found: audio)"),
])
def test_bad_input_gives_one_clear_line(bad_files, kind, reason):
  path = bad_files[kind]
  with pytest.raises(reader.VideoReadError) as info:
    list(reader.read_clips(path))
  message = str(info.value)
  print(message)
  assert "\n" not in message
  assert message.startswith(str(path)) and reason in message
  assert info.value.path == str(path)


def test_missing_file_and_directory(tmp_path):
  with pytest.raises(reader.VideoReadError, match="file not found"):
    reader.read_clips(tmp_path / "nothing_here.mp4")
  with pytest.raises(reader.VideoReadError, match="is a directory"):
    reader.read_clips(tmp_path)


def test_unreadable_file(videos, tmp_path):
  path = tmp_path / "locked.mp4"
  path.write_bytes(videos["h264_24fps.mp4"].path.read_bytes())
  os.chmod(path, 0)
  try:
    try:
      fw.call_without_read_permission(lambda: reader.read_clips(path))
    except reader.VideoReadError as e:
      message = str(e)
    except OSError as e:  # capabilities could not be dropped in this sandbox
      pytest.skip(f"cannot make a file unreadable for this user: {e}")
    else:
      pytest.fail("reading a mode-000 file did not raise")
  finally:
    os.chmod(path, 0o644)
  assert message == f"{path}: no read permission (Permission denied)"


def test_bad_arguments(videos):
  with pytest.raises(ValueError, match="positive"):
    reader.read_clips(videos["h264_24fps.mp4"].path, fps=0)
