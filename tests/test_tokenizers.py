"""Text tokenizers: WordPiece against transformers' BERT tokenizers, SentencePiece trained by the
CLI on demo-world narration, and the config checks of load_tokenizer."""

from __future__ import annotations

import json
import re

import ml_collections
import pytest

from vbert_jax.demo.world import world
from vbert_jax import sequence
from vbert_jax.text import sentences
from vbert_jax.text import tokenizers
from vbert_jax.text import train_sentencepiece
from vbert_jax.text.tokenizers import TokenizerError

SENTENCES = [
    "Hello, World! Today we're making crème brûlée (with 2.5 cups of sugar).",
    "unaffable runners keep running; the QUICK brown fox's tail...",
    "日本語 and 中文 text mixed with Café, naïve résumé",
    "tabs\tand\nnewlines\u00a0nbsp and zero\u200bwidth and control\x07char",
    "now let me show you how to [MASK] the [MASK] .",
    "[CLS] boiling[SEP]water [PAD]",
    "a" * 120 + " short",
    "emoji 🍳 are unknown, as are ☃ snowmen",
    "ligatures ﬁne and full-width ＡＢＣ, Ǆ",
    "$100 ^caret `backtick` ~tilde @at #hash",
    "",
]
UNKNOWN_CHARS = set("🍳☃")
WORDS = ["hello", "world", "today", "we", "making", "run", "##ning", "##ners", "keep", "the",
         "un", "##aff", "##able", "brown", "fox", "tail", "text", "mixed", "with", "and",
         "now", "let", "me", "show", "you", "how", "to", "boil", "##ing", "water", "short",
         "are", "unknown", "as", "snow", "##men", "cups", "of", "sugar", "cafe", "café"]
CASED_WORDS = ["Hello", "World", "Today", "QUICK", "Café", "Ǆ"]


def _bert_vocab(tmp_path, cased: bool):
  """A vocab.txt in BERT's layout ([PAD]=0, [unused0..98], [UNK]=100 ... [MASK]=103)."""
  tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]",
                                                               "[MASK]"]
  text = "".join(SENTENCES)
  chars = sorted(set(text) - UNKNOWN_CHARS - set(" \t\n\x07\u200b\u00a0"))
  chars = sorted(set(chars) | set("".join(chars).lower()) | set("ceiaunoa"))
  if not cased:
    chars = [c for c in chars if c == c.lower()]
  words = WORDS + (CASED_WORDS if cased else [])
  for t in chars + ["##" + c for c in chars if c.isalnum()] + words:
    if t not in tokens:
      tokens.append(t)
  path = tmp_path / ("cased" if cased else "uncased")
  path.mkdir()
  (path / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
  return path / "vocab.txt"


@pytest.fixture(scope="module")
def vocabs(tmp_path_factory):
  root = tmp_path_factory.mktemp("bert")
  return {False: _bert_vocab(root, cased=False), True: _bert_vocab(root, cased=True)}


@pytest.mark.parametrize("cased", [False, True])
def test_wordpiece_matches_transformers(vocabs, cased):
  from transformers import BertTokenizer  # the `tokenizers` (Rust) implementation
  from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy
  path = vocabs[cased]
  ours = tokenizers.WordPieceTokenizer(path)
  assert ours.lowercase == (not cased)  # detected from the vocabulary
  fast = BertTokenizer(vocab=str(path), do_lower_case=not cased)
  slow = BertTokenizerLegacy(vocab_file=str(path), do_lower_case=not cased)
  saw_unk = saw_piece = False
  for text in SENTENCES:
    ids = ours.encode(text)
    assert ids == fast.encode(text, add_special_tokens=False), text
    assert ids == slow.encode(text, add_special_tokens=False), text
    assert ours.tokenize(text) == slow.tokenize(text), text
    assert ours.decode(ids, skip_special=False) == slow.convert_tokens_to_string(
        slow.convert_ids_to_tokens(ids))
    saw_unk |= ours.specials.unk in ids
    saw_piece |= any(ours.id_to_token(i).startswith("##") for i in ids)
  assert saw_unk and saw_piece  # the sentences reach both the [UNK] and the ## paths


def test_wordpiece_specials_and_ids(vocabs):
  tok = tokenizers.WordPieceTokenizer(vocabs[False])
  assert tok.specials == sequence.SpecialIds.bert()
  assert tok.encode("[CLS] a [>] b [SEP]") == [101, tok.token_to_id("a"), 1,
                                               tok.token_to_id("b"), 102]
  assert tok.tokenize("unaffable running") == ["un", "##aff", "##able", "run", "##ning"]
  assert tok.decode(tok.encode("the [MASK] unaffable water")) == "the unaffable water"
  assert tok.vocab_size == len(vocabs[False].read_text().splitlines())
  vocab = tok.joint_vocab(visual_size=300)
  assert vocab.text_size == tok.vocab_size and vocab.specials == tok.specials
  with pytest.raises(KeyError):
    tok.token_to_id("not-a-token")
  # A vocabulary without the specials is refused, naming the file and what is missing.
  bad = vocabs[False].parent / "bad.txt"
  bad.write_text("a\nb\n")
  with pytest.raises(ValueError, match=r"bad\.txt: missing special tokens"):
    tokenizers.WordPieceTokenizer(bad)


def _demo_transcripts(folder, count: int) -> None:
  config = world.WorldConfig(num_videos=count, seed=11)
  for index in range(count):
    rng = world.video_rng(config, index)
    cues = world.narrate(world.plan_steps(config, rng), config.narration, rng)
    (folder / f"{world.video_id(index)}.vtt").write_text(world.webvtt(cues))


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
  folder = tmp_path_factory.mktemp("transcripts")
  _demo_transcripts(folder, 40)
  (folder / "broken.vtt").write_text("WEBVTT\n\n00:00:05.000 --> 00:00:01.000\nbackwards\n")
  out = tmp_path_factory.mktemp("spm") / "demo"
  rc = train_sentencepiece.main([f"--transcripts={folder}/*.vtt", "--vocab_size=120",
                                 f"--out={out}"])
  assert rc == 0
  return out, folder


def test_sentencepiece_cli_model(spm_model, capsys):
  import sentencepiece as spm
  out, folder = spm_model
  assert sorted(p.name for p in out.parent.iterdir()) == ["demo.model", "demo.vocab"]
  tok = tokenizers.SentencePieceTokenizer(f"{out}.model")
  assert tok.vocab_size == 120
  assert tok.specials == sequence.SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4, video_sep=5)
  assert [tok.id_to_token(i) for i in range(6)] == list(sequence.SPECIAL_TOKENS)
  assert tok.lowercase  # trained on lowercased text: no capitals among its pieces
  text = "Now let me show you how to [MASK] the [MASK]"
  ids = tok.encode(text)
  assert ids.count(4) == 2 and 1 not in ids
  unknown = tok.encode("the ; egg")  # the corpus has no ";"
  assert unknown.count(1) == 1 and unknown[:1] == tok.encode("the")[:1]
  # Plain text: exactly what SentencePiece itself gives for the normalised text.
  reference = spm.SentencePieceProcessor(model_file=f"{out}.model")
  plain = "Now  let me SHOW you\u00a0how"
  assert tok.encode(plain) == reference.encode(sentences.normalize_text(plain, True))
  assert tok.decode(tok.encode(plain)) == "now let me show you how"
  assert tok.decode(ids) == "now let me show you how to the"
  assert [tok.token_to_id(t) for t in tok.tokenize(plain)] == tok.encode(plain)


def test_sentencepiece_cli_lists_skipped_and_errors(spm_model, tmp_path, capsys):
  out, folder = spm_model
  rc = train_sentencepiece.main([f"--transcripts={folder}/*.vtt", "--vocab_size=100",
                                 f"--out={tmp_path}/again"])
  printed = capsys.readouterr().out
  assert rc == 0 and "skipped 1 transcripts" in printed
  assert re.search(r"broken\.vtt: no usable cue: all 1 cue\(s\) are broken; the first, cue 1 "
                   r"\(line 3\): end 1\.000s is before start 5\.000s", printed)
  assert train_sentencepiece.main(["--transcripts=/nonexistent/*.vtt", "--vocab_size=100",
                                   f"--out={tmp_path}/x"]) == 2
  # A vocabulary larger than the corpus supports fails with the output named, leaving no files.
  assert train_sentencepiece.main([f"--transcripts={folder}/*.vtt", "--vocab_size=50000",
                                   f"--out={tmp_path}/big"]) == 1
  assert "big.model failed" in capsys.readouterr().err
  assert not list(tmp_path.glob("big*")) and not list(tmp_path.glob(".big*"))


def _config(**text) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      text=dict(dict(tokenizer="wordpiece", vocab="", lowercase=""), **text),
      init=dict(bert_dir=""), model=dict(text_vocab_size=0)))


def test_load_tokenizer_from_config(vocabs, spm_model):
  out, _ = spm_model
  c = _config(tokenizer="sentencepiece", vocab=f"{out}.model")
  c.model.text_vocab_size = 120
  assert isinstance(tokenizers.load_tokenizer(c), tokenizers.SentencePieceTokenizer)
  c.model.text_vocab_size = 30522
  with pytest.raises(TokenizerError, match=r"demo\.model has 120 tokens but config "
                                           r"model\.text_vocab_size=30522"):
    tokenizers.load_tokenizer(c)
  # Starting from BERT: the checkpoint's vocab.txt is the tokenizer, its case from its config.
  bert_dir = vocabs[True].parent
  (bert_dir / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
  c = _config()
  c.init.bert_dir = str(bert_dir)
  tok = tokenizers.load_tokenizer(c)
  assert isinstance(tok, tokenizers.WordPieceTokenizer) and tok.lowercase
  c.text.lowercase = "false"  # an explicit policy wins over the checkpoint's
  assert not tokenizers.load_tokenizer(c).lowercase
  c.text.lowercase = "maybe"
  with pytest.raises(TokenizerError, match="text.lowercase='maybe'"):
    tokenizers.load_tokenizer(c)
  assert tok.vocab_size == len(vocabs[True].read_text().splitlines())


def test_bert_start_with_another_tokenizer_is_an_error(vocabs, spm_model):
  out, _ = spm_model
  c = _config(tokenizer="sentencepiece", vocab=f"{out}.model")
  c.init.bert_dir = str(vocabs[False].parent)
  with pytest.raises(TokenizerError, match=r"init\.bert_dir=.* starts from a BERT checkpoint.*"
                                           r"text\.tokenizer='sentencepiece' names another"):
    tokenizers.load_tokenizer(c)
  c = _config(vocab=str(vocabs[True]))
  c.init.bert_dir = str(vocabs[False].parent)
  with pytest.raises(TokenizerError, match="differs from the BERT checkpoint's"):
    tokenizers.load_tokenizer(c)
  with pytest.raises(TokenizerError, match="text.tokenizer='bpe'"):
    tokenizers.load_tokenizer(_config(tokenizer="bpe"))
  with pytest.raises(TokenizerError, match="text.vocab is empty"):
    tokenizers.load_tokenizer(_config())
