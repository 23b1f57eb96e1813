"""Multi-host for real on one machine: 2 processes x 4 CPU devices joined by jax.distributed.

The pair trains, is preempted (SIGTERM to one process: JAX's preemption service makes both save
the same step and exit 0), resumes, and ends with the losses and parameters of 1 process x 8
devices. Only process 0 writes metrics.
"""

import json
import signal
import socket

import numpy as np
import pytest

from helpers import pretrain_runs as pr

pytestmark = pytest.mark.slow
PROCESSES = 2


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch_pair(workdir, phase: str) -> list[pr.Run]:
  address = f"127.0.0.1:{_free_port()}"
  runs = []
  for i in range(PROCESSES):
    cmd = pr.argv(workdir) + [f"--coordinator_address={address}",
                              f"--num_processes={PROCESSES}", f"--process_id={i}"]
    runs.append(pr.Run(cmd, workdir, f"{phase}.process{i}", pr.env(devices=4)))
  return runs


def _wait_all(runs: list[pr.Run]) -> list[int]:
  try:
    return [run.wait() for run in runs]
  finally:
    for run in runs:
      pr.kill_tree(run)


def _logs(runs: list[pr.Run]) -> str:
  return "\n".join(run.log_tail() for run in runs)


def test_two_processes_train_preempt_resume_like_one(tmp_path, tmp_path_factory):
  reference = pr.reference_run(tmp_path_factory)
  workdir = tmp_path / "pair"

  first = _launch_pair(workdir, "first")
  try:
    first[0].wait_for_step(3)
    # One host gets the notice; both must stop at the same step, which JAX's preemption service
    # agrees on a few steps later.
    first[1].signal(signal.SIGTERM)
  except BaseException:
    _wait_all(first)
    raise
  codes = _wait_all(first)
  assert codes == [0, 0], f"exit codes {codes}\n{_logs(first)}"
  stopped = max(r["step"] for r in pr.records(workdir))
  assert stopped < pr.TOTAL_STEPS, "the pair finished before the preemption notice"
  for run in first:
    assert f"preempted: saved step {stopped}" in run.log_path.read_text(), _logs(first)
  assert (workdir / "checkpoints" / str(stopped)).is_dir()
  data_files = sorted(p.name for p in (workdir / "checkpoints" / str(stopped) / "data").iterdir()
                      if p.suffix == ".json")
  assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]

  second = _launch_pair(workdir, "second")
  codes = _wait_all(second)
  assert codes == [0, 0], f"exit codes {codes}\n{_logs(second)}"
  for run in second:
    assert f"resumed at step {stopped}" in run.log_path.read_text(), _logs(second)
  versions = json.loads((workdir / "versions.json").read_text())
  assert (versions["process_count"], versions["device_count"]) == (2, 8)

  # Only process 0 writes metrics: one record per step (a second writer would double them) and
  # one TensorBoard file per launch.
  steps = [r["step"] for r in pr.records(workdir)]
  assert steps == list(range(1, pr.TOTAL_STEPS + 1)), steps
  assert len(list(workdir.glob("events.out.tfevents.*"))) == 2

  # The same global batches on the same 8-device mesh: the losses of 1 process x 8 devices.
  # Across processes the gradients are summed through gloo, in another order than in one
  # process, hence a tolerance instead of bit equality.
  expected, got = pr.curve(reference), pr.curve(workdir)
  for step, (value,) in got.items():
    np.testing.assert_allclose(value, expected[step][0], rtol=1e-5, atol=1e-6,
                               err_msg=f"step {step}: {pr.CURVE_KEYS}")
  ref_flat = pr.flat(pr.final_state(reference)[1])
  step, state = pr.final_state(workdir)
  assert step == pr.TOTAL_STEPS
  got_flat = pr.flat(state)
  assert ref_flat.keys() == got_flat.keys()
  for key, value in ref_flat.items():
    np.testing.assert_allclose(got_flat[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
