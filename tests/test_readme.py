"""Every command the README and docs/ show, run as written but on small stand-ins, so they cannot
rot.

Stand-ins shrink what is big (24 videos, a 20736-token vocabulary, BERT-large, a 500k-step run) to
what runs in minutes on two cores; each is a textual substitution listed in STAND_INS, and a
command that no longer matches its stand-in fails the test rather than running at full size.
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from helpers import bert_dir

REPO = pathlib.Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))

# Commands that this test does not run, and why.
NOT_RUN = {"make test": "it is the test suite itself",
           # with its captioning stage, on the smaller world that its checks are calibrated on
           "make demo": "tests/test_demo.py runs it",
           # three full demo worlds, some 40 minutes on two cores
           "make worlds": "tests/test_demo_stages.py runs its loop on stand-in results"}

SHORT_RUN = (" --config.total_steps=6 --config.optimizer.warmup_steps=2 --config.eval.every_steps=6"
             " --config.eval.num_batches=1 --config.checkpoint.every_steps=6")

# (command prefix, [(pattern, replacement), ...]): every pattern must match its command.
STAND_INS: list[tuple[str, list[tuple[str, str]]]] = [
    ("python -m vbert_jax.demo.world.generate", [(r"--num_videos=24 --size=112",
                                             "--num_videos=8 --size=64 --workers=1")]),
    ("python -m vbert_jax.video.extract", [(r"--image_size=224", "--image_size=64 --batch_size=16 "
                                            "--no_progress")]),
    ("python -m vbert_jax.vocab.fit", [(r"--depth=4 --branching=12", "--depth=2 --branching=3")]),
    ("python -m vbert_jax.vocab.grid", []),
    ("python -m vbert_jax.text.train_sentencepiece", [(r"--vocab_size=8000", "--vocab_size=100")]),
    # The README itself is punctuated prose, one paragraph (or line) a document.
    ("python -m vbert_jax.text.train_punctuation", [
        (r"--text=prose.txt", "--text={repo}/README.md --steps=4 --eval_every=2 --no_progress")]),
    ("tfds build data/videobert --manual_dir=corpus --data_dir=tfds_data --config='",
     [(r'"visual_vocab_size": 20736, "text_vocab_size": 8000',
       '"visual_vocab_size": 9, "text_vocab_size": 100, "validation_fraction": 0.4')]),
    # Eight videos need a larger validation fraction than the default to give a validation split.
    ("tfds build data/videobert --manual_dir=corpus --data_dir=tfds_data --config=bert",
     [(r"--config=bert$", """--config='{"name": "bert_small", "tokenizer": "wordpiece", "tokenizer_file": "vocab.txt", "validation_fraction": 0.4}'""")]),
    ("python -m vbert_jax.main --config=configs/pretrain.py:variant=base", [
        (r"variant=base", "variant=mu,runlocal"),
        (r"text_vocab_size=8000", "text_vocab_size=100"),
        (r"visual_vocab_size=20736", "visual_vocab_size=9"),
        # The tasks' templates need longer examples than runlocal's 16 tokens.
        (r"$", " --config.max_len=64 --config.input.max_example_len=64" + SHORT_RUN)]),
    ("python -m vbert_jax.main --config=configs/pretrain.py:variant=large", [
        (r"variant=large", "variant=mu,runlocal"),
        (r"tfds_name=videobert/bert", "tfds_name=videobert/bert_small"),
        (r"$", " --config.model.visual_vocab_size=9" + SHORT_RUN)]),
    ("python -m vbert_jax.main --config=configs/pretrain.py:variant=tiny,runlocal",
     [(r"$", " --config.total_steps=20 --config.eval.every_steps=20")]),
    ("python -m vbert_jax.main --config=configs/pretrain.py:variant=mu,runlocal", []),
    ("python -m vbert_jax.aot", [(r"variant=base", "variant=mu"),
                                 (r"$", " --config.batch_size=16 --config.max_len=32")]),
    ("python -m vbert_jax.aot --config=configs/pretrain.py:variant=large",
     [(r"$", "; test $? -eq 1")]),  # the README shows it not fitting: exit status 1
    ("python -m vbert_jax.video.convert_s3d", []),
    ("python -m vbert_jax.tasks.", []),
    ("python -m vbert_jax.captioning.features", []),
    ("python -m vbert_jax.captioning.train", [(r"variant=small", "variant=tiny,runlocal"),
                                              (r"$", SHORT_RUN)]),
    ("python -m vbert_jax.captioning.evaluate", []),
    ("python -m vbert_jax.sweep --sweep=configs/sweeps/mu_lr_loss.py --workdir=runs/mu_lr_loss --",
     [(r"--config.total_steps=100", "--config.total_steps=4 --config.optimizer.warmup_steps=2")]),
    ("python -m vbert_jax.sweep --sweep=configs/sweeps/mu_lr_loss.py --workdir=runs/mu_lr_loss "
     "--collect_only", []),
    ("python -m launch.tpu_vm", [(r"--dry_run", "--dry_run")]),
    ("python -m launch.xpk", [(r"--dry_run", "--dry_run")]),
    ("mkdir -p corpus/videos corpus/transcripts", []),
    ("mv corpus/raw/*.mp4 corpus/videos/", []),
    ("cp bert-large-uncased/vocab.txt corpus/vocab.txt", []),
]


def readme_commands() -> list[str]:
  """The commands of the ```sh blocks of the README, then of docs/, in order, without comments."""
  commands = []
  text = "\n".join(path.read_text() for path in [README, *DOCS])
  for block in re.findall(r"```sh\n(.*?)```", text, re.S):
    for line in block.replace("\\\n", " ").splitlines():
      line = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
      if line:
        commands.append(line)
  return commands


def stand_in(command: str, tmp: pathlib.Path) -> str:
  matches = [(p, subs) for p, subs in STAND_INS if command.startswith(p)]
  if not matches:
    raise AssertionError(f"README command without a stand-in entry in {__file__}: {command}")
  _, subs = max(matches, key=lambda m: len(m[0]))
  for pattern, replacement in subs:
    replacement = replacement.replace("{repo}", str(REPO)).replace("{tmp}", str(tmp))
    command, n = re.subn(pattern, lambda _, r=replacement: r, command, count=1)
    assert n == 1, f"stand-in {pattern!r} no longer matches the README command: {command}"
  return command


def test_every_readme_command_has_a_stand_in(tmp_path):
  commands = readme_commands()
  assert "make demo" in commands and "make test" in commands
  for command in commands:
    if command not in NOT_RUN:
      stand_in(command, tmp_path)


def _workspace(tmp: pathlib.Path, commands: list[str]) -> dict[str, str]:
  """The user's folder: the repo's data/ and configs/, and the BERT and S3D files of their own
  that `commands` name."""
  for name in ("data", "configs"):
    (tmp / name).symlink_to(REPO / name)
  if any("bert-large-uncased" in c for c in commands):
    bert_dir.write_bert_dir(tmp / "bert-large-uncased", vocab_size=512, hidden_size=32,
                            num_layers=2, num_heads=2, mlp_dim=64, max_positions=64)
  if any("S3D_kinetics400.pt" in c for c in commands):
    import torch  # pylint: disable=g-import-not-at-top
    import torchvision  # pylint: disable=g-import-not-at-top
    torch.save(torchvision.models.video.s3d().state_dict(), tmp / "S3D_kinetics400.pt")
  venv_bin = str(pathlib.Path(sys.executable).parent)
  return dict(os.environ, PATH=f"{venv_bin}:{os.environ['PATH']}", PYTHONPATH=str(REPO),
              JAX_PLATFORMS="cpu")


# The commands fall into groups that share no files, so that the suite's workers run them side by
# side; each group runs in its own folder, in the documents' order. "corpus" is the rest: the walk
# from generated videos to a trained model and what uses it.
GROUPS = {
    "aot": ("python -m vbert_jax.aot",),
    "runs": ("python -m vbert_jax.main --config=configs/pretrain.py:variant=tiny,runlocal",
             "python -m vbert_jax.main --config=configs/pretrain.py:variant=mu,runlocal",
             "python -m vbert_jax.sweep", "python -m vbert_jax.video.convert_s3d",
             "python -m launch."),
}


def group_of(command: str) -> str:
  return next((g for g, prefixes in GROUPS.items() if command.startswith(prefixes)), "corpus")


def _check_corpus(tmp: pathlib.Path) -> None:
  assert len(list((tmp / "corpus" / "features").glob("*.npz"))) == 8
  assert (tmp / "corpus" / "vocab_grid.png").stat().st_size > 0
  assert (tmp / "corpus" / "text.model").is_file()
  assert (tmp / "corpus" / "punctuation.msgpack").is_file()
  for run in ("base", "large", "captioner"):
    assert any((tmp / "runs" / run / "checkpoints").iterdir()), run
  for task in ("zero_shot", "t2v", "forecast", "captions", "retrieval"):
    assert (tmp / "results" / task / "results.json").is_file(), task


def _check_runs(tmp: pathlib.Path) -> None:
  assert (tmp / "s3d.msgpack").is_file()
  for run in ("tiny", "fsdp"):
    assert any((tmp / "runs" / run / "checkpoints").iterdir()), run
  assert len(list((tmp / "runs" / "mu_lr_loss").glob("*/checkpoints"))) == 4
  assert (tmp / "runs" / "mu_lr_loss" / "results.csv").is_file()


# What each group's commands promised to write (the aot commands print their verdicts only).
CHECKS = {"corpus": _check_corpus, "runs": _check_runs, "aot": lambda tmp: None}


def test_every_command_is_in_a_group_with_something_to_run():
  groups = [group_of(c) for c in readme_commands() if c not in NOT_RUN]
  assert sorted(set(groups)) == sorted(CHECKS)
  assert groups.count("aot") >= 2


def run_group(group: str, tmp_path: pathlib.Path) -> None:
  """The group's commands as written, in the documents' order, in a folder of their own."""
  commands = [c for c in readme_commands() if c not in NOT_RUN and group_of(c) == group]
  env = _workspace(tmp_path, commands)
  for command in commands:
    run = stand_in(command, tmp_path)
    proc = subprocess.run(["bash", "-c", run], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, (f"README command failed: {command}\nran: {run}\n"
                                  f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
  CHECKS[group](tmp_path)


# One class per group: each is a scope of its own, which the suite's workers take separately.
@pytest.mark.slow
class TestCorpusCommands:

  def test_run(self, tmp_path):
    run_group("corpus", tmp_path)


@pytest.mark.slow
class TestRunsCommands:

  def test_run(self, tmp_path):
    run_group("runs", tmp_path)


@pytest.mark.slow
class TestAotCommands:

  def test_run(self, tmp_path):
    run_group("aot", tmp_path)


def test_every_group_has_its_test():
  assert {"corpus": TestCorpusCommands, "runs": TestRunsCommands,
          "aot": TestAotCommands}.keys() == CHECKS.keys()


def test_not_run_commands_are_real_make_targets():
  targets = re.findall(r"^([a-z]+):", (REPO / "Makefile").read_text(), re.M)
  for command in NOT_RUN:
    assert shlex.split(command)[1] in targets
