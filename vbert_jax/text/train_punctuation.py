"""Trains the punctuation restorer (vbert_jax.text.punctuation) on any punctuated text.

  python -m vbert_jax.text.train_punctuation --text=prose.txt [--text=more.txt ...] \
      --out=punctuation.msgpack [--steps=3000] [--batch_size=32] [--learning_rate=3e-3] \
      [--hidden=256] [--members=3]

Each non-empty line of a text file is a document (a paragraph, an article or a transcript of
human captions). Documents are split into training and validation by a hash of their text, so
the split does not depend on file order. Each of the model's `--members` taggers reads its own
random windows of the training words, with their marks removed and lowercased as ASR writes
them; every `--eval_every` steps the validation sentence-boundary F1 of their average is
printed, and the parameters of the best evaluation are kept. The boundary threshold is then
chosen on the validation text and stored in the model file.
"""

from __future__ import annotations

import collections
import dataclasses
import sys
import time
import types
import zlib
from typing import Iterable, Sequence

from absl import flags
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from vbert_jax import cli
from vbert_jax import console
from vbert_jax.text import punctuation as punct

# Sentence ends are about one word in twenty: weighing them up keeps the tagger from settling on
# "no mark" for uncertain words.
_CLASS_WEIGHTS = (1.0, 1.0, 2.0, 2.0)
# Calibrated boundary probabilities sit near the rate of sentence ends (about 0.05): the grid
# reaches well below 0.1.
_THRESHOLDS = np.round(np.concatenate([np.arange(0.02, 0.1, 0.02), np.arange(0.1, 0.91, 0.05)]),
                       2)


@dataclasses.dataclass
class Tagged:
  """Words as the model sees them and the class of the mark after each."""
  forms: list[str]
  labels: np.ndarray  # int32 [n]


def tag(document: str) -> Tagged:
  tokens = document.split()
  return Tagged([punct.word_form(t) for t in tokens],
                np.array([punct.mark_class(t) for t in tokens], np.int32))


def read_documents(paths: Iterable[str]) -> list[str]:
  docs = []
  for path in paths:
    path = epath.Path(path)
    try:
      text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
      raise ValueError(f"{path}: cannot be read as UTF-8 text ({e})") from e
    docs.extend(line.strip() for line in text.splitlines() if line.strip())
  return docs


def split_documents(docs: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
  """(train, validation) by a hash of each document's text."""
  if not 0 < val_fraction < 1:
    raise ValueError(f"val_fraction={val_fraction}: expected a value in (0, 1)")
  val = [d for d in docs if zlib.crc32(d.encode("utf-8")) % 1000 < val_fraction * 1000]
  train = [d for d in docs if zlib.crc32(d.encode("utf-8")) % 1000 >= val_fraction * 1000]
  return train, val


def boundary_f1(predicted: np.ndarray, labels: np.ndarray) -> float:
  """F1 of sentence ends (full stop or question mark) after words."""
  gold = labels >= punct.PERIOD
  hits = int(np.sum(predicted & gold))
  total = int(predicted.sum() + gold.sum())
  return 2 * hits / total if total else 1.0


def build_vocabulary(docs: Sequence[Tagged], size: int, min_count: int) -> list[str]:
  counts = collections.Counter(f for d in docs for f in d.forms)
  kept = [w for w, c in counts.most_common(size) if c >= min_count]
  return ["<pad>", "<unk>"] + kept


@dataclasses.dataclass
class TrainConfig:
  steps: int = 3000
  batch_size: int = 32
  learning_rate: float = 3e-3
  warmup_steps: int = 100
  eval_every: int = 250
  vocab_size: int = 20000
  min_count: int = 2
  val_fraction: float = 0.1
  seed: int = 0
  # Share of training words shown as unknown, so that the tagger learns to place marks around
  # words it has not seen from their endings and neighbours (and memorises fewer rare words).
  word_dropout: float = 0.3
  # The auxiliary language model (see `punct.BiLSTMTagger`): the words it predicts by name, and
  # the weight of its loss beside the marks'.
  lm_vocab: int = 2000
  lm_weight: float = 0.3
  model: punct.ModelConfig = dataclasses.field(default_factory=punct.ModelConfig)


def lm_targets(ids: np.ndarray, lm_vocab: int) -> np.ndarray:
  """The language model's class of each word id: the `lm_vocab` most frequent words (ids 2 to
  lm_vocab + 1 of a word list sorted by count) by name, every other word (unknown included)
  as class `lm_vocab`."""
  first = punct.UNK + 1
  return np.where((ids >= first) & (ids < lm_vocab + first), ids - first,
                  lm_vocab).astype(np.int32)


def _lm_loss(lm_logits, targets: jax.Array) -> jax.Array:
  """Mean cross-entropy of the next word from each forward state and of the previous word from
  each backward state (the transcript's ends predict nothing)."""
  ahead, behind = lm_logits
  loss = (optax.softmax_cross_entropy_with_integer_labels(ahead[:, :-1], targets[:, 1:]).mean()
          + optax.softmax_cross_entropy_with_integer_labels(behind[:, 1:], targets[:, :-1])
          .mean())
  return loss / 2


def _train_step(module, optimizer, config: TrainConfig):
  """One step of every member, each on its own windows ([members, batch, WINDOW]) with its own
  masks and optimizer state: the members train as separate runs would."""
  weights = jnp.asarray(_CLASS_WEIGHTS)

  def member_step(params, opt_state, words, affixes, labels, targets, key):
    hide_key, dropout_key = jax.random.split(key)
    hidden = (jax.random.bernoulli(hide_key, config.word_dropout, words.shape)
              & (words != punct.PAD))
    words = jnp.where(hidden, punct.UNK, words)

    def loss_fn(p):
      out = module.apply({"params": p}, words, affixes, train=True,
                         rngs={"dropout": dropout_key})
      logits, lm = out if module.lm_vocab else (out, None)
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      w = weights[labels]
      loss = jnp.sum(losses * w) / jnp.sum(w)
      return loss if lm is None else loss + config.lm_weight * _lm_loss(lm, targets)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def step(params, opt_state, words, affixes, labels, targets, key):
    keys = jax.random.split(key, module.config.members)
    params, opt_state, loss = jax.vmap(member_step)(params, opt_state, words, affixes, labels,
                                                    targets, keys)
    return params, opt_state, jnp.mean(loss)

  return step


def _evaluate(model: punct.Punctuator, val: Sequence[Tagged]) -> tuple[float, np.ndarray]:
  """(F1 at the model's threshold, [n, 2] boundary probability and gold) over the documents."""
  probs = [model.probabilities(d.forms) for d in val]
  score = np.concatenate([punct.sentence_end(p) for p in probs])
  labels = np.concatenate([d.labels for d in val])
  return boundary_f1(score > model.boundary_threshold, labels), np.stack([score, labels], 1)


def choose_threshold(scored: np.ndarray) -> tuple[float, float]:
  """(threshold, F1) with the best validation F1."""
  f1s = [boundary_f1(scored[:, 0] > t, scored[:, 1].astype(np.int32)) for t in _THRESHOLDS]
  best = int(np.argmax(f1s))
  return float(_THRESHOLDS[best]), float(f1s[best])


def train(docs: Sequence[str], config: TrainConfig = TrainConfig(),
          progress: bool = True) -> tuple[punct.Punctuator, dict]:
  """A model trained on `docs` and a report of what it did (validation F1, threshold, sizes)."""
  if config.steps < 1 or config.batch_size < 1 or config.eval_every < 1:
    raise ValueError(f"steps={config.steps}, batch_size={config.batch_size} and eval_every="
                     f"{config.eval_every} must be positive")
  if config.lm_vocab < 0 or config.lm_weight < 0:
    raise ValueError(f"lm_vocab={config.lm_vocab} and lm_weight={config.lm_weight} must not be "
                     "negative")
  train_docs, val_docs = split_documents(docs, config.val_fraction)
  if not train_docs or not val_docs:
    raise ValueError(f"{len(docs)} documents give {len(train_docs)} for training and "
                     f"{len(val_docs)} for validation; both need at least one (give more lines)")
  train_tagged, val_tagged = [tag(d) for d in train_docs], [tag(d) for d in val_docs]
  words = build_vocabulary(train_tagged, config.vocab_size, config.min_count)
  model = punct.Punctuator(words, config.model, params={})
  ids, affixes = model.encode([f for d in train_tagged for f in d.forms])
  labels = np.concatenate([d.labels for d in train_tagged])
  if len(ids) < punct.WINDOW:
    raise ValueError(f"{len(ids)} training words: expected at least one window of "
                     f"{punct.WINDOW}")
  if int(np.sum(labels >= punct.PERIOD)) == 0:
    raise ValueError("the training text has no sentence-final marks (. ! ?): it is not "
                     "punctuated text")
  key = jax.random.key(config.seed)
  trained = punct.BiLSTMTagger(len(words), config.model, lm_vocab=config.lm_vocab)
  model.params = punct.init_params(trained, key)
  targets = lm_targets(ids, config.lm_vocab)
  schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate,
                                                min(config.warmup_steps, config.steps // 2),
                                                config.steps)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule))
  opt_state = jax.vmap(optimizer.init)(model.params)
  step = _train_step(trained, optimizer, config)
  rng = np.random.default_rng(config.seed)
  best = (-1.0, model.params, 0)
  bar = tqdm.tqdm(total=config.steps, unit="step", desc="punctuation", disable=not progress,
                  file=sys.stderr)
  t0 = time.time()
  for i in range(1, config.steps + 1):
    starts = rng.integers(0, len(ids) - punct.WINDOW + 1,
                          (config.model.members, config.batch_size))
    window = starts[..., None] + np.arange(punct.WINDOW)
    model.params, opt_state, loss = step(model.params, opt_state, ids[window], affixes[window],
                                         labels[window], targets[window],
                                         jax.random.fold_in(key, i))
    bar.update(1)
    if i % config.eval_every == 0 or i == config.steps:
      f1, _ = _evaluate(model, val_tagged)
      bar.write(f"step {i}/{config.steps}: loss {float(loss):.4f}, validation boundary F1 "
                f"{f1:.3f} ({time.time() - t0:.0f} s)", file=sys.stderr)
      if f1 > best[0]:
        best = (f1, model.params, i)
  bar.close()
  model.params = best[1]
  _, scored = _evaluate(model, val_tagged)
  model.boundary_threshold, val_f1 = choose_threshold(scored)
  report = {"train_documents": len(train_docs), "validation_documents": len(val_docs),
            "train_words": int(len(ids)), "vocabulary": len(words), "best_step": best[2],
            "boundary_threshold": model.boundary_threshold, "validation_f1": val_f1,
            "seconds": time.time() - t0}
  return model, report


# ------------------------------------------------------------------------------------- the CLI


def define_flags(fv: flags.FlagValues) -> None:
  d = TrainConfig()
  flags.DEFINE_multi_string("text", None, "punctuated text file(s), one document per line; "
                            "may be repeated", flag_values=fv)
  flags.DEFINE_string("out", None, "the model file to write", flag_values=fv)
  flags.DEFINE_integer("steps", d.steps, "training steps", flag_values=fv)
  flags.DEFINE_integer("batch_size", d.batch_size, "windows per step", flag_values=fv)
  flags.DEFINE_float("learning_rate", d.learning_rate, "peak learning rate", flag_values=fv)
  flags.DEFINE_integer("eval_every", d.eval_every, "steps between validation F1 reports",
                       flag_values=fv)
  flags.DEFINE_integer("vocab_size", d.vocab_size, "most frequent words kept", flag_values=fv)
  flags.DEFINE_integer("min_count", d.min_count, "fewest occurrences of a kept word",
                       flag_values=fv)
  flags.DEFINE_float("val_fraction", d.val_fraction, "share of documents held out for "
                     "validation", flag_values=fv)
  flags.DEFINE_integer("seed", d.seed, "seed of the initialisation and of the windows",
                       flag_values=fv)
  flags.DEFINE_integer("members", d.model.members, "taggers trained side by side whose "
                       "probabilities the model averages", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("hidden", d.model.hidden, "LSTM units per direction", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_integer("lm_vocab", d.lm_vocab, "words that the auxiliary language model "
                       "predicts by name; 0 trains without it", lower_bound=0, flag_values=fv)
  flags.DEFINE_float("lm_weight", d.lm_weight, "weight of the language model's loss",
                     lower_bound=0.0, flag_values=fv)
  flags.DEFINE_bool("no_progress", False, "no progress bar", flag_values=fv)
  flags.mark_flag_as_required("text", flag_values=fv)
  flags.mark_flag_as_required("out", flag_values=fv)


def parse_args(argv: Sequence[str] | None = None) -> types.SimpleNamespace:
  return cli.parse(define_flags, argv, __doc__)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  console.setup()
  config = TrainConfig(steps=args.steps, batch_size=args.batch_size,
                       learning_rate=args.learning_rate, eval_every=args.eval_every,
                       vocab_size=args.vocab_size, min_count=args.min_count,
                       val_fraction=args.val_fraction, seed=args.seed,
                       lm_vocab=args.lm_vocab, lm_weight=args.lm_weight,
                       model=punct.ModelConfig(hidden=args.hidden, members=args.members))
  try:
    model, report = train(read_documents(args.text), config, progress=not args.no_progress)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  model.save(args.out)
  print(f"wrote {args.out}: {report['vocabulary']} words, {report['train_words']} training "
        f"words in {report['train_documents']} documents; validation boundary F1 "
        f"{report['validation_f1']:.3f} at threshold {report['boundary_threshold']:.2f} "
        f"({report['validation_documents']} documents, best step {report['best_step']}) in "
        f"{report['seconds']:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
