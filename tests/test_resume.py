"""Exact resume of `python -m vbert_jax.main`, driven in subprocesses like a user would.

One run is stopped twice, at random steps: first with SIGTERM (it must save the step it is on and
exit 0), then, once restarted, with SIGKILL (whatever it was doing is lost). Restarted again, it
must end with the parameters and loss curve of an uninterrupted run of the same length, bit for
bit (CPU, dropout on). The reference run's checkpoints, saved on 8 devices, also resume on 1,
past a truncated newest one.
"""

import json
import os
import random
import shutil
import signal
import time

import numpy as np
import pytest

from helpers import pretrain_runs as pr
from vbert_jax import synthetic

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  return pr.reference_run(tmp_path_factory)


def _checkpoint_steps(workdir):
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_sigterm_and_sigkill_then_resume_exactly(reference, tmp_path):
  seed = int(os.environ.get("VBERT_RESUME_SEED", time.time_ns() % 10**6))
  rng = random.Random(seed)
  # SIGTERM off the checkpoint interval, so that the save it causes is its own.
  term_at = rng.choice([s for s in range(2, 7) if s % pr.CHECKPOINT_EVERY])
  kill_at = rng.randint(term_at + 2, pr.TOTAL_STEPS - 2)
  where = f"(VBERT_RESUME_SEED={seed}: SIGTERM at step {term_at}, SIGKILL at step {kill_at})"
  workdir = tmp_path / "run"

  run = pr.Run(pr.argv(workdir), workdir, "sigterm")
  run.wait_for_step(term_at)
  run.signal(signal.SIGTERM)
  code = run.wait()
  log = run.log_path.read_text()
  assert code == 0, f"{where} SIGTERM'd run exited with {code}\n{run.log_tail()}"
  stopped = max(r["step"] for r in pr.records(workdir))
  assert stopped < pr.TOTAL_STEPS, f"{where} the run ended before the signal"
  assert _checkpoint_steps(workdir)[-1] == stopped, (where, _checkpoint_steps(workdir), stopped)
  assert f"preempted: saved step {stopped}" in log, run.log_tail()

  run = pr.Run(pr.argv(workdir), workdir, "sigkill")
  run.wait_for_step(kill_at)
  run.signal(signal.SIGKILL)
  assert run.wait() == -signal.SIGKILL, f"{where} the run ended before SIGKILL\n{run.log_tail()}"
  assert f"resumed at step {stopped}" in run.log_path.read_text(), run.log_tail()
  killed_after = max(r["step"] for r in pr.records(workdir))

  resumed = pr.run_to_end(workdir, "resumed")
  restart_step = max(s for s in _checkpoint_steps(workdir) if s <= killed_after)
  assert "resumed at step" in resumed.log_path.read_text(), resumed.log_tail()

  expected, got = pr.curve(reference), pr.curve(workdir)
  assert sorted(got) == list(range(1, pr.TOTAL_STEPS + 1)), (where, sorted(got))
  for step, values in got.items():
    for value in values:  # steps redone after the SIGKILL must repeat exactly too
      assert value == expected[step][0], (where, step, dict(zip(pr.CURVE_KEYS, value)),
                                          dict(zip(pr.CURVE_KEYS, expected[step][0])))
  assert any(len(v) > 1 for v in got.values()) or restart_step == killed_after

  ref_step, ref_state = pr.final_state(reference)
  step, state = pr.final_state(workdir)
  assert step == ref_step == pr.TOTAL_STEPS
  ref_flat, got_flat = pr.flat(ref_state), pr.flat(state)
  assert ref_flat.keys() == got_flat.keys()
  for key, value in ref_flat.items():
    np.testing.assert_array_equal(got_flat[key], value, err_msg=f"{where} {key}")


def _truncate_array_data(step_dir):
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  assert files, step_dir
  for path in files:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_truncated_checkpoint_falls_back_and_8_devices_resume_on_1(reference, tmp_path):
  """The reference's newest checkpoint truncated: the run says so, resumes from the one before
  (saved on 8 devices) on 1 device, and writes the newest step again."""
  resume_from, newest = pr.TOTAL_STEPS - pr.CHECKPOINT_EVERY, pr.TOTAL_STEPS
  workdir = tmp_path / "one_device"
  shutil.copytree(reference, workdir)
  (workdir / "metrics.jsonl").unlink()
  _truncate_array_data(workdir / "checkpoints" / str(newest))

  run = pr.run_to_end(workdir, "one_device", devices=1)
  log = run.log_path.read_text()
  assert f"checkpoint {workdir / 'checkpoints' / str(newest)} cannot be read" in log, \
      run.log_tail()
  assert f"resumed at step {resume_from}" in log, run.log_tail()
  assert len(list((workdir / "checkpoints").glob(f"{newest}.unreadable-*"))) == 1
  assert _checkpoint_steps(workdir)[-1] == newest
  versions = json.loads((workdir / "versions.json").read_text())
  assert versions["device_count"] == 1

  # One device sums the batch in another order than eight: close, not bitwise.
  expected, got = pr.curve(reference), pr.curve(workdir)
  assert sorted(got) == list(range(resume_from + 1, pr.TOTAL_STEPS + 1))
  for step, (value,) in got.items():
    np.testing.assert_allclose(value, expected[step][0], rtol=2e-4, atol=1e-6,
                               err_msg=f"step {step}: {pr.CURVE_KEYS}")
  ref_flat = pr.flat(pr.final_state(reference)[1])
  got_flat = pr.flat(pr.final_state(workdir)[1])
  for key, value in ref_flat.items():
    if key.startswith("['params']"):
      np.testing.assert_allclose(got_flat[key], value, atol=1e-4, err_msg=key)


def test_checkpoint_from_another_config_is_named(reference, tmp_path):
  workdir = tmp_path / "other_config"
  shutil.copytree(reference / "checkpoints", workdir / "checkpoints")
  run = pr.Run(pr.argv(workdir, **{"model.hidden_size": 64, "model.mlp_dim": 128}), workdir,
               "other_config")
  code = run.wait()
  log = run.log_path.read_text()
  assert code != 0, run.log_tail()
  assert "was written with another config" in log, run.log_tail()
  assert ("'params/embeddings/visual_embeddings/embedding' has shape (256, 32) in the "
          "checkpoint but (256, 64) in the config") in log, run.log_tail()
  # Not taken for an unreadable checkpoint: every checkpoint is still there.
  assert not list((workdir / "checkpoints").glob("*.unreadable-*"))


def test_sigkill_and_resume_exactly_on_the_tfds_pipeline(tmp_path):
  """The same promise end to end through the TFDS records and the grain pipeline, workers on."""
  from helpers import records_dataset  # pylint: disable=g-import-not-at-top
  from vbert_jax import sequence  # pylint: disable=g-import-not-at-top
  vocab = sequence.JointVocab(text_size=512, visual_size=256)  # the runlocal sizes
  recs = synthetic.random_records(12, vocab, seed=3, min_clips=20, max_clips=60)
  data_dir = records_dataset.write(tmp_path / "tfds", {"train": recs[:9], "validation": recs[9:]})
  extra = {"input.source": "tfds", "input.tfds_name": records_dataset.NAME,
           "input.data_dir": data_dir, "input.worker_count": 2}
  reference = tmp_path / "reference"
  pr.run_to_end(reference, "tfds_reference", **extra)

  workdir = tmp_path / "run"
  kill_at = random.Random(os.environ.get("VBERT_RESUME_SEED", 0)).randint(
      pr.CHECKPOINT_EVERY + 2, pr.TOTAL_STEPS - 2)
  run = pr.Run(pr.argv(workdir, **extra), workdir, "tfds_sigkill")
  run.wait_for_step(kill_at)
  # The kill must find the step-4 checkpoint committed, so that the restart really resumes.
  deadline = time.time() + 60
  while not (workdir / "checkpoints" / str(pr.CHECKPOINT_EVERY)).is_dir():
    assert time.time() < deadline, run.log_tail()
    time.sleep(0.05)
  run.signal(signal.SIGKILL)
  run.wait()
  resumed = pr.run_to_end(workdir, "tfds_resumed", **extra)
  assert "resumed at step" in resumed.log_path.read_text(), resumed.log_tail()

  expected, got = pr.curve(reference), pr.curve(workdir)
  assert sorted(got) == list(range(1, pr.TOTAL_STEPS + 1))
  for step, values in got.items():
    for value in values:
      assert value == expected[step][0], (kill_at, step, value, expected[step][0])
  ref_flat = pr.flat(pr.final_state(reference)[1])
  got_flat = pr.flat(pr.final_state(workdir)[1])
  for key, value in ref_flat.items():
    np.testing.assert_array_equal(got_flat[key], value, err_msg=key)
