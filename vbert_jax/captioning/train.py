r"""Trains the captioner (an encoder-decoder on VideoBERT's caption features) on a pairs file.

    python -m vbert_jax.captioning.train --config=configs/captioner.py --workdir=runs/captioner \
        --config.input.pairs=train_pairs.npz --config.text.vocab=vocab.txt

A pairs file is an .npz of caption features and captions, one row per caption (see
vbert_jax/captioning/training.py; `vbert_jax.captioning.features.make_pairs` writes one from a trained
VideoBERT). The text tokenizer (`--config.text.*`) should be the VideoBERT run's. Checkpoints,
metrics (metrics.jsonl, TensorBoard) and the resolved config go to --workdir; a run resumes by
itself from the newest checkpoint there. Evaluate with `python -m vbert_jax.captioning.evaluate`.
Add `--config.input.eval_pairs=PATH.npz` for a held-out loss during training, and
`configs/captioner.py:variant=tiny,runlocal` for a short run on a laptop.
"""

from __future__ import annotations

from absl import app
from absl import logging

from vbert_jax import console
from vbert_jax import entry
from vbert_jax.captioning import training


def main(argv: list[str]) -> None:
  console.setup()
  config, workdir = entry.check_args(argv, "configs/captioner.py")
  entry.initialize_distributed()
  result = training.train_captioner(config, workdir)
  logging.info("%s at step %d", "preempted" if result.preempted else "finished", result.step)


if __name__ == "__main__":
  app.run(main, flags_parser=entry.parse_flags)
