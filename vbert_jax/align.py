"""Alignment: a video's sentences and visual tokens into one record of segments.

Each sentence takes the visual tokens of the clips that overlap its time window (an overlap of
more than `min_overlap` seconds; a sentence of zero length takes the clip it falls in). Clips
that no sentence covers, whether the whole video has no ASR or only a stretch of it, become
video-only segments of `video_segment_tokens` (16, the paper's rule) consecutive clips; the last
piece of a stretch keeps what is left if it has at least `min_video_segment` clips. Sentences
without text tokens are dropped, so their clips count as uncovered.

The record is flat, so that a TFDS feature dict can store it without ragged nesting:

    video_id               str
    clip_tokens            int32   [C]  visual token (leaf index in [0, visual_size)) per clip
    clip_starts/clip_ends  float32 [C]  seconds
    text_tokens            int32   [T]  all sentences' text ids, concatenated in sentence order
    text_lengths           int32   [S]  tokens per sentence (sum = T)
    sentence_starts/_ends  float32 [S]  seconds
    segment_sentence       int32   [G]  sentence index, or -1 for a video-only segment
    segment_clip_begin/_end int32  [G]  the segment's clips, [begin, end) into clip_tokens

Sentences are numbered in order of their start times; segments are in time order, and every
sentence is exactly one segment. Sentence `i`'s tokens are
`text_tokens[offsets[i]:offsets[i+1]]` with `offsets = [0, *cumsum(text_lengths)]`.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import numpy as np

from vbert_jax.text import sentences as sentences_lib
from vbert_jax.text import tokenizers

VIDEO_SEGMENT_TOKENS = 16  # Sun et al. 2019: without ASR, 16 visual tokens form a segment
NO_SENTENCE = -1


class AlignError(ValueError):
  """Inputs that cannot be aligned; the message names the video and what was wrong."""


class TokenizedSentence(NamedTuple):
  ids: Sequence[int]
  start: float
  end: float


@dataclasses.dataclass(frozen=True)
class AlignConfig:
  video_segment_tokens: int = VIDEO_SEGMENT_TOKENS
  min_video_segment: int = 1  # shorter leftovers of an uncovered stretch are dropped
  min_overlap: float = 0.0  # seconds a clip must share with a sentence to belong to it

  def __post_init__(self):
    if self.video_segment_tokens <= 0 or not 0 < self.min_video_segment <= \
        self.video_segment_tokens or self.min_overlap < 0:
      raise ValueError(f"align config: expected video_segment_tokens > 0, 0 < "
                       f"min_video_segment <= video_segment_tokens, min_overlap >= 0; got {self}")


@dataclasses.dataclass
class VideoRecord:
  """One video's sentences, clips and segments, in flat arrays (see the module docstring)."""
  video_id: str
  clip_tokens: np.ndarray
  clip_starts: np.ndarray
  clip_ends: np.ndarray
  text_tokens: np.ndarray
  text_lengths: np.ndarray
  sentence_starts: np.ndarray
  sentence_ends: np.ndarray
  segment_sentence: np.ndarray
  segment_clip_begin: np.ndarray
  segment_clip_end: np.ndarray

  ARRAY_FIELDS = {"clip_tokens": np.int32, "clip_starts": np.float32, "clip_ends": np.float32,
                  "text_tokens": np.int32, "text_lengths": np.int32,
                  "sentence_starts": np.float32, "sentence_ends": np.float32,
                  "segment_sentence": np.int32, "segment_clip_begin": np.int32,
                  "segment_clip_end": np.int32}

  @property
  def num_clips(self) -> int:
    return len(self.clip_tokens)

  @property
  def num_sentences(self) -> int:
    return len(self.text_lengths)

  @property
  def num_segments(self) -> int:
    return len(self.segment_sentence)

  def text_offsets(self) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(self.text_lengths)]).astype(np.int64)

  def sentence_ids(self, i: int) -> np.ndarray:
    offsets = self.text_offsets()
    return self.text_tokens[offsets[i]:offsets[i + 1]]

  def segment(self, g: int) -> tuple[np.ndarray, np.ndarray]:
    """(text ids, visual tokens) of segment g; text is empty for a video-only segment."""
    s = int(self.segment_sentence[g])
    text = self.sentence_ids(s) if s != NO_SENTENCE else np.zeros(0, np.int32)
    return text, self.clip_tokens[self.segment_clip_begin[g]:self.segment_clip_end[g]]

  def sentence_segments(self) -> np.ndarray:
    return np.nonzero(self.segment_sentence != NO_SENTENCE)[0]

  def video_segments(self) -> np.ndarray:
    return np.nonzero(self.segment_sentence == NO_SENTENCE)[0]

  def to_features(self) -> dict[str, np.ndarray | str]:
    """A flat dict of 1-D arrays (and the id), as a TFDS FeaturesDict stores it."""
    out: dict[str, np.ndarray | str] = {"video_id": self.video_id}
    out.update({k: np.asarray(getattr(self, k), dtype) for k, dtype in self.ARRAY_FIELDS.items()})
    return out

  @classmethod
  def from_features(cls, features) -> "VideoRecord":
    vid = features["video_id"]
    vid = vid.decode("utf-8") if isinstance(vid, bytes) else str(vid)
    arrays = {k: np.asarray(features[k], dtype) for k, dtype in cls.ARRAY_FIELDS.items()}
    record = cls(video_id=vid, **arrays)
    record.validate()
    return record

  def validate(self, visual_size: int | None = None, text_size: int | None = None) -> None:
    """Raises AlignError if the arrays disagree or ids are out of range."""
    def fail(what: str):
      raise AlignError(f"record {self.video_id}: {what}")
    c, s, g = self.num_clips, self.num_sentences, self.num_segments
    if len(self.clip_starts) != c or len(self.clip_ends) != c:
      fail(f"{c} clip tokens but {len(self.clip_starts)} starts and {len(self.clip_ends)} ends")
    if len(self.sentence_starts) != s or len(self.sentence_ends) != s:
      fail(f"{s} sentences but {len(self.sentence_starts)} starts, {len(self.sentence_ends)} ends")
    if int(self.text_lengths.sum()) != len(self.text_tokens):
      fail(f"text_lengths sum to {int(self.text_lengths.sum())}, text_tokens has "
           f"{len(self.text_tokens)}")
    if len(self.segment_clip_begin) != g or len(self.segment_clip_end) != g:
      fail("segment arrays have different lengths")
    if g and not ((0 <= self.segment_clip_begin) & (self.segment_clip_begin <=
                                                    self.segment_clip_end) &
                  (self.segment_clip_end <= c)).all():
      fail(f"segment clip ranges outside [0, {c}]")
    sent = self.segment_sentence[self.segment_sentence != NO_SENTENCE]
    if sorted(sent.tolist()) != list(range(s)):
      fail("every sentence must be exactly one segment")
    if visual_size is not None and c and (self.clip_tokens.min() < 0 or
                                          self.clip_tokens.max() >= visual_size):
      fail(f"clip tokens outside [0, {visual_size})")
    if text_size is not None and len(self.text_tokens) and (
        self.text_tokens.min() < 0 or self.text_tokens.max() >= text_size):
      fail(f"text tokens outside [0, {text_size})")


def tokenize_sentences(sentences: Sequence[sentences_lib.Sentence],
                       tokenizer: tokenizers.TextTokenizer) -> list[TokenizedSentence]:
  return [TokenizedSentence(tokenizer.encode(s.text), s.start, s.end) for s in sentences]


def _check_clips(video_id: str, starts: np.ndarray, ends: np.ndarray, tokens: np.ndarray) -> None:
  if not len(starts) == len(ends) == len(tokens):
    raise AlignError(f"video {video_id}: {len(tokens)} clip tokens, {len(starts)} starts and "
                     f"{len(ends)} ends; expected one of each per clip")
  if (ends < starts).any() or (np.diff(starts) < 0).any():
    raise AlignError(f"video {video_id}: clip times must be sorted with start <= end")


def clip_span(start: float, end: float, clip_starts: np.ndarray, clip_ends: np.ndarray,
              min_overlap: float = 0.0) -> tuple[int, int]:
  """[begin, end) of the clips overlapping [start, end]; empty (begin == end) if none."""
  if end > start:
    hit = np.minimum(end, clip_ends) - np.maximum(start, clip_starts) > min_overlap
  else:
    hit = (clip_starts <= start) & (start < clip_ends)
  idx = np.nonzero(hit)[0]
  if not len(idx):
    at = int(np.searchsorted(clip_starts, start, side="right"))
    return at, at
  return int(idx[0]), int(idx[-1]) + 1


def _uncovered_runs(covered: np.ndarray) -> list[tuple[int, int]]:
  runs, begin = [], None
  for i, c in enumerate(covered.tolist() + [True]):
    if not c and begin is None:
      begin = i
    elif c and begin is not None:
      runs.append((begin, i))
      begin = None
  return runs


def align_video(video_id: str, sentences: Sequence[TokenizedSentence], clip_starts,
                clip_ends, clip_tokens, config: AlignConfig = AlignConfig()) -> VideoRecord:
  """The record of one video: sentences with their clips, and video-only segments elsewhere."""
  starts = np.asarray(clip_starts, np.float64).reshape(-1)
  ends = np.asarray(clip_ends, np.float64).reshape(-1)
  tokens = np.asarray(clip_tokens, np.int64).reshape(-1)
  _check_clips(video_id, starts, ends, tokens)
  kept = sorted((s for s in sentences if len(s.ids)), key=lambda s: (s.start, s.end))
  covered = np.zeros(len(tokens), bool)
  segments: list[tuple[int, int, int]] = []  # (begin, end, sentence index or -1)
  for i, sent in enumerate(kept):
    if sent.end < sent.start:
      raise AlignError(f"video {video_id}: sentence {i} ends ({sent.end}) before it starts "
                       f"({sent.start})")
    b, e = clip_span(sent.start, sent.end, starts, ends, config.min_overlap)
    covered[b:e] = True
    segments.append((b, e, i))
  n = config.video_segment_tokens
  for run_begin, run_end in _uncovered_runs(covered):
    for b in range(run_begin, run_end, n):
      e = min(b + n, run_end)
      if e - b >= config.min_video_segment:
        segments.append((b, e, NO_SENTENCE))
  # Time order; a sentence without clips sorts where its start falls.
  segments.sort(key=lambda seg: (seg[0], seg[1], seg[2] == NO_SENTENCE,
                                 kept[seg[2]].start if seg[2] != NO_SENTENCE else 0.0))
  lengths = [len(s.ids) for s in kept]
  text = np.concatenate([np.asarray(s.ids, np.int32) for s in kept]) if kept else np.zeros(0)
  record = VideoRecord(
      video_id=video_id, clip_tokens=tokens.astype(np.int32),
      clip_starts=starts.astype(np.float32), clip_ends=ends.astype(np.float32),
      text_tokens=np.asarray(text, np.int32), text_lengths=np.asarray(lengths, np.int32),
      sentence_starts=np.asarray([s.start for s in kept], np.float32),
      sentence_ends=np.asarray([s.end for s in kept], np.float32),
      segment_sentence=np.asarray([s[2] for s in segments], np.int32),
      segment_clip_begin=np.asarray([s[0] for s in segments], np.int32),
      segment_clip_end=np.asarray([s[1] for s in segments], np.int32))
  record.validate()
  return record
