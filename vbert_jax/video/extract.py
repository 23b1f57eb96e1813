"""Batch feature extraction: videos -> one features file per video (clips x 1024, with times).

  python -m vbert_jax.video.extract --videos='DIR/*.mp4' --out=FEATDIR \
      [--s3d_weights=s3d.msgpack] [--image_size=224] [--batch_size=32] [--dtype=float16] \
      [--decode_workers=N [--decode_slots=S] [--decode_stall_seconds=600]] \
      [--shard_index=I --num_shards=N]

A background thread fills batches of clips into a bounded queue while the main thread runs the
jit-compiled S3D on them, sharded over every local device (a 1-D mesh on the batch axis; the
batch is padded to a multiple of the device count). Batches mix videos, so short videos keep the
devices busy. The clips come from `--decode_workers` processes, each decoding one video at a
time with one thread into shared memory (vbert_jax.video.decode_pool), or with
`--decode_workers=0` (the default) from the batch thread itself, with FFmpeg's own decoding
threads (vbert_jax.video.reader). Either way the batches are filled with the clips of the sorted
videos in order, so the feature files do not depend on the number of workers. Each finished
video is written atomically (features_io), and videos whose file exists are skipped, so a killed
run resumes where it stopped. A video that cannot be read (or whose decode worker dies, or
hangs for `--decode_stall_seconds`) is recorded with its reason and the run goes on; the
summary lists every one.
Hosts split the sorted video list by `--shard_index/--num_shards` (default: the JAX process
index and count). Without `--s3d_weights` the network is randomly initialised, and says so.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import glob
import os
import pathlib
import queue
import sys
import threading
import time
import types
from typing import Callable, Iterable, Sequence

from absl import flags
from etils import epath
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import tqdm

from vbert_jax import cli
from vbert_jax import console
from vbert_jax.video import decode_pool
from vbert_jax.video import features_io
from vbert_jax.video import reader
from vbert_jax.video import s3d

CLIP_FRAMES = 30
FPS = 20.0
DTYPES = ("float16", "float32")
DECODE_SLOTS = 64  # clips per decode worker: 96 s of video, 290 MB at 224 pixels
RANDOM_WEIGHTS_WARNING = (
    "WARNING: no S3D weights given (--s3d_weights): extracting with RANDOMLY INITIALISED S3D "
    "weights (seed {seed}). These are not Kinetics features; convert torchvision's S3D file with "
    "`python -m vbert_jax.video.convert_s3d` for real ones.")


@dataclasses.dataclass
class Summary:
  """What one extraction run did; `skipped` lists every video that could not be read."""
  written: list[str] = dataclasses.field(default_factory=list)  # video ids
  already_done: list[str] = dataclasses.field(default_factory=list)
  no_clips: list[str] = dataclasses.field(default_factory=list)  # shorter than one clip
  skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (path, reason)
  num_clips: int = 0
  seconds: float = 0.0
  random_weights: bool = False
  pooling: str = ""

  def format(self) -> str:
    rate = self.num_clips / self.seconds if self.seconds > 0 else 0.0
    lines = [f"extracted {len(self.written)} videos ({self.num_clips} clips, {rate:.1f} clips/s) "
             f"in {self.seconds:.1f} s; {len(self.already_done)} already done; "
             f"{len(self.no_clips)} shorter than one clip; {len(self.skipped)} skipped"
             + (" [RANDOM S3D WEIGHTS]" if self.random_weights else "")]
    lines += [f"  skipped {path}: {reason}" for path, reason in self.skipped]
    return "\n".join(lines)


# ------------------------------------------------------------------------------- video lists


def expand_videos(specs: Iterable[str]) -> list[pathlib.Path]:
  """Globs, plain paths and `.txt` lists (one path per line) -> sorted unique paths."""
  paths: set[str] = set()
  for spec in specs:
    if spec.endswith(".txt") and os.path.isfile(spec):
      lines = pathlib.Path(spec).read_text().splitlines()
      paths.update(line.strip() for line in lines if line.strip() and not line.startswith("#"))
    elif glob.has_magic(spec):
      matches = glob.glob(spec, recursive=True)
      if not matches:
        raise ValueError(f"--videos {spec!r}: the pattern matches no file")
      paths.update(m for m in matches if not os.path.isdir(m))
    else:
      paths.add(spec)
  return [pathlib.Path(p) for p in sorted(paths)]


def video_id(path: pathlib.Path) -> str:
  return path.stem


# ----------------------------------------------------------------------------------- the model


@jax.jit
def _embed(variables, clips: jax.Array) -> jax.Array:
  """uint8 clips [B, T, H, W, 3] -> [B, 1024]; the batch sharding of `clips` carries through.

  Defined once at module level so that repeated runs in one process reuse the compiled step.
  """
  return s3d.S3D().apply(variables, s3d.normalize(clips), train=False)


def make_embedder(variables, batch_size: int) -> tuple[Callable[[np.ndarray], jax.Array], int]:
  """S3D over all local devices (a 1-D mesh on the batch axis) and its padded batch size."""
  devices = jax.local_devices()
  mesh = Mesh(np.array(devices), ("batch",))
  per_batch = -(-batch_size // len(devices)) * len(devices)
  by_batch = NamedSharding(mesh, P("batch"))
  variables = jax.device_put(variables, NamedSharding(mesh, P()))

  def run(clips: np.ndarray) -> jax.Array:
    if clips.shape[0] < per_batch:  # the last batch: pad; the padding rows are dropped later
      pad = np.zeros((per_batch - clips.shape[0],) + clips.shape[1:], clips.dtype)
      clips = np.concatenate([clips, pad])
    return _embed(variables, jax.device_put(clips, by_batch))

  return run, per_batch


def load_variables(weights: str | os.PathLike | None, image_size: int, seed: int):
  if weights is None:
    return s3d.init_params(seed, image_size, CLIP_FRAMES), True
  return s3d.load_params(weights), False


# ----------------------------------------------------------------------------- batch thread


@dataclasses.dataclass
class _Batch:
  clips: np.ndarray  # uint8 [n, T, S, S, 3]
  owners: list[tuple[str, float, float]]  # (video id, start, end) per row


@dataclasses.dataclass
class _Done:
  key: str
  path: str
  num_clips: int


@dataclasses.dataclass
class _Failed:
  key: str
  path: str
  reason: str


_END = object()


class _Decoder(threading.Thread):
  """Fills batches of clips across videos; a video's end (or failure) is announced after the
  batch that holds its last clip, so the consumer sees events in a safe order.

  `read(i, path)` gives the clips of the i-th item; it is called for the items in order."""

  def __init__(self, items: Sequence[tuple[str, pathlib.Path]], out: queue.Queue,
               batch_size: int, image_size: int, read: Callable[[int, pathlib.Path], Iterable]):
    super().__init__(daemon=True, name="clip-batches")
    self.items, self.out, self.batch_size, self.image_size = items, out, batch_size, image_size
    self.read = read
    self.stop = threading.Event()
    self.error: Exception | None = None  # what ended the whole run, for the main thread
    self._new_buffer()

  def _new_buffer(self):
    self.buf = np.empty((self.batch_size, CLIP_FRAMES, self.image_size, self.image_size, 3),
                        np.uint8)
    self.owners: list[tuple[str, float, float]] = []
    self.events: list[object] = []

  def _put(self, item) -> bool:
    while not self.stop.is_set():
      try:
        self.out.put(item, timeout=0.2)
        return True
      except queue.Full:
        continue
    return False

  def _flush(self) -> bool:
    n = len(self.owners)
    ok = True
    if n:
      ok = self._put(_Batch(self.buf[:n], self.owners))
    for event in self.events:
      ok = ok and self._put(event)
    self._new_buffer()
    return ok

  def _drop(self, key: str):
    keep = [i for i, owner in enumerate(self.owners) if owner[0] != key]
    self.buf[:len(keep)] = self.buf[keep]
    self.owners = [self.owners[i] for i in keep]

  def run(self):
    try:
      for i, (key, path) in enumerate(self.items):
        if self.stop.is_set():
          return
        count = 0
        try:
          for clip in self.read(i, path):
            self.buf[len(self.owners)] = clip.frames
            self.owners.append((key, clip.start, clip.end))
            count += 1
            if len(self.owners) == self.batch_size and not self._flush():
              return
          self.events.append(_Done(key, str(path), count))
        except decode_pool.Cancelled:
          return
        except decode_pool.PoolError as e:
          self.error = e
          return
        except reader.VideoReadError as e:
          self._drop(key)
          self.events.append(_Failed(key, str(path), e.reason))
        except Exception as e:  # pylint: disable=broad-except
          # One broken file must not end a long run; its reason is in the summary.
          self._drop(key)
          self.events.append(_Failed(key, str(path), f"{type(e).__name__}: {e}"))
      self._flush()
    finally:
      self._put(_END)


# ------------------------------------------------------------------------------ the main loop


def extract_features(paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
                     weights: str | os.PathLike | None = None, variables=None,
                     image_size: int = 224, batch_size: int = 32, dtype: str = "float16",
                     shard_index: int | None = None, num_shards: int | None = None,
                     seed: int = 0, progress: bool = True, queue_batches: int = 3,
                     resize: int | None = None, decode_workers: int = 0,
                     decode_slots: int = DECODE_SLOTS, decode=None,
                     decode_stall_seconds: float = decode_pool.STALL_SECONDS) -> Summary:
  """Writes `<out_dir>/<video stem>.npz` for every video of this host's shard of `paths`.

  Frames are resized so the short side is `image_size` and centre-cropped; `resize=256` squashes
  them to 256 x 256 first, the transform torchvision's pretrained Kinetics S3D was trained with.

  `variables` (S3D variables) take precedence over `weights` (a file from s3d.save_params);
  with neither, S3D is randomly initialised from `seed` and a warning is printed.

  `decode_workers` processes decode the videos, each with one thread and `decode_slots` clips of
  shared memory (see decode_pool for how to size it); a worker that sends nothing for
  `decode_stall_seconds` is killed, failing its video. 0 decodes in a thread of this process
  with FFmpeg's threads. `decode` replaces `reader.read_clips` (same keywords, plus `threads=1` in a
  worker, which receives it by name: a module-level function).
  """
  if dtype not in DTYPES:
    raise ValueError(f"dtype {dtype!r}: expected one of {DTYPES}")
  if decode_workers < 0 or decode_slots < 1:
    raise ValueError(f"decode_workers={decode_workers}, decode_slots={decode_slots}: expected "
                     f"decode_workers >= 0 (0: decode in this process) and decode_slots >= 1")
  t0 = time.time()
  shard_index = jax.process_index() if shard_index is None else shard_index
  num_shards = jax.process_count() if num_shards is None else num_shards
  if num_shards < 1 or not 0 <= shard_index < num_shards:
    raise ValueError(f"shard_index {shard_index} / num_shards {num_shards}: expected "
                     f"0 <= shard_index < num_shards")
  out_dir = epath.Path(out_dir)  # a local folder or a bucket; the videos are read locally
  out_dir.mkdir(parents=True, exist_ok=True)
  summary = Summary(pooling=s3d.pooling_mode(CLIP_FRAMES, image_size, image_size))

  all_paths = sorted(pathlib.Path(p) for p in paths)
  first_with_id: dict[str, pathlib.Path] = {}
  todo: list[tuple[str, pathlib.Path]] = []
  for i, path in enumerate(all_paths):
    key = video_id(path)
    mine = i % num_shards == shard_index
    if key in first_with_id:
      if mine:
        summary.skipped.append((str(path), f"duplicate video id {key!r} (also "
                                           f"{first_with_id[key]}); rename one of them"))
      continue
    first_with_id[key] = path
    if not mine:
      continue
    if features_io.feature_path(out_dir, key).exists():
      summary.already_done.append(key)
    else:
      todo.append((key, path))
  if not todo:
    summary.seconds = time.time() - t0
    return summary

  if variables is None:
    variables, summary.random_weights = load_variables(weights, image_size, seed)
    if summary.random_weights:
      print(RANDOM_WEIGHTS_WARNING.format(seed=seed), file=sys.stderr, flush=True)
  embed, per_batch = make_embedder(variables, batch_size)
  settings = decode_pool.Settings(FPS, CLIP_FRAMES, image_size, resize)
  with clip_source([path for _, path in todo], settings, decode_workers, decode_slots,
                   decode, decode_stall_seconds) as (read, pool):
    _run(todo, out_dir, embed, per_batch, image_size, np.dtype(dtype), summary, progress,
         queue_batches, read, pool)
  summary.seconds = time.time() - t0
  return summary


@contextlib.contextmanager
def clip_source(paths: Sequence[pathlib.Path], settings: decode_pool.Settings, workers: int,
                slots: int = DECODE_SLOTS, decode=None,
                stall_seconds: float = decode_pool.STALL_SECONDS):
  """(read, pool): `read(i, paths[i])` gives the clips of the i-th video, asked for in order;
  from `workers` decode processes (then `pool` is their DecodePool), or decoded by the caller."""
  if workers == 0:
    def read(i, path):
      del i
      return (decode or reader.read_clips)(
          path, fps=settings.fps, clip_frames=settings.clip_frames, size=settings.size,
          resize=settings.resize)
    yield read, None
    return
  with decode_pool.DecodePool(paths, workers=workers, slots=slots, settings=settings,
                              decode=decode or reader.read_clips,
                              stall_seconds=stall_seconds) as pool:
    yield (lambda i, path: pool.clips(i)), pool


def _run(todo, out_dir, embed, per_batch, image_size, dtype, summary: Summary, progress: bool,
         queue_batches: int, read, pool: decode_pool.DecodePool | None) -> None:
  bar = tqdm.tqdm(total=len(todo), unit="video", desc="S3D features", disable=not progress,
                  file=sys.stderr)
  rows: dict[str, list[tuple[np.ndarray, float, float]]] = collections.defaultdict(list)
  backlog: collections.deque = collections.deque()  # batches in flight and events after them
  q: queue.Queue = queue.Queue(maxsize=queue_batches)
  decoder = _Decoder(todo, q, per_batch, image_size, read)
  computed = [0]  # clips through S3D, for the progress bar

  def handle(entry):
    if isinstance(entry, tuple):  # (device result, owners)
      result, owners = entry
      feats = np.asarray(result)[:len(owners)].astype(dtype)
      for row, (key, start, end) in zip(feats, owners):
        rows[key].append((row, start, end))
      computed[0] += len(owners)
      bar.set_postfix(clips=computed[0])
    elif isinstance(entry, _Done):
      _write(out_dir, entry, rows.pop(entry.key, []), image_size, dtype, summary)
      bar.update(1)
    else:
      rows.pop(entry.key, None)
      summary.skipped.append((entry.path, entry.reason))
      bar.write(f"skipped {entry.path}: {entry.reason}", file=sys.stderr)
      bar.update(1)

  def drain(keep: int):
    """Handles backlog entries in order, leaving at most `keep` batches computing."""
    while backlog:
      in_flight = sum(isinstance(e, tuple) for e in backlog)
      if isinstance(backlog[0], tuple) and in_flight <= keep:
        return
      handle(backlog.popleft())

  decoder.start()
  try:
    while (item := q.get()) is not _END:
      if isinstance(item, _Batch):
        backlog.append((embed(item.clips), item.owners))  # dispatches without waiting
      else:
        backlog.append(item)
      drain(keep=1)
    drain(keep=0)
    if decoder.error is not None:
      raise decoder.error
  finally:
    decoder.stop.set()
    if pool is not None:
      pool.cancel()  # a batch thread waiting for a worker's clip returns at once
    decoder.join()
    bar.close()


def _write(out_dir, done: _Done, rows, image_size: int, dtype, summary: Summary) -> None:
  if len(rows) != done.num_clips:  # cannot happen unless the pipeline is broken
    raise RuntimeError(f"{done.path}: {done.num_clips} clips decoded but {len(rows)} embedded")
  feats = (np.stack([r[0] for r in rows]) if rows
           else np.zeros((0, s3d.FEATURE_DIM), dtype))
  features_io.save_features(out_dir, features_io.VideoFeatures(
      video_id=done.key, source=done.path, features=feats,
      starts=np.array([r[1] for r in rows], np.float64),
      ends=np.array([r[2] for r in rows], np.float64),
      pooling=summary.pooling, image_size=image_size))
  summary.written.append(done.key)
  summary.num_clips += len(rows)
  if not rows:
    summary.no_clips.append(done.key)


# ------------------------------------------------------------------------------------- the CLI


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_multi_string("videos", None, "a glob (quote it), a video path or a .txt list; "
                            "may be repeated", flag_values=fv)
  flags.DEFINE_string("out", None, "folder for the per-video feature files", flag_values=fv)
  flags.DEFINE_string("s3d_weights", None, "S3D variables from vbert_jax.video.convert_s3d "
                      "(default: random init)", flag_values=fv)
  flags.DEFINE_integer("image_size", 224, "side of the square crop", flag_values=fv)
  flags.DEFINE_integer("resize", 0, "squash frames to RESIZE x RESIZE before the crop (256 with "
                       "the Kinetics S3D weights, as torchvision's transform does); 0: short "
                       "side to image_size", flag_values=fv)
  flags.DEFINE_integer("batch_size", 32, "clips per step, rounded up to a multiple of the local "
                       "device count", flag_values=fv)
  flags.DEFINE_enum("dtype", "float16", DTYPES, "dtype of the written features", flag_values=fv)
  flags.DEFINE_integer("shard_index", None, "this host's shard of the sorted video list "
                       "(default: the JAX process index)", flag_values=fv)
  flags.DEFINE_integer("num_shards", None, "shards the video list is split into (default: the "
                       "JAX process count)", flag_values=fv)
  flags.DEFINE_integer("decode_workers", 0, "processes that decode the videos, one thread each "
                       "(about one per free core); 0: decode in this process with FFmpeg's "
                       "threads", lower_bound=0, flag_values=fv)
  flags.DEFINE_integer("decode_slots", DECODE_SLOTS, "clips of shared memory per decode worker "
                       "(30 x image_size^2 x 3 bytes each); the workers decode ahead that far",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_float("decode_stall_seconds", decode_pool.STALL_SECONDS, "a decode worker that "
                     "sends no clip for this long is killed and its video recorded as failed",
                     lower_bound=1e-3, flag_values=fv)
  flags.DEFINE_integer("seed", 0, "seed of the random S3D weights", flag_values=fv)
  flags.DEFINE_bool("no_progress", False, "no progress bar", flag_values=fv)
  flags.mark_flag_as_required("videos", flag_values=fv)
  flags.mark_flag_as_required("out", flag_values=fv)


def parse_args(argv: Sequence[str] | None = None) -> types.SimpleNamespace:
  return cli.parse(define_flags, argv, __doc__)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  console.setup()
  try:
    paths = expand_videos(args.videos)
    summary = extract_features(
        paths, args.out, weights=args.s3d_weights, image_size=args.image_size,
        batch_size=args.batch_size, dtype=args.dtype, shard_index=args.shard_index,
        num_shards=args.num_shards, seed=args.seed, progress=not args.no_progress,
        resize=args.resize or None, decode_workers=args.decode_workers,
        decode_slots=args.decode_slots, decode_stall_seconds=args.decode_stall_seconds)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(summary.format())
  return 0


if __name__ == "__main__":
  sys.exit(main())
