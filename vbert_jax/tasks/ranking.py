"""Retrieval metrics from a score matrix: recall at K and the median rank.

Each query (a row) has one correct candidate (its column `truth[q]`). Ties are broken at random,
and the figures are their expectation: a correct candidate with g candidates scored above it
and t others tied with it sits at each rank g+1 ... g+1+t with the same probability. So a
scorer that gives every candidate the same score gets chance (K / candidates), never a perfect
recall, and identical captions (several segments narrated with the same words) share their
ranks fairly.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

RECALL_AT = (1, 5, 10)


def ranks(scores: np.ndarray, truth: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """(above, tied) [queries]: how many candidates score above each query's correct one, and
  how many others tie with it."""
  scores = np.asarray(scores, np.float64)
  truth = np.asarray(truth, np.int64)
  if scores.ndim != 2 or truth.shape != (scores.shape[0],):
    raise ValueError(f"scores must be [queries, candidates] and truth [queries]; got "
                     f"{scores.shape} and {truth.shape}")
  if truth.size and (truth.min() < 0 or truth.max() >= scores.shape[1]):
    raise ValueError(f"truth indices must lie in [0, {scores.shape[1]})")
  correct = scores[np.arange(len(truth)), truth][:, None]
  if not np.isfinite(correct).all():
    raise ValueError("a correct candidate has a score that is not finite")
  above = (scores > correct).sum(axis=1)
  tied = (scores == correct).sum(axis=1) - 1
  return above, tied


def recall_at(above: np.ndarray, tied: np.ndarray, k: int) -> float:
  """Expected share of queries whose correct candidate lands in the top k."""
  return float(np.mean(np.clip((k - above) / (tied + 1), 0.0, 1.0)))


def metrics(scores: np.ndarray, truth: Sequence[int],
            recall: Sequence[int] = RECALL_AT) -> dict[str, float]:
  """R@K for each K in `recall`, the median and mean rank (1 is best) of the correct
  candidates, and the number of queries and candidates."""
  above, tied = ranks(scores, truth)
  expected_rank = above + 1 + tied / 2
  out = {f"r{k}": recall_at(above, tied, k) for k in recall}
  out.update(median_rank=float(np.median(expected_rank)), mean_rank=float(expected_rank.mean()),
             queries=int(len(above)), candidates=int(np.asarray(scores).shape[1]))
  return out


def chance(candidates: int, recall: Sequence[int] = RECALL_AT) -> dict[str, float]:
  """What a scorer that knows nothing reaches: R@K = K / candidates, median rank (n + 1) / 2."""
  out = {f"r{k}": min(k / candidates, 1.0) for k in recall}
  out.update(median_rank=(candidates + 1) / 2, mean_rank=(candidates + 1) / 2)
  return out
