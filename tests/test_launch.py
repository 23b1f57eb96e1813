"""The TPU VM and xpk launchers: their --dry_run commands for multi-worker and multi-slice runs
(each also accepted by gcloud's own parser), their refusals, the waiting and stopping they do
against a stand-in for gcloud, and the on-worker script run for real on this machine."""

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from launch import tpu_vm
from launch import xpk
from vbert_jax import sweep

REPO = pathlib.Path(__file__).resolve().parents[1]
RUN_TPU = REPO / "launch" / "run_tpu.sh"
WHERE = ["--zone=us-central2-b", "--project=vb-proj"]
FLAGS = ["--tpu=vb-pod", *WHERE]
TARBALL = tpu_vm.tarball_path(tpu_vm.Settings(tpu="vb-pod", zone="us-central2-b"))


@pytest.fixture(autouse=True)
def no_commands_run(request, monkeypatch):
  """Nothing in these tests may reach gcloud, except through the stand-in (`fake_gcloud`)."""
  if "fake_gcloud" in request.fixturenames:
    return

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

  # Every line of every worker's log is labelled with its host (which names the worker).
  label = 'sed -u "s/^/[$(hostname)] /"'
  cmds, _ = dry_run(["logs", *FLAGS, "--lines=20"], capsys)
  assert cmds == [ssh(f'for f in ~/logs/vbert_*.log; do tail -n 20 "$f" | {label}; done')]
  cmds, _ = dry_run(["logs", *FLAGS, "--accelerator_type=v4-32", "--worker=3", "--follow"],
                    capsys)
  assert cmds == [ssh(f"tail -n 100 -F ~/logs/vbert_*.log | {label}", worker="3")]
  # gcloud copies to this machine from one worker at a time.
  cmds, _ = dry_run(["logs", *FLAGS, "--accelerator_type=v4-32", "--fetch=fetched/logs"], capsys)
  assert cmds == [["gcloud", "compute", "tpus", "tpu-vm", "scp", "vb-pod:~/logs/vbert_*.log",
                   "fetched/logs", f"--worker={w}", *WHERE] for w in range(4)]
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
                   "--runtime-version=v2-alpha-tpuv5-lite", "--spot"],
                  # then polled until ACTIVE
                  ["gcloud", "compute", "tpus", "queued-resources", "describe", "vb-v5e", *where,
                   "--format=value(state.state)"]]
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
  cmds, _ = dry_run(["status", "--tpu=other", "--noqueued"], capsys, env)
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
      "--config=c.py"], "the run has 4 workers that must share it; use gs://"),
    (["run", *FLAGS, "--workdir=gs://b/r", "--", "--config=c.py", "--dry_run"],
     "put it before --"),
    (["logs", *FLAGS, "--accelerator_type=v4-16", "--worker=2"],
     "logs: --worker=2; v4-16 has workers 0..1"),
    (["stop", *FLAGS, "--", "x"], "stop: takes no arguments after --"),
    (["create", *FLAGS, "--accelerator_type=v4-32", "--num_slices=2", "--noqueued"],
     "--num_slices=2 is one queued resource of several slices; drop --noqueued"),
    (["create", *FLAGS, "--accelerator_type=v4-32", "--num_slices=0"],
     "--num_slices=0: expected a positive number of slices"),
    (["run", *FLAGS, "--workdir=gs://b/r", "--env=1BAD=x", "--", "--config=c.py"],
     "--env '1BAD=x': expected KEY=VALUE"),
    (["logs", *FLAGS, "--fetch=here"], "logs --fetch: gcloud copies from one worker at a time"),
])
def test_bad_input_fails_before_anything_runs(argv, message, capsys):
  # Without --dry_run: a command that got through would reach the refusing executor.
  assert tpu_vm.main(argv, environ={}) == 2
  out, err = capsys.readouterr()
  assert out == ""
  assert message in err, err


@pytest.mark.parametrize("argv, message", [
    ([], "missing the subcommand, one of create, copy, setup, run, logs, stop, delete, status"),
    (["bogus", *FLAGS], "unknown subcommand 'bogus'; choose one of create, copy, setup, run, "
                        "logs, stop, delete, status"),
    (["logs", *FLAGS, "--workdir=gs://b/r"], "logs: takes no --workdir (a flag of run)"),
    (["create", *FLAGS, "--accelerator_type=v4-8", "--run_name=a"],
     "create: takes no --run_name (a flag of run and logs)"),
    (["run", *FLAGS, "--workdir=gs://b/r", "--nowait", "--", "--config=c.py"],
     "run: takes no --wait (a flag of create)"),
    (["stop", *FLAGS, "--follow"], "stop: takes no --follow (a flag of logs)"),
    (["run", *FLAGS, "--workdir=gs://b/r", "--config=c.py"],
     "Unknown command line flag 'config'"),
    (["run", *FLAGS, "--workdir=gs://b/r", "c.py", "--", "--config=c.py"],
     "run: unexpected arguments ['c.py']; the module's arguments go after --"),
    (["logs", *FLAGS, "--lines=many"], "flag --lines=many"),
])
def test_bad_command_line_is_a_usage_error(argv, message, capsys):
  """Flags the subcommand does not take, a missing or unknown subcommand and stray arguments end
  the launcher with exit status 2 and one line on stderr, before anything runs."""
  with pytest.raises(SystemExit) as stopped:
    tpu_vm.main(argv, environ={})
  assert stopped.value.code == 2
  out, err = capsys.readouterr()
  assert out == ""
  assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_help_lists_the_subcommands_and_their_flags(capsys):
  for argv in (["--help"], ["run", "-h"]):
    with pytest.raises(SystemExit) as stopped:
      tpu_vm.main(argv, environ={})
    assert stopped.value.code == 0
    out = capsys.readouterr().out
    assert "  logs    tail or fetch the per-worker logs of a run" in out
    assert "--fetch: [logs] local directory" in out and "--run_name: [run, logs]" in out


def test_boolean_flags_in_both_absl_spellings(capsys):
  env = {"TPU_QUEUED": "1"}
  # --noqueued and --queued=false override $TPU_QUEUED.
  for flag in ("--noqueued", "--queued=false"):
    cmds, _ = dry_run(["status", *FLAGS, flag], capsys, env)
    assert cmds == [["gcloud", "compute", "tpus", "tpu-vm", "describe", "vb-pod", *WHERE]], flag
  cmds, _ = dry_run(["status", *FLAGS], capsys, env)
  assert cmds[0][3] == "queued-resources"
  # A queued create that does not wait: the same commands, each spelling accepted.
  for flag in ("--nowait", "--wait=false"):
    cmds, _ = dry_run(["create", *FLAGS, "--accelerator_type=v4-8", "--queued", "--spot", flag],
                      capsys)
    assert [c[3:5] for c in cmds] == [["queued-resources", "create"],
                                      ["queued-resources", "describe"]]
    assert "--spot" in cmds[0]
  # Only the launcher's own arguments are respelled: the module's are passed on as given.
  cmds, _ = dry_run(["run", *FLAGS, "--workdir=gs://b/r", "--", "--config=c.py", "--no-queued"],
                    capsys)
  assert cmds[0][-1].endswith("vbert_jax.main --config=c.py --no-queued --workdir=gs://b/r")


def test_arguments_after_the_dashes_pass_through_untouched(capsys):
  """After `--` come the module's arguments: flags of the launcher, help, values with spaces,
  `=` and quotes, and further `--` reach the module as given and change nothing here."""
  rest = ["--config=configs/pretrain.py:variant=base", "--tpu=other", "--help", "-h",
          "--config.name=a b", "--config.note=it's", "--env=X=1", "--", "positional"]
  cmds, _ = dry_run(["run", *FLAGS, "--workdir=gs://vb/r", "--env=A=1", "--", *rest], capsys)
  command = cmds[0][-1]
  assert cmds[0][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "vb-pod"]
  line = command.removeprefix("--command=cd ~/vbert_jax && ")
  assert shlex.split(line) == ["env", "A=1", "bash", "launch/run_tpu.sh", "start", "vbert",
                               "vbert_jax.main", *rest, "--workdir=gs://vb/r"]


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
  env = dict(os.environ, HOME=str(tmp_path), VBERT_VENV=str(venv), VBERT_START_CHECK_S="1",
             VBERT_LOGS=str(logs), VBERT_TPU_LOCKFILE=str(lock))
  host = subprocess.run(["hostname"], capture_output=True, text=True, check=True).stdout.strip()

  def script(*args, **kwargs):
    return subprocess.run(["bash", str(RUN_TPU), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60, **kwargs)

  # Attached: waits, and the output is in the log too. The module runs from the code directory.
  proc = script("run", "help", "vbert_jax.sweep", "--help")
  assert proc.returncode == 0, proc.stderr
  # The module's own help (it begins with the module's docstring) reached the log.
  assert sweep.__doc__.splitlines()[0] in (logs / f"help_{host}.log").read_text()
  # Every run joins JAX's distributed runtime unless told otherwise.
  joins = "import os; assert os.environ['VBERT_DISTRIBUTED'] == '1'"
  assert script("run", "env", "timeit", "-n", "1", joins).returncode == 0

  # A run that dies at once fails its start, with the end of its log.
  proc = script("start", "dies", "timeit", "-n", "1", "raise SystemExit('no TPU here')")
  assert proc.returncode == 1
  assert "the run failed to start" in proc.stderr and "no TPU here" in proc.stderr

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


def test_two_slices_are_one_queued_resource_reached_on_every_node(capsys):
  flags = [*FLAGS, "--accelerator_type=v5litepod-16", "--num_slices=2", "--internal_ip"]
  qr = ["gcloud", "compute", "tpus", "queued-resources"]
  cmds, err = dry_run(["create", *flags], capsys)
  assert cmds == [[*qr, "create", "vb-pod", *WHERE, "--node-count=2", "--node-prefix=vb-pod",
                   "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite"],
                  [*qr, "describe", "vb-pod", *WHERE, "--format=value(state.state)"]]
  assert "v5litepod-16 x 2 slices: 16 chips on 4 worker(s) per slice" in err

  def qr_ssh(command):
    return [*qr, "ssh", "vb-pod", *WHERE, "--node=all", "--worker=all",
            f"--command={command}", "--internal-ip"]

  cmds, _ = dry_run(["setup", *flags], capsys)
  assert cmds[1] == [*qr, "scp", TARBALL, "vb-pod:~/vbert_jax_code.tar.gz", "--node=all",
                     "--worker=all", *WHERE, "--internal-ip"]
  assert cmds[3] == qr_ssh("bash ~/vbert_jax/launch/run_tpu.sh setup")
  cmds, _ = dry_run(["run", *flags, "--workdir=gs://vb/r", "--env=LIBTPU_INIT_ARGS=--a=1 --b=2",
                     "--", "--config=configs/pretrain.py:variant=base"], capsys)
  assert cmds == [qr_ssh("cd ~/vbert_jax && env 'LIBTPU_INIT_ARGS=--a=1 --b=2' bash "
                         "launch/run_tpu.sh start vbert vbert_jax.main "
                         "--config=configs/pretrain.py:variant=base --workdir=gs://vb/r")]
  cmds, _ = dry_run(["logs", *flags, "--fetch=fetched"], capsys)
  assert cmds == [[*qr, "scp", "vb-pod:~/logs/vbert_*.log", "fetched", f"--node={n}",
                   f"--worker={w}", *WHERE, "--internal-ip"] for n in range(2) for w in range(4)]
  cmds, _ = dry_run(["delete", *flags], capsys)
  assert cmds == [[*qr, "delete", "vb-pod", *WHERE, "--force", "--quiet"]]


def test_xpk_workload_of_two_slices(capsys):
  argv = ["--cluster=vb-gke", "--workload=vb-base", "--zone=us-west4-a", "--project=vb-proj",
          "--accelerator_type=v5litepod-16", "--num_slices=2", "--workdir=gs://vb/run1",
          "--env=LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true", "--dry_run",
          "--", "--config=configs/pretrain.py:variant=base"]
  assert xpk.main(argv, environ={}) == 0
  cmd = shlex.split(capsys.readouterr().out)
  assert cmd == [
      "xpk", "workload", "create", "--cluster=vb-gke", "--workload=vb-base",
      "--tpu-type=v5litepod-16", "--num-slices=2", "--zone=us-west4-a", "--project=vb-proj",
      "--base-docker-image=python:3.11", f"--script-dir={REPO}", "--env=VBERT_DISTRIBUTED=1",
      "--env=LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true",
      "--command=bash launch/run_tpu.sh setup && bash launch/run_tpu.sh run vbert "
      "vbert_jax.main --config=configs/pretrain.py:variant=base --workdir=gs://vb/run1"]
  # A prebuilt image holds the requirements: no set-up at start.
  assert xpk.main([*argv[:-3], "--docker_image=gcr.io/vb-proj/vbert:1", "--dry_run", "--",
                   "--config=c.py"], environ={"XPK_CLUSTER": "c2"}) == 0
  cmd = shlex.split(capsys.readouterr().out)
  assert "--docker-image=gcr.io/vb-proj/vbert:1" in cmd and "--script-dir" not in " ".join(cmd)
  assert cmd[-1] == ("--command=bash launch/run_tpu.sh run vbert vbert_jax.main --config=c.py "
                     "--workdir=gs://vb/run1")
  assert xpk.main(["--workload=w", "--zone=z", "--accelerator_type=v5litepod-16", "--dry_run"],
                  environ={}) == 2
  assert "xpk: missing --cluster (or $XPK_CLUSTER)" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--cluster=c", "--zone=z", "--accelerator_type=v5litepod-16", "--dry_run"],
     "--workload must have a value"),
    (["--workload=w", "--cluster=c", "--zone=z", "--accelerator_type=v5litepod-16",
      "--workdir=gs://b/r", "--dry_run", "stray", "--", "--config=c.py"],
     "unexpected arguments ['stray']"),
    (["--workload=w", "--tpu=t", "--dry_run"], "Unknown command line flag 'tpu'"),
])
def test_xpk_bad_command_line_is_a_usage_error(argv, message, capsys):
  with pytest.raises(SystemExit) as stopped:
    xpk.main(argv, environ={})
  assert stopped.value.code == 2
  out, err = capsys.readouterr()
  assert out == "" and err.count("\n") == 1 and message in err, err
  with pytest.raises(SystemExit) as stopped:
    xpk.main(["--help"], environ={})
  assert stopped.value.code == 0 and "--base_docker_image" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("gcloud") is None, reason="needs the Google Cloud CLI")
def test_gcloud_accepts_every_printed_command(capsys):
  """gcloud parses a command before it asks for an account: a misspelled flag fails at once with
  'unrecognized arguments', a valid command stops at the missing credentials."""
  flags = [*FLAGS, "--accelerator_type=v4-32"]
  plans = [["create", *flags], ["create", *flags, "--queued", "--spot"],
           ["create", *flags, "--num_slices=2"], ["setup", *flags, "--internal_ip"],
           ["setup", *flags, "--num_slices=2"],
           ["run", *flags, "--workdir=gs://b/r", "--env=A=1", "--", "--config=c.py"],
           ["run", *flags, "--num_slices=2", "--workdir=gs://b/r", "--", "--config=c.py"],
           ["logs", *flags, "--follow"], ["logs", *flags, "--fetch=f"],
           ["logs", *flags, "--num_slices=2", "--fetch=f", "--worker=1"],
           ["stop", *flags], ["status", *flags, "--queued"], ["delete", *flags, "--queued"]]
  commands = []
  for argv in plans:
    cmds, _ = dry_run(argv, capsys)
    commands += [c for c in cmds if c[0] == "gcloud"]
  assert len({tuple(c[:5]) for c in commands}) >= 8
  env = dict(os.environ, CLOUDSDK_CONFIG=str(pathlib.Path(os.environ.get("TMPDIR", "/tmp")) /
                                             "vbert_gcloud_parse"),
             CLOUDSDK_CORE_DISABLE_PROMPTS="1")
  for cmd in {tuple(c) for c in commands}:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert "unrecognized arguments" not in proc.stderr and "Invalid choice" not in proc.stderr, \
        (cmd, proc.stderr)
    assert "active account" in proc.stderr or "credential" in proc.stderr.lower(), \
        (cmd, proc.stderr[-500:])


FAKE_GCLOUD = """#!{python}
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
  f.write(json.dumps(args) + "\\n")
if "describe" in args:
  states = os.environ["FAKE_GCLOUD_STATES"].split(",")
  seen = sum(1 for line in open(os.environ["FAKE_GCLOUD_LOG"]) if "describe" in line)
  print(states[min(seen, len(states)) - 1])
fail = os.environ.get("FAKE_GCLOUD_FAIL")
sys.exit(1 if fail and any(fail in a for a in args) else 0)
"""


@pytest.fixture
def fake_gcloud(tmp_path, monkeypatch):
  """A `gcloud` first on PATH that records each call and answers as the test says."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  script = bin_dir / "gcloud"
  script.write_text(FAKE_GCLOUD.format(python=sys.executable))
  script.chmod(0o755)
  log = tmp_path / "gcloud_calls.jsonl"
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  monkeypatch.setenv("FAKE_GCLOUD_LOG", str(log))

  def calls():
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
  return calls


def test_queued_create_waits_until_active(fake_gcloud, monkeypatch, capsys):
  monkeypatch.setenv("FAKE_GCLOUD_STATES", "WAITING_FOR_RESOURCES,PROVISIONING,ACTIVE")
  argv = ["create", *FLAGS, "--accelerator_type=v4-32", "--queued", "--poll_s=0"]
  assert tpu_vm.main(argv, environ={}) == 0
  verbs = [c[3] for c in fake_gcloud()]
  assert verbs == ["create", "describe", "describe", "describe"]
  err = capsys.readouterr().err
  assert "vb-pod: WAITING_FOR_RESOURCES" in err and "queued resource vb-pod is ACTIVE" in err


def test_queued_create_that_fails_says_so(fake_gcloud, monkeypatch):
  monkeypatch.setenv("FAKE_GCLOUD_STATES", "WAITING_FOR_RESOURCES,FAILED")
  argv = ["create", *FLAGS, "--accelerator_type=v4-32", "--queued", "--poll_s=0"]
  with pytest.raises(SystemExit, match="queued resource vb-pod is FAILED: it will not start"):
    tpu_vm.main(argv, environ={})
  assert [c[3] for c in fake_gcloud()] == ["create", "describe", "describe"]


def test_a_worker_that_fails_to_start_stops_the_others(fake_gcloud, monkeypatch, capsys):
  monkeypatch.setenv("FAKE_GCLOUD_FAIL", "run_tpu.sh start")
  argv = ["run", *FLAGS, "--accelerator_type=v4-32", "--workdir=gs://b/r", "--",
          "--config=configs/pretrain.py:variant=base"]
  with pytest.raises(SystemExit) as stopped:
    tpu_vm.main(argv, environ={})
  assert stopped.value.code == 1
  calls = fake_gcloud()
  assert len(calls) == 2
  assert "launch/run_tpu.sh start vbert vbert_jax.main" in calls[0][-1]
  assert calls[1] == ssh("bash ~/vbert_jax/launch/run_tpu.sh stop")[1:]
  assert "stopping it on every worker" in capsys.readouterr().err
