"""Zero-shot classification throughput: batched queries against the same queries one at a time.

A `tiny` VideoBERT (2 layers, hidden 128) with random weights, BERT's text vocabulary size
(30522) and the paper's visual vocabulary size (20736), max_len 64. Each query is one segment's
visual tokens (8 to 24 of them: YouCook II segments last about 20 s, some 13 clips of 1.5 s)
with the zero-shot template, scored against the demo world's 10 verbs and 10 nouns. The weights
do not matter for speed, only the shapes.

Contenders, alternating rounds in one process, on the same queries:
  batched      zero_shot.classify over all queries, 64 prompts per jitted forward pass
  one_by_one   zero_shot.classify called once per query (a forward pass of one prompt each)

Reported: queries/s of the batched path, and ratio = batched / one_by_one queries per second
(wall clock; the table also gives CPU time, steadier when other processes share the machine).
Times are medians of the rounds.

Where the ratio comes from on a CPU: the batched path runs at about the machine's matmul peak
(XLA counts 2.9 GFLOP per batch of 64 prompts of 32 tokens, a third of it the MLM head's
normaliser over 30592 text rows), while a single prompt is bound by reading those 30592 x 128
rows of the embedding table (and, in model.py's head, by a copy of that slice of the table at
every call). The batched path builds its prompts as arrays (`Layout.stack_with_text`), cuts each
batch to its longest prompt rounded up to one of a few widths, and dispatches a batch before
reading the previous one, so that building prompts overlaps the forward passes.

The default 1024 queries (16 batches) stand for an evaluation set (YouCook II's validation split
has some 3,500 segments): with 256 (4 batches) the first batch's prompt building and the last
one's read, which nothing overlaps, weigh a quarter more, and the ratio was 9.2-10.15.

    python bench/tasks.py             # about a minute on 2 cores
    python bench/tasks.py --queries 128 --rounds 2
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

from vbert_jax import cli  # noqa: E402
from vbert_jax.demo.world import words as demo_words  # noqa: E402
from vbert_jax import model as model_lib  # noqa: E402
from vbert_jax import pretrain as pretrain_lib  # noqa: E402
from vbert_jax.tasks import bundle as bundle_lib  # noqa: E402
from vbert_jax.tasks import zero_shot  # noqa: E402
from vbert_jax.text import tokenizers  # noqa: E402

TEXT_VOCAB = 30522
SPECIALS = ("[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def make_bundle(folder: str, max_len: int) -> bundle_lib.Bundle:
  words = ["now", "let", "me", "show", "you", "how", "to", "the", "."]
  words += list(demo_words.VERBS) + list(demo_words.NOUNS)
  filler = [f"w{i}" for i in range(TEXT_VOCAB - len(SPECIALS) - len(words))]
  path = os.path.join(folder, "vocab.txt")
  with open(path, "w") as f:
    f.write("\n".join(SPECIALS + tuple(words) + tuple(filler)) + "\n")
  config = common.pretrain_configs().get_config("variant=tiny")
  with config.unlocked():
    config.model.text_vocab_size = TEXT_VOCAB
    config.model.special_ids = "0,2,3,4,5,1"
    config.max_len = max_len
    config.text.vocab = path
  params = model_lib.init_params(pretrain_lib.model_config(config), jax.random.key(0))
  return bundle_lib.Bundle.from_parts(config, params, tokenizers.load_tokenizer(config))


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_integer("queries", 1024, "zero-shot queries, one segment each", flag_values=fv)
  flags.DEFINE_integer("rounds", 3, "alternating rounds", flag_values=fv)
  flags.DEFINE_integer("batch_size", 64, "prompts per jitted forward pass of the batched path",
                       flag_values=fv)
  flags.DEFINE_integer("max_len", 64, "the model's sequence length", flag_values=fv)
  flags.DEFINE_integer("min_tokens", 8, "fewest visual tokens of a query", flag_values=fv)
  flags.DEFINE_integer("max_tokens", 24, "most visual tokens of a query", flag_values=fv)


def parse_args(argv=None):
  return cli.parse(define_flags, argv, __doc__)


def main() -> None:
  args = parse_args()
  with tempfile.TemporaryDirectory() as folder:
    bundle = make_bundle(folder, args.max_len)
  rng = np.random.default_rng(0)
  queries = [rng.integers(0, 20736, rng.integers(args.min_tokens, args.max_tokens + 1))
             for _ in range(args.queries)]
  labels = dict(verbs=demo_words.VERBS, nouns=demo_words.NOUNS)

  def batched():
    return zero_shot.classify(bundle, queries, batch_size=args.batch_size, **labels)

  def one_by_one():
    return [zero_shot.classify(bundle, [q], **labels)[0] for q in queries]

  # Compile both shapes, and check that the two paths agree.
  a, b = batched(), one_by_one()
  assert [x.verbs for x in a] == [x.verbs for x in b], "batched and single answers differ"
  contenders = {"batched": (batched, lambda x: x), "one_by_one": (one_by_one, lambda x: x)}
  times = common.alternate(contenders, args.rounds, 1)
  med = {name: common.median(t) for name, t in times.items()}
  rows = [(name, f"{m.wall:.3f}", f"{m.cpu:.3f}", f"{args.queries / m.wall:.0f}")
          for name, m in med.items()]
  print(common.table(rows, ("contender", "wall s", "cpu s", "queries/s")))
  qps = args.queries / med["batched"].wall
  ratio = med["one_by_one"].wall / med["batched"].wall
  print(f"{args.queries} queries, tiny model, max_len {args.max_len}, "
        f"{len(demo_words.VERBS)} verbs x {len(demo_words.NOUNS)} nouns, "
        f"batch {args.batch_size}; {jax.default_backend()}")
  print(common.bench_line("tasks", queries_per_s=qps, ratio=ratio))


if __name__ == "__main__":
  main()
