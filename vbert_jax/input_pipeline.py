"""The input pipeline: records of the aligned dataset -> masked, packed host batches.

Works over any random-access source of `VideoRecord.to_features()` dicts: a list in tests, the
TFDS array_record data source (`builder.as_data_source(split)`) in production. All processes
follow one global stream (`vbert_jax/stream.py`): each record stands for `examples_per_video`
elements per epoch, the elements of all records are shuffled together, and global batch b holds
stream positions [b * B, (b + 1) * B). A process makes only the rows its devices hold, reading the
records those rows need, so the examples of a step do not depend on the device order or on the
number of hosts. One example, the paper's recipe:

  1. a regime, text-only / video-only / video-text, drawn in the configured proportions
     (a record that cannot give that regime, such as a video without ASR for text-only, hands
     the example to another record; see `_MAX_TRIES`);
  2. random concatenation: a window of 1..n neighbouring sentences (with the clips they cover)
     for text and video-text, or of 1..n neighbouring segments for video-only;
  3. a random video subsampling rate r in 1..max_rate: every r-th clip token, from a random phase;
  4. for video-text, with probability `lva_negative_rate` a negative (`lva_label` 0): the text
     with the visual tokens of a different window, from the same video where one does not overlap
     the sentence's clips, else from another video of the dataset (`negative_other_video` sets how
     often another video is preferred), or, a share `word_swap_rate` of them, the sentence's
     own clips with one of its verbs or nouns changed for another (`swap_groups`);
  5. its layout with `sequence.Layout` (cut to `max_example_len` tokens) and BERT masking with
     `vbert_jax.masking`;
  6. with `pack_examples` E > 1, several examples share a row (`vbert_jax.packing`): row s of
     the stream holds the candidates at stream positions s * E ... s * E + E - 1 that fit.

Every choice comes from a NumPy generator seeded by (seed, split, epoch, global element index),
never from worker, thread or host order, so a row of a batch is a pure function of (seed, step,
row): batches repeat exactly across runs, worker counts, thread counts and host counts, and a
restored iterator continues where the saved one stood. Parallelism and prefetching are grain's
(`ReadOptions` threads, `mp_prefetch` worker processes).

The iterator contract is the one of `vbert_jax/synthetic.py`: `next(it)` gives this process's rows
of the next global batch, `get_state()` / `set_state(state)` save and restore the stream
position.
With `debug=True` each batch also carries the per-example choices (`debug_*` fields) so that
their statistics can be measured; the training batch is otherwise unchanged.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Mapping, Sequence

from absl import flags
from absl import logging
import grain
import numpy as np

from vbert_jax import masking as masking_lib
from vbert_jax import packing
from vbert_jax import sequence
from vbert_jax import stream
from vbert_jax.text import tokenizers

SPLIT_CODES = {"train": 0, "eval": 1}
# How many records an example may look at before it settles for another regime.
_MAX_TRIES = 8
# Per-example choices added to a batch with debug=True.
DEBUG_KEYS = ("debug_index", "debug_epoch", "debug_record", "debug_regime_requested",
              "debug_concat_requested", "debug_concat", "debug_rate", "debug_negative_source",
              "debug_negative_record")
NEGATIVE_NONE, NEGATIVE_SAME_VIDEO, NEGATIVE_OTHER_VIDEO, NEGATIVE_WORD_SWAP = -1, 0, 1, 2


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """What one pipeline needs, read from a pretraining config by `PipelineConfig.from_config`."""
  vocab: sequence.JointVocab
  max_len: int  # tokens of a row
  batch_size: int  # rows of a global batch
  masking: masking_lib.MaskingConfig = masking_lib.MaskingConfig()
  regime_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # text, video, pair
  lva_negative_rate: float = 0.5
  negative_other_video: float = 0.5  # share of negatives that look in another video first
  # Above 0: this share of video-text examples is shown unmasked and alone trains LVA (on
  # whole sentences and clips, as the classifier meets them at inference; negatives are drawn
  # among them), while the masked rest are positives for MLM/MVM only. 0: the paper's recipe,
  # LVA on every masked video-text example.
  unmasked_pair_rate: float = 0.0
  # Each text token of those unmasked pairs becomes [MASK] with this probability, as input noise
  # with nothing to predict: LVA can then not tell a training pair by its whole sentence,
  # learned by heart, and must go by the words the clips show.
  unmasked_word_dropout: float = 0.0
  # This share of LVA negatives keeps the sentence's own clips and changes one of its words for
  # another of the same group (`swap_groups`: text ids of interchangeable words, such as the
  # narration's verbs, or its nouns): a negative told apart only by a word the clips show, where
  # a negative with other clips also differs in everything else. A sentence with none of those
  # words takes a negative of other clips.
  word_swap_rate: float = 0.0
  swap_groups: tuple[tuple[int, ...], ...] = ()
  max_concat: int = 3  # neighbouring sentences (segments) joined into one example: 1..n
  # Neighbouring segments joined into a video-only example: 1..n (0: as max_concat). Longer
  # video-only windows than sentence windows give masked clips a past to be predicted from.
  max_concat_video: int = 0
  # The share of video-only examples of two or more segments that end at the first clip of
  # their last segment, after [>], which alone is masked (`Layout.video_next`): what comes next
  # when one sentence's clips give way to the next's, from the clips before. Random masking
  # sees both sides of that change, and masking a window's last clips mostly asks for the clip
  # that repeats its neighbour.
  video_boundary_rate: float = 0.0
  max_subsample_rate: int = 5  # every r-th clip token, r in 1..max_subsample_rate
  examples_per_video: int = 1  # examples drawn from each record per epoch
  # Examples a row may hold (1: one example per row, no packing) and the longest example
  # (0: max_len); an example cut to fit counts in the `truncated` field.
  pack_examples: int = 1
  max_example_len: int = 0
  seed: int = 0
  split: str = "train"
  shuffle: bool = True
  num_epochs: int | None = None  # None: repeat for ever
  read_threads: int = 0  # grain ReadOptions.num_threads (0: in the iterating thread)
  prefetch_buffer_size: int = 64
  worker_count: int = 0  # grain worker processes (mp_prefetch); 0: none
  worker_buffer_size: int = 2
  debug: bool = False

  def __post_init__(self):
    w = np.asarray(self.regime_weights, np.float64)
    problems = []
    if w.shape != (3,) or (w < 0).any() or w.sum() <= 0:
      problems.append(f"regimes (text, video, pair)={self.regime_weights}: expected three "
                      f"non-negative numbers, not all zero")
    for name in ("lva_negative_rate", "negative_other_video", "unmasked_pair_rate",
                 "unmasked_word_dropout", "word_swap_rate", "video_boundary_rate"):
      if not 0 <= getattr(self, name) <= 1:
        problems.append(f"{name}={getattr(self, name)}: expected a probability in [0, 1]")
    problems += _swap_group_problems(self)
    for name in ("max_concat", "max_subsample_rate", "examples_per_video", "batch_size",
                 "pack_examples"):
      if getattr(self, name) < 1:
        problems.append(f"{name}={getattr(self, name)}: expected at least 1")
    if self.split not in SPLIT_CODES:
      problems.append(f"split={self.split!r}: expected one of {sorted(SPLIT_CODES)}")
    if not 0 <= self.max_example_len <= self.max_len:
      problems.append(f"max_example_len={self.max_example_len}: expected 0 (max_len) up to "
                      f"max_len={self.max_len}")
    if self.max_concat_video < 0:
      problems.append(f"max_concat_video={self.max_concat_video}: expected >= 0 (0: as "
                      f"max_concat)")
    if self.worker_count < 0 or self.read_threads < 0:
      problems.append(f"worker_count={self.worker_count}, read_threads={self.read_threads}: "
                      f"expected >= 0")
    if problems:
      raise ValueError("input pipeline config: " + "; ".join(problems))

  @property
  def example_len(self) -> int:
    return self.max_example_len or self.max_len

  @property
  def packed(self) -> bool:
    return self.pack_examples > 1

  @property
  def pack_spec(self) -> packing.PackSpec:
    return packing.PackSpec.for_masking(self.max_len, self.pack_examples, self.masking)

  @property
  def examples_per_batch(self) -> int:
    """Stream positions a global batch takes: every candidate of every row."""
    return self.batch_size * self.pack_examples

  @property
  def regime_p(self) -> np.ndarray:
    w = np.asarray(self.regime_weights, np.float64)
    return w / w.sum()

  @classmethod
  def from_config(cls, config: Any, split: str = "train", *, batch_size: int,
                  **overrides) -> "PipelineConfig":
    """From a pretraining config (configs/pretrain.py); `config.input.*` keys it lacks default."""
    inp = config.input
    masking = masking_lib.MaskingConfig.from_config(config.masking)
    specials = sequence.SpecialIds.parse(config.model.get("special_ids", None))
    fields = dict(
        vocab=sequence.JointVocab(config.model.text_vocab_size, config.model.visual_vocab_size,
                                  specials),
        max_len=config.max_len, batch_size=batch_size, masking=masking,
        regime_weights=(config.regimes.text, config.regimes.video, config.regimes.pair),
        lva_negative_rate=config.lva_negative_rate, seed=config.seed, split=split)
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for key in ("negative_other_video", "unmasked_pair_rate", "unmasked_word_dropout",
                "word_swap_rate", "max_concat", "max_concat_video", "video_boundary_rate",
                "max_subsample_rate", "examples_per_video",
                "pack_examples", "max_example_len", "read_threads", "prefetch_buffer_size",
                "worker_count", "worker_buffer_size"):
      fields[key] = inp.get(key, defaults[key])
    if fields["word_swap_rate"] > 0:
      fields["swap_groups"] = swap_groups(config)
    fields.update(overrides)
    return cls(**fields)


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


class _Record:
  """The arrays of one record that examples need, with its sentence / clip segment lists."""

  __slots__ = ("key", "video_id", "clips", "text", "offsets", "seg_sentence", "seg_begin",
               "seg_end", "text_segs", "pair_segs", "clip_segs")

  def __init__(self, key: int, features: Any, vocab: sequence.JointVocab):
    get = features.__getitem__ if isinstance(features, Mapping) else \
        lambda k: getattr(features, k)
    vid = get("video_id")
    self.key = key
    self.video_id = vid.decode("utf-8") if isinstance(vid, bytes) else str(vid)
    self.clips = np.asarray(get("clip_tokens"), np.int32)
    self.text = np.asarray(get("text_tokens"), np.int32)
    lengths = np.asarray(get("text_lengths"), np.int64)
    self.offsets = np.concatenate([[0], np.cumsum(lengths)])
    self.seg_sentence = np.asarray(get("segment_sentence"), np.int32)
    self.seg_begin = np.asarray(get("segment_clip_begin"), np.int32)
    self.seg_end = np.asarray(get("segment_clip_end"), np.int32)
    self._check(vocab)
    has_text = self.seg_sentence >= 0
    has_clips = self.seg_end > self.seg_begin
    self.text_segs = np.flatnonzero(has_text)
    self.pair_segs = np.flatnonzero(has_text & has_clips)
    self.clip_segs = np.flatnonzero(has_clips)

  def _check(self, vocab: sequence.JointVocab) -> None:
    """The ranges an example relies on; errors name the record and the field."""
    def fail(what: str):
      raise ValueError(f"input record {self.key} (video {self.video_id!r}): {what}")
    c, t = len(self.clips), len(self.text)
    if c and (self.clips.min() < 0 or self.clips.max() >= vocab.visual_size):
      fail(f"clip_tokens in [{self.clips.min()}, {self.clips.max()}]; expected [0, "
           f"{vocab.visual_size}) (config.model.visual_vocab_size)")
    if t and (self.text.min() < 0 or self.text.max() >= vocab.text_size):
      fail(f"text_tokens in [{self.text.min()}, {self.text.max()}]; expected [0, "
           f"{vocab.text_size}) (config.model.text_vocab_size)")
    if self.offsets[-1] != t:
      fail(f"text_lengths sum to {self.offsets[-1]} but text_tokens has {t}")
    g = len(self.seg_sentence)
    if len(self.seg_begin) != g or len(self.seg_end) != g:
      fail("segment_sentence, segment_clip_begin and segment_clip_end differ in length")
    if g and ((self.seg_begin < 0) | (self.seg_end < self.seg_begin) | (self.seg_end > c)).any():
      fail(f"segment clip ranges outside [0, {c}]")
    if g and self.seg_sentence.max() >= len(self.offsets) - 1:
      fail(f"segment_sentence refers to sentence {self.seg_sentence.max()} of "
           f"{len(self.offsets) - 1}")

  def text_of(self, segs: np.ndarray) -> np.ndarray:
    parts = [self.text[self.offsets[s]:self.offsets[s + 1]] for s in self.seg_sentence[segs]]
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)

  def clip_range(self, segs: np.ndarray) -> tuple[int, int]:
    """The clips a window of segments covers: from its first begin to its last end."""
    return int(self.seg_begin[segs].min()), int(self.seg_end[segs].max())


def _window(rng: np.random.Generator, candidates: np.ndarray, k: int) -> np.ndarray:
  """k neighbouring entries of `candidates` (fewer if it is shorter), from a uniform start."""
  k = min(k, len(candidates))
  start = int(rng.integers(len(candidates) - k + 1))
  return candidates[start:start + k]


def _subsample(rng: np.random.Generator, clips: np.ndarray, rate: int) -> np.ndarray:
  """Every `rate`-th clip token from a random phase, so each clip can appear at any rate."""
  phase = int(rng.integers(min(rate, len(clips)))) if len(clips) else 0
  return clips[phase::rate]


# --------------------------------------------------------------------------------------------
# Examples
# --------------------------------------------------------------------------------------------


class ExampleMaker:
  """Element index -> packed, masked example; a pure function of (config, source, index).

  Picklable (it holds the source and plain settings), so grain's worker processes run it.
  """

  def __init__(self, config: PipelineConfig, source: Any, rows: np.ndarray):
    self.config = config
    self.source = source
    self.num_records = len(source)
    self.rows = rows  # the rows of each global batch that this process makes
    self.layout = sequence.Layout(config.vocab, config.example_len)
    self.regime_cdf = np.cumsum(config.regime_p)
    self.split_code = SPLIT_CODES[config.split]
    self.elements_per_epoch = self.num_records * config.examples_per_video
    # Text id -> its swap group (-1: none).
    self.swap_group = np.full(config.vocab.text_size, -1, np.int32)
    for g, ids in enumerate(config.swap_groups):
      self.swap_group[list(ids)] = g

  def record(self, key: int) -> _Record:
    return _Record(key, self.source[key], self.config.vocab)

  def _other_key(self, rng: np.random.Generator, key: int) -> int | None:
    if self.num_records < 2:
      return None
    other = int(rng.integers(0, self.num_records - 1))
    return other + 1 if other >= key else other

  def batch(self, batch_index: int, elements: np.ndarray) -> dict[str, np.ndarray]:
    """This process's rows of one global batch of element ids, stacked; `batch_index` counts
    global batches, and `elements` holds E candidates per row (E = pack_examples)."""
    first, per_row = batch_index * len(elements), self.config.pack_examples
    if not self.config.packed:
      return packing.stack_rows([self(first + int(j), int(elements[j])) for j in self.rows])
    extra = DEBUG_KEYS if self.config.debug else ()

    def row(r: int) -> dict[str, np.ndarray]:
      at = r * per_row
      return packing.pack_row(lambda j: self(first + at + j, int(elements[at + j])),
                              self.config.pack_spec, self.config.vocab.specials.pad, extra)
    return packing.stack_rows([row(int(r)) for r in self.rows])

  def __call__(self, index: int, element: int) -> dict[str, np.ndarray]:
    """`index`: position in the repeated stream; `element`: global id (record * K + slot)."""
    c = self.config
    epoch = index // self.elements_per_epoch
    rng = np.random.default_rng([c.seed, self.split_code, epoch, int(element)])
    # Inverse CDF: a tenth of the cost of rng.choice(3, p=...) per example.
    requested = min(int(np.searchsorted(self.regime_cdf, rng.random(), side="right")), 2)
    k_req = int(rng.integers(1, c.max_concat + 1))
    rate = int(rng.integers(1, c.max_subsample_rate + 1))
    negative = bool(rng.random() < c.lva_negative_rate)
    key = int(element) // c.examples_per_video
    rec, regime = self._record_for(rng, key, requested)
    label, weight, neg_source, neg_key, unmasked = 0, 0.0, NEGATIVE_NONE, -1, False
    forecast = None
    if regime == sequence.REGIME_TEXT:
      window = _window(rng, rec.text_segs, k_req)
      packed = self.layout.text_only(rec.text_of(window))
    elif regime == sequence.REGIME_VIDEO:
      if c.max_concat_video:  # a draw of its own, so that other streams stay as they were
        k_req = int(rng.integers(1, c.max_concat_video + 1))
      window = _window(rng, rec.clip_segs, k_req)
      b, e = rec.clip_range(window)
      forecast = self._boundary(rng, rec, window, b)
      if forecast is not None:  # the context subsampled as usual; the forecast clip kept
        packed = self.layout.video_next(_subsample(rng, rec.clips[b:forecast], rate),
                                        rec.clips[forecast:forecast + 1])
      else:
        packed = self.layout.video_only(_subsample(rng, rec.clips[b:e], rate))
    else:
      window = _window(rng, rec.pair_segs, k_req)
      b, e = rec.clip_range(window)
      clips, text, label, weight = rec.clips[b:e], rec.text_of(window), 1, 1.0
      if c.unmasked_pair_rate > 0:  # drawn only when asked for: other recipes keep their streams
        unmasked = bool(rng.random() < c.unmasked_pair_rate)
        negative, weight = negative and unmasked, float(unmasked)
      if negative and (swapped := self._swap_word(rng, text)) is not None:
        text, label, neg_source, neg_key = swapped, 0, NEGATIVE_WORD_SWAP, rec.key
      elif negative and (found := self._negative(rng, rec, (b, e), len(window))) is not None:
        clips, neg_source, neg_key = found
        label = 0
      packed = self.layout.pair(text, _subsample(rng, clips, rate))
    out = packed.as_dict()
    if unmasked and c.unmasked_word_dropout > 0:  # drawn only when asked for, as above
      _drop_words(rng, packed.input_ids, c.vocab, c.unmasked_word_dropout)
    masking = dataclasses.replace(c.masking, rate=0.0) if unmasked else c.masking
    out.update(masking.mask_example(rng, packed.input_ids, c.vocab, forecast is not None))
    out["lva_label"] = np.int32(label)
    out["lva_weight"] = np.float32(weight)
    out["truncated"] = np.int32(packed.truncated)
    if c.debug:
      values = (element, epoch, rec.key, requested, k_req, len(window),
                rate if regime != sequence.REGIME_TEXT else 0, neg_source, neg_key)
      out.update({name: np.int32(v) for name, v in zip(DEBUG_KEYS, values)})
    return out

  def _boundary(self, rng: np.random.Generator, rec: _Record, window: np.ndarray, begin: int
                ) -> int | None:
    """The clip a video-only example forecasts (the first of its window's last segment, with
    clips before it), or None: a draw of `video_boundary_rate`, made only when asked for."""
    rate = self.config.video_boundary_rate
    if rate <= 0 or len(window) < 2 or not rng.random() < rate:
      return None
    first = int(rec.seg_begin[window[-1]])
    return first if first > begin else None

  def _record_for(self, rng: np.random.Generator, key: int, regime: int
                  ) -> tuple[_Record, int]:
    """A record able to give `regime`: this one, else other records, else another regime."""
    rec = first = self.record(key)
    for _ in range(_MAX_TRIES):
      if _supports(rec, regime):
        return rec, regime
      other = self._other_key(rng, key)
      if other is None:
        break
      rec = self.record(other)
    for fallback in (sequence.REGIME_PAIR, sequence.REGIME_VIDEO, sequence.REGIME_TEXT):
      if _supports(first, fallback):
        return first, fallback
    raise ValueError(f"input record {key} (video {first.video_id!r}): no sentences and no clips; "
                     f"expected at least one segment with text or visual tokens")

  def _swap_word(self, rng: np.random.Generator, text: np.ndarray) -> np.ndarray | None:
    """`text` with one word of a swap group changed for another of its group, or None: a draw
    of `word_swap_rate` (made only when asked for), and None too when no word has a group."""
    rate = self.config.word_swap_rate
    if rate <= 0 or not rng.random() < rate:
      return None
    groups = self.swap_group[text]
    where = np.flatnonzero(groups >= 0)
    if not len(where):
      return None
    at = int(where[rng.integers(len(where))])
    others = [i for i in self.config.swap_groups[groups[at]] if i != text[at]]
    out = text.copy()
    out[at] = others[int(rng.integers(len(others)))]
    return out

  def _negative(self, rng: np.random.Generator, rec: _Record, span: tuple[int, int], k: int
                ) -> tuple[np.ndarray, int, int] | None:
    """Visual tokens of a window that is not the sentence's: same video or another."""
    prefer_other = rng.random() < self.config.negative_other_video
    order = ((self._negative_other, self._negative_same) if prefer_other
             else (self._negative_same, self._negative_other))
    for find in order:
      found = find(rng, rec, span, k)
      if found is not None:
        return found
    return None

  def _negative_same(self, rng: np.random.Generator, rec: _Record, span: tuple[int, int],
                     k: int) -> tuple[np.ndarray, int, int] | None:
    segs = rec.clip_segs
    k = min(k, len(segs))
    if not k:
      return None
    starts = rec.seg_begin[segs[:len(segs) - k + 1]]
    ends = np.lib.stride_tricks.sliding_window_view(rec.seg_end[segs], k).max(axis=1)
    # Windows sharing no clip with the sentence's (segments are in time order).
    disjoint = np.flatnonzero((ends <= span[0]) | (starts >= span[1]))
    if not len(disjoint):
      return None
    j = int(disjoint[rng.integers(len(disjoint))])
    return rec.clips[starts[j]:ends[j]], NEGATIVE_SAME_VIDEO, rec.key

  def _negative_other(self, rng: np.random.Generator, rec: _Record, span: tuple[int, int],
                      k: int) -> tuple[np.ndarray, int, int] | None:
    del span
    for _ in range(_MAX_TRIES):
      key = self._other_key(rng, rec.key)
      if key is None:
        return None
      other = self.record(key)
      if len(other.clip_segs):
        b, e = other.clip_range(_window(rng, other.clip_segs, k))
        return other.clips[b:e], NEGATIVE_OTHER_VIDEO, key
    return None


def swap_groups(config: Any) -> tuple[tuple[int, ...], ...]:
  """`config.input.swap_words` ("slide, drop, spin; tomato, egg": groups split by ";", words by
  commas or spaces) as text ids of the config's tokenizer. A word that is not one piece of the
  vocabulary cannot stand in for another in place, nor can a group's only word: they are left
  out, and the log names them."""
  tokenizer = tokenizers.load_tokenizer(config)
  groups, left_out = [], []
  for group in str(config.input.get("swap_words", "")).split(";"):
    ids = []
    for word in group.replace(",", " ").split():
      pieces = tokenizer.encode(word)
      if len(pieces) == 1 and pieces[0] != tokenizer.specials.unk:
        ids.append(int(pieces[0]))
      else:
        left_out.append(word)
    ids = list(dict.fromkeys(ids))
    if len(ids) >= 2:
      groups.append(tuple(ids))
    elif ids:  # a lone word has nothing to be swapped for
      left_out.append(tokenizer.id_to_token(ids[0]))
  if left_out:
    logging.warning("input.swap_words: %d words are not swapped (not one piece of the text "
                    "vocabulary, or alone in their group): %s", len(left_out), ", ".join(left_out))
  return tuple(groups)


def _swap_group_problems(c: PipelineConfig) -> list[str]:
  if c.word_swap_rate <= 0:
    return []
  if not c.swap_groups or any(len(g) < 2 for g in c.swap_groups):
    return [f"word_swap_rate={c.word_swap_rate} with swap groups {c.swap_groups}: expected one "
            f"or more groups, each of two or more words (input.swap_words)"]
  ids, specials = [i for g in c.swap_groups for i in g], set(c.vocab.specials.as_tuple())
  bad = sorted({i for i in ids if not 0 <= i < c.vocab.text_size or i in specials})
  if bad:
    return [f"swap groups hold ids {bad}: expected text ids that are not special tokens"]
  if len(ids) != len(set(ids)):
    return [f"swap groups {c.swap_groups}: a word may be in one group only"]
  return []


def _drop_words(rng: np.random.Generator, ids: np.ndarray, vocab: sequence.JointVocab,
                rate: float) -> None:
  """Each text token of `ids` becomes [MASK] with probability `rate`, in place."""
  text = np.flatnonzero(vocab.is_text(ids))
  ids[text[rng.random(len(text)) < rate]] = vocab.specials.mask


def _supports(rec: _Record, regime: int) -> bool:
  if regime == sequence.REGIME_TEXT:
    return len(rec.text_segs) > 0
  if regime == sequence.REGIME_VIDEO:
    return len(rec.clip_segs) > 0
  return len(rec.pair_segs) > 0


# --------------------------------------------------------------------------------------------
# The iterator
# --------------------------------------------------------------------------------------------


def _shuffle_seed(seed: int, split: str) -> int:
  return zlib.crc32(f"{seed}/{split}".encode()) % 2**32


class Pipeline:
  """This process's rows of the global batches: `next()`, `get_state()`, `set_state()`."""

  def __init__(self, config: PipelineConfig, source: Any, rows: Sequence[int] | None = None):
    if not len(source):
      raise ValueError("input pipeline: the source holds no records; expected at least one")
    self.config = config
    self.rows = stream.check_rows(rows, config.batch_size, "input pipeline")
    self.maker = ExampleMaker(config, source, self.rows)
    self._base = self._build()
    self._batches = 0  # global batches before the next one (since position 0)
    self._iter = None  # started at the first batch, so that a restore starts it only once

  def _build(self) -> grain.MapDataset:
    c, k = self.config, self.config.examples_per_video
    ds = grain.MapDataset.range(0, self.maker.num_records * k)
    if c.shuffle:
      ds = ds.shuffle(seed=_shuffle_seed(c.seed, c.split))  # reshuffled each epoch by grain
    # Batches of element ids, then one call makes this process's rows of the batch: stacking
    # them ourselves costs a third of what stacking example dicts through grain's tree
    # utilities does.
    ds = ds.repeat(c.num_epochs).batch(c.examples_per_batch, drop_remainder=True)
    return ds.map_with_index(self.maker.batch)

  def _start(self, batch: int) -> Any:
    """An iterator from global batch `batch` on (grain keeps each batch's index when sliced)."""
    c = self.config
    it = self._base[batch:].to_iter_dataset(grain.ReadOptions(
        num_threads=c.read_threads, prefetch_buffer_size=c.prefetch_buffer_size))
    if c.worker_count:
      # grain reads absl flags in its workers; a program without absl.app has not parsed them.
      if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
      it = it.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=c.worker_count, per_worker_buffer_size=c.worker_buffer_size))
    return iter(it)

  def __iter__(self) -> "Pipeline":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iter is None:
      self._iter = self._start(self._batches)
    out = next(self._iter)
    self._batches += 1
    return out

  def _identity(self) -> dict[str, Any]:
    return {"seed": self.config.seed, "split": self.config.split,
            "examples_per_video": self.config.examples_per_video,
            "records": self.maker.num_records}

  def get_state(self) -> dict[str, Any]:
    """A JSON-able dict: the stream position of the next global batch and what the stream is."""
    return {"position": self._batches * self.config.examples_per_batch, **self._identity()}

  def set_state(self, state: Mapping[str, Any]) -> None:
    mine = self._identity()
    theirs = {k: state.get(k) for k in mine}
    if theirs != mine:
      raise stream.StreamMismatchError(f"input pipeline: saved state {theirs} is for another "
                                       f"stream; this one is {mine}")
    per_batch = self.config.examples_per_batch
    batch = stream.position_of(state, per_batch, "input pipeline") // per_batch
    self.close()
    self._batches = batch

  def close(self) -> None:
    """Stops the worker processes, if any; a later batch starts them again."""
    close = getattr(self._iter, "close", None)
    if close is not None:
      close()
    self._iter = None


def make_pipeline(config: Any, source: Sequence[Any], *, split: str | None = None,
                  batch_size: int | None = None, rows: Sequence[int] | None = None,
                  **overrides) -> Pipeline:
  """The pipeline over `source` (any random-access sequence of record dicts).

  `config` is a `PipelineConfig` or a pretraining config; `batch_size` is the global batch
  (default: the config's) and `rows` the rows of it this process makes (default: all).
  `overrides` replace PipelineConfig fields (debug=True, worker_count=2, ...).
  """
  if isinstance(config, PipelineConfig):
    cfg = dataclasses.replace(config, split=split or config.split, **overrides)
  else:
    cfg = PipelineConfig.from_config(config, split or "train",
                                     batch_size=batch_size or config.batch_size, **overrides)
  if batch_size is not None and batch_size != cfg.batch_size:
    cfg = dataclasses.replace(cfg, batch_size=batch_size)
  return Pipeline(cfg, source, rows)


def open_tfds_source(config: Any, split: str) -> Any:
  """The array_record data source of `config.input.tfds_name` for a "train" or "eval" split."""
  inp = config.input
  name = {"train": inp.train_split, "eval": inp.eval_split}[split]
  if not inp.tfds_name:
    raise ValueError("config.input.tfds_name is empty; expected the dataset builder's name "
                     "(with config.input.data_dir where it was built)")
  # TFDS imports TensorFlow (seconds): only runs that read a dataset pay for it.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(inp.tfds_name, data_dir=inp.data_dir or None)
    return builder.as_data_source(split=name)
  except Exception as e:  # TFDS raises several types for a missing or unprepared dataset
    raise ValueError(f"config.input.tfds_name={inp.tfds_name!r}, data_dir={inp.data_dir!r}, "
                     f"split {name!r}: cannot open it as an array_record data source ({e}); "
                     f"expected a dataset built with file_format=array_record") from e


def create_iterator(config: Any, split: str, *, batch_size: int,
                    rows: Sequence[int] | None = None, **overrides) -> Pipeline:
  """The hook `vbert_jax/train.py` calls for config.input.source == "tfds"; `overrides` as for
  `make_pipeline`."""
  if split not in SPLIT_CODES:
    raise ValueError(f"input pipeline: split={split!r}; expected one of {sorted(SPLIT_CODES)}")
  return make_pipeline(config, open_tfds_source(config, split), split=split,
                       batch_size=batch_size, rows=rows, **overrides)
