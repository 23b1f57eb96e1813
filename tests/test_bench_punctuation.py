"""bench/punctuation.py's parts that decide its figures: the n-gram baseline, the caption layout
and the boundary F1 (the full benchmark trains for minutes on gensim's text, outside the suite)."""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest

from vbert_jax.text import sentences
from vbert_jax.text import transcripts

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
  spec = importlib.util.spec_from_file_location("bench_punctuation",
                                                REPO / "bench" / "punctuation.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_ngram_counts_boundaries_in_context(bench):
  train = ["We heat the pan. Then we add oil. We stir it. Then we add salt."] * 3
  model = bench.NgramBoundaries(train, prior=2.0)
  forms = "we heat the pan then we add oil".split()
  p = model.probabilities(forms)
  # "pan" + "then" ended a sentence 3 times in 3: (3 + 2 * lower) / (3 + 2) from the bigram up.
  assert p[3] > 0.6 and p[3] == max(p[:-1])
  assert p[0] < 0.1 and p[5] < 0.1
  # Base rate: 4 ends in 15 words; "we" never ends one on its left, nor precedes "heat" after one.
  assert model.base == pytest.approx(4 / 15)
  f1 = model.choose_threshold(["We heat the pan. Then we add oil."])
  assert f1 == 1.0 and 0.02 <= model.threshold <= 0.9
  assert model.restore("we heat the pan then we add oil".split())[3] == "pan."


def test_captions_abut_and_carry_no_marks(bench, tmp_path):
  doc = " ".join(f"Word{i}," if i % 5 == 4 else f"w{i}." if i % 7 == 6 else f"W{i}"
                 for i in range(40))
  path = tmp_path / "doc.vtt"
  bench.write_captions(doc, path)
  cues = transcripts.read_transcript(path)
  assert [len(c.text.split()) for c in cues] == [6, 7, 8, 9, 10]
  assert all(b.start - a.end == pytest.approx(bench.CUE_GAP) for a, b in zip(cues, cues[1:]))
  words = [w for c in cues for w in c.text.split()]
  assert words == [t.lower().strip(".,") for t in doc.split()]
  assert not sentences.is_punctuated(cues)
  # No pause reaches max_gap: the 40 words are only cut for max_words (32), once, at the
  # 10 ms between cues nearest the middle (after the 21st word).
  found = sentences.split_sentences(cues, sentences.SplitConfig())
  assert bench.inner_ends(found, 40) == {20}


def test_boundary_f1(bench):
  found = [sentences.Sentence(0, 1, "a b"), sentences.Sentence(1, 2, "c d e"),
           sentences.Sentence(2, 3, "f")]
  assert bench.inner_ends(found, 6) == {1, 4}
  with pytest.raises(RuntimeError, match="sentences hold 6 words, the document 7"):
    bench.inner_ends(found, 7)
  # 1 hit of 2 predicted and 3 true ends: 2 * 1 / (2 + 3).
  assert bench.f1([{1, 4}], [{1, 2, 3}]) == pytest.approx(0.4)
  assert bench.f1([set()], [set()]) == 1.0
  assert np.isclose(bench.f1([{1}, {2}], [{1}, {3}]), 0.5)
