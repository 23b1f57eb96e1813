"""Writes dummy_data/: a tiny corpus in the manual-directory layout, for the builder's tests.

  python -m data.videobert.make_dummy_data [--out=data/videobert/dummy_data]

Five videos of 8-d features (1.5 s clips), a visual vocabulary of 3 tokens fitted on them, a
WordPiece vocab.txt (the `bert` config) and transcripts: three narrated videos, one transcript
with only a sound tag (a video-only record), one video without a transcript, and one transcript
without a video. Deterministic, so rerunning it gives the same files.
"""

from __future__ import annotations

import pathlib
import sys
import types
from typing import Sequence

from absl import flags
import numpy as np

from vbert_jax import cli

OUT = pathlib.Path(__file__).resolve().parent / "dummy_data"
DIM = 8
CLIP = 1.5
WORDS = ["now", "we", "cut", "the", "tomato", "flip", "egg", "pour", "lemon", "and", "slowly",
         "##ly", "."]
NARRATION = {
    "vid_a": [(0.2, 2.9, "Now we cut the tomato."), (4.6, 7.4, "And we flip the egg.")],
    "vid_b": [(1.0, 3.2, "we pour the lemon slowly")],
    "vid_c": [(0.0, 1.4, "flip the egg."), (3.0, 5.9, "Cut the bread.")],  # "bread" is [UNK]
    "vid_d": [(0.5, 2.0, "[Music]")],  # no sentences: a video-only record
    "orphan": [(0.0, 1.0, "this transcript has no video")],
}
CLIPS = {"vid_a": 6, "vid_b": 3, "vid_c": 5, "vid_d": 4, "vid_e": 20}  # vid_e: no transcript


def _vtt(cues) -> str:
  def ts(t: float) -> str:
    ms = int(round(t * 1000))
    return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}"
  return "WEBVTT\n\n" + "".join(f"{ts(s)} --> {ts(e)}\n{text}\n\n" for s, e, text in cues)


def write(out: pathlib.Path = OUT) -> pathlib.Path:
  from vbert_jax.video import features_io  # pylint: disable=g-import-not-at-top
  from vbert_jax.vocab import kmeans, vocabulary  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(3, DIM)) * 4
  for vid, n in CLIPS.items():
    feats = (centers[rng.integers(0, 3, n)] + rng.normal(size=(n, DIM))).astype(np.float16)
    starts = np.arange(n) * CLIP
    features_io.save_features(out / "features", features_io.VideoFeatures(
        video_id=vid, source=f"{vid}.mp4", features=feats, starts=starts, ends=starts + CLIP,
        pooling="global", image_size=64))
  (out / "transcripts").mkdir(parents=True, exist_ok=True)
  for vid, cues in NARRATION.items():
    (out / "transcripts" / f"{vid}.vtt").write_text(_vtt(cues))
  specials = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  (out / "vocab.txt").write_text("\n".join(specials + WORDS) + "\n")
  vocab = vocabulary.VisualVocabulary.fit(out / "features",
                                          kmeans.KMeansConfig(depth=1, branching=3, seed=0),
                                          nearest_per_leaf=1)
  vocab.save(out / "visual_vocab.npz")
  return out


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("out", str(OUT), "folder to write the corpus to", flag_values=fv)


def parse_args(argv: Sequence[str] | None = None) -> types.SimpleNamespace:
  return cli.parse(define_flags, argv, __doc__)


def main(argv: Sequence[str] | None = None) -> int:
  write(pathlib.Path(parse_args(argv).out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
