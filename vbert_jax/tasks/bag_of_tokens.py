"""A bag-of-tokens scorer for retrieval: naive Bayes from a segment's visual tokens to the words
of its sentence, fitted on training pairs.

Every training pair (sentence, segment) counts each distinct word of its sentence once as a
class, with the segment's visual tokens as a multinomial observation (add-alpha smoothing, as
scikit-learn's MultinomialNB). A sentence's score beside a segment is the mean, over its words
seen in training, of log P(word | tokens) - log P(word): how much the tokens raise each of its
words above its prior. The mean keeps long and short sentences on one scale when a segment
ranks sentences.

It is the baseline that retrieval's cross-encoder must beat, and the cheap shortlist that the
cross-encoder re-ranks on large sets (`vbert_jax.tasks.retrieval`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import special


class BagOfTokens:
  """Fitted on training pairs: `texts[i]` (text token ids) was said over `videos[i]` (visual
  tokens in [0, visual_size))."""

  def __init__(self, texts: Sequence[Sequence[int]], videos: Sequence[Sequence[int]],
               visual_size: int, alpha: float = 1.0):
    if len(texts) != len(videos):
      raise ValueError(f"{len(texts)} training texts but {len(videos)} videos; expected pairs")
    words = [np.unique(np.asarray(t, np.int64)) for t in texts]
    known = [w for w in words if len(w)]
    if not known:
      raise ValueError("BagOfTokens: no training pair has a word")
    self.words = np.unique(np.concatenate(known))
    self.visual_size = int(visual_size)
    counts = np.zeros((len(self.words), self.visual_size), np.float64)
    classes = np.zeros(len(self.words), np.float64)
    for w, v in zip(words, videos):
      rows = np.searchsorted(self.words, w)
      tokens = self._tokens(v)
      if len(rows) and len(tokens):
        np.add.at(counts, (rows[:, None], tokens[None, :]), 1.0)
      classes[rows] += 1.0
    smoothed = counts + alpha
    self.feature_log_prob = np.log(smoothed / smoothed.sum(axis=1, keepdims=True))
    self.log_prior = np.log(classes / classes.sum())

  def _tokens(self, video: Sequence[int]) -> np.ndarray:
    tokens = np.asarray(video, np.int64).reshape(-1)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= self.visual_size):
      raise ValueError(f"visual tokens must lie in [0, {self.visual_size}); got range "
                       f"[{tokens.min()}, {tokens.max()}]")
    return tokens

  def log_posterior(self, videos: Sequence[Sequence[int]]) -> np.ndarray:
    """log P(word | tokens) [videos, words], normalised over the fitted words."""
    joint = np.stack([self.log_prior + self.feature_log_prob[:, self._tokens(v)].sum(axis=1)
                      for v in videos])
    return joint - special.logsumexp(joint, axis=1, keepdims=True)

  def scores(self, texts: Sequence[Sequence[int]], videos: Sequence[Sequence[int]]
             ) -> np.ndarray:
    """[texts, videos]: each text's mean log-ratio over its fitted words (0 for a text with
    none: it ties with every video)."""
    lift = self.log_posterior(videos) - self.log_prior  # [videos, words]
    out = np.zeros((len(texts), len(videos)))
    for i, t in enumerate(texts):
      w = np.unique(np.asarray(t, np.int64))
      rows = np.searchsorted(self.words, w)
      seen = rows < len(self.words)
      seen[seen] = self.words[rows[seen]] == w[seen]
      rows = rows[seen]
      if len(rows):
        out[i] = lift[:, rows].mean(axis=1)
    return out
