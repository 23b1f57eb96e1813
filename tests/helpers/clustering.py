"""Reference checks of a clustering: exhaustive nearest leaf, and agreement of two labelings."""

from __future__ import annotations

import numpy as np


def brute_force_leaf(x: np.ndarray, leaves: np.ndarray) -> np.ndarray:
  """Nearest leaf centroid of every row by exhaustive search (numpy; for checks)."""
  x = np.asarray(x, np.float64)
  leaves = np.asarray(leaves, np.float64)
  d = (x * x).sum(1)[:, None] - 2 * x @ leaves.T + (leaves * leaves).sum(1)[None]
  return np.argmin(d, axis=1).astype(np.int32)


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
  """Adjusted Rand index of two labelings (Hubert and Arabie, 1985)."""
  a = np.unique(np.asarray(a), return_inverse=True)[1]
  b = np.unique(np.asarray(b), return_inverse=True)[1]
  table = np.zeros((a.max() + 1, b.max() + 1), np.int64)
  np.add.at(table, (a, b), 1)

  def pairs(v):
    v = np.asarray(v, np.float64)
    return float((v * (v - 1) / 2).sum())

  index = pairs(table)
  rows, cols, total = pairs(table.sum(1)), pairs(table.sum(0)), pairs([len(a)])
  expected = rows * cols / total if total else 0.0
  top = (rows + cols) / 2
  return 1.0 if top == expected else (index - expected) / (top - expected)
