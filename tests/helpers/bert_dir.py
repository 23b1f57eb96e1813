"""A Hugging Face BERT directory with random weights, standing in for a downloaded checkpoint."""

from __future__ import annotations

import pathlib

import torch
import transformers

from vbert_jax import sequence


def vocab_tokens(size: int) -> list[str]:
  """A BERT-shaped vocab.txt: the specials at BERT's ids, filler elsewhere."""
  tokens = [f"tok{i}" for i in range(size)]
  ids = sequence.SpecialIds.bert()
  for name, i in (("[PAD]", ids.pad), ("[unused0]", ids.video_sep), ("[UNK]", ids.unk),
                  ("[CLS]", ids.cls), ("[SEP]", ids.sep), ("[MASK]", ids.mask)):
    tokens[i] = name
  return tokens


def write_bert_dir(path, *, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                   mlp_dim: int, max_positions: int, seed: int = 0
                   ) -> transformers.BertForPreTraining:
  """Writes config.json, model.safetensors and vocab.txt of a random BertForPreTraining."""
  path = pathlib.Path(path)
  torch.manual_seed(seed)
  config = transformers.BertConfig(
      vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
      num_attention_heads=num_heads, intermediate_size=mlp_dim,
      max_position_embeddings=max_positions, type_vocab_size=2, hidden_act="gelu")
  model = transformers.BertForPreTraining(config)
  model.save_pretrained(path)
  (path / "vocab.txt").write_text("\n".join(vocab_tokens(vocab_size)) + "\n")
  return model
