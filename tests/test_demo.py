"""The demo end to end on a smaller world: it learns, it resumes, and it is honest.

One run of every stage (captioning aside, which its own tests cover) is shared by the tests of
this file; a second run with the narration dealt to other videos checks that zero-shot accuracy
comes from the link between video and narration, not from anything else.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest

from helpers.configs import demo as demo_config
from vbert_jax.demo import main as demo_main
from vbert_jax.demo import prepare
from vbert_jax.demo import stages

pytestmark = pytest.mark.slow
REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(shuffle: bool = False):
  c = demo_config.get_config("size=small")
  c.captioning.enabled = False
  c.world.workers = 1
  c.world.shuffle_narration = shuffle
  c.pretrain.compilation_cache_dir = str(REPO / ".cache" / "jax")
  return c


def _quiet(_: str) -> None:
  pass


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("demo") / "work"
  results = demo_main.run(_config(), workdir, log=_quiet)
  return workdir, results


def _tasks(workdir) -> dict:
  return json.loads((workdir / "tasks" / "tasks.json").read_text())


def test_zero_shot_learns_on_held_out_steps(small_run):
  workdir, _ = small_run
  zs = _tasks(workdir)["zero_shot"]
  assert zs["steps"] >= 50
  # The best prompt order: the model pretrains on [CLS] text [>] video [SEP] only.
  best = max(zs["orders"].values(), key=lambda r: r["verb_top1"] + r["noun_top1"])
  for key in ("verb", "noun"):
    assert best[f"{key}_top1"] >= 2 * zs[f"{key}_chance"], zs
    # and above a guess blind to the video (the held-out steps' most frequent label)
    assert best[f"{key}_top1"] > zs[f"{key}_majority"], zs
  results = (workdir / "results" / "results.md").read_text()
  assert "| zero-shot noun (video_first) | top-1 |" in results
  assert "| zero-shot noun (text_first, paper template) | top-1 |" in results
  assert set(zs["paper_template"]) == set(zs["orders"])
  assert "1-NN raw S3D" in results


def test_alignment_shows_each_narrated_step_with_its_clips_and_with_others(small_run):
  workdir, _ = small_run
  lva = _tasks(workdir)["alignment"]
  assert lva["pairs"] == 2 * lva["positives"] >= 40
  assert 0 <= lva["accuracy"] <= 1
  # The tokens carry the steps' words: naive Bayes on them beats chance by a margin.
  assert lva["token_ceiling"] > 0.6, lva
  assert "naive Bayes on tokens" in (workdir / "results" / "results.md").read_text()


def test_writes_its_pictures_and_tensorboard_logs(small_run):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  workdir, _ = small_run
  pictures = [workdir / prepare.VOCAB / "vocabulary_grid.png"] + [
      workdir / "tasks" / f"{name}.png" for name in ("zero_shot_frames", "text_to_video",
                                                     "forecast")]
  for path in pictures:
    with Image.open(path) as image:
      pixels = image.convert("L").getextrema()
      assert min(image.size) >= 64 and pixels[1] > pixels[0], (path, image.size, pixels)
  assert list((workdir / prepare.PRETRAIN).rglob("events.out.tfevents*"))


def test_results_ignore_a_captioning_folder_left_by_another_run(small_run, tmp_path):
  """With captioning off, figures an earlier run left in captioning/ never reach the table."""
  from vbert_jax.demo import evaluate  # pylint: disable=g-import-not-at-top
  workdir, _ = small_run
  (tmp_path / "tasks").mkdir()
  shutil.copy(workdir / "tasks" / "tasks.json", tmp_path / "tasks")
  (tmp_path / "captioning").mkdir()
  scores = {"Bleu_4": 0.5, "CIDEr": 4.0}
  stale = {"model": scores, "most_frequent": scores, "shuffled_features": scores}
  (tmp_path / "captioning" / "captioning.json").write_text(json.dumps(stale))
  out = tmp_path / "results"
  out.mkdir()
  evaluate.run_results(_config(), tmp_path, out)
  assert "captioning" not in (out / "results.md").read_text()
  assert json.loads((out / "results.json").read_text())["captioning"] is None
  assert (out / "results.md").read_text() == (workdir / "results" / "results.md").read_text()


def test_held_out_videos_never_reach_pretraining(small_run):
  from vbert_jax.demo.world import world  # pylint: disable=g-import-not-at-top
  workdir, results = small_run
  manifest = world.load_manifest(workdir / "world")
  held = {v["video_id"] for v in manifest["videos"] if v["split"] == "val"}
  trained = {p.stem for p in (workdir / "corpus" / "features").glob("*.npz")}
  assert held and trained and not held & trained
  assert {p.stem for p in (workdir / "corpus" / "transcripts").glob("*.vtt")} == trained
  assert results["dataset"].summary["records"] == {"train": len(trained)}


def test_second_run_reuses_every_stage(small_run):
  workdir, first = small_run
  before = (workdir / "results" / "results.md").read_text()
  lines = []
  again = demo_main.run(_config(), workdir, log=lines.append)
  assert all(r.reused for r in again.values()), lines
  assert list(again) == list(first)
  assert (workdir / "results" / "results.md").read_text() == before


def test_interrupted_stage_is_rebuilt(small_run):
  workdir, _ = small_run
  before = _tasks(workdir)
  # An interrupted run: the stage folder has a stray file and no done-marker.
  (workdir / f"tasks.{stages.DONE}").unlink()
  (workdir / "tasks" / "half_written.json").write_text("{")
  lines = []
  again = demo_main.run(_config(), workdir, log=lines.append)
  assert not again["tasks"].reused and not again["results"].reused
  assert all(again[n].reused for n in (prepare.WORLD, prepare.FEATURES, prepare.PRETRAIN))
  assert not (workdir / "tasks" / "half_written.json").exists()
  assert _tasks(workdir)["zero_shot"] == before["zero_shot"]
  assert any("tasks was left by an interrupted run" in line for line in lines)


def test_shuffled_narration_falls_to_chance(small_run, tmp_path):
  """Honesty: with every training video narrated by another video, the video no longer says
  what the narration says, and zero-shot accuracy falls to chance."""
  workdir, _ = small_run
  shuffled = tmp_path / "shuffled"
  shuffled.mkdir()
  for name in (prepare.WORLD, prepare.FEATURES):  # pixels and features do not change
    shutil.copytree(workdir / name, shuffled / name, symlinks=True)
    for kind in (stages.DONE, stages.STARTED):
      shutil.copy(workdir / f"{name}.{kind}", shuffled / f"{name}.{kind}")
  results = demo_main.run(_config(shuffle=True), shuffled, log=_quiet)
  assert results[prepare.WORLD].reused and not results[prepare.CORPUS].reused
  told = json.loads((shuffled / "corpus" / "narration.json").read_text())
  assert all(video != narrator for video, narrator in told.items())
  real, control = _tasks(workdir)["zero_shot"], _tasks(shuffled)["zero_shot"]
  for key in ("verb", "noun"):
    # Chance for a model that does not read the video: 1 / labels, or, when one label covers
    # more of the held-out steps, always answering that label.
    chance, majority = control[f"{key}_chance"], control[f"{key}_majority"]
    for order, r in control["orders"].items():
      assert r[f"{key}_top1"] < 2 * chance or r[f"{key}_top1"] <= majority, (order, key, control)
      assert r[f"{key}_top1"] < real["orders"][order][f"{key}_top1"] or \
          real["orders"][order][f"{key}_top1"] < 2 * chance, (order, key, real, control)
