"""Writes a demo world to a folder.

  python -m vbert_jax.demo.world.generate --out=DIR --num_videos=24 --seed=0 [--size=112] \
      [--workers=N] [--filler_rate=0.3 --early_rate=0.1 --late_rate=0.1 \
      --wrong_word_rate=0.1 --missing_rate=0.1]

Videos already written are kept, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import os
import dataclasses
import sys
import time

from vbert_jax.demo.world import world


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  defaults, narration = world.WorldConfig(), world.NarrationConfig()
  ap = argparse.ArgumentParser(prog="python -m vbert_jax.demo.world.generate", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", required=True, help="output folder")
  ap.add_argument("--num_videos", type=int, default=defaults.num_videos)
  ap.add_argument("--seed", type=int, default=defaults.seed)
  ap.add_argument("--size", type=int, default=None, help="square frames of this size")
  ap.add_argument("--width", type=int, default=defaults.width)
  ap.add_argument("--height", type=int, default=defaults.height)
  ap.add_argument("--fps", type=int, default=defaults.fps)
  ap.add_argument("--min_steps", type=int, default=defaults.steps_per_video[0])
  ap.add_argument("--max_steps", type=int, default=defaults.steps_per_video[1])
  ap.add_argument("--val_fraction", type=float, default=defaults.val_fraction)
  ap.add_argument("--crf", type=int, default=defaults.crf)
  ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                  help="processes that render videos in parallel")
  for field in dataclasses.fields(narration):
    ap.add_argument(f"--{field.name}", type=float, default=getattr(narration, field.name))
  return ap.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> world.WorldConfig:
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
  return 0


if __name__ == "__main__":
  sys.exit(main())
