"""Punctuation restoration for ASR: a small BiLSTM that predicts the mark after each word.

Automatic captions come without punctuation and, when they are continuous, without the pauses
that the unpunctuated split of `sentences` cuts at. As in the paper, a punctuation model runs over
such a transcript first; its sentences are then split as for punctuated text, and every word
keeps its time.

Each word is classed by the mark that follows it: none, comma, full stop or question mark (`!`
counts as a full stop, `;` and `:` as commas). The input of a word is its lowercased form without
punctuation (what ASR gives) through a word embedding, plus embeddings of its last three and
its first three letters hashed into buckets, so unseen words still carry their endings and
beginnings. Two bidirectional LSTM layers read windows of `WINDOW` words; at inference windows
overlap by half and each word takes the prediction of the window where it lies most centrally.
Windows are batched in power-of-two counts, so transcripts of any length compile a handful of
times. In training, the first layer also learns to predict the next and the previous word (see
`BiLSTMTagger`).

A model holds `members` such taggers, trained side by side from different initialisations and
dropout, and averages their probabilities: on a few hundred thousand words of training text one
tagger's errors are partly its own, and the average makes fewer. A sentence ends after a word
whose full-stop and question-mark probabilities sum to more than the model's
`boundary_threshold`, which the training command chooses on its validation text.

The model file (msgpack) records its format tag and version, its word list and its settings.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import zlib
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vbert_jax import tagged_msgpack

FORMAT = "vbert_jax.punctuation"
# 2: parameters stacked over ensemble members (version 1 files hold one tagger).
# 3: word beginnings (`prefix_buckets`; version 2 files have none).
FORMAT_VERSION = 3
MARKS = ("", ",", ".", "?")  # class k appends MARKS[k]
NONE, COMMA, PERIOD, QUESTION = range(4)
PAD, UNK = 0, 1
WINDOW = 64
LM_HEADS = ("lm_next", "lm_previous")  # training-only parameters, never in a model file
_MIN_WINDOWS = 8

_SENTENCE_END = re.compile(r"[.!?\u2026\u3002\uff01\uff1f][\"'\u201d\u2019)\]]*$")
_ABBREVIATIONS = frozenset({"mr.", "mrs.", "ms.", "dr.", "st.", "vs.", "etc.", "e.g.", "i.e.",
                            "approx.", "no.", "jr.", "sr.", "prof.", "tbsp.", "tsp.", "oz."})
_STRIP = re.compile(r"[^\w'$%&+#@-]+")
_FINAL = re.compile(r"([.!?\u2026\u3002\uff01\uff1f,;:])[\"'\u201d\u2019)\]]*$")


def ends_sentence(word: str) -> bool:
  """Whether a word of punctuated text ends its sentence (a few abbreviations such as "Dr." do
  not)."""
  return bool(_SENTENCE_END.search(word)) and word.lower() not in _ABBREVIATIONS


def word_form(token: str) -> str:
  """The model's view of a token: lowercase, punctuation removed (apostrophes and a few signs
  that are spoken, such as `%` or `$`, kept), as ASR would write the word."""
  form = _STRIP.sub("", token.lower()).strip("'-")
  return form or token.lower()


def mark_class(token: str) -> int:
  """The class of the punctuation that ends `token` in written text; the full stop of an
  abbreviation ("Dr.") is no mark."""
  match = _FINAL.search(token)
  if not match:
    return NONE
  mark = match.group(1)
  if mark in ",;:":
    return COMMA
  if not ends_sentence(token):
    return NONE
  return QUESTION if mark in "?\uff1f" else PERIOD


def sentence_end(probs: np.ndarray) -> np.ndarray:
  """[n] probability that a sentence ends after each word, from [n, 4] mark probabilities."""
  return probs[:, PERIOD] + probs[:, QUESTION]


def suffix_bucket(form: str, buckets: int) -> int:
  # crc32, not hash(): Python salts str hashes per process, and the buckets must be stable.
  return zlib.crc32(form[-3:].encode("utf-8")) % buckets


def prefix_bucket(form: str, buckets: int) -> int:
  return zlib.crc32(("^" + form[:3]).encode("utf-8")) % buckets


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  embed_dim: int = 128
  # With word beginnings and the language model to learn from, 128 units per direction were the
  # bottleneck on validation prose; 256 take about twice as long to train and to apply.
  hidden: int = 256
  layers: int = 2
  suffix_buckets: int = 4096
  # Beginnings carry what endings do not (un-, re-, numbers, names that share a stem); 0: none.
  prefix_buckets: int = 4096
  # A few hundred thousand words of text is a small corpus for this many parameters.
  dropout: float = 0.5
  # Three taggers' average beat each of them on held-out prose; training costs three times as
  # much, inference (a few small matmuls per word) hardly matters beside the rest of a build.
  members: int = 3


class BiLSTMTagger(nn.Module):
  """[B, T] word ids and [B, T, 2] affix buckets (the word's ending, its beginning) -> [B, T, 4]
  logits of the mark after each word.

  With `lm_vocab` > 0 (training only) it also returns the logits of a language model on the
  first layer: its forward states predict the next word and its backward states the previous
  one, over the `lm_vocab` most frequent words and one class for all others. Whether a sentence
  ends depends on what comes next, and a few hundred thousand words of marks teach little of
  that; every word teaches it to the language model, whose heads are dropped from the model
  file."""
  vocab_size: int
  config: ModelConfig
  lm_vocab: int = 0

  @nn.compact
  def __call__(self, words: jax.Array, affixes: jax.Array, train: bool = False):
    c = self.config
    # Padding (id 0) only ever trails a window; the backward LSTMs start at each row's last word.
    lengths = jnp.sum(words != PAD, axis=-1)
    h = nn.Embed(self.vocab_size, c.embed_dim, name="words")(words)
    h = h + nn.Embed(c.suffix_buckets, c.embed_dim, name="suffixes")(affixes[..., 0])
    if c.prefix_buckets:
      h = h + nn.Embed(c.prefix_buckets, c.embed_dim, name="prefixes")(affixes[..., 1])
    h = nn.Dropout(c.dropout, deterministic=not train)(h)
    lm = None
    for i in range(c.layers):
      h = nn.Bidirectional(nn.RNN(nn.OptimizedLSTMCell(c.hidden)),
                           nn.RNN(nn.OptimizedLSTMCell(c.hidden)),
                           name=f"bilstm_{i}")(h, seq_lengths=lengths)
      h = nn.Dropout(c.dropout, deterministic=not train)(h)
      if i == 0 and self.lm_vocab:
        # The first layer's directions have each seen one side only; the second's have not.
        lm = (nn.Dense(self.lm_vocab + 1, name="lm_next")(h[..., :c.hidden]),
              nn.Dense(self.lm_vocab + 1, name="lm_previous")(h[..., c.hidden:]))
    marks = nn.Dense(len(MARKS), name="marks")(h)
    return (marks, lm) if self.lm_vocab else marks


@functools.partial(jax.jit, static_argnums=0)
def _probabilities(module: BiLSTMTagger, params, words, affixes) -> jax.Array:
  """The members' mean probabilities; `params` are stacked over members."""
  def member(p):
    return jax.nn.softmax(module.apply({"params": p}, words, affixes).astype(jnp.float32))
  return jnp.mean(jax.vmap(member)(params), axis=0)


def init_params(module: BiLSTMTagger, key: jax.Array) -> dict:
  """Parameters of `module.config.members` taggers, stacked on a leading axis."""
  words, affixes = jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 2, 2), jnp.int32)
  keys = jax.random.split(key, module.config.members)
  return jax.vmap(lambda k: module.init(k, words, affixes)["params"])(keys)


@dataclasses.dataclass
class Punctuator:
  """A trained model: its word list (index = id; 0 and 1 are padding and unknown), settings,
  parameters (stacked over members) and the boundary threshold chosen on validation text."""
  words: list[str]
  config: ModelConfig
  params: dict
  boundary_threshold: float = 0.5

  def __post_init__(self):
    self._ids = {w: i for i, w in enumerate(self.words)}
    self.module = BiLSTMTagger(len(self.words), self.config)

  def encode(self, forms: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """([n] word ids, [n, 2] buckets of each word's ending and beginning)."""
    c = self.config
    ids = np.array([self._ids.get(f, UNK) for f in forms], np.int32)
    affixes = np.array([(suffix_bucket(f, c.suffix_buckets),
                         prefix_bucket(f, c.prefix_buckets) if c.prefix_buckets else 0)
                        for f in forms], np.int32).reshape(-1, 2)
    return ids, affixes

  def probabilities(self, forms: Sequence[str]) -> np.ndarray:
    """[len(forms), 4] probabilities of the mark after each word (forms as `word_form` gives)."""
    n = len(forms)
    if n == 0:
      return np.zeros((0, len(MARKS)), np.float32)
    ids, affixes = self.encode(forms)
    starts = window_starts(n, WINDOW)
    count = max(_MIN_WINDOWS, 1 << (len(starts) - 1).bit_length())
    words = np.zeros((count, WINDOW), np.int32)
    window_affixes = np.zeros((count, WINDOW, 2), np.int32)
    for row, start in enumerate(starts):
      piece = slice(start, min(start + WINDOW, n))
      words[row, :piece.stop - start] = ids[piece]
      window_affixes[row, :piece.stop - start] = affixes[piece]
    probs = np.asarray(_probabilities(self.module, self.params, words, window_affixes))
    return _centred(probs, starts, n)

  def restore(self, tokens: Sequence[str]) -> list[str]:
    """`tokens` with the predicted mark appended where they do not already end in one."""
    return self.mark(tokens)[0]

  def mark(self, tokens: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(`restore(tokens)`, [len(tokens)] probability that a sentence ends after each token)."""
    probs = self.probabilities([word_form(t) for t in tokens])
    boundary = sentence_end(probs)
    out = []
    for token, p, end in zip(tokens, probs, boundary > self.boundary_threshold):
      if mark_class(token) != NONE:
        out.append(token)
      elif end:
        out.append(token + MARKS[QUESTION if p[QUESTION] > p[PERIOD] else PERIOD])
      else:
        out.append(token + (MARKS[COMMA] if p[COMMA] > p[NONE] + p[PERIOD] + p[QUESTION]
                            else ""))
    return out, boundary

  def save(self, path) -> None:
    params = {k: v for k, v in self.params.items() if k not in LM_HEADS}
    tagged_msgpack.write(path, FORMAT, FORMAT_VERSION, {
        "words": list(self.words), "config": dataclasses.asdict(self.config),
        "boundary_threshold": float(self.boundary_threshold), "params": params})


def window_starts(n: int, window: int) -> list[int]:
  """Starts of windows that overlap by half and cover [0, n)."""
  step = window // 2
  starts = list(range(0, max(n - window, 0) + 1, step))
  if starts[-1] + window < n:
    starts.append(n - window)
  return starts


def _centred(probs: np.ndarray, starts: Sequence[int], n: int) -> np.ndarray:
  """Per word, the prediction of the window where it sits farthest from an edge (a BiLSTM sees
  least context at a window's ends)."""
  out = np.zeros((n, probs.shape[-1]), np.float32)
  best = np.full(n, -1)
  for row, start in enumerate(starts):
    length = min(WINDOW, n - start)
    pos = np.arange(length)
    margin = np.minimum(pos, length - 1 - pos)
    # A window cut short by the transcript's end has no context to miss past its last word.
    if start + length == n:
      margin = np.where(pos >= length // 2, length, margin)
    if start == 0:
      margin = np.where(pos < length // 2, length, margin)
    take = margin > best[start:start + length]
    out[start:start + length][take] = probs[row, :length][take]
    best[start:start + length] = np.where(take, margin, best[start:start + length])
  return out


def load(path) -> Punctuator:
  """Reads a model file written by `Punctuator.save`; anything else is refused, naming the file."""
  payload, version = tagged_msgpack.read(
      path, FORMAT, FORMAT_VERSION, "punctuation model",
      "train one with `python -m vbert_jax.text.train_punctuation`")
  try:
    config, params = payload["config"], payload["params"]
    if version < 2:  # one tagger, not stacked, and no `members` in its settings
      config = {**config, "members": 1}
      params = jax.tree.map(lambda x: np.asarray(x)[None], params)
    if version < 3:  # no word beginnings
      config = {**config, "prefix_buckets": 0}
    config = ModelConfig(**config)
    model = Punctuator(list(payload["words"]), config, params,
                       float(payload["boundary_threshold"]))
  except (KeyError, TypeError) as e:
    raise ValueError(f"{path}: punctuation model file is incomplete ({e!r})") from e
  _check_shapes(model, path)
  return model


def _check_shapes(model: Punctuator, path) -> None:
  want = jax.eval_shape(lambda: init_params(model.module, jax.random.key(0)))
  want_shapes = jax.tree.map(lambda x: tuple(x.shape), want)
  try:
    got_shapes = jax.tree.map(lambda x: tuple(np.shape(x)), model.params)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{path}: punctuation model parameters unreadable ({e})") from e
  if got_shapes != want_shapes:
    raise ValueError(f"{path}: punctuation model parameters do not match its word list and "
                     "settings (the file is damaged)")


@functools.lru_cache(maxsize=4)
def load_cached(path: str) -> Punctuator:
  """One load per process and path: a dataset build restores thousands of transcripts."""
  return load(path)
