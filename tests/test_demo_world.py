"""The demo world: files, ground truth, narration faults, distinct motions and looks, speed."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from vbert_jax.demo import world as demo_world
from vbert_jax.demo.world import generate
from vbert_jax.demo.world import recipes
from vbert_jax.demo.world import render
from vbert_jax.demo.world import world
from vbert_jax.video import reader

REPO = pathlib.Path(__file__).resolve().parents[1]
SMALL = world.WorldConfig(num_videos=3, seed=5, width=64, height=48, steps_per_video=(3, 5))


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
  out = tmp_path_factory.mktemp("world")
  t0 = time.process_time()
  manifest = world.generate_world(SMALL, out)
  return out, manifest, time.process_time() - t0


def test_files_and_manifest(small_world):
  out, manifest, _ = small_world
  assert [v["video_id"] for v in manifest["videos"]] == ["demo_00000", "demo_00001", "demo_00002"]
  for v in manifest["videos"]:
    for suffix in (".mp4", ".vtt", ".json"):
      assert (out / f"{v['video_id']}{suffix}").stat().st_size > 0
  assert manifest["verbs"] == list(demo_world.VERBS) and manifest["nouns"] == list(demo_world.NOUNS)
  assert world.WorldConfig.from_dict(manifest["config"]) == SMALL
  assert not list(out.glob(".*"))  # no temporary files left


def test_label_files_list_every_step_of_their_split(small_world):
  from vbert_jax.tasks import zero_shot  # pylint: disable=g-import-not-at-top
  out, manifest, _ = small_world
  for split in ("train", "val"):
    videos = [v["video_id"] for v in manifest["videos"] if v["split"] == split]
    truths = [world.load_truth(out / f"{vid}.json") for vid in videos]
    expected = [(t["video_id"], s["start"], s["end"], s["verb"], s["noun"]) for t in truths
                for s in t["steps"]]
    if not expected:
      continue
    labels = zero_shot.read_labels(out / f"labels_{split}.tsv")
    assert [(g.video_id, g.start, g.end, g.verb, g.noun) for g in labels] == expected
    # Each caption is a fault-free narration of its own step.
    said = {}
    for t in truths:
      for c in t["cues"]:
        if c["fault"] == "none" and c["step"] is not None:
          said.setdefault((t["video_id"], c["step"]), " ".join(c["text"].split()))
    steps = [(t["video_id"], i) for t in truths for i in range(len(t["steps"]))]
    assert any(g.sentence for g in labels)
    assert [g.sentence for g in labels] == [said.get(key, "") for key in steps]


def test_steps_fill_whole_clips_and_match_the_video(small_world):
  out, manifest, _ = small_world
  for v in manifest["videos"]:
    truth = world.load_truth(out / f"{v['video_id']}.json")
    steps = truth["steps"]
    assert SMALL.steps_per_video[0] <= len(steps) <= SMALL.steps_per_video[1]
    assert steps[0]["start"] == 0.0
    for a, b in zip(steps, steps[1:]):
      assert a["end"] == b["start"]
    for s in steps:
      assert s["verb"] in demo_world.VERBS and s["noun"] in demo_world.NOUNS
      clips = (s["end"] - s["start"]) / SMALL.clip_seconds
      assert clips == pytest.approx(round(clips)) and 2 <= round(clips) <= 3
    # The encoded video lasts exactly as long as its steps, and every clip lies in one step.
    clips = list(reader.read_clips(out / truth["video"], size=32))
    assert len(clips) == round(truth["duration"] / SMALL.clip_seconds)
    starts = np.array([c.start for c in clips])
    ends = np.array([c.end for c in clips])
    verbs, nouns = world.clip_labels(steps, starts, ends)
    step_of_clip = np.searchsorted([s["end"] for s in steps], starts, side="right")
    assert verbs.tolist() == [demo_world.VERBS.index(steps[i]["verb"]) for i in step_of_clip]
    assert nouns.tolist() == [demo_world.NOUNS.index(steps[i]["noun"]) for i in step_of_clip]


def test_seeded(small_world, tmp_path):
  out, _, _ = small_world
  again = world.generate_video(SMALL, 1, tmp_path)
  assert again == world.load_truth(out / "demo_00001.json")
  a = [c.frames for c in reader.read_clips(out / "demo_00001.mp4", size=32)]
  b = [c.frames for c in reader.read_clips(tmp_path / "demo_00001.mp4", size=32)]
  np.testing.assert_array_equal(np.stack(a), np.stack(b))
  # Byte for byte, however often it is encoded in one process and in a fresh one (with x264's
  # macroblock tree on, the third of these differed in this process after the small world).
  longer = world.WorldConfig(num_videos=2, seed=0, width=112, height=112)
  files = [world.generate_video(longer, 1, tmp_path / f"again{i}") and
           (tmp_path / f"again{i}" / "demo_00001.mp4").read_bytes() for i in range(3)]
  code = ("import sys; from vbert_jax.demo.world import world; "
          "world.generate_video(world.WorldConfig(num_videos=2, seed=0, width=112, height=112), "
          "1, sys.argv[1])")
  subprocess.run([sys.executable, "-c", code, str(tmp_path / "fresh")], check=True, cwd=REPO)
  files.append((tmp_path / "fresh" / "demo_00001.mp4").read_bytes())
  assert all(f == files[0] for f in files)
  other = world.generate_video(dataclasses.replace(SMALL, seed=6), 1, tmp_path / "other")
  assert other["steps"] != again["steps"]


def test_generation_is_fast(small_world):
  """A few hundred clips in well under a minute: at most 0.1 s of CPU per 1.5 s clip here."""
  out, manifest, cpu_seconds = small_world
  clips = sum(v["duration"] / SMALL.clip_seconds for v in manifest["videos"])
  print(f"{clips:.0f} clips in {cpu_seconds:.2f} s CPU ({cpu_seconds / clips * 1000:.1f} ms/clip)")
  assert cpu_seconds / clips < 0.1


def _step_frames(verb, noun, seed=0, height=64, width=64):
  bg = render.background(np.random.default_rng(seed), height, width)
  return render.render_step(bg, verb, noun, 60, 20, np.random.default_rng(seed + 1), 1.0)[0]


def test_every_verb_moves_and_moves_differently():
  clips = {verb: _step_frames(verb, "bread").astype(np.float32) for verb in demo_world.VERBS}
  for verb, frames in clips.items():
    change = np.abs(np.diff(frames, axis=0)).mean()
    assert change > 0.2, (verb, change)  # something visibly happens
  verbs = list(clips)
  for i, a in enumerate(verbs):
    for b in verbs[i + 1:]:
      diff = np.abs(clips[a] - clips[b]).mean()
      assert diff > 2.0, (a, b, diff)


def test_every_noun_looks_different():
  first = {noun: _step_frames("spin", noun)[0].astype(np.float32) for noun in demo_world.NOUNS}
  nouns = list(first)
  for i, a in enumerate(nouns):
    for b in nouns[i + 1:]:
      assert np.abs(first[a] - first[b]).mean() > 3.0, (a, b)


def test_backgrounds_positions_sizes_and_speeds_vary():
  backgrounds = [render.background(np.random.default_rng(s), 64, 64) for s in range(6)]
  for i, a in enumerate(backgrounds):
    for b in backgrounds[i + 1:]:
      assert np.abs(a - b).mean() > 0.02  # of a 0-1 range
  # One step, drawn with six generators over one plain background: the object's place and size.
  plain = np.full((64, 64, 3), 0.5, np.float32)
  centres, areas = [], []
  for s in range(6):
    frame = render.render_step(plain, "spin", "tomato", 1, 20, np.random.default_rng(s))[0][0]
    ys, xs = np.nonzero(np.abs(frame.astype(np.float32) - 127.5).max(-1) > 12)
    centres.append((xs.mean(), ys.mean()))
    areas.append(len(xs))
  assert np.ptp(np.array(centres), axis=0).max() > 6, centres  # pixels
  assert max(areas) > 1.15 * min(areas), areas
  rng = np.random.default_rng(0)
  config = world.WorldConfig()
  speeds = [step.speed for _ in range(20) for step in world.plan_steps(config, rng)]
  assert min(speeds) >= config.speed_range[0] and max(speeds) <= config.speed_range[1]
  assert np.std(speeds) > 0.15, speeds


def _probe(thing, noun="tomato"):
  """One still frame of the object as `thing` leaves it (a spin through whole turns), and the
  mask of its pixels, over a background the colour of the plate that spinning shows."""
  plain = np.broadcast_to(render.PLATE, (64, 64, 3)).astype(np.float32)
  frame = render.render_step(plain, "spin", noun, 1, 20, np.random.default_rng(9), 12 / 7,
                             thing)[0][0].astype(np.float32)
  return frame, np.abs(frame - render.PLATE * 255).max(-1) > 12


def _after(verb, thing, noun="tomato"):
  plain = np.full((64, 64, 3), 0.5, np.float32)
  return render.render_step(plain, verb, noun, 40, 20, np.random.default_rng(3), 1.0, thing)[1]


def test_what_a_step_does_to_an_object_lasts_into_its_next_step():
  thing = dataclasses.replace(render.place(np.random.default_rng(0), 64, 64), x=0.5, y=0.55,
                              angle=0.0)
  frame, mask = _probe(thing)
  row, col = int(thing.y * 64), int(thing.x * 64)
  area, brightness = mask.sum(), frame[mask].mean()
  assert mask[row, col]
  # Cut: its halves lie apart, with the board showing between them.
  cut = _after("cut", thing)
  assert cut.split == pytest.approx(0.5, abs=0.01)
  assert not _probe(cut)[1][row, col]
  # Shrunk: about half as wide, a quarter of the area.
  shrunk = _after("shrink", thing)
  assert 0.45 <= shrunk.scale <= 0.55
  assert 0.15 * area < _probe(shrunk)[1].sum() < 0.4 * area
  # Flipped: its darker underside up.
  flipped = _after("flip", thing)
  frame, mask = _probe(flipped)
  assert flipped.side == -1 and frame[mask].mean() < 0.85 * brightness
  # Mashed: flatter than tall, and it stays so.
  mashed = _after("mash", thing)
  rows, cols = np.nonzero(_probe(mashed)[1])
  assert mashed.flat == 0.6 and np.ptp(cols) > 1.5 * np.ptp(rows)
  # Slid: the next step starts where the slide ended.
  slid = _after("slide", thing)
  assert abs(slid.x - thing.x) > 0.25
  assert np.nonzero(_probe(slid)[1])[1].mean() == pytest.approx(slid.x * 64 - 0.5, abs=2)
  # A video hands each object's state from one of its steps to its next.
  steps = [world.Step("cut", "tomato", 0, 1.5, 1.0), world.Step("spin", "egg", 1.5, 3, 1.0),
           world.Step("spin", "tomato", 3, 4.5, 1.0)]
  rngs = np.random.default_rng(1).spawn(3)
  frames = list(world.render_video(np.full((64, 64, 3), 0.5, np.float32), steps, 20, rngs))
  alone = render.render_step(np.full((64, 64, 3), 0.5, np.float32), "spin", "tomato", 30, 20,
                             np.random.default_rng(1).spawn(3)[2], 1.0)[0]
  assert np.abs(frames[2].astype(np.float32) - alone).mean() > 1.0


def _synthetic_steps(n: int) -> list[world.Step]:
  rng = np.random.default_rng(0)
  return [world.Step(str(rng.choice(demo_world.VERBS)), str(rng.choice(demo_world.NOUNS)),
                     4.5 * i, 4.5 * i + 4.5, 1.0) for i in range(n)]


def test_narration_faults_at_their_rates():
  steps = _synthetic_steps(3000)
  cfg = world.NarrationConfig(filler_rate=0.3, early_rate=0.1, late_rate=0.15,
                              wrong_word_rate=0.2, missing_rate=0.1)
  cues = world.narrate(steps, cfg, np.random.default_rng(1))
  narrated = [c for c in cues if c.step is not None]
  fillers = [c for c in cues if c.step is None]
  n = len(steps)
  assert len(fillers) / n == pytest.approx(0.3, abs=0.04)
  assert 1 - len({c.step for c in narrated}) / n == pytest.approx(0.1, abs=0.03)
  rate = lambda word: sum(word in c.fault for c in narrated) / len(narrated)
  assert rate("early") == pytest.approx(0.1, abs=0.03)
  assert rate("late") == pytest.approx(0.15, abs=0.03)
  assert rate("wrong") == pytest.approx(0.2, abs=0.03)
  for c in narrated:
    step = steps[c.step]
    words = set(re.findall(r"[a-z]+", c.text))
    said_verb = step.verb in words or demo_world.VERB_ING[step.verb] in words
    assert (step.noun in words) == ("wrong_noun" not in c.fault), c
    assert said_verb == ("wrong_verb" not in c.fault), c
    if "early" in c.fault:
      assert c.start < step.start
    if "late" in c.fault:
      assert c.start >= step.end
  for c in fillers:
    words = set(re.findall(r"[a-z]+", c.text))
    assert not words & (set(demo_world.VERBS) | set(demo_world.NOUNS)), c.text
  for a, b in zip(cues, cues[1:]):
    assert a.end <= b.start  # sorted, no overlaps


def test_clean_narration_follows_the_steps():
  steps = _synthetic_steps(200)
  cues = world.narrate(steps, world.NarrationConfig(0, 0, 0, 0, 0), np.random.default_rng(2))
  assert [c.step for c in cues] == list(range(200))
  phrasings = set()
  for c in cues:
    step = steps[c.step]
    assert step.start <= c.start < step.end and c.fault == "none"
    assert step.noun in c.text
    phrasings.add(re.sub(r"\b(" + "|".join(demo_world.NOUNS) + r")\b", "N", c.text))
  assert len(demo_world.TEMPLATES) >= 20 and len(phrasings) >= 40


def test_webvtt_file(small_world):
  out, _, _ = small_world
  truth = world.load_truth(out / "demo_00000.json")
  text = (out / "demo_00000.vtt").read_text()
  assert text.startswith("WEBVTT\n")
  stamps = re.findall(r"(\d\d):(\d\d):(\d\d)\.(\d\d\d) --> (\d\d):(\d\d):(\d\d)\.(\d\d\d)\n(.+)",
                      text)
  assert len(stamps) == len(truth["cues"])
  for m, cue in zip(stamps, truth["cues"]):
    h, mi, s, ms = map(int, m[:4])
    assert h * 3600 + mi * 60 + s + ms / 1000 == pytest.approx(cue["start"], abs=1e-3)
    assert m[8] == cue["text"]
    assert 0 <= cue["start"] < cue["end"] <= truth["duration"]


def test_bad_config():
  with pytest.raises(ValueError, match="whole number of frames"):
    world.WorldConfig(fps=25, clip_seconds=1.5)
  with pytest.raises(ValueError, match="even"):
    world.WorldConfig(width=65)
  with pytest.raises(ValueError, match=r"steps_per_video \(9, 12\): no dish .*salad 3-6"):
    world.WorldConfig(steps_per_video=(9, 12))


def test_cli_writes_and_resumes(tmp_path, capsys):
  args = [f"--out={tmp_path}", "--num_videos=2", "--seed=9", "--size=48", "--max_steps=4",
          "--missing_rate=0.5"]
  assert generate.main(args) == 0
  assert "2 videos" in capsys.readouterr().out
  manifest = json.loads((tmp_path / world.MANIFEST).read_text())
  assert manifest["config"]["narration"]["missing_rate"] == 0.5
  assert manifest["config"]["width"] == 48 and manifest["config"]["seed"] == 9
  mtime = (tmp_path / "demo_00001.mp4").stat().st_mtime_ns
  assert generate.main(args) == 0
  assert (tmp_path / "demo_00001.mp4").stat().st_mtime_ns == mtime


def test_videos_follow_their_dish(small_world):
  out, manifest, _ = small_world
  lo, hi = SMALL.steps_per_video
  assert set(manifest["dishes"]) == {d.name for d in recipes.usable(lo, hi)}
  assert 0 <= manifest["next_step"]["ngram2"] <= 1
  for v in manifest["videos"]:
    truth = world.load_truth(out / f"{v['video_id']}.json")
    order = tuple((s["verb"], s["noun"]) for s in truth["steps"])
    assert v["dish"] == truth["dish"]
    assert order in dict(recipes.orders(recipes.by_name(truth["dish"]), lo, hi))
