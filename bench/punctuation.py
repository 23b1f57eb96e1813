"""Sentences from unpunctuated speech: the punctuation restorer against an n-gram boundary model
and the pause rule, on real English prose laid out as auto-captions.

Text: the English prose that gensim's wheel ships as test data: 106 English Wikipedia articles (a
shortened 2017 dump, wiki markup stripped with mwparserfromhell; only paragraphs of 20 words or
more that end in a sentence mark) and the Lee corpus (350 short news articles of the Australian
Broadcasting Corporation). It is written text, not speech: sentences are longer and more formal
than narration, so the figures measure the method, not its accuracy on ASR.

Split, by document: the test set is the Lee evaluation corpus (`lee.cor`, 50 articles) and every
10th Wikipedia article; everything else is the training text. The training command
(`vbert_jax.text.train_punctuation`, run here as users run it) holds out its own validation
documents from that text by a hash; the n-gram model's threshold is chosen on the same validation
documents. Nothing is chosen on the test set.

Each test document becomes an auto-caption transcript: lowercased, punctuation removed, in
WebVTT cues of 6 to 10 words (0.3 s a word) that abut as YouTube's do (10 ms apart, no pause to
cut at), written to a file and read back by `read_transcript`. `split_sentences` then splits it
three ways: with the restorer, with the n-gram model's marks, and by the pause rule (which can
only cut sentences longer than `max_words`). The reference is the same pipeline on the punctuated
original. F1 counts sentence ends strictly inside each document.

    python bench/punctuation.py [--steps=3000]

Last line: BENCH punctuation: f1=... ngram_f1=... pause_rule_f1=... ratio=...  (ratio = f1 / ngram_f1)
"""

from __future__ import annotations

import bz2
import collections
import importlib.util
import os
import pathlib
import re
import shutil
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402
import numpy as np  # noqa: E402

from vbert_jax import cli  # noqa: E402
from vbert_jax.text import punctuation as punct  # noqa: E402
from vbert_jax.text import sentences  # noqa: E402
from vbert_jax.text import train_punctuation  # noqa: E402
from vbert_jax.text import transcripts  # noqa: E402

WIKI = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WORD_SECONDS = 0.3
CUE_GAP = 0.01


def gensim_data() -> pathlib.Path:
  """gensim's test data folder, found without importing gensim."""
  spec = importlib.util.find_spec("gensim")
  if spec is None or not spec.submodule_search_locations:
    raise SystemExit("gensim is not installed: `make test` (or pip install -r "
                     "requirements-dev.txt) installs it")
  return pathlib.Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data"


def wikipedia_articles(path: pathlib.Path) -> list[str]:
  """Each article's prose paragraphs, joined into one document."""
  import mwparserfromhell  # pylint: disable=import-outside-toplevel (bench only)
  articles = []
  for _, page in ElementTree.iterparse(bz2.open(path)):
    if not page.tag.endswith("}page"):
      continue
    text = next((e.text for e in page.iter() if e.tag.endswith("}text")), None) or ""
    page.clear()
    if text.lower().startswith("#redirect"):
      continue
    code = mwparserfromhell.parse(text)
    for tag in code.filter_tags(recursive=False):
      if str(tag.tag) in ("ref", "table", "gallery", "math"):
        try:
          code.remove(tag)
        except ValueError:  # already gone with an enclosing tag
          pass
    paragraphs = [" ".join(p.split()) for p in code.strip_code().split("\n")]
    prose = [p for p in paragraphs
             if len(p.split()) >= 20 and punct.ends_sentence(p.split()[-1])]
    if prose:
      articles.append(" ".join(prose))
  return articles


def lee_documents(path: pathlib.Path) -> list[str]:
  # The Lee files are Latin-1 (pound signs).
  return [line.strip() for line in path.read_text(encoding="latin-1").splitlines()
          if line.strip()]


def split_corpus(data: pathlib.Path) -> tuple[list[str], list[str]]:
  wiki = [_clean(a) for a in wikipedia_articles(data / WIKI)]
  lee = [_clean(d) for d in lee_documents(data / "lee_background.cor")]
  train = [a for i, a in enumerate(wiki) if i % 10] + lee
  test = ([a for i, a in enumerate(wiki) if i % 10 == 0]
          + [_clean(d) for d in lee_documents(data / "lee.cor")])
  return train, test


def _clean(document: str) -> str:
  """The document as the sentence splitter reads it (NFKC, no bracketed notes such as [1]) and
  as speech would have it (no token without a letter or digit, such as a dash), so that the words
  of its sentences and of its captions are the words of the document."""
  document = re.sub(r"\[[^\]]*\]", " ", document)
  return " ".join(t for t in sentences.normalize_text(document).split() if re.search(r"\w", t))


# ---------------------------------------------------------------------- the n-gram baseline


class NgramBoundaries:
  """P(a sentence ends between w_i and w_i+1), counted on the training text: relative frequencies
  in the contexts (w_i-1, w_i, w_i+1), (w_i, w_i+1) and the words on either side, each order
  smoothed towards the one below it (Dirichlet prior of weight `prior`)."""

  def __init__(self, documents, prior: float = 2.0):
    self.prior = prior
    self.ends = collections.Counter()
    self.seen = collections.Counter()
    total = ends = 0
    for doc in documents:
      tagged = train_punctuation.tag(doc)
      for key, end in zip(self._contexts(tagged.forms), tagged.labels >= punct.PERIOD):
        for k in key:
          self.seen[k] += 1
          self.ends[k] += int(end)
        total, ends = total + 1, ends + int(end)
    self.base = ends / max(total, 1)
    self.threshold = 0.5

  @staticmethod
  def _contexts(forms):
    padded = ["<s>"] + list(forms) + ["</s>"]
    for i in range(1, len(padded) - 1):
      yield (("L", padded[i]), ("R", padded[i + 1]), ("B", padded[i], padded[i + 1]),
             ("T", padded[i - 1], padded[i], padded[i + 1]))

  def probabilities(self, forms) -> np.ndarray:
    out = []
    for left, right, bigram, trigram in self._contexts(forms):
      p = ((self.ends[left] + self.ends[right] + self.prior * self.base)
           / (self.seen[left] + self.seen[right] + self.prior))
      for k in (bigram, trigram):
        p = (self.ends[k] + self.prior * p) / (self.seen[k] + self.prior)
      out.append(p)
    return np.array(out)

  def choose_threshold(self, documents) -> float:
    tagged = [train_punctuation.tag(d) for d in documents]
    scored = np.stack([np.concatenate([self.probabilities(t.forms) for t in tagged]),
                       np.concatenate([t.labels for t in tagged])], 1)
    self.threshold, f1 = train_punctuation.choose_threshold(scored)
    return f1

  def restore(self, tokens) -> list[str]:
    ends = self.probabilities([punct.word_form(t) for t in tokens]) > self.threshold
    return [t + "." if end else t for t, end in zip(tokens, ends)]


# ------------------------------------------------------------------------- the test layout


def _timestamp(t: float) -> str:
  ms = round(t * 1000)
  return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}"


def write_captions(document: str, path: pathlib.Path) -> None:
  """The document as continuous auto-captions: lowercase, no marks, abutting cues."""
  words = [punct.word_form(t) for t in document.split()]
  lines, t, i, size = ["WEBVTT", ""], 0.0, 0, 6
  while i < len(words):
    cue = words[i:i + size]
    end = t + WORD_SECONDS * len(cue)
    lines += [f"{_timestamp(t)} --> {_timestamp(end)}", " ".join(cue), ""]
    t, i, size = end + CUE_GAP, i + len(cue), 6 + (size - 5) % 5
  path.write_text("\n".join(lines), encoding="utf-8")


def inner_ends(found: list[sentences.Sentence], length: int) -> set[int]:
  """Word positions after which a sentence ends, the document's last word excluded."""
  counts = np.cumsum([len(s.text.split()) for s in found])
  if not len(counts) or counts[-1] != length:
    raise RuntimeError(f"sentences hold {counts[-1] if len(counts) else 0} words, the document "
                       f"{length}")
  return set(int(c) - 1 for c in counts[:-1])


def f1(predicted: list[set[int]], gold: list[set[int]]) -> float:
  hits = sum(len(p & g) for p, g in zip(predicted, gold))
  total = sum(len(p) + len(g) for p, g in zip(predicted, gold))
  return 2 * hits / total if total else 1.0


def evaluate(docs, model_path: str, ngram: NgramBoundaries, tmp: pathlib.Path,
             max_words: int = sentences.SplitConfig.max_words) -> dict:
  """Boundary F1 of the three splits of `docs` laid out as captions; sentences longer than
  `max_words` are cut as `split_sentences` cuts them (the reference never is)."""
  gold, ours, ngram_ends, pause = [], [], [], []
  for k, doc in enumerate(docs):
    n = len(doc.split())
    reference = [transcripts.Cue(0.0, WORD_SECONDS * n, doc)]
    gold.append(inner_ends(sentences.split_sentences(
        reference, sentences.SplitConfig(punctuated=True, max_words=10 ** 6)), n))
    path = tmp / f"doc_{k:03d}.vtt"
    write_captions(doc, path)
    cues = transcripts.read_transcript(path)
    ours.append(inner_ends(sentences.split_sentences(cues, sentences.SplitConfig(
        punctuation_model=model_path, max_words=max_words)), n))
    pause.append(inner_ends(sentences.split_sentences(
        cues, sentences.SplitConfig(max_words=max_words)), n))
    marked = _with_marks(cues, ngram.restore([w for c in cues for w in c.text.split()]))
    ngram_ends.append(inner_ends(sentences.split_sentences(
        marked, sentences.SplitConfig(punctuated=True, max_words=max_words)), n))
  return {"f1": f1(ours, gold), "ngram_f1": f1(ngram_ends, gold),
          "pause_rule_f1": f1(pause, gold), "sentences": sum(len(g) for g in gold),
          "words": sum(len(d.split()) for d in docs)}


def _with_marks(cues, marked_words: list[str]) -> list[transcripts.Cue]:
  """The cues with their words replaced, in order, by `marked_words` (restored over the whole
  transcript, as the restorer does: a cue's end is no sentence end)."""
  out, used = [], 0
  for cue in cues:
    n = len(cue.text.split())
    out.append(cue._replace(text=" ".join(marked_words[used:used + n])))
    used += n
  return out


def _line(name: str, docs, result: dict) -> str:
  return (f"{name}: {result['sentences']} sentence ends inside {len(docs)} documents "
          f"({result['words']} words); restorer {result['f1']:.3f}, n-gram "
          f"{result['ngram_f1']:.3f}, pause rule {result['pause_rule_f1']:.3f}")


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_integer("steps", train_punctuation.TrainConfig.steps, "training steps",
                       flag_values=fv)
  flags.DEFINE_string("model", None, "a model file trained by an earlier run on the same "
                      "training text: skips training", flag_values=fv)
  flags.DEFINE_string("save_model", None, "keep the trained model file here", flag_values=fv)


def train_model(train_docs, tmp: pathlib.Path, steps: int) -> str:
  text = tmp / "train.txt"
  text.write_text("\n".join(train_docs) + "\n", encoding="utf-8")
  model_path = str(tmp / "punctuation.msgpack")
  t0 = time.perf_counter()
  code = train_punctuation.main([f"--text={text}", f"--out={model_path}", f"--steps={steps}",
                                 "--no_progress"])
  if code:
    raise SystemExit(code)
  print(f"trained in {time.perf_counter() - t0:.0f} s", flush=True)
  return model_path


def main() -> None:
  args = cli.parse(define_flags, None, __doc__)
  data = gensim_data()
  t0 = time.perf_counter()
  train_docs, test_docs = split_corpus(data)
  print(f"text: {len(train_docs)} training documents "
        f"({sum(len(d.split()) for d in train_docs)} words), {len(test_docs)} test documents "
        f"({sum(len(d.split()) for d in test_docs)} words); read in "
        f"{time.perf_counter() - t0:.1f} s", flush=True)
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    model_path = args.model or train_model(train_docs, tmp, args.steps)
    if args.save_model:
      shutil.copyfile(model_path, args.save_model)
    fit, val = train_punctuation.split_documents(train_docs,
                                                 train_punctuation.TrainConfig.val_fraction)
    ngram = NgramBoundaries(fit)
    val_f1 = ngram.choose_threshold(val)
    print(f"n-gram: threshold {ngram.threshold:.2f}, validation boundary F1 {val_f1:.3f}",
          flush=True)
    t0 = time.perf_counter()
    print(_line("validation", val, evaluate(val, model_path, ngram, tmp)), flush=True)
    uncut = evaluate(test_docs, model_path, ngram, tmp, max_words=10 ** 6)
    print(_line("test, no sentence cut for length", test_docs, uncut), flush=True)
    result = evaluate(test_docs, model_path, ngram, tmp)
  print(_line(f"test ({time.perf_counter() - t0:.1f} s)", test_docs, result), flush=True)
  print(f"BENCH punctuation: f1={result['f1']:.3f} ngram_f1={result['ngram_f1']:.3f} "
        f"pause_rule_f1={result['pause_rule_f1']:.3f} "
        f"ratio={result['f1'] / max(result['ngram_f1'], 1e-9):.3f}")


if __name__ == "__main__":
  main()
