"""Forecasting: the visual tokens so far, then masked slots for the future; the top futures at
horizons of 1, 2, 3 clips (more when asked).

    python -m vbert_jax.tasks.forecast --workdir=RUN --tokens=12,12,40,7 --horizons=1,2,3 \\
        --out=results/forecast

Layouts: "video_only" ([CLS] v1 ... vN [MASK] x H [SEP], pretraining's video-only regime, the
default) or "pair" ([CLS] v1 ... vN [>] [MASK] x H [SEP], the future after the separator).

Futures are scored jointly, by the chain rule: a future's score is the sum of the
log-probabilities of its tokens, each predicted with the slots filled before it in the input and
the others still masked. Two orders of filling:

    beam        left to right: a beam search over the slots, one batched forward pass per slot
    iterative   each hypothesis fills next the slot it is most sure of (highest top
                probability), also under a beam; the same future reached in two orders
                counts once, with its better score

Only real visual tokens are proposed (never text, special or padding ids); futures come back
best first, and the result depends on nothing but the inputs.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import types
from typing import Sequence

from absl import flags
import numpy as np

from vbert_jax import cli
from vbert_jax.tasks import bundle as bundle_lib
from vbert_jax.tasks import prompts
from vbert_jax.tasks import text_to_video
from vbert_jax.tasks import strips
from vbert_jax.video import features_io

METHODS = ("beam", "iterative")


@dataclasses.dataclass
class _Beam:
  filled: np.ndarray  # [H] int64 visual tokens, -1 where still masked
  score: float


def _inputs(bundle, base, positions: np.ndarray, beams: list[_Beam], rows: int):
  """The base prompt with each beam's filled slots written in, padded to `rows` copies."""
  packed = []
  offset = bundle.vocab.visual_offset
  for beam in beams + [beams[-1]] * (rows - len(beams)):
    p = dataclasses.replace(base, input_ids=base.input_ids.copy())
    done = beam.filled >= 0
    p.input_ids[positions[done]] = beam.filled[done] + offset
    packed.append(p)
  return packed


def _expand(beams: list[_Beam], lp: np.ndarray, method: str, width: int) -> list[_Beam]:
  """One more slot for every beam; the `width` best distinct hypotheses survive."""
  candidates: dict[bytes, _Beam] = {}
  for beam, slot_lp in zip(beams, lp):
    open_slots = np.flatnonzero(beam.filled < 0)
    if method == "beam":
      slot = open_slots[0]
    else:
      slot = open_slots[np.argmax(slot_lp[open_slots].max(axis=1))]
    top = np.argsort(-slot_lp[slot], kind="stable")[:width]
    for token in top:
      filled = beam.filled.copy()
      filled[slot] = token
      new = _Beam(filled, beam.score + float(slot_lp[slot, token]))
      key = filled.tobytes()
      if key not in candidates or candidates[key].score < new.score:
        candidates[key] = new
  ranked = sorted(candidates.values(), key=lambda b: (-b.score, b.filled.tolist()))
  return ranked[:width]


def forecast(bundle, visual_tokens: Sequence[int], horizon: int, *, top: int = 3,
             method: str = "beam", layout: str = "video_only", beam_size: int = 8,
             context: int | None = None) -> list[tuple[np.ndarray, float]]:
  """The `top` most likely futures of `horizon` clips: [(tokens int32 [horizon], score)], best
  first (score: the summed log-probability, see the module docstring). `context`: the most
  recent tokens the prompt keeps (None: as many as fit; see `prompts.forecast`)."""
  if method not in METHODS:
    raise ValueError(f"method={method!r}: expected one of {METHODS}")
  if top < 1 or beam_size < 1:
    raise ValueError(f"top={top} and beam_size={beam_size}: expected at least 1")
  base, positions = prompts.forecast(bundle.layout, visual_tokens, horizon, layout, context)
  if top > bundle.vocab.visual_size ** horizon:
    raise ValueError(f"top={top}: only {bundle.vocab.visual_size ** horizon} distinct futures "
                     f"of {horizon} clips exist")
  width = max(beam_size, top)  # a beam narrower than `top` could not return `top` futures
  beams = [_Beam(np.full(horizon, -1, np.int64), 0.0)]
  for _ in range(horizon):
    packed = _inputs(bundle, base, positions, beams, width)
    slots = np.broadcast_to(positions, (width, horizon))
    lp = text_to_video.visual_log_probs(bundle, packed, slots)[:len(beams)]  # [beams, H, V]
    beams = _expand(beams, lp, method, width)
  return [(b.filled.astype(np.int32), b.score) for b in beams[:top]]


# ------------------------------------------------------------------------------ command line


def _int_list(text: str) -> list[int]:
  try:
    return [int(x) for x in text.replace(" ", "").split(",") if x]
  except ValueError as e:
    raise ValueError(f"{text!r}: expected comma-separated integers") from e


class _IntListParser(flags.ArgumentParser):
  """Comma-separated integers as a list of ints (absl's list flags give strings)."""

  def parse(self, argument):
    # A default comes in as a list already; a command-line value as text.
    if isinstance(argument, (list, tuple)):
      return [int(x) for x in argument]
    return _int_list(argument)

  def flag_type(self) -> str:
    return "comma-separated integers"


def _define_int_list(name: str, default: list[int] | None, help_text: str,
                     fv: flags.FlagValues) -> None:
  flags.DEFINE(_IntListParser(), name, default, help_text, flag_values=fv,
               serializer=flags.CsvListSerializer(","))


# What --help prints above the flags: the command's purpose and examples.
_HELP = (
    "python -m vbert_jax.tasks.forecast\n\n"
    "Forecasting with a trained VideoBERT: given the visual tokens of the clips so far,\n"
    "the most likely next clips, for each horizon (number of future clips). The video\n"
    "comes from --tokens, or from a feature file (--features, its first --clips clips)\n"
    "turned into tokens with the visual vocabulary.\n\n"
    "Examples:\n"
    "  python -m vbert_jax.tasks.forecast --workdir=runs/videobert \\\n"
    "      --tokens=120,120,4031,77 --out=results/forecast\n"
    "  python -m vbert_jax.tasks.forecast --workdir=runs/videobert \\\n"
    "      --features=features/vid_a.npz --clips=12 --horizons=1,2,3,5 \\\n"
    "      --method=iterative --out=results/forecast\n\n"
    "Writes OUT/results.json (per horizon: the futures, best first, with their summed\n"
    "log-probabilities) and, with a visual vocabulary, OUT/horizon_<h>.png: the last\n"
    "clips so far, then one row per future.")


def define_flags(fv: flags.FlagValues) -> None:
  bundle_lib.define_run_flags(
      fv, out_help="Folder for results.json and the PNG strips.",
      visual_vocab_help="Visual vocabulary (.npz); default: the run's "
      "config.init.visual_vocab. Needed for --features and for the pictures.")
  _define_int_list("tokens", None, "The visual tokens so far, comma-separated.", fv)
  flags.DEFINE_string("features", None, "A feature file (<video_id>.npz) instead of --tokens.",
                      flag_values=fv)
  flags.DEFINE_integer("clips", None, "With --features: use its first N clips (default all).",
                       flag_values=fv)
  _define_int_list("horizons", [1, 2, 3], "Future lengths in clips (default 1,2,3).", fv)
  flags.DEFINE_integer("top", 3, "Futures per horizon (default 3).", flag_values=fv)
  flags.DEFINE_enum("method", "beam", METHODS, "beam: fill the slots left to right; iterative: "
                    "most certain slot first.", flag_values=fv)
  flags.DEFINE_enum("layout", "video_only", prompts.FORECAST_LAYOUTS, "video_only: [CLS] video "
                    "[MASK]s [SEP]; pair: [CLS] video [>] [MASK]s [SEP].", flag_values=fv)
  flags.DEFINE_integer("beam_size", 8, "Hypotheses kept per step.", flag_values=fv)
  flags.DEFINE_integer("context", None, "Keep only the last N tokens so far (default: as many "
                       "as fit max_len). N no larger than pretraining's video-only examples minus "
                       "the horizon keeps the prompt at positions the model was trained at.",
                       flag_values=fv)
  flags.DEFINE_integer("tile", 96, "Picture tile size in pixels.", flag_values=fv)


def parse_args(argv: Sequence[str] | None = None) -> types.SimpleNamespace:
  return cli.parse(define_flags, argv, _HELP)


def _video_tokens(args: types.SimpleNamespace, bundle) -> np.ndarray:
  if (args.tokens is None) == (args.features is None):
    raise ValueError("give the video as exactly one of --tokens or --features")
  if args.tokens is not None:
    return np.asarray(args.tokens, np.int64)
  if bundle.visual_vocab is None:
    raise ValueError("--features needs a visual vocabulary: pass --visual_vocab")
  vf = features_io.load_features(args.features)
  features = vf.features[:args.clips] if args.clips else vf.features
  return bundle.visual_vocab.assign(np.asarray(features, np.float32))


def run(args: types.SimpleNamespace) -> dict:
  bundle = bundle_lib.bundle_from_args(args)
  video = _video_tokens(args, bundle)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  results = {"workdir": str(args.workdir), "tokens": video.tolist(), "method": args.method,
             "layout": args.layout, "beam_size": args.beam_size, "context": args.context,
             "horizons": {}}
  for h in args.horizons:
    futures = forecast(bundle, video, h, top=args.top, method=args.method, layout=args.layout,
                       beam_size=args.beam_size, context=args.context)
    entry = {"futures": [{"tokens": t.tolist(), "score": s} for t, s in futures]}
    if bundle.visual_vocab is not None:
      so_far = video[-8:]
      rows = [so_far] + [t for t, _ in futures]
      labels = ["so far"] + [f"#{i + 1} {s:.2f}" for i, (_, s) in enumerate(futures)]
      entry["picture"] = strips.token_strip(bundle.visual_vocab, rows, out / f"horizon_{h}.png",
                                            labels=labels, tile=args.tile).name
    results["horizons"][str(h)] = entry
  bundle_lib.write_results(results, out)
  return results


def _report(results: dict) -> None:
  for h, entry in results["horizons"].items():
    print(f"horizon {h}: " + "; ".join(f"{f['tokens']} ({f['score']:.2f})"
                                       for f in entry["futures"]))


def main(argv: Sequence[str] | None = None) -> int:
  return bundle_lib.run_command(run, parse_args(argv), _report)


if __name__ == "__main__":
  sys.exit(main())
