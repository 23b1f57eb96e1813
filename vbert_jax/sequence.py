"""The joint vocabulary and the sequence layouts: the one source of truth for ids and offsets.

Joint id space (each part padded to a multiple of 128 so any mesh shards the tables evenly):

    [0, text_size)                         text tokens (WordPiece or SentencePiece ids)
    [text_size, text_padded)               padding, never produced; logits masked out
    [visual_offset, visual_offset + V)     visual tokens (leaf index of the k-means tree)
    [visual_offset + V, total_size)        padding, never produced; logits masked out

with visual_offset == text_padded. Layouts:

    video-text  [CLS] text [>] video [SEP]   segments 0 ... 0 | 1 ... 1
    text-only   [CLS] text [SEP]             segments 0 ... 0
    video-only  [CLS] video [SEP]            segments 0 | 1 ... 1
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

PAD_MULTIPLE = 128
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[>]")
# BERT's vocab.txt has no [>]; it takes the first unused slot, as the paper's model did.
BERT_VIDEO_SEP_TOKEN = "[unused0]"

# Regime codes carried in every batch.
REGIME_TEXT, REGIME_VIDEO, REGIME_PAIR = 0, 1, 2

# Segment (token type) ids.
SEGMENT_TEXT, SEGMENT_VIDEO = 0, 1


def round_up(n: int, multiple: int = PAD_MULTIPLE) -> int:
  return -(-n // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  """Ids of the special symbols; they always live in the text part of the vocabulary."""
  pad: int
  unk: int
  cls: int
  sep: int
  mask: int
  video_sep: int  # [>]

  @classmethod
  def bert(cls) -> "SpecialIds":
    """The ids in every uncased/cased BERT vocab.txt ([>] is [unused0] = 1)."""
    return cls(pad=0, unk=100, cls=101, sep=102, mask=103, video_sep=1)

  @classmethod
  def from_vocab(cls, token_to_id: Mapping[str, int], source: str = "vocabulary") -> "SpecialIds":
    """Reads the ids from a token -> id map (a BERT vocab.txt or a SentencePiece model)."""
    lookup = dict(token_to_id)
    if "[>]" not in lookup and BERT_VIDEO_SEP_TOKEN in lookup:
      lookup["[>]"] = lookup[BERT_VIDEO_SEP_TOKEN]
    missing = [t for t in SPECIAL_TOKENS if t not in lookup]
    if missing:
      raise ValueError(f"{source}: missing special tokens {missing}; expected all of "
                       f"{list(SPECIAL_TOKENS)} (or {BERT_VIDEO_SEP_TOKEN} for [>]).")
    pad, unk, cls_, sep, mask, vsep = (int(lookup[t]) for t in SPECIAL_TOKENS)
    return cls(pad=pad, unk=unk, cls=cls_, sep=sep, mask=mask, video_sep=vsep)

  @classmethod
  def parse(cls, spec: str | Sequence[int] | None) -> "SpecialIds":
    """From a config value: "bert" (or empty), or the six ids "pad,unk,cls,sep,mask,[>]"."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "bert")):
      return cls.bert()
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    if len(parts) != len(SPECIAL_TOKENS):
      raise ValueError(f"special_ids={spec!r}: expected 'bert' or {len(SPECIAL_TOKENS)} ids for "
                       f"{', '.join(SPECIAL_TOKENS)}")
    return cls(*(int(p) for p in parts))

  def as_tuple(self) -> tuple[int, ...]:
    return tuple(int(i) for i in self.as_array())

  def as_array(self) -> np.ndarray:
    return np.array([self.pad, self.unk, self.cls, self.sep, self.mask, self.video_sep],
                    np.int32)


@dataclasses.dataclass(frozen=True)
class JointVocab:
  """Text ids followed by visual ids, each part padded to a multiple of 128."""
  text_size: int
  visual_size: int
  specials: SpecialIds = dataclasses.field(default_factory=SpecialIds.bert)

  def __post_init__(self):
    if self.text_size <= 0 or self.visual_size <= 0:
      raise ValueError(f"vocabulary sizes must be positive: text_size={self.text_size}, "
                       f"visual_size={self.visual_size}")
    bad = [i for i in self.specials.as_array() if not 0 <= i < self.text_size]
    if bad:
      raise ValueError(f"special ids {bad} fall outside the text vocabulary of size "
                       f"{self.text_size}")

  @property
  def text_padded(self) -> int:
    return round_up(self.text_size)

  @property
  def visual_padded(self) -> int:
    return round_up(self.visual_size)

  @property
  def visual_offset(self) -> int:
    return self.text_padded

  @property
  def total_size(self) -> int:
    return self.text_padded + self.visual_padded

  def visual_to_joint(self, visual_tokens) -> np.ndarray:
    v = np.asarray(visual_tokens, np.int64)
    if v.size and (v.min() < 0 or v.max() >= self.visual_size):
      raise ValueError(f"visual tokens must lie in [0, {self.visual_size}); got range "
                       f"[{v.min()}, {v.max()}]")
    return (v + self.visual_offset).astype(np.int32)

  def joint_to_visual(self, ids) -> np.ndarray:
    return (np.asarray(ids) - self.visual_offset).astype(np.int32)

  def is_visual(self, ids) -> np.ndarray:
    ids = np.asarray(ids)
    return (ids >= self.visual_offset) & (ids < self.visual_offset + self.visual_size)

  def is_text(self, ids) -> np.ndarray:
    """True for real text tokens (not special, not padding slots)."""
    ids = np.asarray(ids)
    return (ids >= 0) & (ids < self.text_size) & ~self.is_special(ids)

  def is_special(self, ids) -> np.ndarray:
    return np.isin(np.asarray(ids), self.specials.as_array())

  def text_logit_mask(self) -> np.ndarray:
    """Over the padded text part: True where a logit may be produced."""
    return np.arange(self.text_padded) < self.text_size

  def visual_logit_mask(self) -> np.ndarray:
    """Over the padded visual part: True where a logit may be produced."""
    return np.arange(self.visual_padded) < self.visual_size

  def check_ids(self, ids, where: str = "batch") -> None:
    """Raises if any id is negative, a padding slot, or beyond the joint vocabulary."""
    ids = np.asarray(ids)
    ok = self.is_visual(ids) | ((ids >= 0) & (ids < self.text_size))
    if not ok.all():
      bad = np.unique(ids[~ok])[:8].tolist()
      raise ValueError(f"{where}: token ids {bad} are outside the joint vocabulary (text "
                       f"[0, {self.text_size}), visual [{self.visual_offset}, "
                       f"{self.visual_offset + self.visual_size}))")


def split_budget(n_text: int, n_video: int, budget: int) -> tuple[int, int]:
  """How many text and video tokens to keep so that both fit `budget`, cut in proportion."""
  if budget < 0:
    raise ValueError(f"max_len too small for the special tokens (budget {budget})")
  if n_text + n_video <= budget:
    return n_text, n_video
  keep_text = int(round(budget * n_text / (n_text + n_video)))
  # Neither modality vanishes entirely while the budget can hold one token of each.
  if n_text and n_video and budget >= 2:
    keep_text = min(max(keep_text, 1), budget - 1)
  keep_text = min(n_text, max(keep_text, budget - n_video))
  return keep_text, budget - keep_text


@dataclasses.dataclass
class Packed:
  """One sequence in its fixed-length layout (numpy, int32)."""
  input_ids: np.ndarray
  segment_ids: np.ndarray
  position_ids: np.ndarray
  input_mask: np.ndarray  # 1 for real tokens, 0 for padding
  regime: int
  truncated: bool = False  # whether tokens were cut to fit max_len

  def as_dict(self) -> dict[str, np.ndarray]:
    return {"input_ids": self.input_ids, "segment_ids": self.segment_ids,
            "position_ids": self.position_ids, "input_mask": self.input_mask,
            "regime": np.int32(self.regime)}


def _pad(tokens: Sequence[int], segments: Sequence[int], max_len: int, pad_id: int,
         regime: int, truncated: bool) -> Packed:
  n = len(tokens)
  if n > max_len:
    raise ValueError(f"sequence of {n} tokens exceeds max_len={max_len}")
  ids = np.full(max_len, pad_id, np.int32)
  ids[:n] = tokens
  seg = np.zeros(max_len, np.int32)
  seg[:n] = segments
  mask = np.zeros(max_len, np.int32)
  mask[:n] = 1
  return Packed(ids, seg, np.arange(max_len, dtype=np.int32), mask, regime, truncated)


class Layout:
  """Builds the three layouts over a joint vocabulary. Visual tokens are given as leaf indices."""

  def __init__(self, vocab: JointVocab, max_len: int):
    if max_len < 4:
      raise ValueError(f"max_len must be at least 4, got {max_len}")
    self.vocab = vocab
    self.max_len = max_len

  @property
  def specials(self) -> SpecialIds:
    return self.vocab.specials

  def pair(self, text_ids: Sequence[int], visual_tokens: Sequence[int]) -> Packed:
    """[CLS] text [>] video [SEP], truncating text and video in proportion."""
    sp = self.specials
    n_t, n_v = split_budget(len(text_ids), len(visual_tokens), self.max_len - 3)
    video = self.vocab.visual_to_joint(list(visual_tokens)[:n_v])
    tokens = [sp.cls, *list(text_ids)[:n_t], sp.video_sep, *video.tolist(), sp.sep]
    segments = [SEGMENT_TEXT] * (n_t + 2) + [SEGMENT_VIDEO] * (n_v + 1)
    return _pad(tokens, segments, self.max_len, sp.pad, REGIME_PAIR,
                n_t + n_v < len(text_ids) + len(visual_tokens))

  def text_only(self, text_ids: Sequence[int]) -> Packed:
    sp = self.specials
    text = list(text_ids)[:self.max_len - 2]
    tokens = [sp.cls, *text, sp.sep]
    return _pad(tokens, [SEGMENT_TEXT] * len(tokens), self.max_len, sp.pad, REGIME_TEXT,
                len(text) < len(text_ids))

  def video_only(self, visual_tokens: Sequence[int]) -> Packed:
    sp = self.specials
    video = self.vocab.visual_to_joint(list(visual_tokens)[:self.max_len - 2])
    tokens = [sp.cls, *video.tolist(), sp.sep]
    segments = [SEGMENT_TEXT] + [SEGMENT_VIDEO] * (len(tokens) - 1)
    return _pad(tokens, segments, self.max_len, sp.pad, REGIME_VIDEO,
                len(video) < len(visual_tokens))

  def video_next(self, visual_tokens: Sequence[int], next_tokens: Sequence[int]) -> Packed:
    """[CLS] video [>] next [SEP]: clips, then the clips after a boundary (a video-only
    example; [>] with the text segment id marks the boundary, where a pair puts its video).
    The earliest clips give way when it does not fit: a forecast needs the recent past."""
    sp = self.specials
    room = self.max_len - 3 - len(next_tokens)
    if room < 1:
      raise ValueError(f"{len(next_tokens)} clips after the boundary leave no room for the "
                       f"clips before it in max_len={self.max_len}")
    kept = list(visual_tokens)[-room:]
    video = self.vocab.visual_to_joint(kept)
    after = self.vocab.visual_to_joint(list(next_tokens))
    tokens = [sp.cls, *video.tolist(), sp.video_sep, *after.tolist(), sp.sep]
    segments = ([SEGMENT_TEXT] + [SEGMENT_VIDEO] * len(video) + [SEGMENT_TEXT]
                + [SEGMENT_VIDEO] * (len(after) + 1))
    return _pad(tokens, segments, self.max_len, sp.pad, REGIME_VIDEO,
                len(kept) < len(visual_tokens))

  def video_then_text(self, visual_tokens: Sequence[int], text_ids: Sequence[int]) -> Packed:
    """[CLS] video [>] text [SEP]: the prompt order the paper's zero-shot figure shows."""
    sp = self.specials
    n_t, n_v = split_budget(len(text_ids), len(visual_tokens), self.max_len - 3)
    video = self.vocab.visual_to_joint(list(visual_tokens)[:n_v])
    tokens = [sp.cls, *video.tolist(), sp.video_sep, *list(text_ids)[:n_t], sp.sep]
    segments = [SEGMENT_TEXT] + [SEGMENT_VIDEO] * n_v + [SEGMENT_TEXT] * (n_t + 2)
    return _pad(tokens, segments, self.max_len, sp.pad, REGIME_PAIR,
                n_t + n_v < len(text_ids) + len(visual_tokens))

  def stack_with_text(self, visual_rows: Sequence[np.ndarray], text_ids: Sequence[int],
                      video_first: bool, width: int) -> dict[str, np.ndarray]:
    """`stack` of `video_then_text(v, text_ids)` (or `pair(text_ids, v)`) for every v, built
    with array operations rather than row by row, `width` columns wide.

    For prompts, where one text goes beside many videos: every row must fit whole (nothing is
    cut, unlike the row-by-row layouts), and `width` must hold the longest row.
    """
    sp = self.specials
    text = np.asarray(text_ids, np.int32).reshape(-1)
    n_v = np.array([len(v) for v in visual_rows], np.int64)
    longest = int(n_v.max()) + len(text) + 3
    if longest > min(width, self.max_len):
      raise ValueError(f"a row of {longest} tokens does not fit width={width} and max_len="
                       f"{self.max_len}")
    rows = np.arange(len(n_v))
    video_start = np.ones_like(n_v) if video_first else np.full_like(n_v, len(text) + 2)
    text_start = n_v + 2 if video_first else np.ones_like(n_v)
    ends = n_v + len(text) + 2  # the [SEP] column
    cols = np.arange(width)
    ids = np.full((len(n_v), width), sp.pad, np.int32)
    ids[:, 0] = sp.cls
    ids[rows, (n_v + 1) if video_first else len(text) + 1] = sp.video_sep
    ids[rows, ends] = sp.sep
    ids[rows[:, None], text_start[:, None] + np.arange(len(text))] = text
    video_cols = np.repeat(video_start, n_v) + np.arange(n_v.sum()) - np.repeat(
        np.cumsum(n_v) - n_v, n_v)
    ids[np.repeat(rows, n_v), video_cols] = self.vocab.visual_to_joint(
        np.concatenate(visual_rows))
    in_video = (cols >= video_start[:, None]) & (cols < (video_start + n_v)[:, None])
    if not video_first:  # pair(): the closing [SEP] belongs to the video segment
      in_video |= cols == ends[:, None]
    return {"input_ids": ids,
            "segment_ids": np.where(in_video, SEGMENT_VIDEO, SEGMENT_TEXT).astype(np.int32),
            "position_ids": np.broadcast_to(cols.astype(np.int32), ids.shape).copy(),
            "input_mask": (cols <= ends[:, None]).astype(np.int32),
            "regime": np.full(len(n_v), REGIME_PAIR, np.int32)}


def stack(packed: Sequence[Packed]) -> dict[str, np.ndarray]:
  """Stacks packed sequences into a batch dict of [batch, ...] arrays."""
  dicts = [p.as_dict() for p in packed]
  return {k: np.stack([d[k] for d in dicts]) for k in dicts[0]}
