"""Caption metrics: BLEU by hand, pycocoevalcap's scorers called directly, per-video grouping."""

import math
import shutil

import pytest

from vbert_jax.captioning import metrics

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs a Java runtime")

# Lowercase, no punctuation: both tokenizations leave these captions as they are.
CANDIDATES = {
    "v1": "the cat sat on the mat",
    "v2": "stir",  # one word
    "v3": "",  # empty
    "v4": "add salt to the water",
}
REFERENCES = {
    "v1": ["the cat is on the mat", "a cat sat on a mat"],
    "v2": ["stir the soup", "stir it"],
    "v3": ["add the salt"],
    "v4": ["add salt to the water"],
}


def hand_bleu() -> dict[str, float]:
  """Corpus BLEU of the set above, counted by hand.

  Clipped matches / candidate n-grams per video (v1, v2, v3, v4):
    1-grams: 6/6, 1/1, 0/0, 5/5 -> 12/12
    2-grams: 5/5 (the cat, cat sat, sat on, on the, the mat), 0/0, 0/0, 4/4 -> 9/9
    3-grams: 2/4 (cat sat on, on the mat), 0/0, 0/0, 3/3 -> 5/7
    4-grams: 0/3, 0/0, 0/0, 2/2 -> 2/5
  Candidate length 6 + 1 + 0 + 5 = 12; reference closest in length to each candidate:
  6, 2 ("stir it" beside a 1-word candidate), 3, 5 -> 16. Brevity penalty exp(1 - 16/12).
  """
  bp = math.exp(1 - 16 / 12)
  p = [12 / 12, 9 / 9, 5 / 7, 2 / 5]
  return {f"Bleu_{n}": bp * math.prod(p[:n]) ** (1 / n) for n in range(1, 5)}


def hand_rouge_l() -> float:
  """ROUGE-L (beta 1.2): max LCS precision and recall over a video's references, then F."""
  def f(p, r):
    return 0.0 if p == 0 or r == 0 else (1 + 1.2**2) * p * r / (r + 1.2**2 * p)
  v1 = f(5 / 6, 5 / 6)  # LCS "the cat on the mat" with the first reference
  v2 = f(1.0, 1 / 2)  # "stir": recall 1/3 and 1/2, the best taken
  v3 = 0.0
  v4 = 1.0
  return (v1 + v2 + v3 + v4) / 4


def _direct(candidates, references, use_java):
  """pycocoevalcap's tokenizer and scorers, called the way its own evaluation calls them."""
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  from pycocoevalcap.meteor.meteor import Meteor
  from pycocoevalcap.rouge.rouge import Rouge
  from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
  if use_java:
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
    res = tok.tokenize({k: [{"caption": candidates[k]}] for k in references})
  else:
    gts = {k: [metrics.python_tokenize(c) for c in v] for k, v in references.items()}
    res = {k: [metrics.python_tokenize(candidates[k])] for k in references}
  out = dict(zip(("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"),
                 Bleu(4).compute_score(gts, res, verbose=0)[0]))
  if use_java:
    out["METEOR"] = Meteor().compute_score(gts, res)[0]
  out["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
  out["CIDEr"] = Cider().compute_score(gts, res)[0]
  return out


def test_bleu_and_rouge_match_hand_computation():
  got = metrics.score_captions(CANDIDATES, REFERENCES, use_java=False)
  for key, value in hand_bleu().items():
    assert got[key] == pytest.approx(value, rel=1e-6), key
  assert got["ROUGE_L"] == pytest.approx(hand_rouge_l(), rel=1e-9)
  assert "METEOR" not in got


def test_python_tokenization_rule():
  assert metrics.python_tokenize("  Cut the Onion,  then FRY it!") == "cut the onion then fry it"
  assert metrics.python_tokenize("let's add 2 eggs...") == "let s add 2 eggs"
  assert metrics.python_tokenize("?!.") == ""
  cased = {k: (v.capitalize() + "." if v else v) for k, v in CANDIDATES.items()}
  assert (metrics.score_captions(cased, REFERENCES, use_java=False)
          == metrics.score_captions(CANDIDATES, REFERENCES, use_java=False))


@needs_java
def test_java_path_matches_pycocoevalcap_called_directly():
  # Capitals and punctuation, so that the PTB tokenizer has work to do.
  candidates = {**CANDIDATES, "v1": "The cat sat on the mat.", "v4": "Add salt, to the water!"}
  references = {**REFERENCES, "v2": ["Stir the soup.", "stir it"]}
  got = metrics.score_captions(candidates, references, use_java=True)
  want = _direct(candidates, references, use_java=True)
  assert set(got) == set(want) == set(metrics.METRICS)
  for key in want:
    assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key
  # The PTB tokenizer lowercases and strips the punctuation: the hand values hold here too.
  for key, value in hand_bleu().items():
    assert got[key] == pytest.approx(value, rel=1e-6), key
  assert 0.0 < got["METEOR"] < 1.0


def test_python_path_matches_scorers_called_directly():
  got = metrics.score_captions(CANDIDATES, REFERENCES, use_java=False)
  want = _direct(CANDIDATES, REFERENCES, use_java=False)
  assert got == pytest.approx(want, rel=1e-12)


def test_references_are_grouped_per_video():
  base = metrics.score_captions(CANDIDATES, REFERENCES, use_java=False)
  # The same references under other video ids: every score changes.
  swapped = {**REFERENCES, "v1": REFERENCES["v4"], "v4": REFERENCES["v1"]}
  other = metrics.score_captions(CANDIDATES, swapped, use_java=False)
  for key in ("Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"):
    assert other[key] < base[key], key
  assert other == pytest.approx(_direct(CANDIDATES, swapped, use_java=False), rel=1e-12)
  # The order of the videos does not matter.
  reordered = dict(reversed(list(REFERENCES.items())))
  assert metrics.score_captions(CANDIDATES, reordered, use_java=False) == pytest.approx(base)
  # One more reference for v2 that matches its candidate's length lifts the brevity penalty.
  more = {**REFERENCES, "v2": REFERENCES["v2"] + ["stir"]}
  assert metrics.score_captions(CANDIDATES, more, use_java=False)["Bleu_1"] > base["Bleu_1"]


def test_all_empty_candidates_score_zero():
  empty = {k: "" for k in CANDIDATES}
  got = metrics.score_captions(empty, REFERENCES, use_java=False)
  for key in ("Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"):
    assert got[key] == pytest.approx(0.0, abs=1e-9), key


def test_without_java_one_message_and_no_meteor(monkeypatch, capsys):
  monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
  got = metrics.score_captions(CANDIDATES, REFERENCES)
  err = capsys.readouterr().err
  assert err.count("Java") == 1 and "METEOR is left out" in err
  assert "METEOR" not in got
  assert got["Bleu_4"] == pytest.approx(hand_bleu()["Bleu_4"], rel=1e-6)
  with pytest.raises(RuntimeError, match="no `java` is on the PATH"):
    metrics.score_captions(CANDIDATES, REFERENCES, use_java=True)


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match=r"videos without a candidate: \['v4'\]"):
    metrics.score_captions({k: v for k, v in CANDIDATES.items() if k != "v4"}, REFERENCES,
                           use_java=False)
  with pytest.raises(ValueError, match="candidates without references"):
    metrics.score_captions({**CANDIDATES, "v9": "x"}, REFERENCES, use_java=False)
  with pytest.raises(ValueError, match="references of video 'v2' must be a non-empty list"):
    metrics.score_captions(CANDIDATES, {**REFERENCES, "v2": []}, use_java=False)
  with pytest.raises(ValueError, match="non-empty list"):
    metrics.score_captions(CANDIDATES, {**REFERENCES, "v2": "stir it"}, use_java=False)
