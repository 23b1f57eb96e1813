"""Helpers shared by the benchmarks: thread limits, timing, alternating rounds, peak matmul rate.

Every benchmark times ours and a peer in one process on the same input, alternating rounds so
that a change in machine load (other processes, thermal state) hits both alike, and reports
medians.
"""

from __future__ import annotations

import dataclasses
import os
import re
import statistics
import sys
import time
from typing import Callable, Mapping

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setup(threads: int = 2) -> None:
  """Call before importing jax or torch: CPU platform, repo importable, `threads` threads each."""
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  # XLA's CPU client sizes its intra-op pool from the visible cores; torch is told directly.
  for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, str(threads))
  import torch  # noqa: F401  (torch before anything that may pull in tensorflow)
  torch.set_num_threads(threads)


def pretrain_configs():
  """configs/pretrain.py, read by path as the commands read it."""
  from vbert_jax import config_lib  # pylint: disable=g-import-not-at-top  (after setup())
  return config_lib.load_module(os.path.join(REPO, "configs", "pretrain.py"))


@dataclasses.dataclass(frozen=True)
class Timing:
  """Seconds per step: wall clock, and CPU time of the whole process (all its threads).

  On a machine shared with other work the wall clock stretches while the CPU time a step needs
  barely moves, so CPU time per step is the steadier measure of the work done.
  """
  wall: float
  cpu: float


def time_steps(step: Callable[[], object], sync: Callable[[object], object], steps: int
               ) -> Timing:
  """Time per step over `steps` consecutive calls, synchronised at the end."""
  wall0, cpu0 = time.perf_counter(), time.process_time()
  out = None
  for _ in range(steps):
    out = step()
  sync(out)
  return Timing((time.perf_counter() - wall0) / steps, (time.process_time() - cpu0) / steps)


def alternate(contenders: Mapping[str, tuple[Callable[[], object], Callable[[object], object]]],
              rounds: int, steps_per_round: int,
              on_round: Callable[[int, dict[str, Timing]], None] | None = None
              ) -> dict[str, list[Timing]]:
  """Runs each (step, sync) contender in turn, `rounds` times; the time per step of each round."""
  times: dict[str, list[Timing]] = {name: [] for name in contenders}
  for r in range(rounds):
    this_round = {}
    for name, (step, sync) in contenders.items():
      this_round[name] = time_steps(step, sync, steps_per_round)
      times[name].append(this_round[name])
    if on_round is not None:
      on_round(r, this_round)
  return times


def median(values: list[Timing]) -> Timing:
  """Median wall and median CPU time (each on its own)."""
  return Timing(statistics.median(t.wall for t in values),
                statistics.median(t.cpu for t in values))


def matmul_contenders(n: int = 2048) -> dict[str, tuple[Callable[[], object],
                                                       Callable[[object], object]]]:
  """An f32 n^3 matmul in jax and in torch, as (step, sync) contenders for `alternate`.

  Run inside the rounds, they see the same load as the benchmarked steps.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  rng = np.random.default_rng(0)
  a = rng.standard_normal((n, n), np.float32)
  b = rng.standard_normal((n, n), np.float32)
  ja, jb = jnp.asarray(a), jnp.asarray(b)
  jmatmul = jax.jit(jnp.matmul)
  jmatmul(ja, jb).block_until_ready()
  ta, tb = torch.from_numpy(a), torch.from_numpy(b)
  torch.matmul(ta, tb)
  return {"matmul_jax": (lambda: jmatmul(ja, jb), lambda x: x.block_until_ready()),
          "matmul_torch": (lambda: torch.matmul(ta, tb), lambda x: x)}


def peak_from_times(times: Mapping[str, list[Timing]], n: int = 2048) -> dict[str, float]:
  """Best FLOP/s of the matmul contenders: `jax`, `torch`, `peak` (the higher of the two).

  Also FLOPs per CPU-second of each (`jax_cpu`, `torch_cpu`, `peak_cpu`), which stay steady
  under load from other processes.
  """
  flops = 2.0 * n ** 3
  out = {}
  for name in ("jax", "torch"):
    runs = times[f"matmul_{name}"]
    out[name] = max(flops / t.wall for t in runs)
    out[f"{name}_cpu"] = max(flops / t.cpu for t in runs)
  out["peak"] = max(out["jax"], out["torch"])
  out["peak_cpu"] = max(out["jax_cpu"], out["torch_cpu"])
  return out


def peak_matmul_flops(n: int = 2048, repeats: int = 5) -> dict[str, float]:
  """Best of `repeats` f32 n^3 matmuls in jax and in torch, in FLOP/s (see `peak_from_times`)."""
  return peak_from_times(alternate(matmul_contenders(n), repeats, 1), n)


def bench_line(name: str, **values: float) -> str:
  """The headline every benchmark prints last: `BENCH <name>: key=value ... ratio=...`."""
  parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()]
  return f"BENCH {name}: " + " ".join(parts)


def table(rows: list[tuple], header: tuple) -> str:
  """A plain-text table with aligned columns."""
  cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in row) for row in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def _op_metadata(hlo_text: str) -> dict[str, str]:
  """Instruction name -> the jax op_name it came from, read from compiled HLO text."""
  found = {}
  for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"", hlo_text, re.M):
    found[m.group(1)] = m.group(2)
  return found


def _classify(name: str, op_name: str) -> tuple[str, str]:
  """(kind, phase) of one executed XLA op, from its name and the jax op that produced it."""
  base = re.sub(r"\.\d+$", "", name)
  if re.search(r"rng_bit_generator|threefry|random_bits|_bernoulli|_uniform", op_name):
    kind = "random bits (dropout)"
  elif base.startswith("ynn_fusion") or base in ("dot", "convolution") or "dot_fusion" in base:
    kind = "matmul"
  elif "transpose" in base or base.startswith("copy"):
    kind = "transpose/copy"
  elif "slice" in base or base.startswith(("pad", "concatenate", "dynamic-update")):
    kind = "slice/pad/concat"
  elif "scatter" in base or "gather" in base:
    kind = "gather/scatter"
  else:
    kind = "elementwise/reduce"
  if "transpose(jvp(" in op_name:
    phase = "backward"
  elif "jvp(" in op_name:
    phase = "forward"
  else:
    phase = "optimizer/other"
  return kind, phase


def profile_breakdown(trace_dir: str, step: Callable[[], object],
                      sync: Callable[[object], object], hlo_text: str, steps: int = 2) -> str:
  """Traces `steps` calls with jax.profiler and sums the time of each kind of XLA op."""
  import jax

  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(steps):
      sync(step())
  return summarize_trace(trace_dir, hlo_text, steps)


def summarize_trace(trace_dir: str, hlo_text: str, steps: int) -> str:
  """A table of XLA op time per step by kind and phase, from a jax.profiler perfetto trace."""
  import glob
  import gzip
  import json

  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                           recursive=True))
  if not paths:
    raise FileNotFoundError(f"{trace_dir}: jax.profiler wrote no perfetto_trace.json.gz")
  with gzip.open(paths[-1]) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  meta = _op_metadata(hlo_text)
  totals: dict[tuple[str, str], float] = {}
  for e in events:
    if e.get("ph") != "X" or e["name"] not in meta:
      continue
    key = _classify(e["name"], meta[e["name"]])
    totals[key] = totals.get(key, 0.0) + e.get("dur", 0) / 1e3 / steps
  whole = sum(totals.values()) or 1.0
  rows = [(kind, phase, f"{ms:.1f}", f"{100 * ms / whole:.1f}%")
          for (kind, phase), ms in sorted(totals.items(), key=lambda kv: -kv[1])]
  by_kind: dict[str, float] = {}
  for (kind, _), ms in totals.items():
    by_kind[kind] = by_kind.get(kind, 0.0) + ms
  summary = ", ".join(f"{k} {100 * v / whole:.1f}%" for k, v in
                      sorted(by_kind.items(), key=lambda kv: -kv[1]))
  return (f"profile of our step (XLA op time per step, trace in {trace_dir}):\n"
          + table(rows, ("op kind", "phase", "ms/step", "share")) + f"\nby kind: {summary}")
