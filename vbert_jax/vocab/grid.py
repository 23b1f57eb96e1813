"""Draws the visual vocabulary as the paper does: per token, the middle frames of its clips.

  python -m vbert_jax.vocab.grid --vocab=vocab.npz --out=grid.png --top=12 --clips=6
  python -m vbert_jax.vocab.grid --vocab=vocab.npz --out=grid.png --tokens=3,17,250

One row per token (chosen with --tokens, else the --top most frequent), labelled with the token and
its number of training clips, then the middle frame of each of the training clips nearest the
token's centroid. Videos are decoded with the same clip settings as the extractor, each video
once; a video that cannot be read gives grey tiles and a line naming it.
"""

from __future__ import annotations

import collections
import pathlib
import sys
import types
from typing import Sequence

from absl import flags
import numpy as np
from PIL import Image, ImageDraw

from vbert_jax import atomic
from vbert_jax import cli
from vbert_jax import console
from vbert_jax.video import reader
from vbert_jax.vocab import vocabulary


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("vocab", None, "Vocabulary file (.npz).", flag_values=fv)
  flags.DEFINE_string("out", None, "PNG file to write.", flag_values=fv)
  flags.DEFINE_list("tokens", [], "Tokens to show (default: the most frequent).", flag_values=fv)
  flags.DEFINE_integer("top", 12, "How many of the most frequent tokens to show.",
                       flag_values=fv)
  flags.DEFINE_integer("clips", 6, "Clips per token.", flag_values=fv)
  flags.DEFINE_integer("tile", 96, "Tile size in pixels.", flag_values=fv)
  flags.DEFINE_float("fps", 20.0, "Frame rate the features were extracted at.", flag_values=fv)
  flags.DEFINE_integer("clip_frames", 30, "Frames per clip at extraction.", flag_values=fv)
  flags.mark_flag_as_required("vocab", flag_values=fv)
  flags.mark_flag_as_required("out", flag_values=fv)


def parse_args(argv: Sequence[str] | None = None) -> types.SimpleNamespace:
  return cli.parse(define_flags, argv, __doc__)


_LABEL_WIDTH = 110
_GREY = (96, 96, 96)


def middle_frames(wanted: dict[str, set[int]], *, fps: float, clip_frames: int, tile: int,
                  log=print) -> dict[tuple[str, int], np.ndarray]:
  """The middle frame (uint8 [tile, tile, 3]) of each wanted clip, decoding each video once."""
  frames = {}
  for source, clips in sorted(wanted.items()):
    last = max(clips)
    try:
      for clip in reader.read_clips(source, fps=fps, clip_frames=clip_frames, size=tile):
        if clip.index in clips:
          frames[(source, clip.index)] = clip.frames[len(clip.frames) // 2]
        if clip.index >= last:
          break
    except reader.VideoReadError as e:
      log(f"skipped {e}")
    missing = sorted(c for c in clips if (source, c) not in frames)
    if missing and pathlib.Path(source).exists():
      log(f"{source}: clips {missing} not found (video shorter than when features were made?)")
  return frames


def draw_grid(vocab: vocabulary.VisualVocabulary, tokens, *, clips: int, tile: int, fps: float,
              clip_frames: int, log=print) -> Image.Image:
  refs = {int(t): vocab.nearest_clips(int(t), clips) for t in tokens}
  if not any(refs.values()):
    raise ValueError("none of the chosen tokens has training clips to show")
  wanted = collections.defaultdict(set)
  for rs in refs.values():
    for r in rs:
      wanted[r.source].add(r.clip)
  frames = middle_frames(wanted, fps=fps, clip_frames=clip_frames, tile=tile, log=log)
  pad = 4
  image = Image.new("RGB", (_LABEL_WIDTH + clips * (tile + pad), len(refs) * (tile + pad)),
                    (255, 255, 255))
  draw = ImageDraw.Draw(image)
  for row, (token, rs) in enumerate(refs.items()):
    y = row * (tile + pad)
    draw.text((4, y + 4), f"token {token}", fill=(0, 0, 0))
    draw.text((4, y + 20), f"{int(vocab.leaf_counts[token])} clips", fill=(80, 80, 80))
    for col, r in enumerate(rs):
      x = _LABEL_WIDTH + col * (tile + pad)
      frame = frames.get((r.source, r.clip))
      if frame is None:
        image.paste(Image.new("RGB", (tile, tile), _GREY), (x, y))
      else:
        image.paste(Image.fromarray(frame).resize((tile, tile)), (x, y))
      draw.text((x + 2, y + tile - 12), f"{r.start:.1f}s", fill=(255, 255, 0))
  return image


def save_png(image: Image.Image, path) -> pathlib.Path:
  return atomic.write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  console.setup()
  try:
    vocab = vocabulary.VisualVocabulary.load(args.vocab)
    if args.tokens:
      tokens = [vocab._token(int(t)) for t in args.tokens]  # pylint: disable=protected-access
    else:
      tokens = [int(t) for t in vocab.most_frequent(args.top) if vocab.leaf_counts[t] > 0]
    image = draw_grid(vocab, tokens, clips=args.clips, tile=args.tile, fps=args.fps,
                      clip_frames=args.clip_frames)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  save_png(image, args.out)
  print(f"wrote {args.out}: {len(tokens)} tokens x up to {args.clips} clips")
  return 0


if __name__ == "__main__":
  sys.exit(main())
