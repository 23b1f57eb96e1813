"""Packing benchmark: real (non-padding) tokens per second of the trainer's own step.

The examples come from the production input pipeline (`vbert_jax.input_pipeline`) over records
shaped like real ones (`synthetic.random_records`: 1-4 minute videos, ASR sentences of 4-20
tokens, silent stretches), with the paper's recipe (regimes 1:1:1, 1-3 sentences, subsampling
1-5, half the video-text examples negatives, 15% masking). Their lengths are measured first
(`vbert_jax.lengths`). Three ways to lay them out, each trained by `vbert_jax.train.Trainer`'s
jitted step (the `small` model, dropout 0.1, AdamW with clipping and the weight-decay mask, the
sharding constraints), with about the same number of tokens per step:

  packed     rows of --packed_len tokens holding up to --pack_examples examples each;
  p99        one example per row, rows as long as the 99th percentile of the lengths (longer
             examples cut);
  padded512  one example per row of 512 tokens (the paper's config before packing).

Every example may fill up to 10 prediction slots per modality (15% of 64 tokens), in every
layout. Batches are made before timing; the rounds alternate between the layouts, and medians
are reported.

    BENCH packing: packed_real_tokens_per_s=... p99_real_tokens_per_s=...
        padded512_real_tokens_per_s=... pad_fraction=... ratio=...

`ratio` is packed over p99; `pad_fraction` is the packed rows' padding.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402

common.setup(threads=2)

from absl import flags  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from vbert_jax import cli  # noqa: E402
from vbert_jax import input_pipeline as ip  # noqa: E402
from vbert_jax import lengths as lengths_lib  # noqa: E402
from vbert_jax import pretrain as pretrain_lib  # noqa: E402
from vbert_jax import synthetic  # noqa: E402
from vbert_jax import train  # noqa: E402

SLOTS = 10


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("variant", "small", "model variant", flag_values=fv)
  flags.DEFINE_integer("videos", 400, "generated videos", flag_values=fv)
  flags.DEFINE_integer("tokens", 2048, "tokens per step (rows x row length)", flag_values=fv)
  flags.DEFINE_integer("packed_len", 256, "row length of the packed layout", flag_values=fv)
  flags.DEFINE_integer("pack_examples", 16, "places per packed row", flag_values=fv)
  flags.DEFINE_integer("rounds", 3, "alternating rounds", flag_values=fv)
  flags.DEFINE_integer("steps", 4, "steps per round", flag_values=fv)


def make_config(args, max_len: int, pack_examples: int):
  config = common.pretrain_configs().get_config(f"variant={args.variant}")
  with config.unlocked():
    config.max_len, config.batch_size = max_len, args.tokens // max_len
    config.input.pack_examples, config.input.max_example_len = pack_examples, 0
    config.input.examples_per_video = 8
    config.masking.max_predictions_text = config.masking.max_predictions_video = SLOTS
    config.optimizer.learning_rate, config.optimizer.warmup_steps = 1e-4, 10
    config.total_steps = 1000
    config.compilation_cache_dir = ""
  return config


def contender(config, records, batches: int):
  """(step, sync) over pre-made batches of the pipeline, and those batches' real tokens."""
  pipeline = ip.make_pipeline(config, records, worker_count=0)
  made = [next(pipeline) for _ in range(batches)]
  trainer = train.Trainer(pretrain_lib.make_trainable(config), config)
  state = [trainer.init_state()]
  on_device = [trainer.put_batch(b) for b in made]
  position = [0]

  def step():
    batch = on_device[position[0] % len(on_device)]
    position[0] += 1
    state[0], sums = trainer.train_step(state[0], batch)
    return sums
  jax.block_until_ready(step())  # compile
  real = np.mean([(b["input_mask"] > 0).sum() for b in made])
  return (step, jax.block_until_ready), float(real), made


def main(argv=None) -> None:
  args = cli.parse(define_flags, argv, __doc__)
  probe = make_config(args, 512, 1)
  vocab = ip.PipelineConfig.from_config(probe, batch_size=1).vocab
  records = synthetic.random_records(args.videos, vocab, seed=0, no_asr_rate=0.05)
  stats = _lengths(probe, records)
  p99 = stats.suggest(99)
  print(stats.summary())
  layouts = {"packed": (args.packed_len, args.pack_examples), "p99": (p99, 1),
             "padded512": (512, 1)}
  contenders, real, pads = {}, {}, {}
  for name, (max_len, places) in layouts.items():
    config = make_config(args, max_len, places)
    contenders[name], real[name], made = contender(config, records, 2 * args.steps)
    pads[name] = 1 - np.mean([(b["input_mask"] > 0).mean() for b in made])
    print(f"{name}: {config.batch_size} rows x {max_len} tokens, {places} example(s) a row; "
          f"{real[name]:.0f} real tokens a step, padding {pads[name]:.1%}")
  times = common.alternate(contenders, args.rounds, args.steps)
  rate = {n: real[n] / common.median(t).wall for n, t in times.items()}
  cpu_rate = {n: real[n] / common.median(t).cpu for n, t in times.items()}
  print(common.table(
      [(n, f"{common.median(times[n]).wall * 1e3:.0f}", f"{rate[n]:.0f}", f"{cpu_rate[n]:.0f}",
        f"{pads[n]:.1%}") for n in layouts],
      ("layout", "ms/step (median)", "real tokens/s", "real tokens/CPU-s", "padding")))
  print(f"{jax.devices()[0].device_kind}, {os.cpu_count()} cores; model {args.variant}")
  print(common.bench_line("packing", packed_real_tokens_per_s=round(rate["packed"]),
                          p99_real_tokens_per_s=round(rate["p99"]),
                          padded512_real_tokens_per_s=round(rate["padded512"]),
                          pad_fraction=float(pads["packed"]),
                          ratio=rate["packed"] / rate["p99"]))


def _lengths(config, records) -> lengths_lib.LengthStats:
  """The examples' lengths as the pipeline draws them over these records (uncut at 512)."""
  pipeline = ip.make_pipeline(config, records, batch_size=256, max_len=512, pack_examples=1,
                              worker_count=0)
  return lengths_lib.from_batches([next(pipeline) for _ in range(16)], 512)


if __name__ == "__main__":
  main()
