r"""Trains the captioner (an encoder-decoder on VideoBERT's caption features) on a pairs file.

    python -m vbert_jax.captioning.train --config=configs/captioner.py --workdir=runs/captioner \
        --config.input.pairs=train_pairs.npz --config.text.vocab=vocab.txt

A pairs file is an .npz of caption features and captions, one row per caption (see
vbert_jax/captioning/task.py; `vbert_jax.captioning.features.make_pairs` writes one from a trained
VideoBERT). The text tokenizer (`--config.text.*`) should be the VideoBERT run's. Checkpoints,
metrics (metrics.jsonl, TensorBoard) and the resolved config go to --workdir; a run resumes by
itself from the newest checkpoint there. Evaluate with `python -m vbert_jax.captioning.evaluate`.
Add `--config.input.eval_pairs=PATH.npz` for a held-out loss during training, and
`configs/captioner.py:variant=tiny,runlocal` for a short run on a laptop.
"""

from __future__ import annotations

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file and arguments, e.g. configs/captioner.py:variant=tiny,runlocal",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the resolved "
                               "config go (local path or gs://).")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with a mistyped `--config.a.b=v` key named in the error."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as error:
    e: BaseException = error
    # ml_collections wraps a KeyError("'key'\nDid you mean ...?") in an AttributeError.
    while e.args and isinstance(e.args[0], BaseException):
      e = e.args[0]
    detail = str(e.args[0]) if e.args else str(e)
    key = detail.split("\n")[0].strip("\"' ")
    culprit = next((a for a in argv[1:] if a.startswith("--config.")
                    and key in a.split("=", 1)[0].split(".")), "a --config override")
    hint = detail.split("\n", 1)[1] if "\n" in detail else ""
    raise flags.IllegalFlagValueError(
        f"unknown config key {key!r} in {culprit}: the config is locked; check the spelling "
        f"against configs/captioner.py. {hint}".strip()) from error


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/captioner.py")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required: a directory for checkpoints and metrics")
  from vbert_jax.captioning import task  # pylint: disable=g-import-not-at-top
  result = task.train_captioner(_CONFIG.value, _WORKDIR.value)
  logging.info("%s at step %d", "preempted" if result.preempted else "finished", result.step)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
