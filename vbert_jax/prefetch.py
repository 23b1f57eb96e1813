"""The next batches on their way to the devices while the current step runs.

A background thread draws host batches from the input, checks them, and puts them on the
devices, keeping up to `size` ready. The input's state is recorded after each batch the thread
draws, and `get_state()` returns the state after the last batch the loop took: a checkpoint
resumes at the batch after the last step, however far the thread had read ahead.
"""

import queue
import threading
from typing import Any, Callable, Iterator, Mapping

from absl import logging

_POLL_S = 0.1  # how often a blocked thread looks whether it should stop
_JOIN_S = 60.0  # how long `close` waits for a draw in progress


class Prefetcher:
  """`next()` gives device batches of `source` (next / get_state / set_state), `size` ahead.

  `put` turns a host batch into device arrays; `check(batch, step)` may raise on a bad one
  (named by the step it would train). An error in the thread is raised by the `next()` that
  would have returned that batch, and ends the prefetching.
  """

  def __init__(self, source: Any, put: Callable[[Mapping[str, Any]], Any], size: int,
               first_step: int, check: Callable[[Mapping[str, Any], int], None] | None = None):
    if size < 1:
      raise ValueError(f"Prefetcher size={size}: expected at least 1 batch ahead")
    self._source, self._put, self._check = source, put, check
    self._ready: queue.Queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._state = source.get_state()
    self._error: BaseException | None = None
    self._thread = threading.Thread(target=self._fill, args=(first_step,), daemon=True,
                                    name="batch-prefetch")
    self._thread.start()

  def _fill(self, step: int) -> None:
    while not self._stop.is_set():
      try:
        local = next(self._source)
        if self._check is not None:
          self._check(local, step)
        item = (self._put(local), self._source.get_state(), None)
      except BaseException as e:  # pylint: disable=broad-except
        item = (None, None, e)  # raised in the loop's thread, where it can stop the run
      if not self._offer(item) or item[2] is not None:
        return
      step += 1

  def _offer(self, item: tuple[Any, Any, BaseException | None]) -> bool:
    while not self._stop.is_set():
      try:
        self._ready.put(item, timeout=_POLL_S)
        return True
      except queue.Full:
        continue
    return False

  def __iter__(self) -> Iterator[Any]:
    return self

  def __next__(self) -> Any:
    if self._error is not None:
      raise self._error  # the thread has stopped: nothing more will come
    batch, state, error = self._ready.get()
    if error is not None:
      self._error = error
      self.close()
      raise error
    self._state = state
    return batch

  def get_state(self) -> Any:
    """The input's state after the last batch that `next()` returned."""
    return self._state

  def close(self) -> None:
    """Stops the thread once its current batch is drawn. A draw that hangs (a stalled read) is
    left to the daemon thread rather than holding up a run that is saving or exiting."""
    self._stop.set()
    self._thread.join(timeout=_JOIN_S)
    if self._thread.is_alive():
      logging.warning("the input thread is still drawing a batch after %.0f s; leaving it",
                      _JOIN_S)

  def __enter__(self) -> "Prefetcher":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()
