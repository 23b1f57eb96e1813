"""The demo world: seeded instructional videos with narration and a separate ground truth.

Each video cooks one dish (recipes.py): its steps follow the dish's partial order, optional steps
included or not, and each object keeps its place and what was done to it from one of its steps
to the next (render.Thing). A step is one verb applied to one noun and lasts a whole number of
1.5 s clips, so every clip of the reader falls inside exactly one step. For each video
`<id>.mp4` (H.264), `<id>.vtt` (WebVTT narration, with faults at the configured rates) and
`<id>.json` (ground truth: the dish; steps with verb, noun, start, end; every cue with its
fault) are written to one folder, with `world.json` listing the videos, their split, the
settings, the dishes and how foreseeable the next step is (predictability.py). The dish reaches
only the ground truth: the pixels show the steps. Video `i` depends only on (seed, i), so a
larger world extends a smaller one.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import pathlib
from typing import Iterable, Sequence

import av
import numpy as np
import tqdm

from vbert_jax.demo.world import predictability
from vbert_jax.demo.world import recipes
from vbert_jax.demo.world import render
from vbert_jax.demo.world import words
from vbert_jax import atomic

# 2: videos follow recipes, and the ground truth names the dish.
FORMAT = "vbert_jax.demo_world/2"
MANIFEST = "world.json"


@dataclasses.dataclass(frozen=True)
class NarrationConfig:
  """Rates of the faults real narration has; each is a probability per step."""
  filler_rate: float = 0.3  # an extra sentence that describes nothing on screen
  early_rate: float = 0.1  # the step is narrated before it happens
  late_rate: float = 0.1  # ... or after it has happened
  wrong_word_rate: float = 0.1  # the verb or the noun said is not the one shown
  missing_rate: float = 0.1  # the step is not narrated at all


@dataclasses.dataclass(frozen=True)
class WorldConfig:
  num_videos: int = 24
  seed: int = 0
  width: int = 112
  height: int = 112
  fps: int = 20
  clip_seconds: float = 1.5
  clips_per_step: tuple[int, int] = (2, 3)  # inclusive range; 2-3 clips is 3-4.5 s
  steps_per_video: tuple[int, int] = (4, 7)  # inclusive range; dishes that cannot fit are left out
  speed_range: tuple[float, float] = (0.7, 1.5)
  val_fraction: float = 0.25
  crf: int = 20
  preset: str = "veryfast"
  narration: NarrationConfig = NarrationConfig()

  def __post_init__(self):
    frames = self.clip_seconds * self.fps
    if abs(frames - round(frames)) > 1e-6:
      raise ValueError(f"clip_seconds * fps = {frames} must be a whole number of frames")
    if self.width % 2 or self.height % 2:
      raise ValueError(f"width and height must be even for H.264 4:2:0, got "
                       f"{self.width}x{self.height}")
    recipes.usable(*self.steps_per_video)  # a ValueError if no dish fits the range

  @classmethod
  def from_dict(cls, d: dict) -> "WorldConfig":
    d = dict(d)
    d["narration"] = NarrationConfig(**d.get("narration", {}))
    for k in ("clips_per_step", "steps_per_video", "speed_range"):
      if k in d:
        d[k] = tuple(d[k])
    return cls(**d)


@dataclasses.dataclass(frozen=True)
class Step:
  verb: str
  noun: str
  start: float
  end: float
  speed: float


@dataclasses.dataclass(frozen=True)
class Cue:
  start: float
  end: float
  text: str
  step: int | None  # the step it narrates, None for filler
  fault: str  # none | filler | early | late | wrong_verb | wrong_noun


def video_id(index: int) -> str:
  return f"demo_{index:05d}"


def video_rng(config: WorldConfig, index: int) -> np.random.Generator:
  return np.random.default_rng([config.seed, index])


def split_of(config: WorldConfig, index: int) -> str:
  """'val' for every k-th video (k = round(1 / val_fraction)), offset by the seed: exact in
  small worlds and independent of num_videos."""
  if config.val_fraction <= 0:
    return "train"
  period = max(1, round(1 / config.val_fraction))
  return "val" if (index + config.seed) % period == period - 1 else "train"


# ---------------------------------------------------------------------------------- planning


def plan_video(config: WorldConfig, rng: np.random.Generator) -> tuple[str, list[Step]]:
  """The dish of a video and its timed steps, in one of the dish's orders."""
  dish, order = recipes.draw(rng, *config.steps_per_video)
  steps, t = [], 0.0
  for verb, noun in order:
    clips = int(rng.integers(config.clips_per_step[0], config.clips_per_step[1] + 1))
    end = round(t + clips * config.clip_seconds, 6)
    steps.append(Step(verb=verb, noun=noun, start=t, end=end,
                      speed=float(rng.uniform(*config.speed_range))))
    t = end
  return dish.name, steps


def plan_steps(config: WorldConfig, rng: np.random.Generator) -> list[Step]:
  return plan_video(config, rng)[1]


def narrate(steps: Sequence[Step], cfg: NarrationConfig, rng: np.random.Generator) -> list[Cue]:
  """Cues for the steps, with fillers, shifted, wrong and missing narration; no overlaps."""
  duration = steps[-1].end
  cues = []
  for i, step in enumerate(steps):
    if rng.random() < cfg.filler_rate:
      start = rng.uniform(step.start, max(step.start, step.end - 1.0))
      cues.append(Cue(start, start + rng.uniform(0.8, 1.6), str(rng.choice(words.FILLERS)),
                      None, "filler"))
    if rng.random() < cfg.missing_rate:
      continue
    verb, noun, fault = step.verb, step.noun, "none"
    if rng.random() < cfg.wrong_word_rate:
      if rng.random() < 0.5:
        verb, fault = str(rng.choice([v for v in words.VERBS if v != verb])), "wrong_verb"
      else:
        noun, fault = str(rng.choice([n for n in words.NOUNS if n != noun])), "wrong_noun"
    text = words.step_sentence(str(rng.choice(words.TEMPLATES)), verb, noun,
                                    str(rng.choice(words.ADVERBS)))
    shift = rng.random()
    if shift < cfg.early_rate:
      start, fault = step.start - rng.uniform(1.5, 3.0), _join(fault, "early")
    elif shift < cfg.early_rate + cfg.late_rate:
      start, fault = step.end + rng.uniform(0.0, 1.0), _join(fault, "late")
    else:
      start = step.start + rng.uniform(0.0, 0.6)
    start = max(0.0, start)
    cues.append(Cue(start, start + rng.uniform(1.2, 2.4), text, i, fault))
  return _timing_faults(_no_overlaps(cues, duration), steps)


def _join(fault: str, more: str) -> str:
  return more if fault == "none" else f"{fault}+{more}"


def _no_overlaps(cues: list[Cue], duration: float) -> list[Cue]:
  """Sorts cues and removes overlaps, shortening the earlier cue where it can (else delaying
  the later one); cues that run out of video are dropped."""
  out: list[Cue] = []
  for cue in sorted(cues, key=lambda c: c.start):
    start = cue.start
    if out and out[-1].end > start - 0.05:
      prev = out[-1]
      if start - 0.05 - prev.start >= 0.6:
        out[-1] = dataclasses.replace(prev, end=round(start - 0.05, 3))
      else:
        start = prev.end + 0.05
    end = min(start + (cue.end - cue.start), duration)
    if end - start >= 0.5:
      out.append(dataclasses.replace(cue, start=round(start, 3), end=round(end, 3)))
  return out


def _timing_faults(cues: list[Cue], steps: Sequence[Step]) -> list[Cue]:
  """Labels early/late from where each cue finally sits relative to its step."""
  out = []
  for cue in cues:
    if cue.step is not None:
      step = steps[cue.step]
      faults = [f for f in cue.fault.split("+") if f in ("wrong_verb", "wrong_noun")]
      if cue.start < step.start:
        faults.append("early")
      elif cue.start >= step.end:
        faults.append("late")
      cue = dataclasses.replace(cue, fault="+".join(faults) or "none")
    out.append(cue)
  return out


def webvtt(cues: Iterable[Cue]) -> str:
  def ts(t: float) -> str:
    ms = int(round(t * 1000))
    return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}"
  blocks = ["WEBVTT\n"]
  for cue in cues:
    blocks.append(f"{ts(cue.start)} --> {ts(cue.end)}\n{cue.text}\n")
  return "\n".join(blocks)


# ----------------------------------------------------------------------------------- writing


def encode_h264(path: pathlib.Path, frames: Iterable[np.ndarray], config: WorldConfig) -> None:
  def write(tmp: str):
    with av.open(tmp, "w", format="mp4") as out:
      stream = out.add_stream("libx264", rate=config.fps)
      stream.width, stream.height, stream.pix_fmt = config.width, config.height, "yuv420p"
      # Byte-identical files for a seed: x264's macroblock tree (its rate control across
      # frames) reads memory it never wrote, so that the same frames encoded differently from
      # process to process and with what else the process had allocated (20 of the full demo's
      # 96 videos in one run, and a process's first video under the tests); without it, and on
      # one thread, every encode matched. A threaded x264 differs from run to run too, and so
      # does handing it frames that PyAV converts to YUV on the fly.
      stream.options = {"crf": str(config.crf), "preset": config.preset,
                        "x264-params": "mbtree=0"}
      stream.codec_context.thread_count = 1
      index = 0
      for chunk in frames:
        for rgb in chunk:
          frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
          frame.pts = index
          index += 1
          out.mux(stream.encode(frame))
      out.mux(stream.encode())
  atomic.write_atomic(path, write)


def render_video(bg: np.ndarray, steps: Sequence[Step], fps: int,
                 rngs: Sequence[np.random.Generator]) -> Iterable[np.ndarray]:
  """Each step's frames in turn; every object's next step starts from how its last one left
  it."""
  things: dict[str, render.Thing] = {}
  for step, rng in zip(steps, rngs):
    frames, things[step.noun] = render.render_step(
        bg, step.verb, step.noun, int(round((step.end - step.start) * fps)), fps, rng,
        step.speed, things.get(step.noun))
    yield frames


def generate_video(config: WorldConfig, index: int, out_dir) -> dict:
  """Renders, encodes and narrates video `index`; returns its ground truth (also written)."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  vid = video_id(index)
  rng = video_rng(config, index)
  dish, steps = plan_video(config, rng)
  cues = narrate(steps, config.narration, rng)
  bg = render.background(rng, config.height, config.width)
  frames = render_video(bg, steps, config.fps, rng.spawn(len(steps)))
  encode_h264(out_dir / f"{vid}.mp4", frames, config)
  atomic.write_atomic(out_dir / f"{vid}.vtt",
                      lambda tmp: pathlib.Path(tmp).write_text(webvtt(cues)))
  truth = {
      "format": FORMAT, "video_id": vid, "video": f"{vid}.mp4", "narration": f"{vid}.vtt",
      "split": split_of(config, index), "fps": config.fps, "width": config.width,
      "height": config.height, "duration": steps[-1].end, "clip_seconds": config.clip_seconds,
      "dish": dish, "steps": [dataclasses.asdict(s) for s in steps],
      "cues": [dataclasses.asdict(c) for c in cues],
  }
  atomic.write_atomic(out_dir / f"{vid}.json",
                      lambda tmp: pathlib.Path(tmp).write_text(json.dumps(truth, indent=1)))
  return truth


def generate_world(config: WorldConfig, out_dir, progress: bool = False, workers: int = 1
                   ) -> dict:
  """Writes every video of the world (skipping those already complete) and the manifest;
  `workers` > 1 renders videos in that many processes."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  todo = [i for i in range(config.num_videos) if not _complete(out_dir / f"{video_id(i)}.json")]
  bar = None
  if progress:
    bar = tqdm.tqdm(total=len(todo), desc="demo world", unit="video")
  if workers > 1 and len(todo) > 1:
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
      for _ in pool.map(generate_video, [config] * len(todo), todo, [out_dir] * len(todo)):
        if bar:
          bar.update(1)
  else:
    for i in todo:
      generate_video(config, i, out_dir)
      if bar:
        bar.update(1)
  if bar:
    bar.close()
  truths = [load_truth(out_dir / f"{video_id(i)}.json") for i in range(config.num_videos)]
  videos = [{"video_id": t["video_id"], "split": t["split"], "dish": t["dish"],
             "duration": t["duration"], "steps": len(t["steps"])} for t in truths]
  manifest = {"format": FORMAT, "config": dataclasses.asdict(config),
              "verbs": list(words.VERBS), "nouns": list(words.NOUNS),
              "templates": list(words.TEMPLATES),
              "dishes": {d.name: recipes.DISHES[d.name]
                         for d in recipes.usable(*config.steps_per_video)},
              "next_step": _next_step(truths, config), "videos": videos}
  for split in ("train", "val"):
    write_labels(out_dir, out_dir / f"labels_{split}.tsv", split)
  atomic.write_atomic(out_dir / MANIFEST,
                      lambda tmp: pathlib.Path(tmp).write_text(json.dumps(manifest, indent=1)))
  return manifest


def _complete(path: pathlib.Path) -> bool:
  """Whether a video's ground truth is there, written by this version (else it is redone)."""
  try:
    return json.loads(path.read_text()).get("format") == FORMAT
  except (OSError, ValueError):
    return False


def _next_step(truths: Sequence[dict], config: WorldConfig) -> dict | None:
  """How foreseeable the held-out videos' next step is; None without held-out boundaries."""
  try:
    return predictability.next_step(truths, *config.steps_per_video)
  except ValueError:
    return None


def write_labels(world_dir, path, split: str) -> pathlib.Path:
  """The steps of one split as a label file (the TSV that the zero-shot and captioning tasks read:
  video_id, start, end, verb, noun, sentence), the form a user's own labelled segments take. The
  sentence is the step's first narration without a fault ("" if none), as a caption."""
  world_dir = pathlib.Path(world_dir)
  rows = ["video_id\tstart\tend\tverb\tnoun\tsentence"]
  for path_truth in sorted(world_dir.glob("*.json")):
    if path_truth.name == MANIFEST:
      continue
    truth = load_truth(path_truth)
    if truth["split"] != split:
      continue
    said = {}
    for cue in truth["cues"]:
      if cue["step"] is not None and cue["fault"] == "none":
        said.setdefault(cue["step"], " ".join(cue["text"].split()))
    rows += [f"{truth['video_id']}\t{s['start']:.3f}\t{s['end']:.3f}\t{s['verb']}\t{s['noun']}"
             f"\t{said.get(i, '')}" for i, s in enumerate(truth["steps"])]
  return atomic.write_atomic(
      path, lambda tmp: pathlib.Path(tmp).write_text("\n".join(rows) + "\n"))


# ----------------------------------------------------------------------------------- reading


def load_truth(path) -> dict:
  path = pathlib.Path(path)
  try:
    truth = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: not a readable ground-truth file ({e})") from e
  if truth.get("format") != FORMAT:
    raise ValueError(f"{path}: format {truth.get('format')!r}, expected {FORMAT!r}")
  return truth


def load_manifest(world_dir) -> dict:
  path = pathlib.Path(world_dir) / MANIFEST
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: not a readable demo world manifest ({e})") from e


def clip_labels(steps: Sequence[dict], starts: np.ndarray, ends: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
  """Verb and noun index of each clip: those of the step it overlaps most (-1 if none)."""
  verbs = np.full(len(starts), -1, np.int32)
  nouns = np.full(len(starts), -1, np.int32)
  best = np.zeros(len(starts))
  for step in steps:
    overlap = np.minimum(ends, step["end"]) - np.maximum(starts, step["start"])
    better = overlap > best
    verbs[better] = words.VERBS.index(step["verb"])
    nouns[better] = words.NOUNS.index(step["noun"])
    best = np.where(better, overlap, best)
  return verbs, nouns
