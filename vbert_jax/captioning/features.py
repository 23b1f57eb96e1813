"""Caption features as the paper built them, and pairs files made from them.

For each video (segment) the trained VideoBERT reads its visual tokens beside the template

    now let's [MASK] the [MASK] to the [MASK], and then [MASK] the [MASK].

(`[CLS] v1 ... vN [>] template [SEP]` by default, `order="text_first"` for the pretraining
layout); the feature is the mean of the final hidden states at the video tokens, concatenated
with the mean of those at the five `[MASK]`s, optionally followed by the mean S3D feature of the
segment's clips: [2 * hidden] or [2 * hidden + S3D size].

`make_pairs` chains this to the captioner's input: per-video visual tokens and captions ->
a pairs file (`task.Pairs`) with one row per caption.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from vbert_jax import sequence
from vbert_jax.captioning import task as task_lib

CAPTION_TEMPLATE = "now let's [MASK] the [MASK] to the [MASK], and then [MASK] the [MASK]."
CAPTION_MASKS = 5


def _template(bundle: Any, template: str):
  from vbert_jax.tasks import prompts  # pylint: disable=g-import-not-at-top
  expected = CAPTION_MASKS if template == CAPTION_TEMPLATE else None
  return prompts.Template.parse(template, bundle.tokenizer, expected_masks=expected)


def _mean_s3d(s3d: Sequence[np.ndarray], count: int) -> np.ndarray:
  if len(s3d) != count:
    raise ValueError(f"caption features: {len(s3d)} S3D arrays for {count} videos; expected one "
                     f"[clips, dim] array per video")
  out = []
  for i, clips in enumerate(s3d):
    clips = np.asarray(clips, np.float32)
    if clips.ndim != 2 or clips.shape[0] == 0:
      raise ValueError(f"caption features: S3D array of video {i} has shape {clips.shape}; "
                       f"expected [clips >= 1, dim]")
    if out and clips.shape[1] != out[0].shape[0]:
      raise ValueError(f"caption features: S3D array of video {i} has dim {clips.shape[1]}, "
                       f"video 0 has {out[0].shape[0]}")
    out.append(clips.mean(axis=0))
  return np.stack(out)


def caption_features(bundle: Any, videos: Sequence[Sequence[int]], *,
                     s3d: Sequence[np.ndarray] | None = None, order: str = "video_first",
                     template: str = CAPTION_TEMPLATE, batch_size: int = 64) -> np.ndarray:
  """[N, 2 * hidden (+ S3D dim)]: mean video-token output ‖ mean masked-text output (‖ S3D).

  `videos` holds the visual tokens (0 .. visual_size - 1) of each video or segment; `bundle` is a
  `vbert_jax.tasks.bundle.Bundle`. Batches have one fixed shape, so one compilation serves all.
  """
  from vbert_jax.tasks import prompts  # pylint: disable=g-import-not-at-top
  if not len(videos):
    raise ValueError("caption features: no videos given")
  if batch_size < 1:
    raise ValueError(f"caption features: batch_size={batch_size}; expected at least 1")
  prompt = _template(bundle, template)
  vocab: sequence.JointVocab = bundle.layout.vocab
  out = []
  for start in range(0, len(videos), batch_size):
    chunk = videos[start:start + batch_size]
    packed, masks = [], []
    for i, tokens in enumerate(chunk):
      try:
        p, positions = prompts.build(bundle.layout, tokens, prompt, order)
      except ValueError as e:
        raise ValueError(f"caption features, video {start + i}: {e}") from e
      packed.append(p)
      masks.append(positions)
    n = len(packed)
    packed += [packed[0]] * (batch_size - n)  # a fixed batch shape: one compilation
    batch = sequence.stack(packed)
    hidden = np.asarray(bundle.apply(batch)["hidden"], np.float32)[:n]
    is_video = vocab.is_visual(batch["input_ids"][:n]).astype(np.float32)
    is_mask = np.zeros_like(is_video)
    for row, positions in enumerate(masks):
      is_mask[row, positions] = 1.0
    video_mean = np.einsum("bl,blh->bh", is_video, hidden) / is_video.sum(1, keepdims=True)
    mask_mean = np.einsum("bl,blh->bh", is_mask, hidden) / is_mask.sum(1, keepdims=True)
    out.append(np.concatenate([video_mean, mask_mean], axis=1))
  features = np.concatenate(out)
  if s3d is not None:
    features = np.concatenate([features, _mean_s3d(s3d, len(videos))], axis=1)
  return features.astype(np.float32)


def make_pairs(bundle: Any, videos: Mapping[str, Sequence[int]],
               captions: Mapping[str, Sequence[str]], path: Any, *,
               s3d: Mapping[str, np.ndarray] | None = None, order: str = "video_first",
               batch_size: int = 64) -> task_lib.Pairs:
  """Writes a pairs file: caption features of each video, one row per caption of it.

  `videos` maps video ids to their visual tokens, `captions` the same ids to their reference
  captions (one or more), `s3d` optionally to their S3D clip features [clips, dim].
  """
  ids = list(videos)
  missing = [v for v in ids if not captions.get(v)]
  extra = [v for v in captions if v not in videos]
  if missing or extra:
    raise ValueError(f"make_pairs: videos without captions {missing[:8]}, captions without "
                     f"videos {extra[:8]}; expected the same video ids with at least one "
                     f"caption each")
  if s3d is not None and sorted(s3d) != sorted(ids):
    raise ValueError(f"make_pairs: the S3D features cover videos {sorted(s3d)[:8]}...; "
                     f"expected exactly the video ids of `videos`")
  features = caption_features(bundle, [videos[v] for v in ids],
                              s3d=None if s3d is None else [s3d[v] for v in ids], order=order,
                              batch_size=batch_size)
  rows = [(i, v, c) for i, v in enumerate(ids) for c in captions[v]]
  pairs = task_lib.Pairs(features[[r[0] for r in rows]], None, [r[2] for r in rows],
                         [r[1] for r in rows], source=f"pairs file {path}")
  pairs.write(path)
  return pairs
