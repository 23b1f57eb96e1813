"""Retrieval throughput: (caption, segment) pairs scored per second, batched against one at a time.

The `tiny` VideoBERT of bench/tasks.py (random weights, BERT's 30522 text tokens, the paper's
20736 visual tokens, max_len 64). Captions of 8 to 20 text tokens and segments of 8 to 24 visual
tokens (YouCook II's captions run about 9 words, its segments some 13 clips of 1.5 s). The
weights do not matter for speed, only the shapes.

Contenders, alternating rounds in one process:
  batched     retrieval.score_matrix: every pair of `--segments` captions and segments,
              `--batch_size` pairs a compiled call (the library's default), rows built on the
              device from index pairs
  one_by_one  retrieval.PairScorer with batch_size=1: the same code, one pair a call, over the
              first `--single_pairs` pairs
  bundle      Bundle.apply on one Layout.pair row at a time (a row of max_len built on the
              host), the way a pair is scored without this module

Reported: pairs/s of each; ratio = batched / one_by_one pairs per second (wall clock; the table
also gives CPU time, steadier when other processes share the machine). Times are medians.

    python bench/retrieval.py             # about a minute on 2 cores
    python bench/retrieval.py --segments 32 --rounds 2
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402

common.setup(threads=2)

from absl import flags  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import tasks as task_bench  # noqa: E402
from vbert_jax import cli  # noqa: E402
from vbert_jax import sequence  # noqa: E402
from vbert_jax.tasks import retrieval  # noqa: E402


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_integer("segments", 64, "captions and segments: segments^2 pairs batched",
                       flag_values=fv)
  flags.DEFINE_integer("single_pairs", 256, "pairs scored one at a time per round",
                       flag_values=fv)
  flags.DEFINE_integer("rounds", 3, "alternating rounds", flag_values=fv)
  flags.DEFINE_integer("batch_size", retrieval.DEFAULT_BATCH, "pairs per call, batched",
                       flag_values=fv)
  flags.DEFINE_integer("max_len", 64, "the model's sequence length", flag_values=fv)


def parse_args(argv=None):
  return cli.parse(define_flags, argv, __doc__)


def main() -> None:
  args = parse_args()
  with tempfile.TemporaryDirectory() as folder:
    bundle = task_bench.make_bundle(folder, args.max_len)
  rng = np.random.default_rng(0)
  n = args.segments
  texts = [rng.integers(6, task_bench.TEXT_VOCAB, rng.integers(8, 21)) for _ in range(n)]
  videos = [rng.integers(0, 20736, rng.integers(8, 25)) for _ in range(n)]
  grid = np.stack(np.meshgrid(np.arange(n), np.arange(n), indexing="ij"), -1).reshape(-1, 2)
  single = grid[:args.single_pairs]

  def batched():
    return retrieval.score_matrix(bundle, texts, videos, batch_size=args.batch_size)

  def one_by_one():
    return retrieval.PairScorer(bundle, texts, videos, batch_size=1)(single)

  def by_bundle():
    return np.array([bundle.apply(sequence.stack([bundle.layout.pair(texts[i], videos[j])]))[
        "lva_logits"].reshape(()) for i, j in single])

  # Compile every shape, and check that the three agree on the pairs they share.
  full, one, rows = batched().reshape(-1)[:len(single)], one_by_one(), by_bundle()
  np.testing.assert_allclose(full, one, rtol=0, atol=1e-4)
  np.testing.assert_allclose(full, rows, rtol=0, atol=1e-4)
  contenders = {"batched": (batched, lambda x: x), "one_by_one": (one_by_one, lambda x: x),
                "bundle": (by_bundle, lambda x: x)}
  times = common.alternate(contenders, args.rounds, 1)
  med = {name: common.median(t) for name, t in times.items()}
  pairs = {"batched": len(grid), "one_by_one": len(single), "bundle": len(single)}
  rate = {name: pairs[name] / m.wall for name, m in med.items()}
  rows = [(name, pairs[name], f"{m.wall:.3f}", f"{m.cpu:.3f}", f"{rate[name]:.0f}")
          for name, m in med.items()]
  print(common.table(rows, ("contender", "pairs", "wall s", "cpu s", "pairs/s")))
  print(f"{n} captions x {n} segments, tiny model, max_len {args.max_len}, batch "
        f"{args.batch_size}; {jax.default_backend()}")
  print(common.bench_line("retrieval", batched_pairs_per_s=rate["batched"],
                          single_pairs_per_s=rate["one_by_one"],
                          bundle_pairs_per_s=rate["bundle"],
                          ratio=rate["batched"] / rate["one_by_one"]))


if __name__ == "__main__":
  main()
