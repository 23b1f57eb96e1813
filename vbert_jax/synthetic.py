"""Generated token batches with something to learn, behind the input-source interface.

A seeded world holds `num_topics` sentences ("recipes"); the visual tokens of a topic are a fixed
function of its words (each word id maps to one visual token), so a model can learn the text from
the video, the video from the text, and whether the two belong together. Each example picks a
regime (text-only, video-only or video-text) and a topic; a video-text example is a negative
(video of another topic, `lva_label` 0) with probability `lva_negative_rate`. Examples are packed
with `sequence.Layout` and masked with `vbert_jax.masking.mask_example`.

Every example is a pure function of (seed, split, position in the global stream): row r of global
batch b is example b * batch_size + r (or, packed, holds candidates from (b * batch_size + r) * E
on; see `vbert_jax/packing.py`). So the iterator's state is one number, a resumed run sees
exactly the examples an uninterrupted one would (on any number of hosts), and each process makes
only the rows its devices hold, wherever the mesh puts them.

The interface (shared with the TFDS pipeline): `next(it)` gives this process's rows of the next
global batch as a dict of numpy arrays; `get_state()` / `set_state(state)` save and restore the
position.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from vbert_jax import align
from vbert_jax import masking as masking_lib
from vbert_jax import packing
from vbert_jax import sequence
from vbert_jax import stream

SPLITS = {"train": 0, "eval": 1}


@dataclasses.dataclass(frozen=True)
class World:
  """The topics: a sentence of text ids each, and its visual tokens (a function of the words)."""
  texts: tuple[tuple[int, ...], ...]
  videos: tuple[tuple[int, ...], ...]

  @classmethod
  def generate(cls, vocab: sequence.JointVocab, num_topics: int, min_words: int, max_words: int,
               seed: int) -> "World":
    if num_topics < 2:
      raise ValueError(f"synthetic source: num_topics={num_topics}; LVA negatives need at least 2")
    if not 1 <= min_words <= max_words:
      raise ValueError(f"synthetic source: min_words={min_words}, max_words={max_words}; "
                       f"expected 1 <= min_words <= max_words")
    rng = np.random.default_rng([seed, 7919])
    ids = np.arange(vocab.text_size)
    words = ids[vocab.is_text(ids)]
    word_to_visual = rng.integers(0, vocab.visual_size, size=vocab.text_size)
    texts, videos = [], []
    for _ in range(num_topics):
      n = int(rng.integers(min_words, max_words + 1))
      text = rng.choice(words, size=n, replace=True)
      texts.append(tuple(int(w) for w in text))
      videos.append(tuple(int(v) for v in word_to_visual[text]))
    return cls(tuple(texts), tuple(videos))


class SyntheticSource:
  """An iterator over this process's rows of global batches of generated, masked examples."""

  def __init__(self, *, vocab: sequence.JointVocab, max_len: int, batch_size: int,
               masking: masking_lib.MaskingConfig, regime_weights: tuple[float, float, float],
               lva_negative_rate: float, world: World, seed: int, split: str = "train",
               rows: Sequence[int] | None = None, pack_examples: int = 1,
               max_example_len: int = 0):
    if split not in SPLITS:
      raise ValueError(f"synthetic source: split={split!r}; expected one of {sorted(SPLITS)}")
    weights = np.asarray(regime_weights, np.float64)
    if weights.shape != (3,) or (weights < 0).any() or weights.sum() <= 0:
      raise ValueError(f"synthetic source: regime weights (text, video, pair)={regime_weights}; "
                       f"expected three non-negative numbers, not all zero")
    if not 0 <= lva_negative_rate <= 1:
      raise ValueError(f"synthetic source: lva_negative_rate={lva_negative_rate}; expected a "
                       f"probability")
    if pack_examples < 1 or not 0 <= max_example_len <= max_len:
      raise ValueError(f"synthetic source: pack_examples={pack_examples}, max_example_len="
                       f"{max_example_len}; expected pack_examples >= 1 and max_example_len "
                       f"from 0 (max_len) to max_len={max_len}")
    self.rows = stream.check_rows(rows, batch_size, "synthetic source")
    self.vocab = vocab
    self.layout = sequence.Layout(vocab, max_example_len or max_len)
    self.pack_examples = pack_examples
    self.pack_spec = packing.PackSpec.for_masking(max_len, pack_examples, masking)
    self.batch_size = batch_size
    self.masking = masking
    self.regime_p = weights / weights.sum()
    self.negative_rate = lva_negative_rate
    self.world = world
    self.seed = seed
    self.split = split
    self.position = 0  # of the next global batch's first example in the stream

  # The iterator contract ------------------------------------------------------------------

  def __iter__(self) -> "SyntheticSource":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    per_row = self.pack_examples
    if per_row == 1:
      rows = [self.example(self.position + int(r)) for r in self.rows]
    else:  # row s of the stream: the candidates s * E ... s * E + E - 1 that fit
      rows = [packing.pack_row(lambda j, at=self.position + int(r) * per_row: self.example(at + j),
                               self.pack_spec, self.vocab.specials.pad) for r in self.rows]
    self.position += self.batch_size * per_row
    return packing.stack_rows(rows)

  def get_state(self) -> dict[str, Any]:
    return {"position": self.position, "seed": self.seed, "split": self.split}

  def set_state(self, state: Mapping[str, Any]) -> None:
    if state.get("seed") != self.seed or state.get("split") != self.split:
      raise stream.StreamMismatchError(
          f"synthetic source: saved state {dict(state)} is for another stream; this one has "
          f"seed={self.seed}, split={self.split!r}")
    self.position = stream.position_of(state, self.batch_size * self.pack_examples,
                                       "synthetic source")

  # Examples ---------------------------------------------------------------------------------

  def example(self, index: int) -> dict[str, np.ndarray]:
    """The example at a global index of this split: a pure function of (seed, split, index)."""
    rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
    regime = int(rng.choice(3, p=self.regime_p))
    topics = len(self.world.texts)
    topic = int(rng.integers(topics))
    text, video = self.world.texts[topic], self.world.videos[topic]
    label, weight = 0, 0.0
    if regime == sequence.REGIME_PAIR:
      weight, label = 1.0, 1
      if rng.random() < self.negative_rate:
        label = 0
        video = self.world.videos[(topic + int(rng.integers(1, topics))) % topics]
      packed = self.layout.pair(text, video)
    elif regime == sequence.REGIME_TEXT:
      packed = self.layout.text_only(text)
    else:
      packed = self.layout.video_only(video)
    out = packed.as_dict()
    out.update(self.masking.mask_example(rng, packed.input_ids, self.vocab))
    out["lva_label"] = np.int32(label)
    out["lva_weight"] = np.float32(weight)
    out["truncated"] = np.int32(packed.truncated)
    return out


def from_config(config: Any, split: str, *, batch_size: int,
                rows: Sequence[int] | None = None) -> SyntheticSource:
  """The source a pretraining config describes (`config.input.synthetic_*`, masking, regimes):
  `rows` of global batches of `batch_size` (all rows by default)."""
  vocab = sequence.JointVocab(config.model.text_vocab_size, config.model.visual_vocab_size)
  world = World.generate(vocab, config.input.synthetic_topics, config.input.synthetic_min_words,
                         config.input.synthetic_max_words, config.seed)
  masking = masking_lib.MaskingConfig.from_config(config.masking)
  regimes = (config.regimes.text, config.regimes.video, config.regimes.pair)
  return SyntheticSource(vocab=vocab, max_len=config.max_len, batch_size=batch_size,
                         masking=masking, regime_weights=regimes,
                         lva_negative_rate=config.lva_negative_rate, world=world,
                         seed=config.seed, split=split, rows=rows,
                         pack_examples=config.input.get("pack_examples", 1),
                         max_example_len=config.input.get("max_example_len", 0))


def random_records(num_videos: int, vocab: sequence.JointVocab, seed: int = 0, *,
                   min_clips: int = 40, max_clips: int = 160, no_asr_rate: float = 0.0,
                   ) -> list[dict[str, Any]]:
  """Record dicts shaped like real ones, aligned by `align.align_video`: for tests and benches.

  Videos of 1-4 minutes in 1.5 s clips; ASR sentences of 4-20 tokens lasting 1.5-6 s, with
  silent stretches (which become 16-token video-only segments); a share of videos has no ASR.
  """
  rng = np.random.default_rng([seed, 4242])
  ids = np.arange(vocab.text_size)
  words = ids[vocab.is_text(ids)]
  records = []
  for v in range(num_videos):
    n = int(rng.integers(min_clips, max_clips + 1))
    starts = np.arange(n) * 1.5
    sentences, t = [], 0.0
    has_asr = rng.random() >= no_asr_rate
    while has_asr and t < n * 1.5 - 1.0:
      if rng.random() < 0.1:
        t += float(rng.uniform(5.0, 40.0))  # a silent stretch
        continue
      length = float(rng.uniform(1.5, 6.0))
      text = rng.choice(words, size=int(rng.integers(4, 21)))
      sentences.append(align.TokenizedSentence(text.tolist(), t, min(t + length, n * 1.5)))
      t += length
    record = align.align_video(f"video_{seed}_{v}", sentences, starts, starts + 1.5,
                               rng.integers(0, vocab.visual_size, size=n))
    records.append(record.to_features())
  return records
