"""Task inputs in the layouts of `vbert_jax.sequence`, with `[MASK]` slots where the model answers.

A `Template` is text with literal `[MASK]` markers ("now let me show you how to [MASK] the
[MASK] ."), tokenized once. `build` puts a template beside a video in either order:

    video_first   [CLS] v1 ... vN [>] text [SEP]   (the paper's zero-shot figure)
    text_first    [CLS] text [>] v1 ... vN [SEP]   (the pretraining layout)

The text is never cut (its masks must survive); a video longer than the room left is subsampled
evenly, so that the whole segment stays in view. `text_to_video` and `forecast` build the inputs
whose video part ends in masked slots.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from vbert_jax import sequence
from vbert_jax.text import tokenizers

ORDERS = ("video_first", "text_first")
FORECAST_LAYOUTS = ("video_only", "pair")
MASK_TOKEN = "[MASK]"
# Batches are cut to their longest prompt rounded up to one of four widths per octave (16, 20,
# 24, 28, 32, 40, ...), or to max_len: a corpus of any segment lengths compiles a few shapes
# (log-many in max_len), and a batch pays for at most a quarter more columns than it needs.
MIN_WIDTH = 16


@dataclasses.dataclass(frozen=True)
class Template:
  """Tokenized prompt text; `slots` are the indices of its `[MASK]` ids within `ids`."""
  text: str
  ids: tuple[int, ...]
  slots: tuple[int, ...]
  mask_id: int

  @classmethod
  def parse(cls, text: str, tokenizer: tokenizers.TextTokenizer,
            expected_masks: int | None = None) -> "Template":
    mask_id = tokenizer.specials.mask
    ids = tuple(int(i) for i in tokenizer.encode(text))
    slots = tuple(i for i, t in enumerate(ids) if t == mask_id)
    if expected_masks is not None and len(slots) != expected_masks:
      raise ValueError(f"template {text!r} has {len(slots)} {MASK_TOKEN} markers; expected "
                       f"{expected_masks} (write them literally, e.g. 'now let me show you how "
                       f"to {MASK_TOKEN} the {MASK_TOKEN} .')")
    if not slots and expected_masks is None:
      raise ValueError(f"template {text!r} has no {MASK_TOKEN} marker; expected at least one")
    return cls(text, ids, slots, mask_id)

  def expand(self, counts: Sequence[int]) -> "Template":
    """The template with its j-th `[MASK]` repeated counts[j] times (for multi-piece labels)."""
    if len(counts) != len(self.slots) or min(counts, default=1) < 1:
      raise ValueError(f"expand: expected {len(self.slots)} counts of at least 1, got "
                       f"{list(counts)}")
    ids, slots = [], []
    per_slot = dict(zip(self.slots, counts))
    for i, t in enumerate(self.ids):
      for _ in range(per_slot.get(i, 1)):
        if i in per_slot:
          slots.append(len(ids))
        ids.append(t)
    return Template(self.text, tuple(ids), tuple(slots), self.mask_id)

  def fill(self, pieces: dict[int, int]) -> "Template":
    """The template with its k-th `[MASK]` (counting from 0) replaced by the text id pieces[k]:
    the pieces of a label already given, for scoring its next piece. `slots` still lists every
    mask of the template, so that answers keep their indices."""
    if any(not 0 <= k < len(self.slots) for k in pieces):
      raise ValueError(f"fill: mask indices {sorted(pieces)} outside the template's "
                       f"{len(self.slots)} masks")
    ids = list(self.ids)
    for k, piece in pieces.items():
      ids[self.slots[k]] = int(piece)
    return Template(self.text, tuple(ids), self.slots, self.mask_id)

  def slot_groups(self, counts: Sequence[int]) -> list[list[int]]:
    """For `expand(counts)`: the mask indices (0-based, in order) that belong to each slot."""
    out, start = [], 0
    for n in counts:
      out.append(list(range(start, start + n)))
      start += n
    return out


def fit_video(visual_tokens: Sequence[int], room: int, keep: str = "spread") -> np.ndarray:
  """At most `room` tokens: all of them, else an even subsample ("spread") or the last ones."""
  v = np.asarray(visual_tokens, np.int64).reshape(-1)
  if len(v) <= room:
    return v
  if room <= 0:
    return v[:0]
  if keep == "last":
    return v[len(v) - room:]
  return v[np.linspace(0, len(v) - 1, room).round().astype(np.int64)]


def _check_video(visual_tokens: Sequence[int], vocab: sequence.JointVocab) -> np.ndarray:
  v = np.asarray(visual_tokens, np.int64).reshape(-1)
  if v.size == 0:
    raise ValueError("empty video: no visual tokens (a segment with no clips); expected at "
                     "least one token")
  if v.min() < 0 or v.max() >= vocab.visual_size:
    raise ValueError(f"visual tokens must lie in [0, {vocab.visual_size}); got range "
                     f"[{v.min()}, {v.max()}]")
  return v


def _video_room(layout: sequence.Layout, template: Template) -> int:
  room = layout.max_len - 3 - len(template.ids)
  if room < 1:
    raise ValueError(f"template {template.text!r} takes {len(template.ids)} tokens; with "
                     f"[CLS], [>], [SEP] and one video token it exceeds max_len="
                     f"{layout.max_len}")
  return room


def build(layout: sequence.Layout, visual_tokens: Sequence[int], template: Template,
          order: str = "video_first") -> tuple[sequence.Packed, np.ndarray]:
  """The template beside the video in `order`; returns (packed, positions of the masks)."""
  if order not in ORDERS:
    raise ValueError(f"order={order!r}: expected one of {ORDERS}")
  video = fit_video(_check_video(visual_tokens, layout.vocab), _video_room(layout, template))
  if order == "video_first":
    packed = layout.video_then_text(video, template.ids)
  else:
    packed = layout.pair(template.ids, video)
  positions = np.flatnonzero(packed.input_ids == template.mask_id).astype(np.int32)
  return packed, positions


def build_batch(layout: sequence.Layout, videos: Sequence[Sequence[int]], template: Template,
                order: str, rows: int, ids: Sequence[int] | None = None
                ) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """`build` for each video, stacked into `rows` rows and cut after the longest prompt
  (rounded up by `prompt_width`: the cut columns are padding in every row, masked out of
  attention, so the answers do not change and the pass costs what the prompts need); returns
  (batch, mask positions [rows, masks]).

  Rows past the videos repeat the first prompt, so that every batch has one compiled shape;
  their outputs are to be dropped. `ids` name the videos in errors (default 0, 1, ...).
  """
  if order not in ORDERS:
    raise ValueError(f"order={order!r}: expected one of {ORDERS}")
  room = _video_room(layout, template)
  fitted = []
  for i, video in enumerate(videos):
    try:
      fitted.append(fit_video(_check_video(video, layout.vocab), room))
    except ValueError as e:
      raise ValueError(f"video {i if ids is None else ids[i]}: {e}") from e
  fitted += [fitted[0]] * (rows - len(fitted))
  longest = max(len(v) for v in fitted) + len(template.ids) + 3
  width = prompt_width(longest, layout.max_len)
  video_first = order == "video_first"
  batch = layout.stack_with_text(fitted, template.ids, video_first, width)
  slots = np.asarray(template.slots, np.int32)
  n_v = np.array([len(v) for v in fitted], np.int32)[:, None]
  positions = n_v + 2 + slots if video_first else np.tile(1 + slots, (len(fitted), 1))
  return batch, positions.astype(np.int32)


def build_text_only(layout: sequence.Layout, template: Template
                    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """`[CLS] text [SEP]` with no video (the language prior), as a batch of one row; returns
  (batch, mask positions [1, masks])."""
  if len(template.ids) + 2 > layout.max_len:
    raise ValueError(f"template {template.text!r} takes {len(template.ids)} tokens; with [CLS] "
                     f"and [SEP] it exceeds max_len={layout.max_len}")
  batch = sequence.stack([layout.text_only(template.ids)])
  width = prompt_width(len(template.ids) + 2, layout.max_len)
  batch = {k: v[:, :width] if v.ndim == 2 else v for k, v in batch.items()}
  return batch, (1 + np.asarray(template.slots, np.int32))[None]


def prompt_width(longest: int, max_len: int) -> int:
  """The columns of a batch whose longest prompt has `longest` tokens: the next of 16, 20, 24,
  28, 32, 40, 48, 56, 64, 80, ... (2^k times 1, 1.25, 1.5 or 1.75), at most max_len."""
  power = 1 << (max(longest, MIN_WIDTH) - 1).bit_length()
  octave = [power // 8 * q for q in (5, 6, 7)] if power >= 2 * MIN_WIDTH else []
  return min(max_len, next(w for w in octave + [power] if w >= longest))


def _mask_video(packed: sequence.Packed, positions: np.ndarray, mask_id: int) -> None:
  # The slots are laid out as placeholders of the video segment, then masked: the layout code in
  # sequence.py stays the one place that decides positions and segment ids.
  packed.input_ids[positions] = mask_id
  packed.segment_ids[positions] = sequence.SEGMENT_VIDEO


def text_to_video(layout: sequence.Layout, text_ids: Sequence[int],
                  num_slots: int) -> tuple[sequence.Packed, np.ndarray]:
  """[CLS] text [>] [MASK] x num_slots [SEP]; returns (packed, slot positions)."""
  if num_slots < 1:
    raise ValueError(f"num_slots={num_slots}: expected at least 1")
  if not len(text_ids):
    raise ValueError("the text tokenizes to nothing; expected at least one text token")
  if len(text_ids) + num_slots + 3 > layout.max_len:
    raise ValueError(f"{len(text_ids)} text tokens and {num_slots} slots with [CLS], [>], "
                     f"[SEP] exceed max_len={layout.max_len}")
  packed = layout.pair(list(text_ids), [0] * num_slots)
  start = len(text_ids) + 2
  positions = np.arange(start, start + num_slots, dtype=np.int32)
  _mask_video(packed, positions, layout.specials.mask)
  return packed, positions


def forecast(layout: sequence.Layout, visual_tokens: Sequence[int], horizon: int,
             kind: str = "video_only",
             context: int | None = None) -> tuple[sequence.Packed, np.ndarray]:
  """The video so far followed by `horizon` masked slots; returns (packed, slot positions).

  video_only: [CLS] v1 ... vN [MASK] ... [SEP] (pretraining's video-only regime);
  pair:       [CLS] v1 ... vN [>] [MASK] ... [SEP] (the future after the separator: what
              follows a boundary, as pretraining's `input.video_boundary_rate` examples ask).
  The most recent tokens are kept when the video does not fit, or when it is longer than
  `context` (None: as many as fit). A context no longer than pretraining's video-only examples
  (minus the horizon) keeps the prompt at positions the model was trained at.
  """
  if context is not None and context < 1:
    raise ValueError(f"context={context}: expected at least 1 token, or None")
  if kind not in FORECAST_LAYOUTS:
    raise ValueError(f"layout={kind!r}: expected one of {FORECAST_LAYOUTS}")
  if horizon < 1:
    raise ValueError(f"horizon={horizon}: expected at least 1")
  video = _check_video(visual_tokens, layout.vocab)
  extra = 3 if kind == "pair" else 2
  room = layout.max_len - extra - horizon
  if room < 1:
    raise ValueError(f"horizon={horizon} leaves no room for the video in max_len="
                     f"{layout.max_len}")
  video = fit_video(video, room if context is None else min(room, context), keep="last")
  n = len(video)
  if kind == "video_only":
    packed = layout.video_only(np.concatenate([video, np.zeros(horizon, np.int64)]))
    start = 1 + n
  else:
    packed = layout.video_next(video, np.zeros(horizon, np.int64))
    start = 2 + n
  positions = np.arange(start, start + horizon, dtype=np.int32)
  _mask_video(packed, positions, layout.specials.mask)
  return packed, positions
