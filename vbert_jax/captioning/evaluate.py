r"""Captions the videos of a pairs file with a trained captioner and scores them.

    python -m vbert_jax.captioning.evaluate --workdir=runs/captioner --pairs=val_pairs.npz \
        --out=results/captioner

--workdir is a run of `python -m vbert_jax.captioning.train` (its config.json and checkpoints).
--pairs is a pairs file (.npz of features, captions, video_ids; see vbert_jax/captioning/training.py):
its rows are grouped by video_id, every caption of a video is one of its references, and each
video gets one generated caption (greedy with --beam_size=1, else beam search).
--out receives results.json: BLEU-1..4, METEOR, ROUGE-L and CIDEr (pycocoevalcap's scorers with
its PTB tokenizer; without Java, a Python tokenization and no METEOR), the decoding settings, and
per video the generated caption beside its references.
"""

from __future__ import annotations

import sys
import types
from typing import Any, Sequence

from absl import flags
import jax
import ml_collections
import numpy as np

from vbert_jax import checkpoints
from vbert_jax import cli
from vbert_jax.captioning import decode
from vbert_jax.captioning import metrics
from vbert_jax.captioning import model as model_lib
from vbert_jax.captioning import training as task_lib
from vbert_jax.tasks import bundle as bundle_lib
from vbert_jax.text import tokenizers


def read_config(workdir: Any) -> ml_collections.ConfigDict:
  return bundle_lib.read_config(workdir, ("model", "text", "max_caption_len", "decode"),
                                "a captioner config (configs/captioner.py)")


def load_captioner(workdir: Any, *, step: int | None = None, text_vocab: str | None = None
                   ) -> tuple[ml_collections.ConfigDict, model_lib.CaptionerConfig, Any,
                              tokenizers.TextTokenizer, int]:
  """(run config, CaptionerConfig, parameters (host arrays), tokenizer, step) of a run."""
  config = read_config(workdir)
  if text_vocab:
    config.text.vocab = str(text_vocab)
  tokenizer = task_lib.load_tokenizer(config)
  cfg = task_lib.captioner_config(config, tokenizer)
  # The parameters alone: the optimizer state is twice their size under Adam and not needed.
  step, params = bundle_lib.read_run_params(workdir, step)
  expected = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0)))
  checkpoints.check_shapes(params, expected, where=f"captioner checkpoint {workdir} step {step}")
  return config, cfg, params, tokenizer, step


def evaluate(workdir: Any, pairs_path: Any, *, step: int | None = None,
             beam_size: int | None = None, max_len: int | None = None,
             length_penalty: float | None = None, batch_size: int | None = None,
             use_java: bool | None = None, text_vocab: str | None = None) -> dict[str, Any]:
  """Generated captions and their scores for the videos of a pairs file (results.json's content).

  Unset decoding options come from the run's config (`decode.*`).
  """
  config, cfg, params, tokenizer, step = load_captioner(workdir, step=step,
                                                        text_vocab=text_vocab)
  pairs = task_lib.Pairs.read(pairs_path)
  if pairs.feature_dim != cfg.feature_dim or pairs.feature_len > cfg.max_feature_len:
    raise ValueError(f"{pairs.source}: features [rows, {pairs.feature_len}, "
                     f"{pairs.feature_dim}] but the captioner of {workdir} takes "
                     f"[rows, <= {cfg.max_feature_len}, {cfg.feature_dim}]")
  d = config.decode
  settings = {
      "beam_size": int(d.beam_size if beam_size is None else beam_size),
      "max_len": int(max_len if max_len is not None else (d.max_len or cfg.max_caption_len - 1)),
      "length_penalty": float(d.length_penalty if length_penalty is None else length_penalty)}
  batch_size = int(d.batch_size if batch_size is None else batch_size)
  video_ids, features, mask, references = pairs.by_video()
  pad = cfg.max_feature_len - pairs.feature_len
  features = np.pad(features, ((0, 0), (0, pad), (0, 0)))
  mask = np.pad(mask, ((0, 0), (0, pad)))
  tokens = decode.decode_all(params, cfg, features, mask, batch_size=batch_size, **settings)
  captions = decode.to_captions(tokenizer, tokens, cfg.eos_id)
  candidates = dict(zip(video_ids, captions))
  java = metrics.java_available() if use_java is None else use_java
  scores = metrics.score_captions(candidates, references, use_java=java)
  return {
      "metrics": scores,
      "tokenization": "ptb" if java else "python",
      "decoding": {"method": "greedy" if settings["beam_size"] == 1 else "beam_search",
                   **settings},
      "checkpoint": {"workdir": str(workdir), "step": int(step)},
      "pairs": str(pairs_path),
      "num_videos": len(video_ids),
      "captions": [{"video_id": v, "caption": candidates[v], "references": references[v]}
                   for v in video_ids],
  }


def define_flags(fv: flags.FlagValues) -> None:
  # Not bundle_lib.define_run_flags: --workdir is a captioner's run, read without a VideoBERT
  # bundle, and there is no visual vocabulary to name.
  flags.DEFINE_string("workdir", None,
                      "the captioner's training workdir (config.json and checkpoints)",
                      flag_values=fv)
  flags.DEFINE_string("pairs", None, "pairs file (.npz) of the videos to caption, with their "
                      "reference captions", flag_values=fv)
  flags.DEFINE_string("out", None, "output folder; receives results.json", flag_values=fv)
  flags.DEFINE_integer("step", None, "checkpoint step to load (default: the newest)",
                       flag_values=fv)
  flags.DEFINE_integer("beam_size", None, "1 for greedy decoding, more for beam search "
                       "(default: the run's config.decode.beam_size)", flag_values=fv)
  flags.DEFINE_integer("max_len", None, "most tokens per caption, [EOS] included (default: the "
                       "config's)", flag_values=fv)
  flags.DEFINE_float("length_penalty", None, "beam search ranks by log p / ((5 + length) / 6) "
                     "** this (default: the config's; 0 ranks by log p)", flag_values=fv)
  flags.DEFINE_integer("batch_size", None, "videos decoded at once (default: the config's)",
                       flag_values=fv)
  flags.DEFINE_enum("java", "auto", ("auto", "yes", "no"), "use Java for the PTB tokenizer and "
                    "METEOR: auto (when `java` is on the PATH), yes (required), no (Python "
                    "tokenization, no METEOR)", flag_values=fv)
  flags.DEFINE_string("text_vocab", None, "the caption tokenizer's vocabulary file, if it moved "
                      "since training", flag_values=fv)
  flags.mark_flags_as_required(["workdir", "pairs", "out"], flag_values=fv)


def parse_args(argv: Sequence[str] | None = None) -> types.SimpleNamespace:
  return cli.parse(define_flags, argv, __doc__)


def _run(args: types.SimpleNamespace) -> dict[str, Any]:
  use_java = {"auto": None, "yes": True, "no": False}[args.java]
  results = evaluate(args.workdir, args.pairs, step=args.step, beam_size=args.beam_size,
                     max_len=args.max_len, length_penalty=args.length_penalty,
                     batch_size=args.batch_size, use_java=use_java, text_vocab=args.text_vocab)
  bundle_lib.write_results(results, args.out)
  return results


def _report(results: dict[str, Any]) -> None:
  summary = ", ".join(f"{k}={v:.4f}" for k, v in results["metrics"].items())
  print(f"{results['num_videos']} videos, {results['decoding']['method']}: {summary}")


def main(argv: Sequence[str] | None = None) -> int:
  return bundle_lib.run_command(_run, parse_args(argv), _report)


if __name__ == "__main__":
  sys.exit(main())
