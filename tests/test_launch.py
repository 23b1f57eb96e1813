"""The TPU VM launcher: its --dry_run commands for a multi-worker slice, its refusals, and the
on-worker script run for real on this machine (start, log, stop)."""

import os
import pathlib
import shlex
import subprocess
import sys
import time

import pytest

from launch import tpu_vm

REPO = pathlib.Path(__file__).resolve().parents[1]
RUN_TPU = REPO / "launch" / "run_tpu.sh"
WHERE = ["--zone=us-central2-b", "--project=vb-proj"]
FLAGS = ["--tpu=vb-pod", *WHERE]
TARBALL = tpu_vm.tarball_path(tpu_vm.Settings(tpu="vb-pod", zone="us-central2-b"))


@pytest.fixture(autouse=True)
def no_commands_run(monkeypatch):
  """Nothing in these tests may reach gcloud: any command run is a failure."""
  def refuse(commands):
    raise AssertionError(f"commands were run: {commands}")
  monkeypatch.setattr(tpu_vm, "execute", refuse)


def dry_run(argv, capsys, environ=None):
  """The printed commands, each split back into its arguments."""
  code = tpu_vm.main([*argv[:1], "--dry_run", *argv[1:]], environ=environ or {})
  out, err = capsys.readouterr()
  assert code == 0, err
  return [shlex.split(line) for line in out.splitlines()], err


def ssh(command, worker="all"):
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "vb-pod", *WHERE, f"--worker={worker}",
          f"--command={command}"]


def test_create_setup_run_logs_stop_delete_on_a_v4_32(capsys):
  cmds, err = dry_run(["create", *FLAGS, "--accelerator_type=v4-32"], capsys)
  assert cmds == [["gcloud", "compute", "tpus", "tpu-vm", "create", "vb-pod", *WHERE,
                   "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"]]
  assert "v4-32: 16 chips on 4 worker(s)" in err

  cmds, _ = dry_run(["setup", *FLAGS], capsys)
  assert cmds[0][:3] == ["tar", "-czf", TARBALL] and cmds[0][-3:] == ["-C", str(REPO), "."]
  assert "--exclude=.venv" in cmds[0] and "--exclude=.git" in cmds[0]
  assert cmds[1] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", TARBALL,
                     "vb-pod:~/vbert_jax_code.tar.gz", "--worker=all", *WHERE]
  assert cmds[2] == ssh(
      "rm -rf ~/vbert_jax.new && mkdir -p ~/vbert_jax.new && tar -xzf ~/vbert_jax_code.tar.gz "
      "-C ~/vbert_jax.new && rm -rf ~/vbert_jax && mv ~/vbert_jax.new ~/vbert_jax && "
      "rm -f ~/vbert_jax_code.tar.gz")
  assert cmds[3] == ssh("bash ~/vbert_jax/launch/run_tpu.sh setup")
  assert len(cmds) == 4

  cmds, _ = dry_run(["run", *FLAGS, "--accelerator_type=v4-32", "--workdir=gs://vb/run1", "--",
                     "--config=configs/pretrain.py:variant=large", "--config.batch_size=256"],
                    capsys)
  assert cmds == [ssh("cd ~/vbert_jax && bash launch/run_tpu.sh start vbert vbert_jax.main "
                      "--config=configs/pretrain.py:variant=large --config.batch_size=256 "
                      "--workdir=gs://vb/run1")]

  cmds, _ = dry_run(["logs", *FLAGS, "--lines=20"], capsys)
  assert cmds == [ssh("tail -n 20 ~/logs/vbert_*.log")]
  cmds, _ = dry_run(["logs", *FLAGS, "--accelerator_type=v4-32", "--worker=3", "--follow"],
                    capsys)
  assert cmds == [ssh("tail -n 100 -F ~/logs/vbert_*.log", worker="3")]
  cmds, _ = dry_run(["logs", *FLAGS, "--fetch=fetched/logs"], capsys)
  assert cmds == [["gcloud", "compute", "tpus", "tpu-vm", "scp", "vb-pod:~/logs/vbert_*.log",
                   "fetched/logs", "--worker=all", *WHERE]]
  assert not os.path.exists("fetched")  # a dry run creates nothing

  cmds, _ = dry_run(["stop", *FLAGS], capsys)
  assert cmds == [ssh("bash ~/vbert_jax/launch/run_tpu.sh stop")]
  cmds, _ = dry_run(["delete", *FLAGS], capsys)
  assert cmds == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "vb-pod", *WHERE, "--quiet"]]


def test_queued_v5e_pod_from_environment_variables(capsys):
  env = {"TPU_NAME": "vb-v5e", "TPU_ZONE": "us-west4-a", "TPU_PROJECT": "p2",
         "TPU_TYPE": "v5litepod-16", "TPU_QUEUED": "1", "TPU_SPOT": "true",
         "TPU_REMOTE_DIR": "~/code/vb", "WORKDIR": "gs://vb/sweep/a=1"}
  where = ["--zone=us-west4-a", "--project=p2"]
  cmds, err = dry_run(["create"], capsys, env)
  assert cmds == [["gcloud", "compute", "tpus", "queued-resources", "create", "vb-v5e", *where,
                   "--node-id=vb-v5e", "--accelerator-type=v5litepod-16",
                   "--runtime-version=v2-alpha-tpuv5-lite", "--spot"]]
  assert "16 chips on 4 worker(s)" in err
  cmds, _ = dry_run(["run", "--run_name=a1", "--foreground", "--module=vbert_jax.sweep", "--",
                     "--help"], capsys, env)
  assert cmds == [["gcloud", "compute", "tpus", "tpu-vm", "ssh", "vb-v5e", *where, "--worker=all",
                   "--command=cd ~/code/vb && bash launch/run_tpu.sh run a1 vbert_jax.sweep "
                   "--help --workdir=gs://vb/sweep/a=1"]]
  cmds, _ = dry_run(["delete"], capsys, env)
  assert cmds == [["gcloud", "compute", "tpus", "queued-resources", "delete", "vb-v5e", *where,
                   "--force", "--quiet"]]
  # Flags win over the environment.
  cmds, _ = dry_run(["status", "--tpu=other", "--no-queued"], capsys, env)
  assert cmds == [["gcloud", "compute", "tpus", "tpu-vm", "describe", "other", *where]]


@pytest.mark.parametrize("name, chips, workers", [
    ("v4-8", 4, 1), ("v4-16", 8, 2), ("v4-32", 16, 4), ("v4-128", 64, 16),
    ("v5litepod-4", 4, 1), ("v5litepod-8", 8, 1), ("v5litepod-16", 16, 4),
    ("v5litepod-256", 256, 64), ("v5p-8", 4, 1), ("v5p-16", 8, 2), ("v5p-128", 64, 16),
    ("v6e-8", 8, 1), ("v6e-16", 16, 4)])
def test_worker_counts(name, chips, workers):
  accel = tpu_vm.parse_accelerator(name)
  assert (accel.chips, accel.workers) == (chips, workers)


@pytest.mark.parametrize("argv, message", [
    (["create", *FLAGS, "--accelerator_type=v5e-16"],
     "unknown accelerator type 'v5e-16'; known types: v4-8, v4-16"),
    (["run", *FLAGS, "--accelerator_type=v4-12", "--workdir=gs://b/r", "--", "--config=c.py"],
     "unknown accelerator type 'v4-12'"),
    (["create", *FLAGS], "create: missing --accelerator_type (or $TPU_TYPE)"),
    (["setup", "--zone=z"], "setup: missing --tpu (or $TPU_NAME)"),
    (["run", *FLAGS, "--", "--config=configs/pretrain.py"], "run: missing --workdir (or $WORKDIR)"),
    (["run", *FLAGS, "--workdir=gs://b/r"], "run: give the config after --"),
    (["run", *FLAGS, "--accelerator_type=v5litepod-16", "--workdir=/tmp/run", "--",
      "--config=c.py"], "v5litepod-16 has 4 workers that must share it; use gs://"),
    (["run", *FLAGS, "--workdir=gs://b/r", "--", "--config=c.py", "--dry_run"],
     "put it before --"),
    (["logs", *FLAGS, "--accelerator_type=v4-16", "--worker=2"],
     "logs: --worker=2; v4-16 has workers 0..1"),
    (["stop", *FLAGS, "--", "x"], "stop: takes no arguments after --"),
])
def test_bad_input_fails_before_anything_runs(argv, message, capsys):
  # Without --dry_run: a command that got through would reach the refusing executor.
  assert tpu_vm.main(argv, environ={}) == 2
  out, err = capsys.readouterr()
  assert out == ""
  assert message in err, err


def test_unknown_type_lists_every_generation(capsys):
  tpu_vm.main(["create", *FLAGS, "--accelerator_type=v9-8", "--dry_run"], environ={})
  err = capsys.readouterr().err
  for known in ("v4-32", "v5litepod-16", "v5p-8..v5p-12288", "v6e-256"):
    assert known in err


def test_run_tpu_script_starts_logs_and_stops_a_run(tmp_path):
  """The on-worker script, for real: a detached run writes its per-host log; `stop` ends a run
  left behind (its pid file) and clears a stale libtpu lock file."""
  subprocess.run(["bash", "-n", str(RUN_TPU)], check=True)
  logs = tmp_path / "logs"
  lock = tmp_path / "libtpu_lockfile"
  venv = pathlib.Path(sys.executable).parents[1]
  env = dict(os.environ, HOME=str(tmp_path), VBERT_VENV=str(venv),
             VBERT_LOGS=str(logs), VBERT_TPU_LOCKFILE=str(lock))
  host = subprocess.run(["hostname"], capture_output=True, text=True, check=True).stdout.strip()

  def script(*args, **kwargs):
    return subprocess.run(["bash", str(RUN_TPU), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60, **kwargs)

  # Attached: waits, and the output is in the log too. The module runs from the code directory.
  proc = script("run", "help", "vbert_jax.sweep", "--help")
  assert proc.returncode == 0, proc.stderr
  assert "usage: python -m vbert_jax.sweep" in (logs / f"help_{host}.log").read_text()

  # Detached: a long run keeps going after the script returns ...
  proc = script("start", "long", "timeit", "-n", "1", "import time; time.sleep(60)")
  assert proc.returncode == 0, proc.stderr
  pid = int((logs / "current.pid").read_text())
  assert (logs / f"long_{host}.log").exists()
  os.kill(pid, 0)
  lock.write_text("")
  # ... until `stop` (which every start runs first) ends it and removes the stale lock.
  proc = script("stop")
  assert proc.returncode == 0, proc.stderr
  assert f"stopping process {pid}" in proc.stdout
  deadline = time.monotonic() + 10
  while time.monotonic() < deadline and pathlib.Path(f"/proc/{pid}").exists() and \
      "zombie" not in pathlib.Path(f"/proc/{pid}/status").read_text().lower():
    time.sleep(0.1)
  status = pathlib.Path(f"/proc/{pid}/status")
  assert not status.exists() or "zombie" in status.read_text().lower()
  assert not lock.exists() and not (logs / "current.pid").exists()

  assert script("bogus").returncode == 2
