"""Sweeps: the override helpers, run names and command lines, refusals before anything starts,
the results table, and a real local sweep of `mu`: 2 runs that change the learning rate and the
loss weights together."""

import csv
import json
import os
import pathlib
import shlex
import sys

import pytest

from vbert_jax import sweep

REPO = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = str(REPO / "configs" / "sweeps" / "mu_lr_loss.py")
CONFIG = "configs/pretrain.py:variant=mu,runlocal"
NAMES = ["optimizer.learning_rate=0.001,loss.beta=1,loss.gamma=1",
         "optimizer.learning_rate=0.001,loss.beta=0.5,loss.gamma=0.5",
         "optimizer.learning_rate=0.003,loss.beta=1,loss.gamma=1",
         "optimizer.learning_rate=0.003,loss.beta=0.5,loss.gamma=0.5"]


@pytest.fixture(autouse=True)
def repo_cwd(monkeypatch):
  monkeypatch.chdir(REPO)  # config and sweep paths are relative to the repository


def test_helpers_expand_product_zip_chain():
  lr = sweep.sweep("config.optimizer.learning_rate", [1, 2])
  assert lr == [{"optimizer.learning_rate": 1}, {"optimizer.learning_rate": 2}]
  both = sweep.zipit(sweep.sweep("a", [1, 2]), sweep.sweep("b", [3, 4]))
  assert both == [{"a": 1, "b": 3}, {"a": 2, "b": 4}]
  grid = sweep.product(sweep.sweep("x", ["p", "q"]), both, sweep.fixed("seed", 7))
  assert grid == [{"x": "p", "a": 1, "b": 3, "seed": 7}, {"x": "p", "a": 2, "b": 4, "seed": 7},
                  {"x": "q", "a": 1, "b": 3, "seed": 7}, {"x": "q", "a": 2, "b": 4, "seed": 7}]
  assert sweep.chainit(lr, sweep.fixed("a", 0)) == lr + [{"a": 0}]
  with pytest.raises(ValueError, match=r"zipit: its parts have different lengths \[2, 3\]"):
    sweep.zipit(sweep.sweep("a", [1, 2]), sweep.sweep("b", [1, 2, 3]))
  with pytest.raises(ValueError, match="product: key 'a' is set by more than one"):
    sweep.product(sweep.sweep("a", [1]), sweep.sweep("a", [2]))


def test_example_sweep_expands_to_four_named_runs(tmp_path):
  runs, config = sweep.load_sweep(EXAMPLE)
  assert config == CONFIG
  assert runs == [{"optimizer.learning_rate": lr, "loss.beta": w, "loss.gamma": w}
                  for lr in (1e-3, 3e-3) for w in (1.0, 0.5)]
  planned = sweep.plan_runs(CONFIG, runs, str(tmp_path), ["--config.total_steps=10"])
  assert [r.name for r in planned] == NAMES
  assert planned[1].command == [
      sys.executable, "-m", "vbert_jax.main", f"--workdir={tmp_path / NAMES[1]}",
      f"--config={CONFIG}", "--config.optimizer.learning_rate=0.001", "--config.loss.beta=0.5",
      "--config.loss.gamma=0.5", "--config.total_steps=10"]


def test_names_keep_only_what_varies_and_stay_distinct():
  runs = sweep.product(sweep.fixed("seed", 1), sweep.sweep("optimizer.learning_rate",
                                                           [1e-5, 1.000001e-5, 2e-5]))
  # %g would give the first two the same name; the exact values keep them apart.
  assert sweep.run_names(runs) == ["optimizer.learning_rate=1e-05",
                                   "optimizer.learning_rate=1.000001e-05",
                                   "optimizer.learning_rate=2e-05"]
  assert sweep.run_names([{"input.tfds_name": "videobert/bert x"}]) == ["run"]
  assert sweep.run_names([{"t": "a/b c"}, {"t": "d"}]) == ["t=a_b_c", "t=d"]
  with pytest.raises(ValueError, match="runs 0 and 2 have the same settings"):
    sweep.run_names([{"a": 1}, {"a": 2}, {"a": 1}])


def _sweep_file(tmp_path, body):
  path = tmp_path / "bad_sweep.py"
  path.write_text(f"CONFIG = {CONFIG!r}\n\ndef get_sweep():\n  from vbert_jax import sweep as h\n"
                  f"  return {body}\n")
  return str(path)


@pytest.mark.parametrize("body, message", [
    ("h.sweep('optimizer.learnin_rate', [1e-3])",
     "run 0: the config has no key 'optimizer.learnin_rate' (no 'learnin_rate' in "
     "config.optimizer); did you mean 'optimizer.learning_rate'"),
    ("h.product(h.sweep('loss.beta', [1.0]), h.sweep('losses.gamma', [1.0, 2.0]))",
     "the config has no key 'losses.gamma' (no 'losses' in config); did you mean 'loss'"),
    ("h.sweep('loss.beta', ['high'])", "loss.beta='high' does not fit the config"),
    ("[1, 2]", "run 0 is 1; expected a dict of overrides"),
])
def test_bad_sweep_fails_before_anything_is_launched(tmp_path, capsys, body, message):
  path = _sweep_file(tmp_path, body)
  workdir = tmp_path / "runs"
  assert sweep.main([f"--sweep={path}", f"--workdir={workdir}"]) == 2
  err = capsys.readouterr().err
  assert message in err and path in err, err
  assert not workdir.exists()


def test_bad_extra_arguments_fail_naming_them(tmp_path, capsys):
  workdir = tmp_path / "runs"
  assert sweep.main([f"--sweep={EXAMPLE}", f"--workdir={workdir}", "--",
                     "--config.total_stepz=10"]) == 2
  assert "no key 'total_stepz'" in capsys.readouterr().err
  assert sweep.main([f"--sweep={EXAMPLE}", f"--workdir={workdir}", "--", "--workdir=x"]) == 2
  assert "expected --config.KEY=VALUE" in capsys.readouterr().err
  assert not workdir.exists()


def test_dry_run_prints_the_command_lines(tmp_path, capsys):
  assert sweep.main([f"--sweep={EXAMPLE}", f"--workdir={tmp_path}/r", "--dry_run", "--",
                     "--config.total_steps=10"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == f"4 runs of {CONFIG} under {tmp_path}/r"
  cmds = [shlex.split(line) for line in lines[1:]]
  assert [c[3] for c in cmds] == [f"--workdir={tmp_path}/r/{n}" for n in NAMES]
  assert all(c[-1] == "--config.total_steps=10" for c in cmds)


def test_tpu_launcher_gets_each_run(tmp_path, capfd):
  code = sweep.main([f"--sweep={EXAMPLE}", "--workdir=gs://vb/sweeps/lr_loss", "--launcher=tpu",
                     "--tpu_flags=--tpu=vb-pod --zone=us-central2-b --accelerator_type=v4-32",
                     "--dry_run", "--", "--config.total_steps=10"])
  assert code == 0
  out = capfd.readouterr().out
  gcloud = [shlex.split(line) for line in out.splitlines() if line.startswith("gcloud ")]
  assert len(gcloud) == 4
  for cmd, name in zip(gcloud, NAMES):
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "vb-pod"]
    assert "--worker=all" in cmd and "--zone=us-central2-b" in cmd
    remote = shlex.split(cmd[-1].removeprefix("--command="))
    assert remote[:8] == ["cd", "~/vbert_jax", "&&", "bash", "launch/run_tpu.sh", "run", name,
                          "vbert_jax.main"]
    assert remote[-1] == f"--workdir=gs://vb/sweeps/lr_loss/{name}"
    assert f"--config={CONFIG}" in remote and "--config.total_steps=10" in remote


def _write_metrics(workdir, rows):
  workdir.mkdir(parents=True)
  with open(workdir / "metrics.jsonl", "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")


def test_collect_takes_the_last_records_into_csv_and_table(tmp_path):
  runs = sweep.plan_runs(CONFIG, [{"loss.beta": 1.0}, {"loss.beta": 0.5}, {"loss.beta": 0.25}],
                         str(tmp_path))
  _write_metrics(pathlib.Path(runs[0].workdir), [
      {"step": 5, "kind": "train", "loss": 3.0, "mlm_loss": 1.0},
      {"step": 10, "kind": "train", "loss": 2.0, "mlm_loss": 0.5},
      {"step": 10, "kind": "eval", "loss": 2.5}])
  _write_metrics(pathlib.Path(runs[1].workdir), [
      {"step": 10, "kind": "train", "loss": 1.5, "mlm_loss": 0.75}, {"step": 11, "kind": "tr"}])
  runs[0].status = runs[1].status = "ok"
  runs[2].status = "failed (exit 1)"
  columns, rows = sweep.collect(runs)
  assert columns == ["run", "loss.beta", "status", "step", "loss", "mlm_loss", "eval_loss",
                     "workdir"]
  sweep.write_csv(str(tmp_path / "results.csv"), columns, rows)
  with open(tmp_path / "results.csv") as f:
    table = list(csv.DictReader(f))
  assert [(r["run"], r["status"], r["step"], r["loss"], r["eval_loss"]) for r in table] == [
      ("loss.beta=1", "ok", "10", "2.0", "2.5"), ("loss.beta=0.5", "ok", "10", "1.5", ""),
      ("loss.beta=0.25", "failed (exit 1)", "", "", "")]
  text = sweep.format_table(columns, rows).splitlines()
  assert text[0].split() == ["run", "status", "step", "loss", "mlm_loss", "eval_loss"]
  assert text[1].split() == ["loss.beta=1", "ok", "10", "2", "0.5", "2.5"]
  assert text[2].split() == ["*", "loss.beta=0.5", "ok", "10", "1.5", "0.75"]
  assert text[3].split() == ["loss.beta=0.25", "failed", "(exit", "1)"]
  assert text[-1] == "best by loss (min): loss.beta=0.5 (loss=1.5)"


# Two of the example's four runs, zipped: each override differs between them, and each run is a
# process that pays its start-up and compilation.
LOCAL_SWEEP = f"""
CONFIG = "{CONFIG}"


def get_sweep(h):
  return h.zipit(h.sweep("optimizer.learning_rate", [1e-3, 3e-3]),
                 h.sweep("loss.beta", [1.0, 0.5]), h.sweep("loss.gamma", [1.0, 0.5]))
"""
LOCAL_NAMES = [NAMES[0], NAMES[3]]


@pytest.mark.slow
def test_local_sweep_of_mu_runs_each_and_tables_their_final_losses(tmp_path, capsys,
                                                                    monkeypatch):
  # One device per run: the runs are separate processes on two cores.
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
  root = tmp_path / "lr_loss"
  sweep_file = tmp_path / "lr_loss_zip.py"
  sweep_file.write_text(LOCAL_SWEEP)
  code = sweep.main([f"--sweep={sweep_file}", f"--workdir={root}", "--",
                     "--config.total_steps=10", "--config.optimizer.warmup_steps=2",
                     "--config.log_every_steps=1",
                     "--config.eval.every_steps=0", "--config.checkpoint.every_steps=10",
                     f"--config.compilation_cache_dir={REPO / '.cache' / 'jax'}"])
  out = capsys.readouterr().out
  print(out)
  logs = "".join((root / f"{n}.log").read_text()[-2000:] for n in LOCAL_NAMES
                 if (root / f"{n}.log").exists())
  assert code == 0, out + logs
  assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(LOCAL_NAMES)

  with open(root / "results.csv") as f:
    table = {r["run"]: r for r in csv.DictReader(f)}
  assert set(table) == set(LOCAL_NAMES)
  finals = {}
  for name in LOCAL_NAMES:
    lines = (root / name / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    last = [r for r in records if r["kind"] == "train"][-1]
    assert last["step"] == 10 and table[name]["status"] == "ok"
    assert float(table[name]["loss"]) == pytest.approx(last["loss"], rel=1e-6)
    # The overrides reached the runs: the logged total is MLM + beta * MVM + gamma * LVA.
    weight = 0.5 if "beta=0.5" in name else 1.0
    assert last["loss"] == pytest.approx(
        last["mlm_loss"] + weight * (last["mvm_loss"] + last["lva_loss"]), rel=1e-5)
    finals[name] = last
  # ... and the learning rate: the same point of the schedule, 3x apart.
  assert finals[LOCAL_NAMES[1]]["learning_rate"] == pytest.approx(
      3 * finals[LOCAL_NAMES[0]]["learning_rate"], rel=1e-5)
  # The printed table has a row per run with its final loss, and names the best.
  for name in LOCAL_NAMES:
    row = next(line for line in out.splitlines() if name in line and " ok " in line)
    assert f"{finals[name]['loss']:.4g}" in row.split()
  assert "best by loss (min): " in out and f"results: {root / 'results.csv'}" in out


def test_collect_only_tables_runs_made_elsewhere(tmp_path, capsys):
  root = tmp_path / "lr_loss"
  for i, name in enumerate(NAMES[:3]):
    _write_metrics(root / name, [{"step": 10, "kind": "train", "loss": 4.0 - i}])
  assert sweep.main([f"--sweep={EXAMPLE}", f"--workdir={root}", "--collect_only"]) == 1
  out = capsys.readouterr().out
  with open(root / "results.csv") as f:
    table = list(csv.DictReader(f))
  assert [(r["run"], r["status"], r["loss"]) for r in table] == [
      (NAMES[0], "found", "4.0"), (NAMES[1], "found", "3.0"), (NAMES[2], "found", "2.0"),
      (NAMES[3], "no metrics", "")]
  assert f"best by loss (min): {NAMES[2]} (loss=2)" in out
