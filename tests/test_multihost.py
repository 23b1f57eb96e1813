"""Multi-host for real on one machine: 2 processes x 4 CPU devices joined by jax.distributed.

The pair trains, is preempted (SIGTERM to one process: JAX's preemption service makes both save
the same step and exit 0), resumes, and ends with the losses and parameters of 1 process x 8
devices. Only process 0 writes metrics.

Then, on the TFDS records, with mesh positions interleaved over the processes as a TPU topology
orders them (tests/helpers/multihost_worker.py): each process reads exactly its rows, a pair's
checkpoint resumes on one process in the same example stream, a checkpoint that one process
cannot read is skipped by both, a tensor axis across processes feeds both the same rows, and a
process started with another config stops both before the first step.
"""

import json
import shutil
import signal
import socket
import sys

import numpy as np
import pytest

from helpers import pretrain_runs as pr
from helpers import shared
from vbert_jax import synthetic

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


# ---------------------------------------------------------------------------------------------
# Mesh positions interleaved over processes, as a TPU topology orders them.

WORKER = pr.REPO / "tests" / "helpers" / "multihost_worker.py"
INTERLEAVED = "0,1,1,0,0,1,0,1"
BATCH = 32  # the workers' global batch: 8 shards of 4 rows
PLACES = 4  # runlocal's packed rows: each takes 4 stream positions
SLOTS = 8  # and holds up to 8 prediction slots per modality


@pytest.fixture(scope="module")
def records_data(tmp_path_factory):
  from helpers import records_dataset  # pylint: disable=g-import-not-at-top
  from vbert_jax import sequence  # pylint: disable=g-import-not-at-top
  vocab = sequence.JointVocab(text_size=512, visual_size=256)  # the runlocal sizes
  recs = synthetic.random_records(24, vocab, seed=5, min_clips=20, max_clips=60)
  return shared.build_once(tmp_path_factory, "multihost_records", lambda d: records_dataset.write(
      d, {"train": recs[:20], "validation": recs[20:]}))


def _worker(workdir, data_dir, name, *, process=0, processes=1, address="", order="",
            mesh="data=8", fail_read=0, overrides=()):
  from helpers import records_dataset  # pylint: disable=g-import-not-at-top
  cmd = [sys.executable, str(WORKER), f"--workdir={workdir}", f"--data_dir={data_dir}",
         f"--dataset={records_dataset.NAME}", f"--process_id={process}",
         f"--num_processes={processes}", f"--coordinator={address}", f"--order={order}",
         f"--mesh={mesh}", f"--fail_read={fail_read}"]
  cmd += [f"--override={o}" for o in overrides]
  return pr.Run(cmd, workdir, name, pr.env(devices=8 // processes))


def _pair(workdir, data_dir, phase, order=INTERLEAVED, mesh="data=8", fail_read=0,
          overrides=((), ())):
  address = f"127.0.0.1:{_free_port()}"
  runs = [_worker(workdir, data_dir, f"{phase}.process{i}", process=i, processes=2,
                  address=address, order=order, mesh=mesh,
                  fail_read=fail_read if i == 1 else 0, overrides=overrides[i])
          for i in range(2)]
  return runs, _wait_all(runs)


def _rows_seen(workdir, process):
  """step -> {global row: stream element} of one process's training batches.

  The input's thread reads ahead of the step (config.prefetch_batches ready, one more waiting
  for room): the batches it drew past the last step were never trained on."""
  path = workdir.parent / f"{workdir.name}.rows.process{process}.jsonl"
  out = {}
  for line in path.read_text().splitlines():
    r = json.loads(line)
    if r["split"] == "train":
      step = r["position"] // (BATCH * PLACES)
      out[step] = dict(zip(r["rows"], r["elements"]))
  ahead = sorted(step for step in out if step > pr.TOTAL_STEPS)
  assert ahead == list(range(pr.TOTAL_STEPS + 1, pr.TOTAL_STEPS + 1 + len(ahead)))
  assert len(ahead) <= 3, ahead
  return {step: rows for step, rows in out.items() if step <= pr.TOTAL_STEPS}


def _assert_losses_close(got_dir, want_dir, steps):
  # A loss term is a mean of non-negative cross-entropies over at most 32 rows x 8 slots of
  # predictions; another summation order moves it by at most (n - 1) * eps of itself.
  got, want = pr.curve(got_dir), pr.curve(want_dir)
  assert sorted(got) == list(steps), sorted(got)
  for step in steps:
    for value in got[step]:
      np.testing.assert_allclose(value[:4], want[step][0][:4],
                                 rtol=(BATCH * SLOTS - 1) * 1.2e-7, atol=0,
                                 err_msg=f"step {step} losses {pr.CURVE_KEYS[:4]}")


@pytest.fixture(scope="module")
def stream_reference(records_data, tmp_path_factory):
  """1 process x 8 devices on the records: every row of every step and the loss curve."""
  def build(folder):
    run = _worker(folder / "one_process", records_data, "reference")
    assert run.wait() == 0, run.log_tail()
  return shared.build_once(tmp_path_factory, "multihost_stream", build) / "one_process"


@pytest.fixture(scope="module")
def interleaved_pair(records_data, tmp_path_factory):
  def build(folder):
    runs, codes = _pair(folder / "interleaved", records_data, "interleaved")
    assert codes == [0, 0], _logs(runs)
  return shared.build_once(tmp_path_factory, "multihost_interleaved", build) / "interleaved"


def test_interleaved_processes_read_their_rows_and_train_like_one(stream_reference,
                                                                  interleaved_pair):
  """Processes 0,1,1,0,0,1,0,1 over the mesh: each reads exactly the rows its devices hold, and
  row by row the pair sees the examples, and gets the losses, of one process."""
  want = _rows_seen(stream_reference, 0)
  assert sorted(want) == list(range(1, pr.TOTAL_STEPS + 1))
  assert all(sorted(rows) == list(range(BATCH)) for rows in want.values())
  seen = [_rows_seen(interleaved_pair, p) for p in range(2)]
  order = [int(p) for p in INTERLEAVED.split(",")]
  for process in range(2):
    # Shard k (4 rows) lives on mesh position k: process 0 holds rows 0-3, 12-19 and 24-27.
    expected_rows = [4 * k + i for k, p in enumerate(order) if p == process for i in range(4)]
    assert sorted(seen[process]) == list(range(1, pr.TOTAL_STEPS + 1))
    for step, rows in seen[process].items():
      assert sorted(rows) == expected_rows, (process, step)
      assert rows == {r: want[step][r] for r in rows}, (process, step)
  _assert_losses_close(interleaved_pair, stream_reference, range(1, pr.TOTAL_STEPS + 1))


def test_a_pair_resumes_on_one_process_in_the_same_stream(records_data, stream_reference,
                                                          interleaved_pair):
  """The pair's step-8 checkpoint, resumed by 1 process x 8 devices: the same examples and
  losses as the uninterrupted run, where the input used to start over from its first epoch."""
  workdir = stream_reference.parent / "resumed_on_one"
  for step in (4, 8):
    shutil.copytree(interleaved_pair / "checkpoints" / str(step),
                    workdir / "checkpoints" / str(step))
  run = _worker(workdir, records_data, "resumed_on_one")
  assert run.wait() == 0, run.log_tail()
  assert "resumed at step 8" in run.log_path.read_text(), run.log_tail()
  assert "written by another number of processes" in run.log_path.read_text()
  want, got = _rows_seen(stream_reference, 0), _rows_seen(workdir, 0)
  assert sorted(got) == list(range(9, pr.TOTAL_STEPS + 1))
  for step, rows in got.items():
    assert rows == want[step], step
  _assert_losses_close(workdir, stream_reference, range(9, pr.TOTAL_STEPS + 1))


def test_a_checkpoint_one_process_cannot_read_is_skipped_by_both(records_data, stream_reference,
                                                                  interleaved_pair):
  """Process 1 cannot read step 8 (an injected fault): both restore step 4, nothing hangs, and
  step 8's files are set aside once, by process 0, so that step 8 is written again."""
  workdir = stream_reference.parent / "fault"
  for step in (4, 8):
    shutil.copytree(interleaved_pair / "checkpoints" / str(step),
                    workdir / "checkpoints" / str(step))
  runs, codes = _pair(workdir, records_data, "fault", fail_read=8)
  assert codes == [0, 0], _logs(runs)
  for run in runs:
    log = run.log_path.read_text()
    assert "resumed at step 4" in log, run.log_tail()
    assert "cannot be read (process 1: ValueError: injected fault" in log, run.log_tail()
  aside = list((workdir / "checkpoints").glob("8.unreadable-*"))
  assert len(aside) == 1 and list((aside[0] / "state").rglob("*")), aside
  assert (workdir / "checkpoints" / "8").is_dir()  # written again
  _assert_losses_close(workdir, stream_reference, range(5, pr.TOTAL_STEPS + 1))


def test_a_tensor_axis_across_processes_feeds_both_the_same_rows(records_data,
                                                                 stream_reference):
  """data=4 x tensor=2 with each tensor pair spread over both processes: every process holds
  every row, reads the same examples as the other, and the pair trains like one process."""
  workdir = stream_reference.parent / "tensor_across"
  runs, codes = _pair(workdir, records_data, "tensor", order="0,1,0,1,0,1,0,1",
                      mesh="data=4,tensor=2")
  assert codes == [0, 0], _logs(runs)
  want = _rows_seen(stream_reference, 0)
  seen = [_rows_seen(workdir, p) for p in range(2)]
  for step in range(1, pr.TOTAL_STEPS + 1):
    assert seen[0][step] == seen[1][step] == want[step], step
  _assert_losses_close(workdir, stream_reference, range(1, pr.TOTAL_STEPS + 1))


def test_a_process_with_another_config_stops_both_before_the_first_step(records_data,
                                                                        tmp_path):
  runs, codes = _pair(tmp_path / "mismatch", records_data, "mismatch",
                      overrides=((), ("lva_negative_rate=0.25",)))
  assert codes[0] != 0 and codes[1] != 0, _logs(runs)
  for run in runs:
    log = run.log_path.read_text()
    assert ("process 1 runs with config.lva_negative_rate = 0.25 but process 0 with 0.5"
            in log), run.log_tail()
  assert not (tmp_path / "mismatch" / "metrics.jsonl").exists()
