"""Media made by the tests: small encoded videos whose frames carry their own index, bad files,
and the small demo world with random-init S3D features that several tests share.
"""

from __future__ import annotations

import dataclasses
import fractions
import os
import pathlib
import random
from typing import Sequence

import av
import numpy as np

from helpers import shared
from vbert_jax.demo.world import corpus as corpus_lib

Fraction = fractions.Fraction


# ------------------------------------------------------------------ videos that know their frames


def index_frame(i: int, width: int, height: int) -> np.ndarray:
  """A grey frame whose left half says i // 16 and right half i % 16 (16 levels each)."""
  img = np.empty((height, width, 3), np.uint8)
  img[:, :width // 2] = (i // 16) % 16 * 16 + 8
  img[:, width // 2:] = i % 16 * 16 + 8
  return img


def decode_index(frames: np.ndarray) -> np.ndarray:
  """Inverse of index_frame on [N, S, S, 3] crops (the halves survive resizing and cropping)."""
  s = frames.shape[2]
  rows = slice(s // 4, 3 * s // 4)
  left = frames[:, rows, 2:s // 2 - 3].astype(np.float64).mean(axis=(1, 2, 3))
  right = frames[:, rows, s // 2 + 3:s - 2].astype(np.float64).mean(axis=(1, 2, 3))
  return (np.round((left - 8) / 16) * 16 + np.round((right - 8) / 16)).astype(np.int64)


@dataclasses.dataclass
class EncodedVideo:
  path: pathlib.Path
  times: list[Fraction]  # presentation time of every frame, seconds
  duration: Fraction  # last time + last frame's duration
  frame_step: Fraction  # the largest gap between frames ("one frame")


def write_video(path, *, num_frames: int, fps: Fraction | None = None,
                times_ms: Sequence[int] | None = None, end_ms: int | None = None,
                width: int = 64, height: int = 48, codec: str = "libx264",
                container_format: str | None = None, options: dict | None = None,
                frame_fn=index_frame) -> EncodedVideo:
  """Encodes frames 0..num_frames-1 at a constant `fps` or at the given millisecond times."""
  path = pathlib.Path(path)
  with av.open(str(path), "w", format=container_format) as out:
    if times_ms is None:
      stream = out.add_stream(codec, rate=fps)
      tb = 1 / Fraction(fps)
      times = [i * tb for i in range(num_frames)]
      pts = list(range(num_frames))
      duration = num_frames * tb
    else:
      stream = out.add_stream(codec, rate=20)
      tb = Fraction(1, 1000)
      stream.codec_context.time_base = tb
      times = [Fraction(t, 1000) for t in times_ms]
      pts = list(times_ms)
      duration = Fraction(end_ms, 1000)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.options = dict(options or {})
    for i in range(num_frames):
      frame = av.VideoFrame.from_ndarray(frame_fn(i, width, height), format="rgb24")
      frame.pts, frame.time_base = pts[i], tb
      out.mux(stream.encode(frame))
    out.mux(stream.encode())
  gaps = np.diff([float(t) for t in times] + [float(duration)])
  return EncodedVideo(path, times, duration, Fraction(float(gaps.max())).limit_denominator(100000))


def vfr_times_ms(num_frames: int, seed: int = 0) -> tuple[list[int], int]:
  """Variable gaps of 20-70 ms; the last frame lasts as long as the gap before it."""
  rng = random.Random(seed)
  times, t = [], 0
  for _ in range(num_frames):
    times.append(t)
    t += rng.randint(20, 70)
  return times, times[-1] + (times[-1] - times[-2])


def write_audio(path) -> pathlib.Path:
  """One second of a 440 Hz tone in AAC (an m4a file with no video stream)."""
  path = pathlib.Path(path)
  with av.open(str(path), "w", format="mp4") as out:
    stream = out.add_stream("aac", rate=16000)
    t = np.arange(16000) / 16000
    samples = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
    for s in range(0, 16000, 1024):
      frame = av.AudioFrame.from_ndarray(samples[:, s:s + 1024], format="fltp", layout="mono")
      frame.sample_rate, frame.pts = 16000, s
      out.mux(stream.encode(frame))
    out.mux(stream.encode())
  return path


def write_bad_files(folder, good_mp4) -> dict[str, pathlib.Path]:
  """The bad inputs the issue lists, by name (an unreadable file is tested separately)."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  empty = folder / "empty.mp4"
  empty.write_bytes(b"")
  text = folder / "notes.mp4"
  text.write_text("these are my shopping notes, not a video\n" * 20)
  noise = folder / "noise.mkv"
  noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
  data = pathlib.Path(good_mp4).read_bytes()
  truncated = folder / "truncated.mp4"
  truncated.write_bytes(data[:len(data) // 2])
  audio = write_audio(folder / "audio_only.m4a")
  return {"empty": empty, "not_media": text, "random_bytes": noise, "truncated": truncated,
          "audio_only": audio}


# ---------------------------------------------------------------- dropping read permission (root)


def unreadable_as_root(fn):
  """Runs fn() in a thread without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH, so that root obeys
  file modes there; capabilities are per thread on Linux, so the rest of the process keeps them.
  Returns fn's result or raises what it raised; raises OSError if capabilities cannot be dropped.
  """
  import ctypes  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top

  class Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

  class Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]

  libc = ctypes.CDLL(None, use_errno=True)
  result: dict = {}

  def run():
    header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if libc.capget(ctypes.byref(header), data) != 0:
      result["error"] = OSError(ctypes.get_errno(), "capget failed")
      return
    data[0].effective &= ~((1 << 1) | (1 << 2))
    if libc.capset(ctypes.byref(header), data) != 0:
      result["error"] = OSError(ctypes.get_errno(), "capset failed")
      return
    try:
      result["value"] = fn()
    except BaseException as e:  # pylint: disable=broad-except
      result["raised"] = e

  thread = threading.Thread(target=run)
  thread.start()
  thread.join()
  if "error" in result:
    raise result["error"]
  if "raised" in result:
    raise result["raised"]
  return result.get("value")


def call_without_read_permission(fn):
  """fn() as a caller for whom chmod 000 files are unreadable (root included)."""
  if os.geteuid() != 0:
    return fn()
  return unreadable_as_root(fn)


# ------------------------------------------------------- the small demo corpus, built once per session

_CORPORA: dict = {}


def small_corpus(tmp_path_factory, num_videos: int = 12, size: int = 64, seed: int = 0):
  """The demo corpus with random-init S3D features, built once per test session (shared by its
  worker processes) for every test that asks for the same settings."""
  key = (num_videos, size, seed)
  if key not in _CORPORA:
    config = corpus_lib.small_config(num_videos, size, seed)
    folder = shared.build_once(
        tmp_path_factory, f"demo_corpus_{num_videos}_{size}_{seed}",
        lambda f: corpus_lib.build_small_corpus(f, config, batch_size=EXTRACT_BATCH))
    _CORPORA[key] = corpus_lib.Corpus(folder / "world", folder / "features", config,
                                      min(config.width, config.height))
  return _CORPORA[key]


# One batch size for every extraction in the tests, so that S3D compiles once per process.
EXTRACT_BATCH = 16
