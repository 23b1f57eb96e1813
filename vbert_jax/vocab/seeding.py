"""Greedy k-means++ seeding of every node of a tree level at once, on a sample of each node's rows.

Seeding only has to spread the first centroids out; Lloyd's iterations that follow use every row.
So each node seeds from at most `sample` of its rows (all of them in a smaller node), drawn
uniformly with a seeded generator. Within that sample the squared distances between all pairs of
rows come from one Gram matrix per node, and the k rounds of greedy k-means++ (scikit-learn's
variant: in every round a few candidates are drawn with probability proportional to the squared
distance to the nearest chosen centre, and the one that lowers the node's potential most is kept)
are then table lookups, run for many nodes together. The seeds are rows of the source, so a node
with fewer distinct rows than branches repeats rows, which `kmeans` takes out of the assignment.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

# Padded rows of one group of nodes: bounds the group's rows [G, pad, D] and Gram [G, pad, pad].
_GROUP_ROWS = 8192


def sample_rows(node: np.ndarray, nodes: int, sample: int, rng: np.random.Generator):
  """At most `sample` rows of each node, uniformly: (rows grouped by node, per-node counts)."""
  order = np.lexsort((rng.random(len(node)), node))
  count = np.bincount(node, minlength=nodes)
  rank = np.arange(len(node)) - np.repeat(np.cumsum(count) - count, count)
  return order[rank < sample], np.minimum(count, sample)


def seed_level(node: np.ndarray, nodes: int, k: int, sample: int,
               rows_of: Callable[[np.ndarray], np.ndarray], rng: np.random.Generator
               ) -> np.ndarray:
  """The seed rows [nodes, k] of every node (-1 for a node without rows).

  `rows_of(rows)` returns the rows [m, D] float32 in any one frame (distances are all that
  matter here; each node's rows are taken relative to one of them before any product).
  """
  rows, size = sample_rows(node, nodes, sample, rng)
  start = np.cumsum(size) - size
  seeds = np.full((nodes, k), -1, np.int64)
  # A node with at most k rows: k-means++ would take each row once, then repeat rows.
  few = np.flatnonzero((size > 0) & (size <= k))
  seeds[few] = rows[start[few][:, None] + np.arange(k)[None, :] % size[few][:, None]]
  by_size = np.argsort(size, kind="stable")
  by_size = by_size[size[by_size] > k]
  lo = 0
  while lo < len(by_size):
    hi = lo + 1  # sizes ascend, so the last node of a group sets its padding
    while hi < len(by_size) and (hi + 1 - lo) * size[by_size[hi]] <= _GROUP_ROWS:
      hi += 1
    group = by_size[lo:hi]
    pad = int(size[group[-1]])
    valid = np.arange(pad)[None, :] < size[group][:, None]
    # A node's slots past its size repeat its first row; `valid` keeps them out of every draw.
    src = rows[start[group][:, None] + np.where(valid, np.arange(pad)[None, :], 0)]
    y = rows_of(src.reshape(-1)).reshape(len(group), pad, -1)
    y -= y[:, :1, :].copy()  # relative to a row of the node: no cancellation in the Gram
    chosen = _greedy(_sq_dist(y), valid, k, rng)
    seeds[group] = src[np.arange(len(group))[:, None], chosen]
    lo = hi
  return seeds


def _sq_dist(y: np.ndarray) -> np.ndarray:
  """Squared distances [G, pad, pad] between the rows of each node, from the Gram matrix."""
  sq = np.einsum("gpd,gpd->gp", y, y)
  d = sq[:, :, None] + sq[:, None, :] - 2.0 * np.matmul(y, y.transpose(0, 2, 1))
  np.maximum(d, 0.0, out=d)
  d[:, np.arange(d.shape[1]), np.arange(d.shape[1])] = 0.0
  return d


def _greedy(d: np.ndarray, valid: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
  """Greedy k-means++ in every node of a group: the chosen row [G, k] of each round.

  A node whose rows are all chosen already (every weight 0) draws uniformly, so it repeats a row
  only when it must.
  """
  g, pad = valid.shape
  trials = 2 + int(math.log(k))
  size = valid.sum(1)
  gi = np.arange(g)[:, None]
  dmin = np.full((g, pad), np.inf, np.float32)
  chosen = np.zeros((g, k), np.int64)
  for r in range(k):
    u = rng.random((g, trials))
    uniform = np.minimum((u * size[:, None]).astype(np.int64), size[:, None] - 1)
    weight = np.where(valid, dmin, 0.0) if r else np.zeros((g, pad))
    cw = np.cumsum(weight, axis=1, dtype=np.float64)
    total = cw[:, -1]
    drawn = np.sum(cw[:, None, :] <= (u * total[:, None])[:, :, None], axis=-1)
    cand = np.where((total > 0)[:, None], np.minimum(drawn, size[:, None] - 1), uniform)
    new = np.minimum(dmin[:, None, :], d[gi, cand])
    potential = np.where(valid[:, None, :], new, 0.0).sum(-1, dtype=np.float64)
    best = np.argmin(potential, axis=1)
    chosen[:, r] = cand[np.arange(g), best]
    dmin = new[np.arange(g), best]
  return chosen
