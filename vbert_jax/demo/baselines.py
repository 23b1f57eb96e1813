"""The baselines printed beside the model's figures: what a result must beat to mean something.

- `nearest_neighbour`: 1-NN on raw S3D features (cosine), the ceiling that a model reading only
  visual tokens approaches;
- `Bigram`: next visual token = the most frequent successor of the current one in the training
  videos (falling back to the most frequent token);
- `most_frequent`: the training caption said most often, given to every held-out video;
- `label_prior`: how often a label occurs among training clips (chance for a retrieval that
  returns training clips);
- `TokenNaiveBayes`: a label from a step's visual tokens by naive Bayes fitted on the training
  steps' true labels: what the tokens alone can tell, the ceiling for alignment.
"""

from __future__ import annotations

import collections
from typing import Sequence

import numpy as np


def _unit(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def nearest_neighbour(train: np.ndarray, test: np.ndarray) -> np.ndarray:
  """Index of each test row's most cosine-similar training row."""
  if len(train) == 0:
    raise ValueError("nearest_neighbour: no training rows")
  return np.argmax(_unit(test) @ _unit(train).T, axis=1)


def nearest_neighbour_accuracy(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray,
                               test_labels: np.ndarray) -> float:
  nearest = nearest_neighbour(train, test)
  return float(np.mean(np.asarray(train_labels)[nearest] == np.asarray(test_labels)))


class Bigram:
  """argmax_b count(a -> b) over consecutive training tokens; unseen a: the most frequent token."""

  def __init__(self, sequences: Sequence[Sequence[int]]):
    self.counts: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    unigram: collections.Counter = collections.Counter()
    for seq in sequences:
      seq = [int(t) for t in seq]
      unigram.update(seq)
      for a, b in zip(seq[:-1], seq[1:]):
        self.counts[a][b] += 1
    if not unigram:
      raise ValueError("Bigram: no training tokens")
    # Ties break towards the smaller token, so that the baseline is deterministic.
    self.fallback = min(unigram, key=lambda t: (-unigram[t], t))
    self.best = {a: min(c, key=lambda t: (-c[t], t)) for a, c in self.counts.items()}

  def predict(self, previous: int) -> int:
    return self.best.get(int(previous), self.fallback)

  def accuracy(self, sequences: Sequence[Sequence[int]]) -> tuple[float, int]:
    """Next-token accuracy over every position after the first of each sequence; (acc, n)."""
    hits = total = 0
    for seq in sequences:
      for a, b in zip(seq[:-1], seq[1:]):
        hits += int(self.predict(a) == int(b))
        total += 1
    return (hits / total if total else 0.0), total


def most_frequent(captions: Sequence[str]) -> str:
  """The most frequent caption (ties: the first in sorted order)."""
  if not captions:
    raise ValueError("most_frequent: no captions")
  counts = collections.Counter(captions)
  return min(counts, key=lambda c: (-counts[c], c))


def label_prior(labels: np.ndarray, num_labels: int) -> np.ndarray:
  """Share of each label among `labels` (ints in [0, num_labels); -1 ignored)."""
  labels = np.asarray(labels)
  labels = labels[labels >= 0]
  counts = np.bincount(labels, minlength=num_labels).astype(np.float64)
  return counts / max(counts.sum(), 1.0)


class TokenNaiveBayes:
  """log P(label | tokens) with P(token | label) counted over training steps (add-one)."""

  def __init__(self, tokens: Sequence[np.ndarray], labels: Sequence[int], num_labels: int,
               vocab_size: int):
    if not len(tokens):
      raise ValueError("TokenNaiveBayes: no training steps")
    counts = np.ones((num_labels, vocab_size))
    for t, label in zip(tokens, labels):
      np.add.at(counts[label], np.asarray(t, np.int64), 1.0)
    self.log_likelihood = np.log(counts / counts.sum(axis=1, keepdims=True))
    self.log_prior = np.log(label_prior(np.asarray(labels), num_labels) + 1e-12)

  def log_posterior(self, tokens: np.ndarray) -> np.ndarray:
    """[num_labels], normalised; the prior is the training steps' label shares."""
    lp = self.log_prior + self.log_likelihood[:, np.asarray(tokens, np.int64)].sum(axis=1)
    return lp - np.logaddexp.reduce(lp)

  def log_ratio(self, tokens: np.ndarray, label: int) -> float:
    """log P(label | tokens) / P(label): above 0 where the tokens make `label` likelier."""
    return float(self.log_posterior(tokens)[label] - self.log_prior[label])
