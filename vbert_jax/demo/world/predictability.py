"""How foreseeable the demo world's next step is: a step n-gram against chance and an oracle.

A world whose next step is drawn afresh gives forecasting nothing to learn; one whose recipes
fix every order gives it nothing to test. At every step boundary of the held-out videos (every
step after the first) three predictors guess the next (verb, noun):

- a step n-gram counted on the training videos' true steps (backing off to shorter contexts);
- the oracle: it knows the video's dish and the generator's exact distribution over its orders
  (recipes.orders), and picks the likeliest next step: the ceiling for any predictor;
- chance: one over the distinct steps of the training recipes.
"""

from __future__ import annotations

import collections
from typing import Hashable, Mapping, Sequence

from vbert_jax.demo.world import recipes


class StepNgram:
  """The step seen most often after the last n-1 steps; a shorter context where that one was
  never seen, the most frequent step at the end (ties: the first in sorted order)."""

  def __init__(self, sequences: Sequence[Sequence[Hashable]], n: int = 2):
    if n < 1:
      raise ValueError(f"StepNgram: n={n}; expected at least 1")
    self.n = n
    self.after: dict[tuple, collections.Counter] = collections.defaultdict(collections.Counter)
    for seq in sequences:
      seq = list(seq)
      for i, step in enumerate(seq):
        for k in range(min(i, n - 1) + 1):
          self.after[tuple(seq[i - k:i])][step] += 1
    if not self.after[()]:
      raise ValueError("StepNgram: the training sequences hold no step")

  def predict(self, history: Sequence[Hashable]):
    history = list(history)
    for k in range(min(len(history), self.n - 1), -1, -1):
      counts = self.after.get(tuple(history[len(history) - k:]))
      if counts:
        return min(counts, key=lambda s: (-counts[s], s))
    raise AssertionError("unreachable: the empty context is always counted")


def _steps(truth: Mapping) -> list[tuple[str, str]]:
  return [(s["verb"], s["noun"]) for s in truth["steps"]]


def next_step(truths: Sequence[Mapping], min_steps: int, max_steps: int,
              orders: Sequence[int] = (2, 3)) -> dict:
  """Accuracy of step n-grams (one per order), the oracle and chance at the held-out videos'
  step boundaries; n-grams count the training videos."""
  train = [_steps(t) for t in truths if t["split"] == "train"]
  held = [t for t in truths if t["split"] == "val"]
  models = {n: StepNgram(train, n) for n in orders}
  hits = collections.defaultdict(int)
  boundaries = 0
  for truth in held:
    steps = _steps(truth)
    dish = recipes.by_name(truth["dish"])
    for i in range(1, len(steps)):
      boundaries += 1
      for n, model in models.items():
        hits[f"ngram{n}"] += model.predict(steps[:i]) == steps[i]
      hits["oracle"] += recipes.oracle_next(dish, steps[:i], min_steps, max_steps) == steps[i]
  if not boundaries:
    raise ValueError("next_step: no held-out video has two steps")
  distinct = {s for seq in train for s in seq}
  return {"boundaries": boundaries, "distinct_steps": len(distinct),
          "chance": 1.0 / len(distinct),
          **{k: hits[k] / boundaries for k in [f"ngram{n}" for n in orders] + ["oracle"]}}
