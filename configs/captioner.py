r"""The captioner (encoder-decoder on VideoBERT's caption features), trained by the generic trainer.

Commands:

    python -m vbert_jax.captioning.train --config=configs/captioner.py --workdir=DIR \
        --config.input.pairs=train_pairs.npz --config.text.vocab=vocab.txt
    python -m vbert_jax.captioning.train --config=configs/captioner.py:variant=tiny,runlocal ...

Expected results. No run at these defaults (`base`, 20k steps) is recorded; the paper's own
captioner reached BLEU-4 4.33 and CIDEr 0.55 on YouCook II.
`variant=tiny,runlocal` is what `make demo` trains, with its `captioning` keys (400 steps at 1e-3,
greedy decoding): on the generated world's held-out annotations, BLEU-4 0.507 and CIDEr 4.563
against 0.101 / 0.895 for the most frequent caption (this project's 2-core Intel Xeon (Emerald
Rapids), 2026-12-06; docs/demo.md). tests/test_captioner.py trains runlocal at hidden size 64 on
16 random captions for 60 steps: the loss falls below a quarter of its first value, and greedy
decoding gives back at least 12 of the 16 captions.

Arguments (comma-separated): `variant=` tiny|small|base (sizes below), `runlocal` (a short run that
fits a laptop CPU). Any field can be overridden with `--config.key=value`; the config is locked.

The paper gives no sizes or schedule for its captioner; these defaults are an ordinary small
transformer recipe (Adam with warmup and linear decay, dropout 0.1). `model.feature_dim` and
`model.max_feature_len` of 0 are read from the pairs file when training starts and recorded in the
run's config.json, where evaluation reads them back.
"""

from __future__ import annotations

import ml_collections

from vbert_jax import config_lib

# The pretraining config that this one builds on, read by path beside this file.
pretrain = config_lib.sibling(__file__, "pretrain.py")


# The paper gives no sizes; `base` has Transformer-base's width, 4 layers a side.
VARIANTS = {
    "tiny": dict(hidden_size=128, num_encoder_layers=2, num_decoder_layers=2, num_heads=4,
                 mlp_dim=512),
    "small": dict(hidden_size=256, num_encoder_layers=2, num_decoder_layers=2, num_heads=4,
                  mlp_dim=1024),
    "base": dict(hidden_size=512, num_encoder_layers=4, num_decoder_layers=4, num_heads=8,
                 mlp_dim=2048),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = config_lib.parse_arg(arg, variant="base", runlocal=False)
  if arg.variant not in VARIANTS:
    raise ValueError(f"captioner variant {arg.variant!r}: expected one of {sorted(VARIANTS)}")
  c = ml_collections.ConfigDict()
  c.variant = arg.variant
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(
      **VARIANTS[arg.variant], dropout_rate=0.1, dtype="float32", param_dtype="float32",
      feature_dim=0,  # 0: from the pairs file
      max_feature_len=0))  # feature vectors per example; 0: from the pairs file
  # A caption is one sentence: 32 pieces hold it.
  c.max_caption_len = 32  # decoder positions, [BOS] included

  # The caption tokenizer (vbert_jax.text.tokenizers.load_tokenizer): use the VideoBERT run's
  # (its config.json's `text` section) so captions and prompts share one vocabulary.
  c.text = ml_collections.ConfigDict(dict(tokenizer="wordpiece", vocab="", lowercase="auto"))
  # Pairs files (see vbert_jax/captioning/training.py); eval_pairs is optional.
  c.input = ml_collections.ConfigDict(dict(pairs="", eval_pairs=""))

  # An ordinary small-transformer recipe (the paper gives none): Adam with a 1k-step warmup and
  # linear decay to 0, Adam's default eps, weight decay 0.01, clipping at 1.
  c.batch_size = 64
  c.total_steps = 20_000
  c.grad_accum_steps = 1
  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=1e-4, end_learning_rate=0.0, warmup_steps=1_000,
      b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, grad_clip_norm=1.0))

  # Data parallel over every device, as pretraining; the same logical axes, so the same rules.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.sharding_rules = pretrain.DEFAULT_RULES

  # Held-out loss (with input.eval_pairs) and checkpoints every 5% of the run.
  c.eval = ml_collections.ConfigDict(dict(every_steps=1_000, num_batches=8, batch_size=64))
  c.log_every_steps = 100
  # Reads that fail for a reason a retry may clear are tried again, as in configs/pretrain.py.
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1_000, keep=3, restore_retries=3,
                                                restore_backoff_s=2.0))
  c.checkpoint["async"] = True
  # The trainer's initial-checkpoint keys: `checkpoint` is a directory of exported captioner
  # parameters to start from; the other two belong to VideoBERT and stay empty here.
  c.init = ml_collections.ConfigDict(dict(checkpoint="", bert_dir="", visual_vocab=""))
  # Decoding at evaluation (vbert_jax.captioning.evaluate): beam_size 1 is greedy. A beam of 4,
  # up to max_caption_len - 1 pieces (max_len 0), scored by plain log-probability (no penalty).
  c.decode = ml_collections.ConfigDict(dict(beam_size=4, max_len=0, length_penalty=0.0,
                                            batch_size=64))
  # As in configs/pretrain.py: a rerun skips compiling; no profile; peak FLOP/s from the device.
  c.compilation_cache_dir = "~/.cache/vbert_jax/xla"
  c.profile = ml_collections.ConfigDict(dict(start_step=0, num_steps=0))
  c.prefetch_batches = 2
  c.peak_flops_per_device = 0.0

  if arg.runlocal:
    _shrink(c)
  c.lock()
  return c


def _shrink(c: ml_collections.ConfigDict) -> None:
  """A run of a few hundred steps that learns a small pairs file on two CPU cores."""
  # The smallest model, without dropout: a small pairs file is to be learned, fast.
  c.model.update(VARIANTS["tiny"])
  c.model.dropout_rate = 0.0
  # Short captions, as generated ones are.
  c.max_caption_len = 16
  # To learn in 300 steps: a high learning rate, a 20-step warmup and no weight decay.
  c.batch_size = 32
  c.total_steps = 300
  c.optimizer.learning_rate = 2e-3
  c.optimizer.warmup_steps = 20
  c.optimizer.weight_decay = 0.0
  # Three evaluations and checkpoints; small evaluation batches, for a small pairs file.
  c.eval.every_steps = 100
  c.eval.num_batches = 2
  c.eval.batch_size = 32
  c.log_every_steps = 25
  c.checkpoint.every_steps = 100
  c.decode.batch_size = 32
