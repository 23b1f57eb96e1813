"""A small VideoBERT trained in the test process on a world where the answers are learnable.

Each example shows one step, a verb applied to a noun: each (verb, noun) pair owns four visual
tokens, the video is a run of them, and the text is "now let me show you how to <verb> the
<noun> ." One noun ("pineapple") is two WordPiece pieces ("pine", "##apple"), so that multi-piece
labels are learned and scored too. Three kinds of example teach the three tasks:

  video first  [CLS] video [>] text [SEP], the verb and noun masked   -> zero-shot
  text first   [CLS] text [>] video [SEP], video tokens masked        -> text-to-video
  video only   [CLS] video [SEP], the last tokens masked              -> forecasting

`trained_bundle(tmp_path_factory)` trains the `tiny` model (about 30 s) through
`train.train_loop` (so the run leaves config.json and a checkpoint, read back with `load_bundle`)
once per test process.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Sequence

import jax
import numpy as np

from helpers import shared
from helpers.configs import pretrain
from vbert_jax import sequence
from vbert_jax import sharding
from vbert_jax import pretrain as pretrain_lib
from vbert_jax import train
from vbert_jax.tasks import bundle as bundle_lib

VERBS = ("cut", "flip", "pour", "stir")
NOUNS = ("tomato", "egg", "lemon", "pineapple")
SENTENCE = "now let me show you how to {verb} the {noun} ."
TOKENS_PER_STEP = 4
VISUAL_SIZE = 64  # 4 verbs x 4 nouns x 4 tokens
MAX_LEN = 28
VIDEO_LEN = (6, 10)
TEXT_SLOTS, VIDEO_SLOTS = 3, 10
STEPS = 300
VARIANT = "tiny"
LEARNING_RATE = 3e-3
BATCH = 32
# [PAD] [unused0]=[>] [UNK] [CLS] [SEP] [MASK], as in a BERT vocab.txt.
SPECIAL_IDS = "0,2,3,4,5,1"
WORDS = ("[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "now", "let", "me", "show",
         "you", "how", "to", "the", ".", "cut", "flip", "pour", "stir", "tomato", "egg", "lemon",
         "pine", "##apple", "apple", "slice", "bread", "##s",
         # For the captioning template ("now let's [MASK] the [MASK] to the [MASK], and ...").
         "'", "s", ",", "and", "then")


def step_tokens(verb: str, noun: str) -> np.ndarray:
  """The visual tokens that show `verb` applied to `noun`."""
  first = (VERBS.index(verb) * len(NOUNS) + NOUNS.index(noun)) * TOKENS_PER_STEP
  return np.arange(first, first + TOKENS_PER_STEP)


def step_of(token: int) -> tuple[str, str]:
  pair = int(token) // TOKENS_PER_STEP
  return VERBS[pair // len(NOUNS)], NOUNS[pair % len(NOUNS)]


def sample_video(rng: np.random.Generator, verb: str, noun: str,
                 length: int | None = None) -> np.ndarray:
  length = length or int(rng.integers(VIDEO_LEN[0], VIDEO_LEN[1] + 1))
  return rng.choice(step_tokens(verb, noun), length).astype(np.int32)


def write_vocab(path: pathlib.Path) -> pathlib.Path:
  path.write_text("\n".join(WORDS) + "\n")
  return path


def make_config(vocab_path: pathlib.Path, steps: int = STEPS, variant: str = VARIANT,
                learning_rate: float = LEARNING_RATE):
  c = pretrain.get_config(f"variant={variant},runlocal")
  with c.unlocked():
    c.model.text_vocab_size = len(WORDS)
    c.model.visual_vocab_size = VISUAL_SIZE
    c.model.special_ids = SPECIAL_IDS
    c.max_len = MAX_LEN
    c.input.pack_examples, c.input.max_example_len = 1, 0  # StepSource's rows: one example
    c.masking.max_predictions_text = TEXT_SLOTS
    c.masking.max_predictions_video = VIDEO_SLOTS
    c.batch_size = BATCH
    c.total_steps = steps
    c.optimizer.learning_rate = learning_rate
    c.optimizer.warmup_steps = 20
    c.log_every_steps = 50
    c.eval.every_steps = 0
    c.checkpoint.every_steps = steps
    c.checkpoint["async"] = False
    c.text.tokenizer = "wordpiece"
    c.text.vocab = str(vocab_path)
    c.text.lowercase = "true"
    c.compilation_cache_dir = ""
  return c


class StepSource:
  """Endless batches of the three kinds of example; batch i is a function of i alone."""

  def __init__(self, layout: sequence.Layout, tokenizer, batch_size: int):
    self.layout, self.tokenizer, self.batch_size, self.index = layout, tokenizer, batch_size, 0

  def get_state(self):
    return {"index": self.index}

  def set_state(self, state):
    self.index = int(state["index"])

  def __next__(self):
    rng = np.random.default_rng([11, self.index])
    self.index += 1
    rows = [self._example(rng) for _ in range(self.batch_size)]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

  def _example(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
    verb, noun = VERBS[rng.integers(len(VERBS))], NOUNS[rng.integers(len(NOUNS))]
    video = sample_video(rng, verb, noun)
    kind = rng.integers(3)
    if kind == 2:
      packed = self.layout.video_only(video)
      video_start, text_targets = 1, []
      count = int(rng.integers(1, 4))
      video_targets = list(range(len(video) - count, len(video)))
    else:
      text = self.tokenizer.encode(SENTENCE.format(verb=verb, noun=noun))
      word_at = len(self.tokenizer.encode("now let me show you how to"))
      noun_pieces = len(self.tokenizer.encode(noun))
      verb_slot, noun_slots = [word_at], list(range(word_at + 2, word_at + 2 + noun_pieces))
      if kind == 0:
        packed = self.layout.video_then_text(video, text)
        text_start, video_start = len(video) + 2, 1
        pick = rng.random()
        chosen = verb_slot + noun_slots if pick < 0.6 else (verb_slot if pick < 0.8
                                                             else noun_slots)
        text_targets = [text_start + i for i in chosen]
        video_targets = []
      else:
        packed = self.layout.pair(text, video)
        video_start = len(text) + 2
        text_targets = []
        count = len(video) if rng.random() < 0.5 else int(rng.integers(1, 4))
        video_targets = sorted(rng.choice(len(video), count, replace=False).tolist())
    return self._mask(packed, text_targets, [video_start + i for i in video_targets])

  def _mask(self, packed: sequence.Packed, text_pos: list[int],
            video_pos: list[int]) -> dict[str, np.ndarray]:
    vocab = self.layout.vocab
    ids = packed.input_ids.copy()
    out = packed.as_dict()
    for name, positions, slots, to_target in (
        ("mlm", text_pos, TEXT_SLOTS, lambda i: i),
        ("mvm", video_pos, VIDEO_SLOTS, vocab.joint_to_visual)):
      pos = np.zeros(slots, np.int32)
      tgt = np.zeros(slots, np.int32)
      w = np.zeros(slots, np.float32)
      pos[:len(positions)] = positions
      tgt[:len(positions)] = to_target(ids[positions])
      w[:len(positions)] = 1.0
      out.update({f"{name}_positions": pos, f"{name}_ids": tgt, f"{name}_weights": w})
      packed.input_ids[positions] = vocab.specials.mask
    out["input_ids"] = packed.input_ids
    out["lva_label"] = np.int32(0)
    out["lva_weight"] = np.float32(0.0)
    out["truncated"] = np.int32(0)
    return out


@dataclasses.dataclass
class TrainedWorld:
  bundle: bundle_lib.Bundle
  workdir: pathlib.Path
  vocab_path: pathlib.Path
  final_loss: float


_CACHE: dict[str, TrainedWorld] = {}


def train_world(root: pathlib.Path, steps: int = STEPS, **config_args) -> TrainedWorld:
  """Trains the model into `root/run` on one CPU device and loads it back as a bundle."""
  vocab_path = write_vocab(root / "vocab.txt")
  config = make_config(vocab_path, steps, **config_args)
  from vbert_jax.text import tokenizers  # pylint: disable=g-import-not-at-top
  tokenizer = tokenizers.load_tokenizer(config)
  layout = sequence.Layout(pretrain_lib.model_config(config).vocab, config.max_len)
  # One device: the tiny model trains fastest unsplit on two cores.
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  workdir = root / "run"
  result = train.train_loop(pretrain_lib.make_trainable(config), config, workdir,
                            StepSource(layout, tokenizer, config.batch_size), None, mesh)
  final = result.train_history[-1][1]["loss"]
  return TrainedWorld(bundle_lib.load_bundle(workdir), workdir, vocab_path, float(final))


def trained_bundle(tmp_path_factory) -> TrainedWorld:
  """The trained world, made once per test session and shared by its worker processes (pass
  pytest's tmp_path_factory)."""
  if "world" not in _CACHE:
    def build(folder: pathlib.Path) -> None:
      world = train_world(folder)
      (folder / "final_loss.json").write_text(json.dumps(world.final_loss))
    folder = shared.build_once(tmp_path_factory, "trained_videobert", build)
    _CACHE["world"] = TrainedWorld(bundle_lib.load_bundle(folder / "run"), folder / "run",
                                   folder / "vocab.txt",
                                   json.loads((folder / "final_loss.json").read_text()))
  return _CACHE["world"]


@dataclasses.dataclass
class WorldFeatures:
  """A 64-token visual vocabulary fitted on clustered features, and rows that map to each token."""
  vocab_path: pathlib.Path
  rows_by_token: dict[int, np.ndarray]  # token -> feature rows [n, dim] assigned to it

  def clips(self, rng: np.random.Generator, tokens: Sequence[int]) -> np.ndarray:
    """One feature row per wanted token (each one the vocabulary assigns to that token)."""
    return np.stack([self.rows_by_token[int(t)][rng.integers(len(self.rows_by_token[int(t)]))]
                     for t in tokens]).astype(np.float32)


def fit_world_vocab(root: pathlib.Path, dim: int = 8) -> WorldFeatures:
  """Fits a depth-3, branching-4 vocabulary (64 tokens, the world's visual size)."""
  from vbert_jax.vocab import kmeans, vocabulary  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(VISUAL_SIZE, dim)) * 10
  x = (centers[:, None] + rng.normal(size=(VISUAL_SIZE, 12, dim))).reshape(-1, dim)
  x = x.astype(np.float32)
  vocab = vocabulary.VisualVocabulary.fit(x, kmeans.KMeansConfig(depth=3, branching=4))
  tokens = vocab.assign(x)
  path = vocab.save(root / "world_vocab.npz")
  return WorldFeatures(path, {t: x[tokens == t] for t in np.unique(tokens).tolist()})


def write_video_features(folder: pathlib.Path, video_id: str, rows: np.ndarray) -> None:
  """A feature file of consecutive 1.5 s clips (middles at 0.75, 2.25, 3.75, ... s)."""
  from vbert_jax.video import features_io  # pylint: disable=g-import-not-at-top
  starts = np.arange(len(rows)) * 1.5
  features_io.save_features(folder, features_io.VideoFeatures(
      video_id, f"/videos/{video_id}.mp4", rows, starts, starts + 1.5, "avg", 224))
