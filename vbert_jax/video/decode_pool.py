"""Decode worker processes: videos -> clips in shared memory, handed over in the videos' order.

Video i of the list goes to worker i % N. Each worker is a fresh interpreter ("spawn": a process
that has started JAX is never forked) that decodes with one thread (`reader.read_clips(...,
threads=1)`), so N workers use N cores and one bad codec call takes down one worker, not the run.
A worker writes each clip's uint8 frames into its own ring of shared-memory slots and sends only
(video index, slot, clip times) through a pipe; the frames are never pickled.

The reading side takes the videos strictly in order: all of video i from worker i % N, then
video i + 1 from the next worker. So the clips come out in the same sequence for any N, and
batches filled from them are the same batches as with one in-process decoder. While video i is
read, the other workers decode their next videos ahead into their slots and wait when the slots
are full:

- memory is bounded: N x slots clips in shared memory, whatever the lengths of the videos;
- no deadlock: the reader waits only on the worker of the video it reads, and that worker's full
  slots can only hold clips of that same video (its earlier videos were read and their slots
  given back), so either the worker can write or the reader can take a clip and free a slot.

The price of the fixed order: a worker decodes ahead at most `slots` clips, so with videos much
longer than that the reader mostly waits on the video it reads. With videos of L clips, N
workers give up to min(N, L / (L - slots)) times one worker's rate; full speed needs `slots` of
about (N - 1) / N x L. Size it with `clip_bytes`.

A worker that raises on a file reports the reason and goes on with its next video. A worker that
dies (a crash in a codec, a kill) closes its pipe: the video it was decoding fails with that
reason, and a new worker takes its remaining videos. So does a worker that hangs: once started,
a worker that sends nothing for `stall_seconds` while its video is awaited (a wedged codec, a
read from storage that never returns) is killed and replaced the same way. Every process spawned
also imports the module that started the run (multiprocessing's rule), so it costs that module's
import time and memory.
"""

from __future__ import annotations

import collections
import dataclasses
import multiprocessing
import multiprocessing.connection
import os
import pathlib
import secrets
import signal
import time
from multiprocessing import shared_memory
from typing import Callable, Iterator, Sequence

import numpy as np

from vbert_jax.video import reader

SHM_PREFIX = "vbert_decode_"  # /dev/shm/<prefix><pid>_<worker>_<random>
JOBS_AHEAD = 2  # videos queued per worker beyond the one it decodes
_POLL_S = 0.2  # how often a waiting reader checks for cancel()
# A 1.5 s clip decodes in well under a second even at 1080p on one thread: ten minutes without
# one is a hang, not a slow file.
STALL_SECONDS = 600.0


class Cancelled(Exception):
  """The pool was cancelled while a reader waited for a clip."""


class PoolError(RuntimeError):
  """The pool cannot go on (unlike a failure of one video, which is a reader.VideoReadError)."""


class _Stalled(Exception):
  """A started worker sent nothing for the stall limit."""


class WorkerStartError(PoolError):
  """A worker process died before it was ready: no video can be decoded this way."""


def clip_bytes(clip_frames: int, size: int) -> int:
  return clip_frames * size * size * 3


@dataclasses.dataclass(frozen=True)
class Settings:
  """How every video is decoded; passed to the decode function as keywords."""
  fps: float = 20.0
  clip_frames: int = 30
  size: int = 224
  resize: int | None = None

  @property
  def shape(self) -> tuple[int, ...]:
    return (self.clip_frames, self.size, self.size, 3)


# ---------------------------------------------------------------------------- the worker side


class _MainGone(BaseException):
  """The main process has gone; not an Exception, so that no decode error handler takes it."""


def _send(conn, message) -> None:
  try:
    conn.send(message)
  except OSError as e:
    raise _MainGone() from e


def _worker_main(conn, shm_name: str, slots: int, shape, decode, settings: Settings, free):
  """Decodes the videos sent on `conn` until it sends None or closes."""
  # Ctrl-C reaches the whole process group: the main process handles it and stops the workers.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  shm = shared_memory.SharedMemory(name=shm_name)
  ring = np.ndarray((slots,) + tuple(shape), np.uint8, buffer=shm.buf)
  try:
    _send(conn, ("ready", os.getpid()))
    written = 0
    while (job := conn.recv()) is not None:
      written = _decode_one(conn, ring, written, free, decode, settings, *job)
  except (_MainGone, EOFError, OSError):
    pass
  finally:
    del ring
    shm.close()


def _decode_one(conn, ring, written: int, free, decode, settings: Settings, index: int,
                path: str) -> int:
  """Sends the clips of one video, then "done" or "failed"; returns the slots used so far."""
  count = 0
  try:
    for clip in decode(path, fps=settings.fps, clip_frames=settings.clip_frames,
                       size=settings.size, resize=settings.resize, threads=1):
      slot = written % len(ring)
      _acquire(free)
      try:
        ring[slot] = clip.frames
      except BaseException:
        free.release()
        raise
      written += 1
      _send(conn, ("clip", index, slot, clip.start, clip.end, clip.index))
      count += 1
    _send(conn, ("done", index, count))
  except reader.VideoReadError as e:
    _send(conn, ("failed", index, e.reason))
  except Exception as e:  # pylint: disable=broad-except
    # One broken file must not end a long run; its reason goes to the summary.
    _send(conn, ("failed", index, f"{type(e).__name__}: {e}"))
  return written


def _acquire(free) -> None:
  """Waits for a free slot; gives up if the main process has gone (no orphans)."""
  parent = multiprocessing.parent_process()
  while not free.acquire(timeout=1.0):
    if parent is not None and not parent.is_alive():
      raise _MainGone()


# ------------------------------------------------------------------------------ the main side


class _Worker:
  """The main process's handle on one worker: its slots, its process and its queued jobs."""

  def __init__(self, ctx, worker_id: int, slots: int, settings: Settings, decode):
    self.ctx, self.id, self.slots, self.settings, self.decode = (
        ctx, worker_id, slots, settings, decode)
    name = f"{SHM_PREFIX}{os.getpid()}_{worker_id}_{secrets.token_hex(4)}"
    self.shm = shared_memory.SharedMemory(name=name, create=True,
                                          size=slots * int(np.prod(settings.shape)))
    self.ring = np.ndarray((slots,) + settings.shape, np.uint8, buffer=self.shm.buf)
    self.jobs: collections.deque[tuple[int, str]] = collections.deque()  # sent, not finished
    self.process = self.conn = self.free = None
    self.ready = False

  def start(self) -> None:
    self.conn, child = self.ctx.Pipe(duplex=True)
    self.free = self.ctx.Semaphore(self.slots)
    self.process = self.ctx.Process(
        target=_worker_main, name=f"decode-worker-{self.id}", daemon=True,
        args=(child, self.shm.name, self.slots, self.settings.shape, self.decode, self.settings,
              self.free))
    self.process.start()
    child.close()  # so that the worker's death closes the pipe for us
    self.ready = False
    for job in self.jobs:  # a restarted worker takes over its predecessor's queue
      self._send(job)

  def send(self, index: int, path: str) -> None:
    self.jobs.append((index, path))
    self._send((index, path))

  def _send(self, job) -> None:
    try:
      self.conn.send(job)
    except OSError:  # it died: seen when its video is read; its successor gets self.jobs
      pass

  def receive(self, cancelled: Callable[[], bool], stall_seconds: float | None = None):
    """The next message of this worker after "ready"; None when it has died. Raises _Stalled
    when a started worker sends nothing for `stall_seconds`."""
    while ((message := self.next_message(cancelled, stall_seconds)) is not None
           and message[0] == "ready"):
      self.ready = True
    return message

  def next_message(self, cancelled: Callable[[], bool], stall_seconds: float | None = None):
    """The next message; None when the worker has died. Checks `cancelled` while it waits, and
    the stall limit once the worker has started (starting a worker imports the caller's modules,
    which has no bound worth guessing)."""
    deadline = time.monotonic() + stall_seconds if self.ready and stall_seconds else None
    while not self.conn.poll(_POLL_S):
      if cancelled():
        raise Cancelled()
      if deadline is not None and time.monotonic() > deadline:
        raise _Stalled()
    try:
      return self.conn.recv()
    except (EOFError, ConnectionResetError):
      return None

  def death(self) -> str:
    """Reaps the dead worker and says how it ended."""
    self.process.join(timeout=10)
    code, pid = self.process.exitcode, self.process.pid
    self.conn.close()
    if code is None:
      self.process.kill()
      self.process.join()
      return f"pid {pid} closed its pipe and was killed"
    if code >= 0:
      return f"pid {pid} exited with status {code}"
    try:
      return f"pid {pid} was killed by {signal.Signals(-code).name}"
    except ValueError:
      return f"pid {pid} was killed by signal {-code}"

  def kill(self) -> None:
    """Ends a hung process at once and closes the pipe."""
    self.process.kill()
    self.process.join()
    self.conn.close()

  def stop(self) -> None:
    """Ends the process (politely if it is idle) and closes the pipe; the slots stay."""
    if self.process is None:
      return
    try:
      self.conn.send(None)
    except OSError:
      pass
    self.process.join(timeout=0.5)
    if self.process.exitcode is None:
      self.process.terminate()
      self.process.join(timeout=2)
    if self.process.exitcode is None:
      self.process.kill()
      self.process.join()
    self.conn.close()
    self.process = None

  def release(self) -> None:
    """Unlinks the shared memory first, so that nothing is left in /dev/shm whatever follows."""
    self.ring = self.free = None  # the semaphore's own file goes with its last reference
    try:
      self.shm.unlink()
    except FileNotFoundError:
      pass
    try:
      self.shm.close()
    except BufferError:  # a caller still holds a clip view; the mapping goes with it
      pass


class DecodePool:
  """N decode worker processes over `paths`; read with `clips(0)`, `clips(1)`, ... in order.

  A context manager: leaving it (normally, on an exception or on Ctrl-C) stops the workers and
  unlinks every shared-memory block. `decode` is called in the workers as
  `decode(path, fps=, clip_frames=, size=, resize=, threads=1)` and must yield `reader.Clip`s;
  it is sent by name, so it must be a module-level function.
  """

  def __init__(self, paths: Sequence[str | os.PathLike], *, workers: int, slots: int,
               settings: Settings = Settings(), decode=reader.read_clips,
               stall_seconds: float = STALL_SECONDS):
    if workers < 1 or slots < 1 or stall_seconds <= 0:
      raise ValueError(f"workers={workers}, slots={slots}, stall_seconds={stall_seconds}: "
                       "expected at least 1 worker and 1 slot, and a positive stall limit")
    self.paths = [str(p) for p in paths]
    self.stall_seconds = stall_seconds
    workers = max(1, min(workers, len(self.paths)))
    check_shared_memory(workers * slots * clip_bytes(settings.clip_frames, settings.size),
                        f"{workers} decode workers x {slots} slots")
    self._ctx = multiprocessing.get_context("spawn")
    self._workers: list[_Worker] = []
    self._fed = 0  # videos sent to a worker so far
    self._next = 0  # the video clips() must be asked for next
    self._cancelled = False
    try:
      for i in range(workers):
        self._workers.append(_Worker(self._ctx, i, slots, settings, decode))
        self._workers[-1].start()
    except BaseException:
      self.close()
      raise

  def __enter__(self) -> DecodePool:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def wait_ready(self) -> None:
    """Waits until every worker has started (a benchmark's clock starts after this)."""
    for w in self._workers:
      if not w.ready:
        message = w.next_message(lambda: self._cancelled)
        if message is None:
          raise WorkerStartError(f"decode worker {w.id} died before it started: {w.death()}")
        if message[0] != "ready":
          raise PoolError(f"decode worker {w.id} sent {message[0]!r} before 'ready'")
        w.ready = True

  def cancel(self) -> None:
    """Makes a reader waiting in clips() raise Cancelled (callable from another thread)."""
    self._cancelled = True

  def clips(self, index: int) -> Iterator[reader.Clip]:
    """The clips of video `index`, which must be the next video; raises VideoReadError.

    Each clip's frames are a view of a shared slot, valid until the next clip is asked for.
    """
    if index != self._next:
      raise ValueError(f"clips({index}) asked for, but video {self._next} comes next")
    self._next += 1
    self._feed(index + JOBS_AHEAD * len(self._workers))
    w = self._workers[index % len(self._workers)]
    path = self.paths[index]
    while True:
      try:
        message = w.receive(lambda: self._cancelled, self.stall_seconds)
      except _Stalled:
        w.kill()
        self._replace(w, index, f"the decode worker made no progress on "
                      f"{pathlib.Path(path).name} for {self.stall_seconds:g} s and was killed")
      if message is None:
        how = w.death()
        if not w.ready:
          raise WorkerStartError(f"decode worker {w.id} died before it started: {how}")
        self._replace(w, index, f"the decode worker died while reading "
                      f"{pathlib.Path(path).name} ({how})")
      kind, got = message[0], message[1]
      if got != index:
        raise PoolError(f"decode worker {w.id} sent video {got} while video {index} "
                        f"({path}) was expected")
      if kind == "clip":
        slot, start, end, clip_index = message[2:]
        yield reader.Clip(w.ring[slot], start, end, clip_index)
        w.free.release()
      else:
        w.jobs.popleft()
        if kind == "done":
          return
        raise reader.VideoReadError(path, message[2])

  def _feed(self, upto: int) -> None:
    while self._fed < min(upto, len(self.paths)):
      self._workers[self._fed % len(self._workers)].send(self._fed, self.paths[self._fed])
      self._fed += 1

  def _replace(self, w: _Worker, index: int, what_happened: str):
    """Starts a new worker on the rest of `w`'s queue and fails video `index`."""
    w.jobs.popleft()
    w.start()
    raise reader.VideoReadError(
        self.paths[index], f"{what_happened}; a new worker took over its remaining videos")

  def close(self) -> None:
    self._cancelled = True
    try:
      for w in self._workers:
        w.stop()
    finally:
      for w in self._workers:
        w.release()


def check_shared_memory(needed: int, what: str, folder: str = "/dev/shm") -> None:
  """Fails early, naming the sizes, where writing the slots would crash the workers (SIGBUS)."""
  if not os.path.isdir(folder):
    return
  stat = os.statvfs(folder)
  free = stat.f_bavail * stat.f_frsize
  if needed > free:
    raise ValueError(f"shared memory: {what} need {needed / 2**20:.0f} MiB but {folder} has "
                     f"{free / 2**20:.0f} MiB free; use fewer workers or slots (--decode_workers, "
                     f"--decode_slots), a smaller --image_size, or a larger {folder} "
                     f"(docker: --shm-size)")
