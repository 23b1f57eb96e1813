"""The text side: transcript readers, sentence segmentation, text tokenizers."""

from vbert_jax.text.sentences import Sentence, SplitConfig, normalize_text, split_sentences
from vbert_jax.text.tokenizers import (SentencePieceTokenizer, TextTokenizer, TokenizerError,
                                       WordPieceTokenizer, load_tokenizer)
from vbert_jax.text.transcripts import Cue, TranscriptError, read_transcript

__all__ = ["Cue", "Sentence", "SentencePieceTokenizer", "SplitConfig", "TextTokenizer",
           "TokenizerError", "TranscriptError", "WordPieceTokenizer", "load_tokenizer",
           "normalize_text", "read_transcript", "split_sentences"]
