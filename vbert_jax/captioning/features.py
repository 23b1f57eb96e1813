"""Caption features as the paper built them, and pairs files made from them.

For each video (segment) the trained VideoBERT reads its visual tokens beside the template

    now let's [MASK] the [MASK] to the [MASK], and then [MASK] the [MASK].

(`[CLS] v1 ... vN [>] template [SEP]` by default, `order="text_first"` for the pretraining
layout); the feature is the mean of the final hidden states at the video tokens, concatenated
with the mean of those at the five `[MASK]`s, optionally followed by the mean S3D feature of the
segment's clips: [2 * hidden] or [2 * hidden + S3D size].

`make_pairs` chains this to the captioner's input: per-video visual tokens and captions ->
a pairs file (`training.Pairs`) with one row per caption. The command line does it for YouCook II:

    python -m vbert_jax.captioning.features --workdir=RUN --features=FEATURES \
        --youcook2=youcookii_annotations.json --split=training --out=pairs/training
"""

from __future__ import annotations

import pathlib
import sys
import types
from typing import Any, Mapping, Sequence

from absl import flags
import numpy as np

from vbert_jax import cli
from vbert_jax import sequence
from vbert_jax.captioning import training as task_lib
from vbert_jax.tasks import bundle as bundle_lib
from vbert_jax.tasks import prompts
from vbert_jax.tasks import zero_shot

CAPTION_TEMPLATE = "now let's [MASK] the [MASK] to the [MASK], and then [MASK] the [MASK]."
CAPTION_MASKS = 5


def _template(bundle: Any, template: str):
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
  `vbert_jax.tasks.bundle.Bundle`.
  """
  if not len(videos):
    raise ValueError("caption features: no videos given")
  if batch_size < 1:
    raise ValueError(f"caption features: batch_size={batch_size}; expected at least 1")
  prompt = _template(bundle, template)
  vocab: sequence.JointVocab = bundle.layout.vocab
  # Every batch has the same rows and a length cut to its prompts: few compiled shapes.
  rows = min(batch_size, len(videos))
  out = []
  for start in range(0, len(videos), rows):
    chunk = videos[start:start + rows]
    n = len(chunk)
    try:
      batch, positions = prompts.build_batch(bundle.layout, chunk, prompt, order, rows,
                                             ids=range(start, start + n))
    except ValueError as e:
      raise ValueError(f"caption features, {e}") from e
    hidden = np.asarray(bundle.apply(batch)["hidden"], np.float32)[:n]
    is_video = vocab.is_visual(batch["input_ids"][:n]).astype(np.float32)
    is_mask = np.zeros_like(is_video)
    np.put_along_axis(is_mask, positions[:n], 1.0, axis=1)
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


# ------------------------------------------------------------------------------ command line


# What --help prints above the flags: the command's purpose and an example.
_HELP = (
    "python -m vbert_jax.captioning.features\n\n"
    "Caption features of captioned segments (YouCook II's annotation JSON, or a label\n"
    "file with a sentence column) from a trained VideoBERT, written as a\n"
    "pairs file for the captioner (python -m vbert_jax.captioning.train). Each segment's\n"
    "clips (those whose middle lies inside it) become visual tokens; the model reads them\n"
    f"with the template '{CAPTION_TEMPLATE}'\n"
    "and the feature is the mean output at the video tokens beside the mean output at\n"
    "the [MASK]s (with --s3d, also the mean clip feature). One row per segment, its\n"
    "sentence the caption; the row's video id is '<video_id>/<start>-<end>'.\n\n"
    "Example:\n"
    "  python -m vbert_jax.captioning.features --workdir=runs/videobert \\\n"
    "      --features=features/youcook2 --youcook2=youcookii_annotations.json \\\n"
    "      --split=training --out=pairs/training\n\n"
    "Writes OUT/pairs.npz and OUT/results.json (counts, settings, skipped segments).")


def define_flags(fv: flags.FlagValues) -> None:
  bundle_lib.define_run_flags(
      fv, out_help="Folder for pairs.npz and results.json.",
      visual_vocab_help="Visual vocabulary (.npz) that turns --features into tokens; default: "
      "the run's config.init.visual_vocab.")
  flags.DEFINE_string("features", None, "Folder of per-video feature files (<video_id>.npz from "
                      "the feature extractor).", flag_values=fv)
  flags.DEFINE_string("youcook2", None, "YouCook II annotation JSON (segments with times and "
                      "sentences).", flag_values=fv)
  flags.DEFINE_string("labels", None, "A label file whose rows carry a sentence: TSV or JSON "
                      "lines of video_id, start, end, verb, noun, sentence (rows without a "
                      "sentence are skipped).", flag_values=fv)
  flags.DEFINE_enum("split", "training", zero_shot.YOUCOOK2_SUBSETS, "The YouCook II subset to "
                    "write (default: training).", flag_values=fv)
  flags.DEFINE_bool("s3d", False, "Append the mean clip feature of each segment (the paper's "
                    "option).", flag_values=fv)
  flags.DEFINE_enum("order", "video_first", ("video_first", "text_first"), "Prompt order: video "
                    "then template (default), or the pretraining layout.", flag_values=fv)
  flags.DEFINE_integer("batch_size", 64, "Prompts per forward pass.", flag_values=fv)
  flags.mark_flag_as_required("features", flag_values=fv)
  # The segments come from exactly one of the two sources.
  flags.mark_flags_as_mutual_exclusive(["youcook2", "labels"], required=True, flag_values=fv)


def parse_args(argv: Sequence[str] | None = None) -> types.SimpleNamespace:
  return cli.parse(define_flags, argv, _HELP)


def run(args: types.SimpleNamespace) -> dict:
  segments = _captioned_segments(args)
  bundle = bundle_lib.bundle_from_args(args)
  if bundle.visual_vocab is None:
    raise ValueError("no visual vocabulary: pass --visual_vocab (the run's config has no "
                     "init.visual_vocab)")
  usable, skipped = zero_shot.clips_of_segments(args.features, segments)
  names = [f"{s.video_id}/{s.start:g}-{s.end:g}" for s, _ in usable]
  videos = {n: bundle.visual_vocab.assign(clips) for n, (_, clips) in zip(names, usable)}
  captions = {n: [s.sentence] for n, (s, _) in zip(names, usable)}
  s3d = {n: clips for n, (_, clips) in zip(names, usable)} if args.s3d else None
  path = pathlib.Path(args.out) / "pairs.npz"
  pairs = make_pairs(bundle, videos, captions, path, s3d=s3d, order=args.order,
                     batch_size=args.batch_size)
  results = {"workdir": str(args.workdir), "youcook2": args.youcook2, "labels": args.labels,
             "split": None if args.labels else args.split,
             "pairs": str(path), "rows": len(pairs), "feature_dim": pairs.feature_dim,
             "order": args.order, "s3d": bool(args.s3d), "skipped": skipped}
  bundle_lib.write_results(results, args.out)
  return results


def _captioned_segments(args: types.SimpleNamespace) -> list:
  if args.labels:
    segments = [s for s in zero_shot.read_labels(args.labels) if s.sentence.strip()]
    if not segments:
      raise ValueError(f"{args.labels}: no row has a sentence (the sixth field), so there is "
                       f"nothing to caption")
    return segments
  segments = zero_shot.read_youcook2(args.youcook2, args.split)
  if not segments:
    raise ValueError(f"{args.youcook2}: no segments in the {args.split!r} subset")
  return segments


def _report(results: dict) -> None:
  print(f"{results['rows']} segments of {results['split'] or results['labels']} (feature size "
        f"{results['feature_dim']}), {len(results['skipped'])} skipped; wrote {results['pairs']}")


def main(argv: Sequence[str] | None = None) -> int:
  return bundle_lib.run_command(run, parse_args(argv), _report)


if __name__ == "__main__":
  sys.exit(main())
