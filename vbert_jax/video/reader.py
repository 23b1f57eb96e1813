"""Decoding a video into the paper's clips: 20 fps, 30 frames (1.5 s), square RGB crops.

Frames are resampled by their timestamps, so any input rate works, constant or variable: output
frame k shows the latest decoded frame whose presentation time is at or before
t_k = t_0 + k / fps, where t_0 is the first frame's time. Times are kept as exact fractions, so a
29.97 fps or millisecond-timebase file lands on the right frame. Output frame k exists only if
the video lasts until t_k + 1 / fps; a clip is emitted once all its frames exist, so a video of
duration D gives floor(D / 1.5) clips and a trailing partial clip is dropped.

Only the source frames that are shown are converted (PyAV's swscale: resize so the short side is
`size`, RGB), then centre-cropped; at most one clip is held, never the whole video. With
`resize=R` frames are instead squashed to R x R before the centre crop, as torchvision's Kinetics
transform for its pretrained S3D does (resize to 256 x 256, crop 224). Pixels are
uint8 RGB in [0, 255]; `s3d.normalize` maps them to what S3D expects.
"""

from __future__ import annotations

import dataclasses
import fractions
import pathlib
from typing import Iterator

import av
import numpy as np

# The video end may be known only to the container's timebase (often 1 ms).
_END_TOLERANCE = fractions.Fraction(1, 2000)


class VideoReadError(Exception):
  """A video that cannot be read; str() is one line naming the file and the reason."""

  def __init__(self, path, reason: str):
    self.path = str(path)
    self.reason = reason
    super().__init__(f"{self.path}: {reason}")


@dataclasses.dataclass
class Clip:
  frames: np.ndarray  # uint8 [clip_frames, size, size, 3] RGB
  start: float  # seconds, the first frame's output time
  end: float  # seconds, start + clip_frames / fps
  index: int


def read_clips(path, fps: float = 20.0, clip_frames: int = 30, size: int = 224,
               resize: int | None = None, threads: int | None = None) -> Iterator[Clip]:
  """Non-overlapping clips of `path`, streamed; raises VideoReadError on bad input.

  The file is opened (and checked) at the call, so an unreadable file fails here; decoding
  errors surface while iterating. `threads=None` lets FFmpeg choose its decoding threads (frame
  and slice threading over the machine's cores); `threads=1` decodes in the calling thread only,
  for a process that is one of many decoding side by side.
  """
  if fps <= 0 or clip_frames <= 0 or size <= 0:
    raise ValueError(f"fps, clip_frames and size must be positive, got {fps}, {clip_frames}, "
                     f"{size}")
  if resize is not None and resize < size:
    raise ValueError(f"resize={resize} is smaller than the crop size={size}")
  if threads is not None and threads < 1:
    raise ValueError(f"threads={threads}: expected None (FFmpeg chooses) or at least 1")
  container = open_video(path)
  return _clips(container, pathlib.Path(path), fractions.Fraction(fps).limit_denominator(100000),
                clip_frames, _Converter(size, resize), threads)


def open_video(path) -> av.container.InputContainer:
  """Opens `path` with PyAV and checks that it holds a video stream."""
  path = pathlib.Path(path)
  if not path.exists():
    raise VideoReadError(path, "file not found")
  if path.is_dir():
    raise VideoReadError(path, "is a directory, expected a video file")
  try:
    with open(path, "rb") as f:
      if not f.read(1):
        raise VideoReadError(path, "empty file (0 bytes)")
  except PermissionError as e:
    raise VideoReadError(path, f"no read permission ({e.strerror})") from e
  except OSError as e:
    raise VideoReadError(path, f"cannot be read ({e.strerror or e})") from e
  try:
    container = av.open(str(path), "r")
  except av.error.FFmpegError as e:
    raise VideoReadError(path, f"not a readable media file (FFmpeg: {_ffmpeg_reason(e)})") from e
  if not container.streams.video:
    kinds = sorted({s.type for s in container.streams}) or ["none"]
    container.close()
    raise VideoReadError(path, f"no video stream (streams found: {', '.join(kinds)})")
  return container


def _ffmpeg_reason(e: Exception) -> str:
  return getattr(e, "strerror", None) or str(e)


def _frame_time(frame: av.VideoFrame) -> fractions.Fraction | None:
  if frame.pts is None or frame.time_base is None:
    return None
  return frame.pts * frame.time_base


class _Converter:
  """Resizes (short side to `size`, or to `resize` x `resize`), converts to RGB, centre-crops."""

  def __init__(self, size: int, resize: int | None = None):
    self.size = size
    self.resize = resize
    self._cache_key = None
    self._cache = None

  def __call__(self, frame: av.VideoFrame) -> np.ndarray:
    if self._cache_key is frame:  # upsampling shows one source frame several times
      return self._cache
    w, h = frame.width, frame.height
    if self.resize:
      nw = nh = self.resize
    elif w <= h:
      nw, nh = self.size, max(self.size, round(h * self.size / w))
    else:
      nw, nh = max(self.size, round(w * self.size / h)), self.size
    rgb = frame.reformat(width=nw, height=nh, format="rgb24",
                         interpolation="BILINEAR").to_ndarray()
    top, left = (nh - self.size) // 2, (nw - self.size) // 2
    self._cache_key, self._cache = frame, rgb[top:top + self.size, left:left + self.size]
    return self._cache


def _set_threads(stream, threads: int | None) -> None:
  if threads is None:
    stream.thread_type = "AUTO"
  elif threads == 1:  # no frame or slice threads: exactly one core's work
    stream.thread_type = "NONE"
    stream.codec_context.thread_count = 1
  else:
    stream.thread_type = "AUTO"
    stream.codec_context.thread_count = threads


def _clips(container, path: pathlib.Path, fps: fractions.Fraction, clip_frames: int,
           convert: _Converter, threads: int | None = None) -> Iterator[Clip]:
  stream = container.streams.video[0]
  _set_threads(stream, threads)
  nominal = 1 / stream.average_rate if stream.average_rate else 1 / fps
  size = convert.size
  buf = np.empty((clip_frames, size, size, 3), np.uint8)
  origin = prev = prev_time = last_step = None
  k = 0  # next output frame
  pending: Clip | None = None  # a full clip whose last frame is not yet known to exist
  clip_index = 0

  def out_time(i: int) -> fractions.Fraction:
    return origin + i / fps

  def fill(frame, upto: fractions.Fraction, known_end: fractions.Fraction) -> Iterator[Clip]:
    """Shows `frame` at every output time before `upto`; yields the clips that fill up and
    that the video is known to cover (it lasts at least until `known_end`)."""
    nonlocal k, pending, clip_index
    while out_time(k) < upto:
      buf[k % clip_frames] = convert(frame)
      k += 1
      if k % clip_frames == 0:
        clip = Clip(buf.copy(), float(out_time(k - clip_frames)), float(out_time(k)), clip_index)
        clip_index += 1
        if out_time(k) <= known_end:
          yield clip
        else:
          pending = clip

  try:
    try:
      for frame in container.decode(stream):
        t = _frame_time(frame)
        if t is None:
          t = prev_time + nominal if prev_time is not None else fractions.Fraction(0)
        if origin is None:
          origin = t
        if prev is not None:
          if t < prev_time:  # out-of-order timestamps: treat as simultaneous
            t = prev_time
          if t > prev_time:
            last_step = t - prev_time
          # A frame at t means the video lasts beyond t.
          if pending is not None and pending.end <= t:
            yield pending
            pending = None
          yield from fill(prev, t, t)
        prev, prev_time = frame, t
    except av.error.FFmpegError as e:
      where = f"{float(prev_time):.2f} s" if prev_time is not None else "the start"
      raise VideoReadError(path, f"decoding failed near {where} "
                                 f"(FFmpeg: {_ffmpeg_reason(e)})") from e
    if prev is None:
      raise VideoReadError(path, "no decodable video frames")
    end = prev_time + _last_duration(prev, last_step, nominal)
    if pending is not None and pending.end <= end + _END_TOLERANCE:
      yield pending
    pending = None
    # Output frame k exists if the video lasts until t_k + 1 / fps; a clip still filling when
    # the video ends is the dropped trailing partial clip.
    yield from fill(prev, end, end + _END_TOLERANCE)
  finally:
    container.close()


def _last_duration(frame: av.VideoFrame, last_step, nominal) -> fractions.Fraction:
  if frame.duration and frame.time_base is not None:
    return frame.duration * frame.time_base
  return last_step if last_step else nominal
