"""Input pipeline throughput: packed examples/s at max_len 128, against what a TPU host needs.

Ours: `vbert_jax.input_pipeline` over records shaped like real ones (1-4 minute videos, ASR
sentences with silent stretches, 5% of videos without ASR), held in memory, with the paper's
recipe on: regimes text / video / video-text at 1:1:1, half the video-text examples LVA
negatives, concatenation of 1-3 neighbouring sentences, subsampling rates 1-5, 15% masking with
20 slots per modality. Measured with two grain worker processes (this machine has 2 cores) and,
for reference, in the iterating process alone; rounds alternate so that load from other work
hits both alike (each round first drains what the workers prefetched meanwhile), and medians
are reported, with the in-process examples per CPU-second, which load disturbs less.

The peer is the consumption of the `base` model on one v5e-8 host (8 chips) at 40% MFU:

    needs/s = chips * peak_bf16 * MFU / FLOPs per training example,

with FLOPs per example from `vbert_jax.flops.flops_per_step` (encoder 6N + attention per token
over 128 tokens, plus the MLM / MVM / LVA heads at the prediction slots our batches actually
fill) and the v5e peak from `vbert_jax.flops.PEAK_BF16_FLOPS`. ratio = ours / needs.
"""

from __future__ import annotations

import os
import sys
import time

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (bench/common.py)

sys.path.insert(0, common.REPO)
# Only absl: nothing here imports jax or torch before common.setup() has set their threads.
from vbert_jax import cli  # noqa: E402


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_integer("videos", 1000, "generated videos the pipeline reads", flag_values=fv)
  flags.DEFINE_integer("batch", 128, "examples per batch", flag_values=fv)
  flags.DEFINE_integer("batches", 16, "batches per round", flag_values=fv)
  flags.DEFINE_integer("rounds", 3, "alternating rounds", flag_values=fv)
  flags.DEFINE_integer("workers", 2, "grain worker processes", flag_values=fv)
  flags.DEFINE_integer("drain", 24, "batches taken untimed before each round of the worker "
                       "pipeline", flag_values=fv)
  flags.DEFINE_float("mfu", 0.4, "model FLOPs utilisation of the v5e host", flag_values=fv)
  flags.DEFINE_integer("chips", 8, "chips per v5e host", flag_values=fv)


def parse_args(argv=None):
  return cli.parse(define_flags, argv, __doc__)


def main() -> None:
  args = parse_args()
  common.setup(threads=1)

  import numpy as np  # pylint: disable=g-import-not-at-top
  pretrain = common.pretrain_configs()
  from vbert_jax import flops  # pylint: disable=g-import-not-at-top
  from vbert_jax import input_pipeline as ip  # pylint: disable=g-import-not-at-top
  from vbert_jax import model  # pylint: disable=g-import-not-at-top
  from vbert_jax import synthetic  # pylint: disable=g-import-not-at-top

  config = pretrain.get_config("variant=base")
  with config.unlocked():
    config.max_len = 128
    config.input.pack_examples = 1  # examples/s of the example maker; packing is bench/packing
    config.masking.max_predictions_text = config.masking.max_predictions_video = 20
  vocab = ip.PipelineConfig.from_config(config, batch_size=1).vocab
  t0 = time.perf_counter()
  records = synthetic.random_records(args.videos, vocab, seed=0, no_asr_rate=0.05)
  print(f"{len(records)} records in {time.perf_counter() - t0:.1f} s; "
        f"{np.mean([len(r['clip_tokens']) for r in records]):.0f} clips and "
        f"{np.mean([len(r['text_lengths']) for r in records]):.0f} sentences per video")

  pipelines = {}
  for name, workers in (("workers", args.workers), ("in_process", 0)):
    t0 = time.perf_counter()
    p = ip.make_pipeline(config, records, batch_size=args.batch,
                         worker_count=workers, worker_buffer_size=4,
                         examples_per_video=8)
    next(p)
    print(f"{name}: first batch after {time.perf_counter() - t0:.1f} s")
    pipelines[name] = p

  # Worker processes fill their buffers while the other pipeline is timed: each round first
  # drains them (more batches than they can hold), then times batches made while we wait.
  drain = {"workers": args.drain, "in_process": 1}
  times = {n: [] for n in pipelines}
  last = {}
  for _ in range(args.rounds):
    for name, p in pipelines.items():
      for _ in range(drain[name]):
        next(p)
      times[name].append(common.time_steps(lambda p=p: next(p), lambda b: b, args.batches))
      last[name] = next(p)
  rate = {n: args.batch / common.median(t).wall for n, t in times.items()}
  cpu_rate = args.batch / common.median(times["in_process"]).cpu
  for p in pipelines.values():
    p.close()

  batch = last["workers"]
  mlm_slots = float(batch["mlm_weights"].sum()) / args.batch
  mvm_slots = float(batch["mvm_weights"].sum()) / args.batch
  cfg = model.VideoBERTConfig.from_variant("base")
  per_example = flops.flops_per_step(cfg, 1, config.max_len, mlm_slots, mvm_slots).total
  peak = flops.PEAK_BF16_FLOPS["tpu v5e"]
  needs = args.chips * peak * args.mfu / per_example
  print(common.table(
      [(n, f"{rate[n]:.0f}", f"{common.median(times[n]).cpu * 1e3:.1f}") for n in rate],
      ("pipeline", "examples/s (wall, median)", "main-process CPU ms/batch")))
  print(f"base at max_len {config.max_len}: {per_example / 1e9:.1f} GFLOP per training example "
        f"({mlm_slots:.1f} MLM, {mvm_slots:.1f} MVM slots filled); v5e-8 host = {args.chips} x "
        f"{peak / 1e12:.0f} TFLOP/s x {args.mfu:.0%} MFU -> {needs:.0f} examples/s")
  print(f"in-process examples per CPU-second: {cpu_rate:.0f} (steadier than wall clock under "
        f"load); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (shared machine)")
  print(common.bench_line("input_pipeline", examples_per_s=round(rate["workers"]),
                          in_process_per_s=round(rate["in_process"]),
                          in_process_per_cpu_s=round(cpu_rate),
                          v5e_host_needs_per_s=round(needs),
                          ratio=rate["workers"] / needs))


if __name__ == "__main__":
  main()
