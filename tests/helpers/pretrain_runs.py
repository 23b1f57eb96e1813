"""Launching, watching and reading `python -m vbert_jax.main` pretraining runs for the tests.

Every run uses the same short recipe (the `mu` model on generated tokens, dropout on, one loss
record per step) so that runs interrupted and resumed in different ways can be compared with one
uninterrupted reference run, which is made once per test session.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import Any, Sequence

import numpy as np

from helpers import shared

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG = "configs/pretrain.py:variant=mu,runlocal"
TOTAL_STEPS = 12
CHECKPOINT_EVERY = 4
# What must match between runs; throughput and timing figures may differ.
CURVE_KEYS = ("loss", "mlm_loss", "mvm_loss", "lva_loss", "grad_norm", "learning_rate",
              "mlm_accuracy", "mvm_accuracy", "lva_accuracy")
OVERRIDES = {
    "total_steps": TOTAL_STEPS,
    "log_every_steps": 1,
    "checkpoint.every_steps": CHECKPOINT_EVERY,
    "checkpoint.keep": 10,
    "optimizer.warmup_steps": 2,
    "model.dropout_rate": 0.1,  # the dropout keys must resume too
    "model.attention_dropout_rate": 0.1,
    "eval.num_batches": 0,
    "compilation_cache_dir": str(REPO / ".cache" / "jax"),
}
RUN_TIMEOUT_S = 240
MAIN = ("-m", "vbert_jax.main")


def argv(workdir: pathlib.Path, **extra: Any) -> list[str]:
  flags = {**OVERRIDES, **extra}
  return ([sys.executable, *MAIN, f"--config={CONFIG}", f"--workdir={workdir}"]
          + [f"--config.{k}={v}" for k, v in flags.items()])


def env(devices: int = 8, **extra: str) -> dict[str, str]:
  out = dict(os.environ)
  out.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1",
             PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
  out.update(extra)
  return out


class Run:
  """A training process whose output goes to a log file next to its workdir."""

  def __init__(self, cmd: Sequence[str], workdir: pathlib.Path, name: str,
               environ: dict[str, str] | None = None):
    self.workdir, self.name = workdir, name
    self.log_path = workdir.parent / f"{workdir.name}.{name}.log"
    self._log = open(self.log_path, "w")
    # A session of its own: SIGKILL then takes the run's input workers with it, as preemption
    # would, rather than leaving them orphaned.
    self.proc = subprocess.Popen(list(cmd), cwd=REPO, env=environ or env(), stdout=self._log,
                                 stderr=subprocess.STDOUT, start_new_session=True)

  def log_tail(self, chars: int = 4000) -> str:
    if not self._log.closed:
      self._log.flush()
    return f"--- {self.log_path} ---\n" + self.log_path.read_text()[-chars:]

  def wait(self, timeout: float = RUN_TIMEOUT_S) -> int:
    try:
      return self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.signal(signal.SIGKILL)
      self.proc.wait()
      raise AssertionError(f"{self.name} did not finish in {timeout} s\n{self.log_tail()}")
    finally:
      self._log.close()

  def signal(self, signum: int) -> None:
    """SIGKILL goes to the run's whole process group; other signals to the trainer alone, which
    stops its workers itself."""
    if signum == signal.SIGKILL:
      os.killpg(self.proc.pid, signum)
    else:
      self.proc.send_signal(signum)

  def wait_for_step(self, step: int, timeout: float = RUN_TIMEOUT_S) -> int:
    """Polls the loss records until `step` is written; returns the last step seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      steps = [r["step"] for r in records(self.workdir)]
      if steps and max(steps) >= step:
        return max(steps)
      if self.proc.poll() is not None:
        raise AssertionError(f"{self.name} exited with {self.proc.returncode} before step "
                             f"{step}\n{self.log_tail()}")
      time.sleep(0.02)
    raise AssertionError(f"{self.name} did not reach step {step} in {timeout} s\n{self.log_tail()}")


def run_to_end(workdir: pathlib.Path, name: str, devices: int = 8, **extra: Any) -> Run:
  run = Run(argv(workdir, **extra), workdir, name, env(devices))
  code = run.wait()
  assert code == 0, f"{name} exited with {code}\n{run.log_tail()}"
  return run


def records(workdir: pathlib.Path) -> list[dict[str, float]]:
  """Train records of metrics.jsonl in the order written (a resumed run appends)."""
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  rows = []
  for line in path.read_text().splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:  # a line being written right now
      continue
    if row.get("kind") == "train":
      rows.append(row)
  return rows


def curve(workdir: pathlib.Path) -> dict[int, list[tuple[float, ...]]]:
  """step -> the curve values of every record written for it (repeated steps after a resume)."""
  out: dict[int, list[tuple[float, ...]]] = {}
  for row in records(workdir):
    out.setdefault(int(row["step"]), []).append(tuple(row[k] for k in CURVE_KEYS))
  return out


def final_state(workdir: pathlib.Path, step: int | None = None) -> tuple[int, Any]:
  from vbert_jax import checkpoints  # pylint: disable=g-import-not-at-top
  return checkpoints.read_checkpoint(workdir, step)


def flat(tree: Any) -> dict[str, np.ndarray]:
  import jax  # pylint: disable=g-import-not-at-top
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}


_REFERENCE: dict[str, pathlib.Path] = {}


def reference_run(tmp_path_factory: Any) -> pathlib.Path:
  """One uninterrupted run on 1 process x 8 devices, shared by the tests (and the worker
  processes) of a session."""
  if "workdir" not in _REFERENCE:
    folder = shared.build_once(tmp_path_factory, "reference_run",
                               lambda f: run_to_end(f / "reference", "reference"))
    _REFERENCE["workdir"] = folder / "reference"
  return _REFERENCE["workdir"]


def kill_tree(run: Run) -> None:
  if run.proc.poll() is None:
    run.proc.send_signal(signal.SIGKILL)
    run.proc.wait()
