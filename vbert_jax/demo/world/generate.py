"""Writes a demo world to a folder.

  python -m vbert_jax.demo.world.generate --out=DIR --num_videos=24 --seed=0 [--size=112] \
      [--workers=N] [--filler_rate=0.3 --early_rate=0.1 --late_rate=0.1 \
      --wrong_word_rate=0.1 --missing_rate=0.1]

Videos already written are kept, so an interrupted run resumes.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import types

from absl import flags

from vbert_jax import cli
from vbert_jax import console
from vbert_jax.demo.world import world

# What each NarrationConfig rate does, for --help; every field gets a flag even without an entry.
_NARRATION_HELP = {
    "filler_rate": "an extra sentence that describes nothing on screen",
    "early_rate": "the step is narrated before it happens",
    "late_rate": "the step is narrated after it has happened",
    "wrong_word_rate": "the verb or the noun said is not the one shown",
    "missing_rate": "the step is not narrated at all",
}


def define_flags(fv: flags.FlagValues) -> None:
  defaults, narration = world.WorldConfig(), world.NarrationConfig()
  flags.DEFINE_string("out", None, "output folder", flag_values=fv)
  flags.DEFINE_integer("num_videos", defaults.num_videos, "videos in the world", flag_values=fv)
  flags.DEFINE_integer("seed", defaults.seed, "seed of the world", flag_values=fv)
  flags.DEFINE_integer("size", None, "square frames of this size", flag_values=fv)
  flags.DEFINE_integer("width", defaults.width, "frame width (without --size)", flag_values=fv)
  flags.DEFINE_integer("height", defaults.height, "frame height (without --size)",
                       flag_values=fv)
  flags.DEFINE_integer("fps", defaults.fps, "frames per second", flag_values=fv)
  flags.DEFINE_integer("min_steps", defaults.steps_per_video[0], "fewest steps of a video",
                       flag_values=fv)
  flags.DEFINE_integer("max_steps", defaults.steps_per_video[1], "most steps of a video",
                       flag_values=fv)
  flags.DEFINE_float("val_fraction", defaults.val_fraction, "share of the videos in val",
                     flag_values=fv)
  flags.DEFINE_integer("crf", defaults.crf, "H.264 constant rate factor", flag_values=fv)
  flags.DEFINE_integer("workers", os.cpu_count() or 1,
                       "processes that render videos in parallel", flag_values=fv)
  for field in dataclasses.fields(narration):
    flags.DEFINE_float(field.name, getattr(narration, field.name),
                       "probability per step: " + _NARRATION_HELP.get(field.name, field.name),
                       flag_values=fv)
  flags.mark_flag_as_required("out", flag_values=fv)


def parse_args(argv: list[str] | None = None) -> types.SimpleNamespace:
  return cli.parse(define_flags, argv, __doc__)


def config_from_args(args: types.SimpleNamespace) -> world.WorldConfig:
  narration = world.NarrationConfig(**{f.name: getattr(args, f.name)
                                       for f in dataclasses.fields(world.NarrationConfig)})
  width = height = args.size
  if args.size is None:
    width, height = args.width, args.height
  return world.WorldConfig(num_videos=args.num_videos, seed=args.seed, width=width, height=height,
                           fps=args.fps, steps_per_video=(args.min_steps, args.max_steps),
                           val_fraction=args.val_fraction, crf=args.crf, narration=narration)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  console.setup()
  try:
    config = config_from_args(args)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  t0 = time.time()
  manifest = world.generate_world(config, args.out, progress=True, workers=args.workers)
  videos = manifest["videos"]
  clips = sum(round(v["duration"] / config.clip_seconds) for v in videos)
  val = sum(v["split"] == "val" for v in videos)
  print(f"demo world in {args.out}: {len(videos)} videos ({val} val), {clips} clips, "
        f"{sum(v['steps'] for v in videos)} steps, {time.time() - t0:.1f} s")
  ns = manifest["next_step"]
  if ns:
    print(f"next step at {ns['boundaries']} held-out step boundaries: step trigram "
          f"{ns['ngram3']:.3f}, bigram {ns['ngram2']:.3f}, oracle that knows the dish "
          f"{ns['oracle']:.3f}, chance {ns['chance']:.3f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
