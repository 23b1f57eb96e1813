"""Cues into timed sentences, by punctuation or by pauses and length; the text normalisation."""

from __future__ import annotations

import pytest

from vbert_jax.text import sentences
from vbert_jax.text.sentences import Sentence, SplitConfig
from vbert_jax.text.transcripts import Cue


def test_normalize_text():
  # NFKC folds the ligature, the full-width letters and the non-breaking space; zero-width and
  # bidi marks vanish; whitespace collapses; case follows the argument.
  raw = "  Ｃrème\u00a0brûlée\u200b is \ufb01ne\t\n\u200eTODAY  "
  assert sentences.normalize_text(raw) == "Crème brûlée is fine TODAY"
  assert sentences.normalize_text(raw, lowercase=True) == "crème brûlée is fine today"
  # Composed and decomposed spellings of é come out the same.
  assert sentences.normalize_text("cafe\u0301") == sentences.normalize_text("caf\u00e9") == "café"
  assert sentences.normalize_text("") == ""


def test_punctuated_captions_split_at_sentence_ends():
  cues = [Cue(0.0, 4.0, "Heat the pan. Add the oil!"),  # 4 words of 5,4,5,4 chars
          Cue(4.5, 6.0, "Is it hot? Dr. Smith says"),
          Cue(6.0, 8.0, "\u201cyes.\u201d Then [Music] stir.")]
  out = sentences.split_sentences(cues)
  assert [s.text for s in out] == ["Heat the pan.", "Add the oil!", "Is it hot?",
                                   "Dr. Smith says \u201cyes.\u201d", "Then stir."]
  # Word times are spread over the cue by length: "Heat the pan." takes 14 of 27 units (4 s).
  assert out[0] == Sentence(0.0, round(4.0 * 14 / 27, 3), "Heat the pan.")
  assert out[1].start == out[0].end and out[1].end == 4.0
  assert out[2].start == 4.5
  assert out[-1].end == 8.0


def test_asr_without_punctuation_splits_at_pauses():
  cues = [Cue(0.0, 1.0, "so today we"), Cue(1.1, 2.0, "are making soup"),
          Cue(3.5, 4.5, "first chop"), Cue(4.6, 5.2, "the onions"),
          Cue(7.0, 8.0, "then fry them")]
  out = sentences.split_sentences(cues, SplitConfig(max_gap=1.0))
  assert out == [Sentence(0.0, 2.0, "so today we are making soup"),
                 Sentence(3.5, 5.2, "first chop the onions"),
                 Sentence(7.0, 8.0, "then fry them")]
  wider = sentences.split_sentences(cues, SplitConfig(max_gap=2.0))
  assert [s.text for s in wider] == ["so today we are making soup first chop the onions "
                                     "then fry them"]


def test_long_runs_cut_at_longest_pause_then_in_half():
  # 12 words, no pause as long as max_gap: max_words=5 cuts at the 0.3 s pause (g|h) first,
  # then the 7 words before it at the 0.1 s pause (d|e).
  cues = [Cue(0.0, 1.0, "a b c d"), Cue(1.1, 2.0, "e f g"), Cue(2.3, 3.0, "h i j k l")]
  out = sentences.split_sentences(cues, SplitConfig(max_gap=1.0, max_words=5))
  assert out == [Sentence(0.0, 1.0, "a b c d"), Sentence(1.1, 2.0, "e f g"),
                 Sentence(2.3, 3.0, "h i j k l")]
  # Without any pause, pieces are halved until they fit: 10 -> 5 + 5 -> 2 + 3 + 2 + 3.
  flat = sentences.split_sentences([Cue(0.0, 10.0, "w " * 10)], SplitConfig(max_words=4))
  assert [len(s.text.split()) for s in flat] == [2, 3, 2, 3]
  assert flat[0].start == 0.0 and flat[-1].end == 10.0
  assert all(a.end == b.start for a, b in zip(flat, flat[1:]))


def test_long_sentences_cut_where_one_most_likely_ends():
  words = [sentences._Word(float(i), float(i + 1), w)
           for i, w in enumerate("a, b c, d e f g h i j k l".split())]
  # 12 words over max_words=8: after "c," (the clause mark past the first quarter, 2 words;
  # "a," would leave 1), then the 9 words after it nearest their middle.
  pieces = sentences._cut_long(words, 8)
  assert [" ".join(w.text for w in p) for p in pieces] == ["a, b c,", "d e f g", "h i j k l"]
  # A punctuation model's boundary probabilities outrank clause marks, pauses and the middle.
  scored = [w._replace(boundary=0.3 if w.text == "e" else 0.1) for w in words]
  scored[7] = scored[7]._replace(start=9.0, end=10.0)  # a 2 s pause before "h"
  assert [len(p) for p in sentences._cut_long(scored, 8)] == [5, 7]


def test_mode_is_chosen_per_transcript_and_lowercase_applies():
  asr = [Cue(0, 1, "one two three four"), Cue(3, 4, "five six.")]  # one stray period
  assert not sentences.is_punctuated(asr, max_words=4)
  assert [s.text for s in sentences.split_sentences(asr, SplitConfig(max_words=4))] == [
      "one two three four", "five six."]
  forced = sentences.split_sentences(asr, SplitConfig(punctuated=True, max_words=8,
                                                      lowercase=True))
  assert [s.text for s in forced] == ["one two three four five six."]
  assert sentences.split_sentences([Cue(0, 1, "  [Music]  ")]) == []
  with pytest.raises(ValueError, match="max_gap"):
    SplitConfig(max_gap=0.0)
