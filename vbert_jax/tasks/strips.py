"""Visual tokens as pictures: one row per token sequence, one tile per token, showing the middle
frame of the training clip nearest the token's centroid (the vocabulary keeps those clips).

A token without a kept clip, or whose video cannot be read, gets a grey tile; the reason is
logged, naming the video.
"""

from __future__ import annotations

import collections
import pathlib
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from vbert_jax.vocab import grid
from vbert_jax.vocab import vocabulary

GREY = (96, 96, 96)
_PAD = 4


def token_strip(vocab: vocabulary.VisualVocabulary, tokens_rows: Sequence[Sequence[int]], path,
                *, labels: Sequence[str] | None = None, tile: int = 96, fps: float = 20.0,
                clip_frames: int = 30, label_width: int = 110,
                log: Callable[[str], None] = print) -> pathlib.Path:
  """Writes the PNG (atomically) and returns its path."""
  rows = [[int(t) for t in row] for row in tokens_rows]
  if not rows or not any(rows):
    raise ValueError("token_strip: no tokens to draw")
  if labels is not None and len(labels) != len(rows):
    raise ValueError(f"token_strip: {len(labels)} labels for {len(rows)} rows")
  refs = {t: (vocab.nearest_clips(t, 1) or [None])[0] for row in rows for t in row}
  wanted = collections.defaultdict(set)
  for ref in refs.values():
    if ref is not None:
      wanted[ref.source].add(ref.clip)
  frames = grid.middle_frames(wanted, fps=fps, clip_frames=clip_frames, tile=tile, log=log)
  width = label_width + max(len(r) for r in rows) * (tile + _PAD)
  image = Image.new("RGB", (width, len(rows) * (tile + _PAD)), (255, 255, 255))
  draw = ImageDraw.Draw(image)
  for y_index, row in enumerate(rows):
    y = y_index * (tile + _PAD)
    if labels is not None:
      draw.text((4, y + 4), str(labels[y_index]), fill=(0, 0, 0))
    for x_index, token in enumerate(row):
      x = label_width + x_index * (tile + _PAD)
      ref = refs[token]
      frame = None if ref is None else frames.get((ref.source, ref.clip))
      if frame is None:
        image.paste(Image.new("RGB", (tile, tile), GREY), (x, y))
      else:
        image.paste(Image.fromarray(np.asarray(frame)).resize((tile, tile)), (x, y))
      draw.text((x + 2, y + tile - 12), str(token), fill=(255, 255, 0))
  return grid.save_png(image, path)
