"""Text tokenizers behind one interface: WordPiece from a BERT vocab.txt, and SentencePiece.

Text ids are joint ids: the joint vocabulary (`sequence.JointVocab`) puts text first, so a text id
`i` in [0, vocab_size) is joint id `i`, and `config.model.text_vocab_size` must equal
`vocab_size`.

Special symbols (`sequence.SPECIAL_TOKENS`) written in the text, such as the `[MASK]`s of a prompt,
are kept whole and map to their ids in both tokenizers.

- `WordPieceTokenizer`: BERT's tokenizer (clean-up, CJK split, NFC, lowercase with accent
  stripping for uncased vocabularies, punctuation split, greedy longest-match-first WordPiece with
  `##` continuations, `[UNK]` for words over 100 characters or without a match). Its ids are the
  line numbers of vocab.txt; `[>]` is `[unused0]` (`sequence.BERT_VIDEO_SEP_TOKEN`).
- `SentencePieceTokenizer`: a `.model` from `train_sentencepiece`, trained with `[PAD]`=0,
  `[UNK]`=1 and `[CLS]`=2, `[SEP]`=3, `[MASK]`=4, `[>]`=5 as user-defined symbols. Its text is
  put through `sentences.normalize_text` with the model's case policy.
"""

from __future__ import annotations

import abc
import json
import pathlib
import re
import unicodedata
from typing import Any, Iterable, Sequence

import sentencepiece as spm

from vbert_jax import sequence
from vbert_jax.text import sentences

# The ids train_sentencepiece gives the special symbols.
SENTENCEPIECE_SPECIAL_IDS = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4, "[>]": 5}
TOKENIZERS = ("wordpiece", "sentencepiece")
# SentencePiece's byte-fallback pieces (<0x4A>) are not letters, whatever their case.
_BYTE_PIECE = re.compile(r"^<0x[0-9A-F]{2}>$")


class TokenizerError(ValueError):
  """A tokenizer file or config that cannot be used; the message names it."""


class TextTokenizer(abc.ABC):
  """Text <-> ids. Ids lie in [0, vocab_size) and are joint ids as they are."""

  lowercase: bool  # the case policy given to sentences.normalize_text
  source: str  # the file it was read from, for error messages

  @abc.abstractmethod
  def tokenize(self, text: str) -> list[str]:
    """The pieces of `text` (special symbols kept whole)."""

  @abc.abstractmethod
  def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
    """Text from ids; special symbols are left out when `skip_special`."""

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Ids are [0, vocab_size); the model's text_vocab_size must equal it."""

  @abc.abstractmethod
  def token_to_id(self, token: str) -> int:
    """The id of a piece; raises KeyError for a piece outside the vocabulary."""

  @abc.abstractmethod
  def id_to_token(self, token_id: int) -> str:
    """The piece of an id; raises for an id outside the vocabulary."""

  @property
  @abc.abstractmethod
  def specials(self) -> sequence.SpecialIds:
    """The ids of [PAD], [UNK], [CLS], [SEP], [MASK] and [>] in this vocabulary."""

  def encode(self, text: str) -> list[int]:
    return [self.token_to_id(t) for t in self.tokenize(text)]

  def joint_vocab(self, visual_size: int) -> sequence.JointVocab:
    return sequence.JointVocab(self.vocab_size, visual_size, self.specials)


def _special_names(vocab: dict[str, int]) -> list[str]:
  names = [t for t in sequence.SPECIAL_TOKENS if t in vocab or t == "[>]"]
  return sorted(names, key=len, reverse=True)


def _split_specials(text: str, names: Sequence[str]) -> list[tuple[str, bool]]:
  """[(piece, is_special)] with every occurrence of a special symbol as its own piece."""
  if not names:
    return [(text, False)]
  pattern = re.compile("(" + "|".join(re.escape(n) for n in names) + ")")
  return [(p, i % 2 == 1) for i, p in enumerate(pattern.split(text)) if p]


# ------------------------------------------------------------------------------- WordPiece


def _is_whitespace(ch: str) -> bool:
  return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
  return ch not in "\t\n\r" and unicodedata.category(ch).startswith("C")


def _is_punctuation(ch: str) -> bool:
  cp = ord(ch)
  # BERT counts all non-letter/number ASCII as punctuation ("$", "^", "`"), not only Unicode P*.
  if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
    return True
  return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
  return any(lo <= cp <= hi for lo, hi in (
      (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
      (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))


def _strip_accents(text: str) -> str:
  return "".join(ch for ch in unicodedata.normalize("NFD", text)
                 if unicodedata.category(ch) != "Mn")


def _split_punctuation(token: str) -> list[str]:
  out, current = [], []
  for ch in token:
    if _is_punctuation(ch):
      if current:
        out.append("".join(current))
        current = []
      out.append(ch)
    else:
      current.append(ch)
  if current:
    out.append("".join(current))
  return out


def read_vocab_file(path) -> dict[str, int]:
  """vocab.txt: one token a line; the id is the line number."""
  path = pathlib.Path(path)
  try:
    with open(path, encoding="utf-8") as f:
      tokens = [line.rstrip("\n").rstrip("\r") for line in f]
  except (OSError, UnicodeDecodeError) as e:
    raise TokenizerError(f"{path}: cannot read the WordPiece vocabulary ({e})") from e
  while tokens and not tokens[-1]:
    tokens.pop()
  if not tokens:
    raise TokenizerError(f"{path}: empty WordPiece vocabulary (expected one token a line)")
  return {token: i for i, token in enumerate(tokens)}


def _vocab_is_cased(vocab: dict[str, int]) -> bool:
  """A vocabulary with uppercase pieces outside [BRACKETED] specials was trained cased."""
  return any(t != t.lower() for t in vocab
             if not (t.startswith("[") and t.endswith("]")) and not _BYTE_PIECE.match(t))


class WordPieceTokenizer(TextTokenizer):
  """BERT's basic + WordPiece tokenizer over a vocab.txt (or a token -> id map)."""

  def __init__(self, vocab, lowercase: bool | None = None, strip_accents: bool | None = None,
               tokenize_cjk: bool = True, max_chars_per_word: int = 100, source: str = ""):
    """`lowercase=None` follows the vocabulary: uncased when it has no uppercase pieces.
    `strip_accents=None` strips accents exactly when lowercasing, as BERT does."""
    if isinstance(vocab, (str, pathlib.Path)):
      source = source or str(vocab)
      vocab = read_vocab_file(vocab)
    self.source = source or "WordPiece vocabulary"
    self._vocab = dict(vocab)
    self._inv = {i: t for t, i in self._vocab.items()}
    self.lowercase = not _vocab_is_cased(self._vocab) if lowercase is None else lowercase
    self.strip_accents = strip_accents
    self.tokenize_cjk = tokenize_cjk
    self.max_chars_per_word = max_chars_per_word
    self._specials = sequence.SpecialIds.from_vocab(self._vocab, self.source)
    self._special_names = _special_names(self._vocab)
    self._unk = "[UNK]"

  @property
  def vocab_size(self) -> int:
    return max(self._inv) + 1

  @property
  def specials(self) -> sequence.SpecialIds:
    return self._specials

  def token_to_id(self, token: str) -> int:
    if token == "[>]" and token not in self._vocab:
      return self._specials.video_sep
    return self._vocab[token]

  def id_to_token(self, token_id: int) -> str:
    return self._inv[int(token_id)]

  def basic_tokenize(self, text: str) -> list[str]:
    """BERT's BasicTokenizer: words and punctuation marks, before WordPiece."""
    chars = []
    for ch in text:
      cp = ord(ch)
      if cp == 0 or cp == 0xFFFD or _is_control(ch):
        continue
      if _is_whitespace(ch):
        chars.append(" ")
      elif self.tokenize_cjk and _is_cjk(cp):
        chars.extend((" ", ch, " "))
      else:
        chars.append(ch)
    text = unicodedata.normalize("NFC", "".join(chars))
    out = []
    for token in text.split():
      if self.lowercase:
        token = token.lower()
        if self.strip_accents is not False:
          token = _strip_accents(token)
      elif self.strip_accents:
        token = _strip_accents(token)
      out.extend(_split_punctuation(token))
    return " ".join(out).split()

  def wordpiece(self, word: str) -> list[str]:
    """Greedy longest-match-first; a word with an unmatched remainder is one `[UNK]`."""
    if len(word) > self.max_chars_per_word:
      return [self._unk]
    pieces, start = [], 0
    while start < len(word):
      end, match = len(word), None
      while start < end:
        piece = word[start:end] if start == 0 else "##" + word[start:end]
        if piece in self._vocab:
          match = piece
          break
        end -= 1
      if match is None:
        return [self._unk]
      pieces.append(match)
      start = end
    return pieces

  def tokenize(self, text: str) -> list[str]:
    out = []
    for piece, special in _split_specials(text, self._special_names):
      if special:
        out.append(piece)
      else:
        for word in self.basic_tokenize(piece):
          out.extend(self.wordpiece(word))
    return out

  def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
    special = set(self._specials.as_array().tolist())
    tokens = [self.id_to_token(i) for i in ids if not (skip_special and int(i) in special)]
    return " ".join(tokens).replace(" ##", "").strip()


# --------------------------------------------------------------------------- SentencePiece


class SentencePieceTokenizer(TextTokenizer):
  """A trained SentencePiece `.model`; the specials are read from its pieces."""

  def __init__(self, model_path, lowercase: bool | None = None):
    """`lowercase=None` follows the model: lowercase when none of its pieces has a capital."""
    self.source = str(model_path)
    if not pathlib.Path(model_path).is_file():
      raise TokenizerError(f"{model_path}: no such SentencePiece model file")
    try:
      self._sp = spm.SentencePieceProcessor(model_file=str(model_path))
    except (OSError, RuntimeError) as e:
      raise TokenizerError(f"{model_path}: not a SentencePiece model ({e})") from e
    self._pieces = [self._sp.id_to_piece(i) for i in range(self._sp.get_piece_size())]
    self._vocab = {p: i for i, p in enumerate(self._pieces)}
    self._specials = sequence.SpecialIds.from_vocab(self._vocab, self.source)
    self._special_names = _special_names(self._vocab)
    self.lowercase = not _vocab_is_cased(self._vocab) if lowercase is None else lowercase

  @property
  def vocab_size(self) -> int:
    return len(self._pieces)

  @property
  def specials(self) -> sequence.SpecialIds:
    return self._specials

  def token_to_id(self, token: str) -> int:
    return self._vocab[token]

  def id_to_token(self, token_id: int) -> str:
    if not 0 <= int(token_id) < len(self._pieces):
      raise KeyError(f"id {token_id} is outside {self.source}'s [0, {len(self._pieces)})")
    return self._pieces[int(token_id)]

  def _parts(self, text: str) -> list[tuple[str, bool]]:
    return [(p if special else sentences.normalize_text(p, self.lowercase), special)
            for p, special in _split_specials(text, self._special_names)]

  def tokenize(self, text: str) -> list[str]:
    out = []
    for part, special in self._parts(text):
      out.extend([part] if special else self._sp.encode(part, out_type=str))
    return out

  def encode(self, text: str) -> list[int]:
    out = []
    for part, special in self._parts(text):
      out.extend([self._vocab[part]] if special else self._sp.encode(part, out_type=int))
    return out

  def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
    ids = [int(i) for i in ids]
    if skip_special:
      special = set(self._specials.as_array().tolist())
      ids = [i for i in ids if i not in special]
    return self._sp.decode(ids)


# ------------------------------------------------------------------------------------ config


def _get(config: Any, dotted: str, default: Any = None) -> Any:
  node = config
  for key in dotted.split("."):
    if node is None:
      return default
    try:
      node = node[key] if isinstance(node, dict) else getattr(node, key)
    except (KeyError, AttributeError):
      return default
  return default if node is None else node


def load_tokenizer(config: Any) -> TextTokenizer:
  """The tokenizer a config names. Reads (a ConfigDict, dict or object with these keys):

    text.tokenizer   "wordpiece" or "sentencepiece"
    text.vocab       vocab.txt or .model ("" with init.bert_dir: the checkpoint's vocab.txt)
    text.lowercase   "auto" (or None, "") to follow the vocabulary, or true/false
    init.bert_dir    when set, the run starts from BERT: the tokenizer must be its WordPiece
    model.text_vocab_size  when set, must equal the tokenizer's vocabulary size
  """
  name = str(_get(config, "text.tokenizer", "wordpiece")).lower()
  vocab_path = str(_get(config, "text.vocab", ""))
  bert_dir = str(_get(config, "init.bert_dir", ""))
  lowercase = _lowercase_policy(_get(config, "text.lowercase", None))
  if name not in TOKENIZERS:
    raise TokenizerError(f"config text.tokenizer={name!r}: expected one of {list(TOKENIZERS)}")
  if bert_dir and name != "wordpiece":
    raise TokenizerError(
        f"config init.bert_dir={bert_dir!r} starts from a BERT checkpoint, whose text "
        f"embeddings are indexed by its WordPiece vocab.txt, but text.tokenizer={name!r} names "
        f"another tokenizer; set text.tokenizer='wordpiece' (and text.vocab to "
        f"{bert_dir}/vocab.txt or leave it empty)")
  if bert_dir:
    tokenizer = _bert_wordpiece(bert_dir, vocab_path, lowercase)
  elif not vocab_path:
    raise TokenizerError(f"config text.vocab is empty: expected the path of a "
                         f"{'vocab.txt' if name == 'wordpiece' else 'SentencePiece .model'}")
  elif name == "wordpiece":
    tokenizer = WordPieceTokenizer(vocab_path, lowercase=lowercase)
  else:
    tokenizer = SentencePieceTokenizer(vocab_path, lowercase=lowercase)
  check_vocab_size(tokenizer, _get(config, "model.text_vocab_size", None))
  return tokenizer


def _lowercase_policy(value: Any) -> bool | None:
  if value is None or isinstance(value, bool):
    return value
  text = str(value).strip().lower()
  if text in ("", "auto", "none"):
    return None
  if text in ("true", "1", "false", "0"):
    return text in ("true", "1")
  raise TokenizerError(f"config text.lowercase={value!r}: expected auto, true or false")


def _bert_wordpiece(bert_dir: str, vocab_path: str, lowercase: bool | None
                    ) -> WordPieceTokenizer:
  bert_vocab = pathlib.Path(bert_dir) / "vocab.txt"
  if not bert_vocab.is_file():
    raise TokenizerError(f"config init.bert_dir={bert_dir!r}: no vocab.txt there")
  if vocab_path and read_vocab_file(vocab_path) != read_vocab_file(bert_vocab):
    raise TokenizerError(f"config text.vocab={vocab_path!r} differs from the BERT checkpoint's "
                         f"{bert_vocab}; a run that starts from BERT must use its vocab.txt")
  if lowercase is None:
    tok_config = pathlib.Path(bert_dir) / "tokenizer_config.json"
    if tok_config.is_file():
      lowercase = json.loads(tok_config.read_text()).get("do_lower_case")
  return WordPieceTokenizer(bert_vocab, lowercase=lowercase)


def check_vocab_size(tokenizer: TextTokenizer, text_vocab_size: int | None) -> None:
  """The model's text vocabulary must be exactly the tokenizer's."""
  if text_vocab_size and int(text_vocab_size) != tokenizer.vocab_size:
    raise TokenizerError(
        f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} tokens but config "
        f"model.text_vocab_size={text_vocab_size}; they must be equal")
