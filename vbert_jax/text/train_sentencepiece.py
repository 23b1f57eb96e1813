"""Trains a SentencePiece model on a transcript corpus, with the special symbols of sequence.py.

    python -m vbert_jax.text.train_sentencepiece --transcripts='DIR/*.vtt' --vocab_size=8000 \
        --out=/data/spm/howto

writes `/data/spm/howto.model` and `/data/spm/howto.vocab`. The model's ids are `[PAD]`=0,
`[UNK]`=1, `[CLS]`=2, `[SEP]`=3, `[MASK]`=4, `[>]`=5, then the learned pieces, so that
`sequence.SpecialIds.from_vocab` reads them. The corpus is the sentences of every transcript
(`sentences.split_sentences`, normalised by `sentences.normalize_text`), so training sees text
exactly as the dataset builder will give it to the tokenizer. SentencePiece's own normaliser is
off ("identity"): `normalize_text` is the only one. A transcript that cannot be read is skipped
and listed at the end; the model files are written under temporary names, then renamed.
"""

from __future__ import annotations

import glob
import os
import pathlib
import sys
import tempfile
import types
from typing import Sequence

from absl import flags
import sentencepiece as spm

from vbert_jax import cli
from vbert_jax import console
from vbert_jax.text import sentences as sentences_lib
from vbert_jax.text import tokenizers
from vbert_jax.text import transcripts


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("transcripts", None,
                      "glob(s) of .vtt/.srt/.json transcripts, comma-separated", flag_values=fv)
  flags.DEFINE_integer("vocab_size", None, "pieces in the model, the 6 special symbols included",
                       flag_values=fv)
  flags.DEFINE_string("out", None, "output prefix: writes PREFIX.model, PREFIX.vocab",
                      flag_values=fv)
  flags.DEFINE_enum("model_type", "unigram", ("unigram", "bpe", "word", "char"),
                    "SentencePiece model type", flag_values=fv)
  flags.DEFINE_bool("lowercase", True, "lowercase the corpus", flag_values=fv)
  flags.DEFINE_float("character_coverage", 0.9995,
                     "share of the corpus' characters the model covers", flag_values=fv)
  flags.DEFINE_bool("byte_fallback", False,
                    "spell unknown characters as bytes instead of [UNK]", flag_values=fv)
  flags.DEFINE_float("max_gap", sentences_lib.SplitConfig.max_gap,
                     "seconds of silence that end an unpunctuated sentence", flag_values=fv)
  flags.DEFINE_integer("max_words", sentences_lib.SplitConfig.max_words,
                       "longer sentences are cut at their longest pause", flag_values=fv)
  flags.DEFINE_string("punctuation_model", "", "a model from vbert_jax.text.train_punctuation "
                      "that restores the marks of unpunctuated transcripts", flag_values=fv)
  flags.DEFINE_integer("input_sentence_size", 2_000_000,
                       "sentences sampled for training (0: all)", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "seed of the sentence sampling", flag_values=fv)
  for name in ("transcripts", "vocab_size", "out"):
    flags.mark_flag_as_required(name, flag_values=fv)


def parse_args(argv: Sequence[str] | None = None) -> types.SimpleNamespace:
  return cli.parse(define_flags, argv, __doc__)


def find_transcripts(patterns: str) -> list[pathlib.Path]:
  paths = set()
  for pattern in filter(None, (p.strip() for p in patterns.split(","))):
    paths.update(pathlib.Path(p) for p in glob.glob(os.path.expanduser(pattern),
                                                    recursive=True))
  return sorted(p for p in paths
                if p.is_file() and p.suffix.lower() in transcripts.SUFFIXES)


def corpus_sentences(paths: Sequence[pathlib.Path], config: sentences_lib.SplitConfig
                     ) -> tuple[list[str], list[str]]:
  """(normalised sentences of all readable transcripts, "path: reason" of the skipped ones)."""
  texts, skipped = [], []
  for path in paths:
    try:
      if path.suffix.lower() == ".json":  # possibly HowTo100M's file of all videos
        videos = list(transcripts.read_howto100m_all(path).values())
      else:
        videos = [transcripts.read_transcript(path)]
    except transcripts.TranscriptError as e:
      skipped.append(str(e))
      continue
    for cues in videos:
      texts.extend(s.text for s in sentences_lib.split_sentences(cues, config) if s.text)
  return texts, skipped


def train(texts: Sequence[str], out_prefix: str, vocab_size: int, model_type: str = "unigram",
          character_coverage: float = 0.9995, byte_fallback: bool = False,
          input_sentence_size: int = 2_000_000, seed: int = 0) -> pathlib.Path:
  """Trains on `texts` and writes OUT.model / OUT.vocab atomically; returns the .model path."""
  specials = tokenizers.SENTENCEPIECE_SPECIAL_IDS
  out = pathlib.Path(out_prefix)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp_dir = tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent)
  tmp_prefix = os.path.join(tmp_dir, "model")
  spm.set_random_generator_seed(seed)  # sampling of input sentences, so runs repeat
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=tmp_prefix, vocab_size=vocab_size,
        model_type=model_type, character_coverage=character_coverage,
        byte_fallback=byte_fallback, normalization_rule_name="identity",
        pad_id=specials["[PAD]"], pad_piece="[PAD]", unk_id=specials["[UNK]"],
        unk_piece="[UNK]", bos_id=-1, eos_id=-1,
        user_defined_symbols=["[CLS]", "[SEP]", "[MASK]", "[>]"],
        input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
        num_threads=os.cpu_count() or 1, minloglevel=2)
    for ext in (".model", ".vocab"):
      os.replace(tmp_prefix + ext, str(out) + ext)
  except RuntimeError as e:
    raise tokenizers.TokenizerError(f"training SentencePiece for {out}.model failed: {e}") from e
  finally:
    for name in os.listdir(tmp_dir):
      os.unlink(os.path.join(tmp_dir, name))
    os.rmdir(tmp_dir)
  return pathlib.Path(str(out) + ".model")


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  console.setup()
  paths = find_transcripts(args.transcripts)
  if not paths:
    print(f"no transcripts (.vtt, .srt, .json) match {args.transcripts!r}", file=sys.stderr)
    return 2
  config = sentences_lib.SplitConfig(max_gap=args.max_gap, max_words=args.max_words,
                                     lowercase=args.lowercase,
                                     punctuation_model=args.punctuation_model)
  texts, skipped = corpus_sentences(paths, config)
  if not texts:
    print(f"no sentences in the {len(paths)} transcripts matching {args.transcripts!r}",
          file=sys.stderr)
    return 2
  try:
    model = train(texts, args.out, args.vocab_size, args.model_type, args.character_coverage,
                  args.byte_fallback, args.input_sentence_size, args.seed)
  except tokenizers.TokenizerError as e:
    print(e, file=sys.stderr)
    return 1
  tok = tokenizers.SentencePieceTokenizer(model)
  print(f"wrote {model} ({tok.vocab_size} pieces, specials {tok.specials}) from "
        f"{len(texts)} sentences of {len(paths) - len(skipped)} transcripts")
  if skipped:
    print(f"skipped {len(skipped)} transcripts:")
    for reason in skipped:
      print(f"  {reason}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
