"""Caption metrics as the paper reports them: BLEU-3/4, METEOR, ROUGE-L, CIDEr (pycocoevalcap).

`score_captions` uses pycocoevalcap's individual scorers (Bleu(4), Meteor(), Rouge(), Cider()) and
its PTB tokenizer, as COCO's evaluation does, but not its COCOEvalCap wrapper (which also runs
SPICE, and SPICE downloads models). Candidates and references are grouped per video: one
candidate and any number of references for each video id.

The PTB tokenizer and METEOR are Java programs. Without Java (no `java` on the PATH, or
`use_java=False`) one message says so, captions are tokenized in Python by `python_tokenize`, and
METEOR is left out of the result.

BLEU is pycocoevalcap's corpus BLEU: n-gram counts clipped by each video's references and summed
over all videos, the brevity penalty from the summed candidate length against the summed lengths
of the references closest in length to each candidate. An empty candidate adds nothing to the
matches and nothing to the candidate length.
"""

from __future__ import annotations

import re
import shutil
import sys
from typing import Hashable, Mapping, Sequence

from pycocoevalcap.bleu import bleu
from pycocoevalcap.cider import cider
from pycocoevalcap.meteor import meteor as meteor_lib
from pycocoevalcap.rouge import rouge
from pycocoevalcap.tokenizer import ptbtokenizer

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
NO_JAVA_MESSAGE = ("caption metrics: running without Java (none on the PATH, or use_java=False): "
                   "the PTB tokenizer and METEOR cannot run; captions are tokenized in Python "
                   "(lowercased, every character that is not a letter, digit or space becomes a "
                   "space, split on whitespace) and METEOR is left out")
# Letters and digits of any script; everything else (punctuation, symbols) separates words.
_NOT_WORD = re.compile(r"[^\w\s]|_")


def java_available() -> bool:
  return shutil.which("java") is not None


def python_tokenize(text: str) -> str:
  """The tokenization used without Java: lowercase, punctuation to spaces, split on whitespace.

  PTB's tokenizer removes the same punctuation marks but keeps clitics as their own tokens
  ("let's" -> "let 's"); here they become words of their own ("let s").
  """
  return " ".join(_NOT_WORD.sub(" ", text.lower()).split())


def _check(candidates: Mapping[Hashable, str],
           references: Mapping[Hashable, Sequence[str]]) -> None:
  missing = [k for k in references if k not in candidates]
  extra = [k for k in candidates if k not in references]
  if missing or extra:
    raise ValueError(f"caption metrics: candidates and references must cover the same videos; "
                     f"videos without a candidate: {missing[:8]}, candidates without "
                     f"references: {extra[:8]}")
  if not references:
    raise ValueError("caption metrics: no videos to score")
  for key, refs in references.items():
    if isinstance(refs, str) or not len(refs):
      raise ValueError(f"caption metrics: references of video {key!r} must be a non-empty list "
                       f"of strings, got {refs!r}")
  for key, cand in candidates.items():
    if not isinstance(cand, str):
      raise ValueError(f"caption metrics: the candidate of video {key!r} must be one string, got "
                       f"{type(cand).__name__}")


def tokenize(captions: Mapping[Hashable, Sequence[str]], use_java: bool
             ) -> dict[Hashable, list[str]]:
  """{video: [tokenized caption, ...]} by the PTB tokenizer (Java) or `python_tokenize`."""
  if not use_java:
    return {k: [python_tokenize(c) for c in v] for k, v in captions.items()}
  # The Java tokenizer reads one caption a line: a newline inside a caption would shift the rest.
  wrapped = {k: [{"caption": " ".join(c.split())} for c in v] for k, v in captions.items()}
  out = ptbtokenizer.PTBTokenizer().tokenize(wrapped)
  for key, value in captions.items():
    if len(out.get(key, [])) != len(value):
      raise RuntimeError(f"PTB tokenizer returned {len(out.get(key, []))} captions for video "
                         f"{key!r}, expected {len(value)}")
  return out


def score_tokenized(candidates: Mapping[Hashable, list[str]],
                    references: Mapping[Hashable, list[str]], *, meteor: bool
                    ) -> dict[str, float]:
  """The scorers on tokenized captions ({video: [one candidate]}, {video: [references]})."""
  gts = {k: list(v) for k, v in references.items()}
  res = {k: list(candidates[k]) for k in gts}
  out = {}
  bleus, _ = bleu.Bleu(4).compute_score(gts, res, verbose=0)
  out.update({f"Bleu_{n + 1}": float(b) for n, b in enumerate(bleus)})
  if meteor:
    scorer = meteor_lib.Meteor()
    try:
      out["METEOR"] = float(scorer.compute_score(gts, res)[0])
    finally:
      del scorer  # stops its Java process
  out["ROUGE_L"] = float(rouge.Rouge().compute_score(gts, res)[0])
  out["CIDEr"] = float(cider.Cider().compute_score(gts, res)[0])
  return out


def score_captions(candidates: Mapping[Hashable, str],
                   references: Mapping[Hashable, Sequence[str]], *,
                   use_java: bool | None = None) -> dict[str, float]:
  """Bleu_1..Bleu_4, METEOR (with Java), ROUGE_L and CIDEr of one candidate per video.

  `use_java=None` uses Java when it is on the PATH; True requires it; False never uses it.
  """
  _check(candidates, references)
  have_java = java_available()
  if use_java and not have_java:
    raise RuntimeError("caption metrics: use_java=True but no `java` is on the PATH; install a "
                       "Java runtime (the PTB tokenizer and METEOR need it) or pass "
                       "use_java=False")
  java = have_java if use_java is None else bool(use_java)
  if not java:
    print(NO_JAVA_MESSAGE, file=sys.stderr)
  keys = list(references)
  refs = tokenize({k: list(references[k]) for k in keys}, java)
  cands = tokenize({k: [candidates[k]] for k in keys}, java)
  return score_tokenized(cands, refs, meteor=java)
