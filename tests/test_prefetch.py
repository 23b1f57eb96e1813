"""One transfer per batch, and the next batches on their way while a step runs."""

import threading
import time

import jax
import numpy as np
import pytest

from helpers.configs import pretrain
from vbert_jax import prefetch
from vbert_jax import sharding
from vbert_jax import synthetic


def test_a_pretraining_batch_reaches_the_devices_in_one_transfer(monkeypatch):
  config = pretrain.get_config("variant=mu,runlocal")
  local = next(synthetic.from_config(config, "train", batch_size=8))
  local["flags"] = local["input_mask"] > 0  # a bool field travels as int32 words too
  mesh = sharding.make_mesh({"data": 4, "tensor": 2})
  rules = sharding.make_rules(config.sharding_rules)
  transfers = []
  make = jax.make_array_from_process_local_data
  monkeypatch.setattr(jax, "make_array_from_process_local_data",
                      lambda *a, **k: transfers.append(a[1].shape) or make(*a, **k))
  out = sharding.global_batch(local, mesh, rules)
  words = sum(np.asarray(v)[0].size for v in local.values())
  assert transfers == [(8, words)]
  assert list(out) == list(local)
  want_sharding = sharding.batch_sharding(mesh, rules)
  for name, value in local.items():
    got = out[name]
    assert got.dtype == jax.dtypes.canonicalize_dtype(value.dtype), name
    np.testing.assert_array_equal(np.asarray(got), value, err_msg=name)
    assert got.sharding.is_equivalent_to(want_sharding, got.ndim), name
  # Floats keep their bits: a weight of 0.1 is 0.1, not its integer part.
  assert np.asarray(out["mlm_weights"]).dtype == np.float32


def test_a_field_of_another_width_travels_on_its_own():
  mesh = sharding.make_mesh({"data": 8})
  rules = sharding.make_rules([["batch", "data"]])
  local = {"ids": np.arange(16, dtype=np.int32).reshape(8, 2),
           "half": np.linspace(0, 1, 8, dtype=np.float16)}
  out = sharding.global_batch(local, mesh, rules)
  np.testing.assert_array_equal(np.asarray(out["half"]), local["half"])
  assert out["half"].dtype == np.float16


class Counter:
  """Batches {"x": [n]} with n = 0, 1, ...; its state is the next n. Optionally slow."""

  def __init__(self, delay_s: float = 0.0, stop_at: int | None = None):
    self.n, self.delay_s, self.stop_at = 0, delay_s, stop_at
    self.drawn = 0

  def __next__(self):
    if self.stop_at is not None and self.n >= self.stop_at:
      raise StopIteration
    time.sleep(self.delay_s)
    self.n += 1
    self.drawn += 1
    return {"x": np.array([self.n - 1])}

  def get_state(self):
    return {"n": self.n}


def _wait_for(condition, timeout_s=10.0):
  end = time.monotonic() + timeout_s
  while not condition() and time.monotonic() < end:
    time.sleep(0.01)
  return condition()


def test_the_state_is_after_the_batches_taken_not_those_drawn():
  source = Counter()
  with prefetch.Prefetcher(source, lambda b: b["x"][0], size=3, first_step=1) as batches:
    assert batches.get_state() == {"n": 0}
    assert _wait_for(lambda: source.drawn == 4)  # 3 ready and one waiting for room
    assert next(batches) == 0 and next(batches) == 1
    assert batches.get_state() == {"n": 2}
    assert _wait_for(lambda: source.drawn == 6)
    assert batches.get_state() == {"n": 2}
    assert [next(batches) for _ in range(3)] == [2, 3, 4]
    assert batches.get_state() == {"n": 5}


def test_a_bad_batch_is_raised_at_its_own_step_after_the_good_ones():
  def check(batch, step):
    if batch["x"][0] == 2:
      raise ValueError(f"train batch of step {step}: bad")

  with prefetch.Prefetcher(Counter(), lambda b: b["x"][0], 2, first_step=11,
                           check=check) as batches:
    assert [next(batches), next(batches)] == [0, 1]
    with pytest.raises(ValueError, match="train batch of step 13: bad"):
      next(batches)
    assert batches.get_state() == {"n": 2}  # a checkpoint now resumes at the bad batch
    with pytest.raises(ValueError, match="step 13"):  # again, rather than waiting for ever
      next(batches)


def test_the_end_of_the_input_reaches_the_loop():
  with prefetch.Prefetcher(Counter(stop_at=2), lambda b: b["x"][0], 4, 1) as batches:
    assert list(batches) == [0, 1]


def test_close_stops_a_thread_waiting_for_room():
  batches = prefetch.Prefetcher(Counter(), lambda b: b, 1, 1)
  assert _wait_for(lambda: batches._ready.full())  # pylint: disable=protected-access
  batches.close()
  assert not any(t.name == "batch-prefetch" and t.is_alive() for t in threading.enumerate())


def test_drawing_overlaps_the_step():
  """Batches that take 0.1 s to draw, steps that take 0.1 s: 10 steps take about 1 s with the
  drawing in its own thread, where drawing then stepping takes 2 s."""
  batches = prefetch.Prefetcher(Counter(delay_s=0.1), lambda b: b, 2, 1)
  start = time.perf_counter()
  for _ in range(10):
    next(batches)
    time.sleep(0.1)  # the step, which releases the GIL as a device step does
  elapsed = time.perf_counter() - start
  batches.close()
  assert elapsed < 1.6, elapsed


def test_close_does_not_wait_for_ever_on_a_stalled_read(monkeypatch, caplog):
  monkeypatch.setattr(prefetch, "_JOIN_S", 0.2)
  release = threading.Event()

  class Stalled(Counter):
    def __next__(self):
      release.wait()
      return super().__next__()

  batches = prefetch.Prefetcher(Stalled(), lambda b: b, 1, 1)
  start = time.perf_counter()
  batches.close()
  assert time.perf_counter() - start < 5
  assert "still drawing a batch" in caplog.text
  release.set()  # the read ends; the thread sees the stop and exits
  assert _wait_for(lambda: not batches._thread.is_alive())  # pylint: disable=protected-access
