"""Cues into sentences with start and end times, and the one text normalisation of the project.

ASR has no punctuation, so a transcript is split one of two ways, chosen per transcript:

- punctuated (human captions): after words ending in `.`, `!`, `?` or `…` (closing quotes and
  brackets may follow; a few abbreviations such as "Dr." do not end a sentence);
- unpunctuated (ASR): at pauses, where the silence between two cues is at least `max_gap`; or,
  with a punctuation model (`punctuation_model`, see `vbert_jax.text.punctuation`), after the
  marks that the model restores, as for punctuated text. Continuous auto-captions have no pauses
  to cut at, which is what the model is for.

Either way, a sentence longer than `max_words` is cut until every piece fits, each time where a
sentence most likely ends: after the word that the punctuation model scores highest when it
restored the marks, else after a clause mark (`,` `;` `:`), else at the longest pause, and among
equals nearest the middle; no piece is left shorter than a quarter of `max_words`.

Where the transcript times its words (`Cue.words`), each timed piece runs until the next one;
otherwise, and inside a piece, word times are spread over the duration in proportion to the
words' lengths, so a sentence that ends inside a cue ends at the time its last word was
(probably) spoken.

`normalize_text` is the single text normalisation: Unicode NFKC, control and format characters
removed, whitespace collapsed, and an explicit case policy.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from typing import NamedTuple, Sequence

from vbert_jax.text import punctuation
from vbert_jax.text import transcripts

# Non-speech annotations in captions: [Music], [Applause], ♪ ... ♪.
_SOUND_TAG = re.compile(r"\[[^\]]*\]|[\u266a\u266b\u266c]+")


def normalize_text(text: str, lowercase: bool = False) -> str:
  """NFKC, control/format characters dropped, whitespace collapsed to single spaces, stripped;
  lowercased when `lowercase` (the case policy of the text tokenizer in use)."""
  text = unicodedata.normalize("NFKC", text)
  chars = []
  for ch in text:
    cat = unicodedata.category(ch)
    if ch.isspace():
      chars.append(" ")
    elif cat in ("Cc", "Cf", "Cs", "Co", "Cn") or ch == "\ufffd":
      continue  # zero-width marks, bidi controls, private use: invisible in speech
    else:
      chars.append(ch)
  text = " ".join("".join(chars).split())
  return text.lower() if lowercase else text


class Sentence(NamedTuple):
  start: float
  end: float
  text: str


@dataclasses.dataclass(frozen=True)
class SplitConfig:
  """How cues become sentences. `punctuated`: None decides per transcript (at least one
  sentence-final mark per `max_words` words); True/False force the mode. `punctuation_model`: a
  file from `vbert_jax.text.train_punctuation` that restores the marks of unpunctuated
  transcripts; empty: they are cut at pauses."""
  max_gap: float = 1.0  # seconds of silence that end an unpunctuated sentence
  max_words: int = 32
  punctuated: bool | None = None
  lowercase: bool = False
  drop_sound_tags: bool = True
  punctuation_model: str = ""

  def __post_init__(self):
    if self.max_gap <= 0 or self.max_words <= 0:
      raise ValueError(f"sentence split config: max_gap={self.max_gap} and "
                       f"max_words={self.max_words} must be positive")


class _Word(NamedTuple):
  start: float
  end: float
  text: str
  # P(a sentence ends after this word), where a punctuation model restored the marks.
  boundary: float | None = None


def _words(cues: Sequence[transcripts.Cue], drop_sound_tags: bool) -> list[_Word]:
  words: list[_Word] = []
  for cue in cues:
    # Timed pieces where the file gives them (each runs until the next one), else the whole cue.
    pieces = cue.words or ((cue.start, cue.text),)
    ends = [t for t, _ in pieces[1:]] + [cue.end]
    for (start, text), end in zip(pieces, ends):
      words.extend(_spread(text, start, max(end, start), drop_sound_tags))
  return words


def _spread(text: str, start: float, end: float, drop_sound_tags: bool) -> list[_Word]:
  """The words of `text` over [start, end], each in proportion to its length."""
  text = _SOUND_TAG.sub(" ", text) if drop_sound_tags else text
  tokens = normalize_text(text).split()
  weights = [len(t) + 1 for t in tokens]
  total, acc, out = float(sum(weights)), 0, []
  for token, w in zip(tokens, weights):
    out.append(_Word(start + (end - start) * acc / total,
                     start + (end - start) * (acc + w) / total, token))
    acc += w
  return out


def is_punctuated(cues: Sequence[transcripts.Cue], max_words: int = 32) -> bool:
  words = [w for c in cues for w in c.text.split()]
  ends = sum(punctuation.ends_sentence(w) for w in words)
  return bool(words) and ends * max_words >= len(words)


def _cut_long(words: list[_Word], max_words: int) -> list[list[_Word]]:
  """Splits where a sentence most likely ends until every piece has <= max_words."""
  done, todo = [], [words]
  shortest = max(1, max_words // 4)
  while todo:  # a stack, not recursion: an hour of ASR without a pause is one long run
    piece = todo.pop()
    if len(piece) <= max_words:
      done.append(piece)
      continue
    cut = max(range(shortest, len(piece) - shortest + 1),
              key=lambda c: _cut_score(piece, c))
    todo.extend((piece[cut:], piece[:cut]))
  return done


def _cut_score(piece: list[_Word], cut: int) -> tuple:
  """How likely a sentence ends before piece[cut], as a key to maximise."""
  before = piece[cut - 1]
  if before.boundary is not None:
    score = before.boundary
  else:
    score = float(punctuation.mark_class(before.text) == punctuation.COMMA)
  # Pauses to the centisecond: abutting cues are all 10 ms apart however their times round.
  gap = round(piece[cut].start - before.end, 2)
  return score, gap, -abs(2 * cut - len(piece)), -cut


def _restore(words: list[_Word], model_path: str) -> list[_Word]:
  """The words with the model's marks appended and their boundary probabilities; times are
  unchanged."""
  restored, boundary = punctuation.load_cached(str(model_path)).mark([w.text for w in words])
  return [w._replace(text=text, boundary=float(p))
          for w, text, p in zip(words, restored, boundary)]


def split_sentences(cues: Sequence[transcripts.Cue],
                    config: SplitConfig = SplitConfig()) -> list[Sentence]:
  """Sentences, in time order, each with the start of its first and the end of its last word."""
  words = _words(cues, config.drop_sound_tags)
  punctuated = config.punctuated
  if punctuated is None:
    punctuated = is_punctuated(cues, config.max_words)
  if not punctuated and config.punctuation_model and words:
    words = _restore(words, config.punctuation_model)
    punctuated = True
  groups: list[list[_Word]] = []
  current: list[_Word] = []
  for i, word in enumerate(words):
    if current and not punctuated and word.start - words[i - 1].end >= config.max_gap:
      groups.append(current)
      current = []
    current.append(word)
    if punctuated and punctuation.ends_sentence(word.text):
      groups.append(current)
      current = []
  if current:
    groups.append(current)
  out = []
  for group in groups:
    for piece in _cut_long(group, config.max_words):
      text = normalize_text(" ".join(w.text for w in piece), config.lowercase)
      out.append(Sentence(round(piece[0].start, 3), round(piece[-1].end, 3), text))
  return out
