"""Text-to-video: "[CLS] text [>] [MASK] ... [MASK] [SEP]", the masked slots answered with visual
tokens (the pretraining layout, text first).

    python -m vbert_jax.tasks.text_to_video --workdir=RUN --text="cut the tomato" --num_slots=6 \\
        --mode=topk --k=3 --out=results/t2v

One forward pass gives every slot's distribution over the visual tokens (only real visual
tokens: text, special and padding ids are never produced). The slots are predicted together from
the same input, so a sequence's score is the sum of its slots' log-probabilities:

    argmax   the best token of each slot (one row)
    topk     the k best sequences by that score (exact: a beam of width k over the slots)
    sample   k sequences drawn slot by slot from softmax(logits / temperature), seeded

Rows come back in score order (best first); the same seed gives the same rows. With a visual
vocabulary that keeps its nearest training clips, the command line also draws each row as a
strip of those clips' middle frames.
"""

from __future__ import annotations

import pathlib
import sys
import types
from typing import Sequence

from absl import flags
import numpy as np

from vbert_jax import cli
from vbert_jax import sequence
from vbert_jax.tasks import bundle as bundle_lib
from vbert_jax.tasks import prompts
from vbert_jax.tasks import strips

MODES = ("argmax", "topk", "sample")


def visual_log_probs(bundle, packed: Sequence[sequence.Packed],
                     positions: np.ndarray) -> np.ndarray:
  """Log-probabilities over the real visual tokens [B, P, visual_size] at `positions` [B, P]."""
  batch = sequence.stack(list(packed))
  lp = bundle.log_probs(batch, mvm_positions=np.asarray(positions, np.int32))["mvm_log_probs"]
  # The padding ids are already at -1e9; they are cut off so that they cannot be picked at all.
  return lp[..., :bundle.vocab.visual_size].astype(np.float64)


def k_best(lp: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """The k best rows of independent slots lp [S, V] by summed log-probability, best first."""
  rows = np.zeros((1, 0), np.int64)
  scores = np.zeros(1)
  for slot in lp:
    top = np.argsort(-slot, kind="stable")[:k]
    cand = scores[:, None] + slot[top][None, :]  # [beams, k]
    flat = np.argsort(-cand.ravel(), kind="stable")[:k]
    beam, choice = np.divmod(flat, len(top))
    rows = np.concatenate([rows[beam], top[choice][:, None]], axis=1)
    scores = cand.ravel()[flat]
  return rows, scores


def sample(lp: np.ndarray, k: int, temperature: float,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """k draws per slot from softmax(lp / temperature) (Gumbel-max); scored by the untempered
  log-probabilities and sorted best first."""
  gumbel = rng.gumbel(size=(k,) + lp.shape)
  rows = np.argmax(lp[None] / temperature + gumbel, axis=-1)  # [k, S]
  scores = np.take_along_axis(lp[None], rows[..., None], axis=-1)[..., 0].sum(axis=1)
  order = np.argsort(-scores, kind="stable")
  return rows[order], scores[order]


def generate_scored(bundle, text: str, num_slots: int, *, mode: str = "argmax", k: int = 1,
                    temperature: float = 1.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(visual tokens int32 [k, num_slots], scores [k]) for `text`, best first."""
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}: expected one of {MODES}")
  if k < 1:
    raise ValueError(f"k={k}: expected at least 1")
  if mode == "argmax" and k != 1:
    raise ValueError(f"mode='argmax' gives one row; got k={k} (use mode='topk' or 'sample' for "
                     f"alternatives)")
  if mode == "sample" and not temperature > 0:
    raise ValueError(f"temperature={temperature}: expected a positive number")
  if not text.strip():
    raise ValueError("the text is empty; expected words to show")
  if mode == "topk" and k > bundle.vocab.visual_size ** num_slots:
    raise ValueError(f"k={k}: only {bundle.vocab.visual_size ** num_slots} distinct rows of "
                     f"{num_slots} slots exist")
  text_ids = bundle.tokenizer.encode(text)
  packed, positions = prompts.text_to_video(bundle.layout, text_ids, num_slots)
  lp = visual_log_probs(bundle, [packed], positions[None])[0]
  if mode == "sample":
    rows, scores = sample(lp, k, temperature, np.random.default_rng(seed))
  else:
    rows, scores = k_best(lp, k)
  return rows.astype(np.int32), scores


def generate(bundle, text: str, num_slots: int, *, mode: str = "argmax", k: int = 1,
             temperature: float = 1.0, seed: int = 0) -> np.ndarray:
  """Visual token indices [k, num_slots] (0 .. visual_size - 1) for `text`, best row first."""
  return generate_scored(bundle, text, num_slots, mode=mode, k=k, temperature=temperature,
                         seed=seed)[0]


# ------------------------------------------------------------------------------ command line


# What --help prints above the flags: the command's purpose and an example.
_HELP = (
    "python -m vbert_jax.tasks.text_to_video\n\n"
    "Text-to-video with a trained VideoBERT: the model reads '[CLS] text [>]' followed by\n"
    "--num_slots masked video slots and fills them with visual tokens. Each row of the\n"
    "answer is one video of num_slots clips; rows come best first.\n\n"
    "Example:\n"
    "  python -m vbert_jax.tasks.text_to_video --workdir=runs/videobert \\\n"
    "      --text='now let me show you how to cut the tomato' --num_slots=6 \\\n"
    "      --mode=topk --k=3 --out=results/t2v\n\n"
    "Writes OUT/results.json (per text: the token rows and their scores, the summed\n"
    "log-probabilities) and, with a visual vocabulary, OUT/text_<i>.png: per row, the\n"
    "middle frame of each token's nearest training clip.")


def define_flags(fv: flags.FlagValues) -> None:
  bundle_lib.define_run_flags(
      fv, out_help="Folder for results.json and the PNG strips.",
      visual_vocab_help="Visual vocabulary (.npz) for the pictures; default: the run's "
      "config.init.visual_vocab (no pictures when neither is set).")
  flags.DEFINE_multi_string("text", None, "The text to show (repeat the flag for several texts).",
                            flag_values=fv)
  flags.DEFINE_integer("num_slots", 6, "Video tokens (clips) to generate.", flag_values=fv)
  flags.DEFINE_enum("mode", "argmax", MODES, "argmax: the best token per slot; topk: the k best "
                    "rows; sample: k rows drawn with --temperature and --seed.", flag_values=fv)
  flags.DEFINE_integer("k", 1, "Rows (alternatives) per text.", flag_values=fv)
  flags.DEFINE_float("temperature", 1.0, "Sampling temperature (>0).", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=fv)
  flags.DEFINE_integer("tile", 96, "Picture tile size in pixels.", flag_values=fv)
  flags.mark_flag_as_required("text", flag_values=fv)


def parse_args(argv: Sequence[str] | None = None) -> types.SimpleNamespace:
  return cli.parse(define_flags, argv, _HELP)


def run(args: types.SimpleNamespace) -> dict:
  bundle = bundle_lib.bundle_from_args(args)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  results = {"workdir": str(args.workdir), "mode": args.mode, "k": args.k,
             "num_slots": args.num_slots, "temperature": args.temperature, "seed": args.seed,
             "texts": []}
  for i, text in enumerate(args.text):
    rows, scores = generate_scored(bundle, text, args.num_slots, mode=args.mode, k=args.k,
                                   temperature=args.temperature, seed=args.seed)
    entry = {"text": text, "tokens": rows.tolist(), "scores": scores.tolist()}
    if bundle.visual_vocab is not None:
      labels = [f"#{r + 1} {s:.2f}" for r, s in enumerate(scores)]
      entry["picture"] = str(strips.token_strip(bundle.visual_vocab, rows, out / f"text_{i}.png",
                                                labels=labels, tile=args.tile).name)
    results["texts"].append(entry)
  bundle_lib.write_results(results, out)
  return results


def _report(results: dict) -> None:
  for entry in results["texts"]:
    print(f"{entry['text']!r}: " + "; ".join(
        f"{row} ({score:.2f})" for row, score in zip(entry["tokens"], entry["scores"])))


def main(argv: Sequence[str] | None = None) -> int:
  return bundle_lib.run_command(run, parse_args(argv), _report)


if __name__ == "__main__":
  sys.exit(main())
