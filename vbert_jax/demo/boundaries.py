"""Forecasting at step boundaries: the first clip of each held-out step, from the clips before it.

Within a step the next clip mostly repeats the current one, which a bigram of tokens predicts as
well as any model; what a model understands of a task shows where one step ends and the next
begins. At each boundary of a held-out video (every step after the first, with at least one clip
before it) these forecasters guess what comes next:

- the model: the most likely visual token after the clips so far (the forecasting prompt);
- a bigram of the training videos' clip tokens, from the last clip's token;
- a bigram told that a step ends: the first token of the next step most often seen after the
  last clip's token at the training videos' boundaries (the fair comparison for a model asked
  in the "pair" prompt, [>] before the forecast, which is told so too);
- a forecaster told the next step (a reference, not a competitor): the token that step's first
  clip most often had in the training videos;
- a step-level n-gram of the training narration: the (verb, noun) said next after the last two
  said (backing off to the last one), read from what the narrator said (faults and all, as the
  model read it), applied to the held-out video's narration up to the boundary.

A token is scored by itself (is it the first clip's token?) and by meaning: the majority verb and
noun of the training clips nearest it (the visual vocabulary's own clips, as text-to-video is
scored), against the next step's true verb and noun. The difference of the model and the token
bigram, boundary by boundary, is reported with its standard error.
"""

from __future__ import annotations

import collections
from typing import Callable, Mapping, Sequence

import numpy as np

from vbert_jax.demo import baselines
from vbert_jax.demo.world import predictability
from vbert_jax.demo.world import words

# The narration n-gram's order: a trigram backing off to the bigram, the stronger of the two on
# recipes whose stages hold two or three steps in any order.
STEP_ORDER = 3

_VERB_OF = {**{v: v for v in words.VERBS}, **{ing: v for v, ing in words.VERB_ING.items()}}


def said_steps(truth: Mapping) -> list[tuple[float, str, str]]:
  """(start, verb, noun) of each cue that names a verb and a noun, in time order."""
  out = []
  for cue in sorted(truth["cues"], key=lambda c: c["start"]):
    tokens = cue["text"].lower().split()
    verbs = [_VERB_OF[t] for t in tokens if t in _VERB_OF]
    nouns = [t for t in tokens if t in words.NOUNS]
    if verbs and nouns:
      out.append((float(cue["start"]), verbs[0], nouns[0]))
  return out


def token_meanings(vocab, clip_truth: Mapping[tuple[str, int], tuple[int, int]],
                   nearest: int) -> tuple[np.ndarray, np.ndarray]:
  """Per visual token, the majority verb and noun index (-1: none) of its nearest training
  clips; ties go to the smaller index."""
  verbs = np.full(vocab.size, -1, np.int64)
  nouns = np.full(vocab.size, -1, np.int64)
  for token in range(vocab.size):
    labels = [clip_truth.get((r.video_id, r.clip), (-1, -1))
              for r in vocab.nearest_clips(token, nearest)]
    for out, column in ((verbs, 0), (nouns, 1)):
      counts = collections.Counter(lab[column] for lab in labels if lab[column] >= 0)
      if counts:
        out[token] = min(counts, key=lambda x: (-counts[x], x))
  return verbs, nouns


def _paired(model: np.ndarray, baseline: np.ndarray) -> dict:
  diff = model.astype(np.float64) - baseline
  se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan")
  return {"difference": float(diff.mean()), "standard_error": se}


def _first_tokens(train: Sequence) -> Callable[[str, str], int]:
  """A forecaster told the next step's verb and noun: the token its first clip most often had in
  the training videos (the commonest first token of any step for a step never seen). What a
  model that foresaw every step could reach, given how the tokens vary from video to video."""
  by_step: dict[tuple[str, str], collections.Counter] = collections.defaultdict(
      collections.Counter)
  for v in train:
    for step in v.steps[1:]:
      by_step[(step.verb, step.noun)][int(v.tokens[int(step.clips[0])])] += 1
  anywhere = sum(by_step.values(), collections.Counter())
  commonest = lambda c: min(c, key=lambda k: (-c[k], k)) if c else -1  # noqa: E731
  return lambda verb, noun: commonest(by_step.get((verb, noun)) or anywhere)


def _boundary_steps(video) -> list[tuple[object, int]]:
  """(step, t) for every step after the first with a clip before it; t: its first clip."""
  return [(step, int(step.clips[0])) for step in video.steps[1:] if int(step.clips[0]) >= 1]


def positions(video) -> list[int]:
  """The clip index t of each boundary of a video: the first clip of every step after the
  first that has a clip before it."""
  return [t for _, t in _boundary_steps(video)]


def _boundary_bigram(train: Sequence) -> Callable[[int], int]:
  """The first token of the next step most often seen after `last` at the training videos'
  boundaries; the commonest first token after a token never seen at one. Ties: the smaller."""
  after: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
  for v in train:
    for t in positions(v):
      after[int(v.tokens[t - 1])][int(v.tokens[t])] += 1
  anywhere = sum(after.values(), collections.Counter())
  commonest = lambda c: min(c, key=lambda k: (-c[k], k)) if c else -1  # noqa: E731
  return lambda last: commonest(after.get(last) or anywhere)


def evaluate(held: Sequence, train: Sequence, predict: Callable[[object, int], int],
             vocab, nearest: int) -> dict:
  """Scores at every boundary of the `held` videos. `predict(video, t)` is the model's next
  token after the video's first t clips; videos carry tokens, steps (with clip indices, verb
  and noun), truth (with cues), verbs and nouns per clip (as `evaluate.Video`)."""
  clip_truth = {(v.video_id, int(c)): (int(v.verbs[c]), int(v.nouns[c]))
                for v in train for c in range(len(v.tokens))}
  meaning_verb, meaning_noun = token_meanings(vocab, clip_truth, nearest)
  token_bigram = baselines.Bigram([v.tokens for v in train]).predict
  boundary_bigram = _boundary_bigram(train)
  step_ngram = predictability.StepNgram(
      [[(vb, n) for _, vb, n in said_steps(v.truth)] for v in train], STEP_ORDER)
  told = _first_tokens(train)
  rows = collections.defaultdict(list)
  for v in held:
    said = said_steps(v.truth)
    for step, t in _boundary_steps(v):
      truth = (words.VERBS.index(step.verb), words.NOUNS.index(step.noun))
      last = int(v.tokens[t - 1])
      guesses = {"model": predict(v, t), "bigram": token_bigram(last),
                 "boundary_bigram": boundary_bigram(last)}
      for name, token in guesses.items():
        rows[f"{name}_token"].append(token == int(v.tokens[t]))
        rows[f"{name}_verb"].append(meaning_verb[token] == truth[0])
        rows[f"{name}_noun"].append(meaning_noun[token] == truth[1])
      before = [(vb, n) for start, vb, n in said if start < step.start]
      verb, noun = step_ngram.predict(before)
      rows["step_ngram_verb"].append(words.VERBS.index(verb) == truth[0])
      rows["step_ngram_noun"].append(words.NOUNS.index(noun) == truth[1])
      rows["told_step_token"].append(told(step.verb, step.noun) == int(v.tokens[t]))
  if not rows:
    raise ValueError("no held-out step boundary has a clip before it")
  hits = {k: np.array(x) for k, x in rows.items()}
  out = {"boundaries": len(hits["model_token"]),
         **{k: float(x.mean()) for k, x in hits.items()}}
  for what in ("token", "verb", "noun"):
    out[f"{what}_vs_bigram"] = _paired(hits[f"model_{what}"], hits[f"bigram_{what}"])
  out["token_vs_boundary_bigram"] = _paired(hits["model_token"], hits["boundary_bigram_token"])
  return out

