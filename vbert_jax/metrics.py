"""Training metrics: averaging, throughput and MFU, progress, non-finite checks, writers.

Metric dicts follow one convention (the objectives' one): a key `<prefix>_count` is the
denominator of every other key that starts with `<prefix>_`, so that a mean over steps, micro-batches
or eval batches is sum(value * count) / sum(count); keys without a count are plain means.
Only process 0 writes (TensorBoard through clu, the log, and `metrics.jsonl` in the workdir);
other processes log only.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from absl import logging
from etils import epath

from vbert_jax import flops

COUNT_SUFFIX = "_count"

class NonFiniteError(FloatingPointError):
  """A training quantity became NaN or infinite; the run stops without saving."""

  def __init__(self, step: int, quantity: str, value: float):
    self.step, self.quantity, self.value = step, quantity, value
    super().__init__(f"non-finite {quantity} ({value}) at step {step}; stopping without saving "
                     f"so the last good checkpoint stays the newest")


def peak_flops_per_device(device_kind: str, override: float = 0.0) -> float:
  """Peak FLOP/s of one device: `override` when positive, else flops.py's table, else 0."""
  if override > 0:
    return float(override)
  return float(flops.peak_flops(device_kind) or 0.0)


def _count_key(name: str, keys: Sequence[str]) -> str | None:
  if name.endswith(COUNT_SUFFIX):
    return None
  prefix = name.split("_", 1)[0]
  key = prefix + COUNT_SUFFIX
  return key if key in keys and key != name else None


def to_sums(metrics: Mapping[str, Any]) -> dict[str, Any]:
  """Values weighted by their counts, plus `_n` entries for uncounted means (jnp or np)."""
  keys = list(metrics)
  sums = {}
  for name, value in metrics.items():
    count = _count_key(name, keys)
    if name.endswith(COUNT_SUFFIX):
      sums[name] = value
    elif count is None:
      sums[name] = value
      sums[name + "/_n"] = value * 0 + 1
    else:
      sums[name] = value * metrics[count]
  return sums


def add_sums(a: Mapping[str, Any] | None, b: Mapping[str, Any]) -> dict[str, Any]:
  if a is None:
    return dict(b)
  return {k: a[k] + b[k] for k in b}


def from_sums(sums: Mapping[str, Any]) -> dict[str, float]:
  """Means back from sums; a prefix whose count is zero gives 0 (nothing of that kind seen)."""
  keys = [k for k in sums if not k.endswith("/_n")]
  out = {}
  for name in keys:
    value = float(np.asarray(sums[name]))
    if name.endswith(COUNT_SUFFIX):
      out[name] = value
      continue
    count = _count_key(name, keys)
    den = float(np.asarray(sums[name + "/_n"] if count is None else sums[count]))
    out[name] = value / den if den > 0 else 0.0
  return out


def check_finite(step: int, values: Mapping[str, Any], quantities: Sequence[str]) -> None:
  """Raises NonFiniteError naming the first of `quantities` that is NaN or infinite."""
  for name in quantities:
    if name in values:
      value = float(np.asarray(values[name]))
      if not math.isfinite(value):
        raise NonFiniteError(step, name, value)


class Throughput:
  """Steps/s, tokens/s, model TFLOP/s and MFU over the interval since the last report."""

  def __init__(self, tokens_per_step: float, flops_per_step: float, num_devices: int,
               peak_per_device: float):
    self.tokens_per_step = tokens_per_step
    self.flops_per_step = flops_per_step
    self.num_devices = num_devices
    self.peak = peak_per_device
    self._t0: float | None = None
    self._step0 = 0

  def start(self, step: int) -> None:
    self._t0, self._step0 = time.perf_counter(), step

  def report(self, step: int) -> dict[str, float]:
    """Rates since `start` (or the previous report); restarts the interval."""
    if self._t0 is None or step <= self._step0:
      self.start(step)
      return {}
    now = time.perf_counter()
    steps_per_s = (step - self._step0) / max(now - self._t0, 1e-9)
    self._t0, self._step0 = now, step
    out = {"steps_per_sec": steps_per_s,
           "tokens_per_sec": steps_per_s * self.tokens_per_step,
           "tokens_per_sec_per_device": steps_per_s * self.tokens_per_step / self.num_devices}
    if self.flops_per_step > 0:
      flops = steps_per_s * self.flops_per_step
      out["tflops_per_sec"] = flops / 1e12
      out["tflops_per_sec_per_device"] = flops / 1e12 / self.num_devices
      if self.peak > 0:
        out["mfu"] = flops / (self.peak * self.num_devices)
    return out


def real_rates(values: Mapping[str, float]) -> dict[str, float]:
  """Rates over real tokens beside the padded ones: `real_tokens_per_sec`, `pad_fraction` and
  `real_mfu`, from a batch's `tokens_real` share and `flops_real_fraction` (the objectives'
  batch metrics) and the padded `tokens_per_sec` and `mfu`."""
  out = {}
  if "tokens_real" in values:
    out["pad_fraction"] = 1.0 - values["tokens_real"]
    if "tokens_per_sec" in values:
      out["real_tokens_per_sec"] = values["tokens_per_sec"] * values["tokens_real"]
  if "flops_real_fraction" in values and "mfu" in values:
    out["real_mfu"] = values["mfu"] * values["flops_real_fraction"]
  return out


def headline(values: Mapping[str, float]) -> str:
  """The figures a person reads first: the loss, each term's loss and accuracy, the rates."""
  keys = [k for k in ("loss",) if k in values]
  keys += sorted(k for k in values if k.endswith("_loss"))
  keys += sorted(k for k in values if k.endswith("_accuracy"))
  keys += [k for k in ("steps_per_sec", "pad_fraction", "mfu", "real_mfu") if k in values]
  return ", ".join(f"{k}={values[k]:.4g}" for k in keys)


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
  """A one-line progress report: step, percent, steps/s over the whole run so far, ETA."""

  def __init__(self, total_steps: int, first_step: int):
    self.total = total_steps
    self.first = first_step
    self.t0 = time.perf_counter()

  def line(self, step: int) -> str:
    done = step - self.first
    elapsed = time.perf_counter() - self.t0
    rate = done / elapsed if elapsed > 0 and done > 0 else 0.0
    eta = (self.total - step) / rate if rate > 0 else float("nan")
    eta_text = format_duration(eta) if math.isfinite(eta) else "unknown"
    return (f"step {step}/{self.total} ({100.0 * step / max(self.total, 1):.1f}%), "
            f"{rate:.2f} steps/s, elapsed {format_duration(elapsed)}, ETA {eta_text}")


class Reporter:
  """Writes scalars to TensorBoard and the log (clu) and to `metrics.jsonl`, on process 0 only."""

  def __init__(self, workdir: str | epath.Path, asynchronous: bool = True):
    from clu import metric_writers  # Imports tensorflow; only needed once a run starts.
    self.is_writer = jax.process_index() == 0
    self.workdir = epath.Path(workdir)
    self.writer = metric_writers.create_default_writer(
        str(self.workdir), just_logging=not self.is_writer, asynchronous=asynchronous)
    self._jsonl = self.workdir / "metrics.jsonl"

  def write(self, step: int, scalars: Mapping[str, float], kind: str = "train") -> None:
    scalars = {k: float(v) for k, v in scalars.items()}
    self.writer.write_scalars(step, {f"{kind}/{k}": v for k, v in scalars.items()})
    if self.is_writer:
      with self._jsonl.open("a") as f:
        f.write(json.dumps({"step": step, "kind": kind, **scalars}) + "\n")

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    self.writer.write_hparams(dict(hparams))

  def flush(self) -> None:
    self.writer.flush()

  def close(self) -> None:
    self.writer.close()


def read_jsonl(workdir: str | epath.Path, kind: str = "train") -> list[dict[str, float]]:
  """The records a Reporter wrote, in order (used to compare loss curves across runs)."""
  path = epath.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return [r for r in rows if r.get("kind") == kind]


class ProfileWindow:
  """Writes a profiler trace of steps start .. start + num_steps - 1 (numbered from 1)."""

  def __init__(self, logdir: str, start_step: int, num_steps: int):
    self.logdir, self.start, self.stop = logdir, start_step, start_step + num_steps
    self.enabled = num_steps > 0
    self.active = False

  def before_step(self, step: int) -> None:
    if self.enabled and not self.active and self.start <= step < self.stop:
      jax.profiler.start_trace(self.logdir)
      self.active = True

  def after_step(self, step: int, sync: Any) -> None:
    """`step` is the step just run; `sync` an output of it to wait for before stopping."""
    if self.active and step + 1 >= self.stop:
      jax.block_until_ready(sync)
      jax.profiler.stop_trace()
      self.active = False
      logging.info("profiler trace of steps %d-%d written to %s", self.start, self.stop - 1,
                   self.logdir)

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
