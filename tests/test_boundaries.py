"""Forecasting at step boundaries: the narration's steps, token meanings, and the scores of each
forecaster on hand-made videos whose answers are known."""

import dataclasses

import numpy as np

from vbert_jax.demo import boundaries
from vbert_jax.demo.world import words
from vbert_jax.vocab import kmeans


def _cue(start, text, step=0, fault="none"):
  return {"start": start, "end": start + 1.0, "text": text, "step": step, "fault": fault}


def test_said_steps_reads_verbs_in_either_form_and_skips_filler():
  truth = {"cues": [_cue(4.0, "now we're cutting the tomato"),
                    _cue(0.0, "okay so um hi everyone", None, "filler"),
                    _cue(2.0, "let me show you how to flip the egg"),
                    _cue(6.0, "and the onion", 2, "wrong_verb")]}
  assert boundaries.said_steps(truth) == [(2.0, "flip", "egg"), (4.0, "cut", "tomato")]


class _Vocab:
  """Token t's nearest clips: clips 2t and 2t+1 of video "train"."""
  size = 3

  def nearest_clips(self, token, k):
    return [kmeans.ClipRef("train", "train.mp4", c, 0.0, 1.0) for c in (2 * token, 2 * token + 1)]


@dataclasses.dataclass
class _Step:
  start: float
  verb: str
  noun: str
  clips: np.ndarray


@dataclasses.dataclass
class _Video:
  video_id: str
  tokens: np.ndarray
  verbs: np.ndarray
  nouns: np.ndarray
  steps: list
  truth: dict


def _verb(v):
  return words.VERBS.index(v)


def _noun(n):
  return words.NOUNS.index(n)


def _world():
  # Training: tokens 0, 1, 2 show (cut, tomato), (flip, egg), (stir, egg): two clips each, in
  # that order, and the narration says those steps in that order.
  steps = [("cut", "tomato"), ("flip", "egg"), ("stir", "egg")]
  train = _Video("train", np.array([0, 0, 1, 1, 2, 2]),
                 np.array([_verb(v) for v, _ in steps for _ in range(2)]),
                 np.array([_noun(n) for _, n in steps for _ in range(2)]),
                 [_Step(2.0 * i, v, n, np.array([2 * i, 2 * i + 1]))
                  for i, (v, n) in enumerate(steps)],
                 {"cues": [_cue(2.0 * i, f"now we {v} the {n}") for i, (v, n) in
                           enumerate(steps)]})
  # Held out: the same three steps; its boundaries are at clips 2 and 4.
  held = dataclasses.replace(train, video_id="held")
  return train, held


def test_scores_at_each_boundary_by_token_and_by_meaning():
  train, held = _world()
  meanings = boundaries.token_meanings(_Vocab(), {("train", c): (int(train.verbs[c]),
                                                                 int(train.nouns[c]))
                                                  for c in range(6)}, 8)
  assert meanings[0].tolist() == [_verb("cut"), _verb("flip"), _verb("stir")]
  # A model that knows the recipe: the next step's token at each boundary.
  right = boundaries.evaluate([held], [train], lambda v, t: {2: 1, 4: 2}[t], _Vocab(), 8)
  assert right["boundaries"] == 2
  assert right["model_token"] == right["model_verb"] == right["model_noun"] == 1.0
  # The token bigram saw 0 -> 0 and 0 -> 1 once each (ties: the smaller token), 1 -> 1 and
  # 1 -> 2 likewise: it repeats the current step at both boundaries.
  assert right["bigram_token"] == 0.0 and right["bigram_verb"] == 0.0
  # (cut, tomato) -> (flip, egg) -> (stir, egg) in the narration: the step n-gram is right.
  assert right["step_ngram_verb"] == right["step_ngram_noun"] == 1.0
  assert right["token_vs_bigram"] == {"difference": 1.0, "standard_error": 0.0}
  # Told that a step ends, the bigram saw 1 after 0 and 2 after 1 at the training boundaries.
  assert right["boundary_bigram_token"] == 1.0
  assert right["token_vs_boundary_bigram"] == {"difference": 0.0, "standard_error": 0.0}
  # Told the next step, the commonest first token of that step in training is the right one.
  assert right["told_step_token"] == 1.0
  # A model that repeats the last clip's step: its nouns still match where the step keeps them.
  wrong = boundaries.evaluate([held], [train], lambda v, t: int(v.tokens[t - 1]), _Vocab(), 8)
  assert wrong["model_token"] == wrong["model_verb"] == 0.0
  assert wrong["model_noun"] == 0.5  # (flip, egg) -> (stir, egg): the egg stays
  assert wrong["token_vs_bigram"]["difference"] == 0.0
  assert wrong["token_vs_boundary_bigram"]["difference"] == -1.0
