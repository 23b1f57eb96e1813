"""The captioner: a Flax encoder-decoder transformer from video features to caption tokens.

The paper trains a separate encoder-decoder on VideoBERT's caption features. The encoder reads a
short sequence of feature vectors: one vector per video segment (the paper's features, given as
[B, D] and read as a sequence of length 1) or [B, T, D] with a mask. The decoder is causal over
the caption's text ids (the text tokenizer's own ids) and attends to the encoder's outputs.

Layers are pre-LN (LayerNorm before each block, one more at the end of each stack): unlike BERT's
post-LN they train from scratch without a long warmup, which is how this model is always trained.
Output logits use the decoder's token embedding table (tied weights) plus a bias; the table is
padded to a multiple of 128 rows (`sequence.round_up`) so that any mesh shards it, and padding
rows get a large negative logit.

Logical axis names are those of `vbert_jax.model` (batch, length, embed, heads, kv, mlp, vocab),
so the generic trainer shards the captioner with the same rules as VideoBERT; the attention
projections are that module's `Projection`, which reads only the sizes, dtypes and
initializer range that both configs share.

Parameter tree (`params` collection):

    encoder/  input/{kernel [D, H], bias}, position_embeddings/embedding [T, H],
              layer_{i}/{attention_norm, attention/{query, key, value, out}, mlp_norm,
                         intermediate, output}, final_norm
    decoder/  token_embeddings/embedding [V_padded, H], position_embeddings/embedding [L, H],
              layer_{i}/{self_norm, self_attention, cross_norm, cross_attention, mlp_norm,
                         intermediate, output}, final_norm, logits_bias [V_padded]
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vbert_jax import model as videobert
from vbert_jax import sequence

# Logits of padding and banned ids: finite, so that 0 * log p stays 0 in a cross-entropy.
PAD_LOGIT = -1e9


@dataclasses.dataclass(frozen=True)
class CaptionerConfig(videobert.Precision):
  """Sizes, token ids and options. Frozen: a linen attribute and a static jit argument."""
  vocab_size: int  # the text tokenizer's vocabulary size
  feature_dim: int  # D of one feature vector
  pad_id: int
  bos_id: int  # the decoder's first input ([CLS] of the tokenizer)
  eos_id: int  # ends a caption ([SEP] of the tokenizer)
  max_feature_len: int = 1  # T: feature vectors per example
  max_caption_len: int = 32  # decoder positions, [BOS] included
  hidden_size: int = 256
  num_encoder_layers: int = 2
  num_decoder_layers: int = 2
  num_heads: int = 4
  mlp_dim: int = 1024
  dropout_rate: float = 0.1
  layer_norm_eps: float = 1e-6
  initializer_range: float = 0.02
  dtype: str = "float32"
  param_dtype: str = "float32"
  # Ids never generated besides padding and [BOS] (the tokenizer's [MASK], [>], [UNK]).
  banned_ids: tuple[int, ...] = ()

  def __post_init__(self):
    for key in ("vocab_size", "feature_dim", "max_feature_len", "max_caption_len", "hidden_size",
                "num_encoder_layers", "num_decoder_layers", "num_heads", "mlp_dim"):
      value = getattr(self, key)
      if not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"captioner config {key}={value!r}: expected a positive integer")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"captioner config hidden_size={self.hidden_size} is not divisible by "
                       f"num_heads={self.num_heads}")
    if self.max_caption_len < 2:
      raise ValueError(f"captioner config max_caption_len={self.max_caption_len}: expected at "
                       f"least 2 ([BOS] and one token)")
    ids = {"pad_id": self.pad_id, "bos_id": self.bos_id, "eos_id": self.eos_id,
           **{f"banned_ids[{i}]": v for i, v in enumerate(self.banned_ids)}}
    for key, value in ids.items():
      if not 0 <= value < self.vocab_size:
        raise ValueError(f"captioner config {key}={value} lies outside the text vocabulary "
                         f"[0, {self.vocab_size})")
    for key in ("dtype", "param_dtype"):
      try:
        jnp.dtype(getattr(self, key))
      except TypeError as e:
        raise ValueError(f"captioner config {key}={getattr(self, key)!r} is not a dtype") from e

  @property
  def padded_vocab(self) -> int:
    return sequence.round_up(self.vocab_size)

  def generation_mask(self) -> np.ndarray:
    """[padded_vocab] bool: the ids decoding may produce (real text ids and [EOS])."""
    allowed = np.arange(self.padded_vocab) < self.vocab_size
    allowed[[self.pad_id, self.bos_id, *self.banned_ids]] = False
    allowed[self.eos_id] = True
    return allowed


# ----------------------------------------------------------------------------------------------
# Building blocks.


class Attention(nn.Module):
  """Multi-head attention of queries `x` [B, T, H] over `memory` [B, S, H]; mask [B, 1, T, S]."""
  config: CaptionerConfig

  @nn.compact
  def __call__(self, x: jax.Array, memory: jax.Array, mask: jax.Array) -> jax.Array:
    cfg = self.config
    heads = (cfg.num_heads, cfg.head_dim)
    axes = ("batch", "length", "heads", "kv")

    def project(name: str, source: jax.Array) -> jax.Array:
      out = videobert.Projection(cfg, heads, ("embed", "heads", "kv"), name=name)(source)
      return nn.with_logical_constraint(out, axes)

    q, k, v = project("query", x), project("key", memory), project("value", memory)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask)
    out = nn.with_logical_constraint(out, axes)
    return videobert.Projection(cfg, (cfg.hidden_size,), ("heads", "kv", "embed"), num_in=2,
                                name="out")(out)


class MLP(nn.Module):
  config: CaptionerConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    h = nn.gelu(videobert.dense(cfg, cfg.mlp_dim, ("embed", "mlp"), "intermediate")(x))
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    return videobert.dense(cfg, cfg.hidden_size, ("mlp", "embed"), "output")(h)


class EncoderLayer(nn.Module):
  config: CaptionerConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
    cfg = self.config
    drop = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)
    h = videobert.layer_norm(cfg, "attention_norm")(x)
    x = x + drop(Attention(cfg, name="attention")(h, h, mask))
    x = x + drop(MLP(cfg, name="mlp")(videobert.layer_norm(cfg, "mlp_norm")(x)))
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class DecoderLayer(nn.Module):
  config: CaptionerConfig

  @nn.compact
  def __call__(self, x: jax.Array, memory: jax.Array, self_mask: jax.Array,
               cross_mask: jax.Array, deterministic: bool) -> jax.Array:
    cfg = self.config
    drop = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)
    h = videobert.layer_norm(cfg, "self_norm")(x)
    x = x + drop(Attention(cfg, name="self_attention")(h, h, self_mask))
    h = videobert.layer_norm(cfg, "cross_norm")(x)
    x = x + drop(Attention(cfg, name="cross_attention")(h, memory, cross_mask))
    x = x + drop(MLP(cfg, name="mlp")(videobert.layer_norm(cfg, "mlp_norm")(x)))
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


def _with_positions(cfg: CaptionerConfig, x: jax.Array, size: int,
                    deterministic: bool) -> jax.Array:
  """x [B, T, H] plus learned position embeddings (of `size` rows), then dropout: how both
  stacks begin. Called inside a compact module, whose parameters it creates."""
  table = nn.Embed(size, cfg.hidden_size, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
                   embedding_init=videobert.kernel_init(cfg, (None, "embed")),
                   name="position_embeddings")
  x = x + table(jnp.arange(x.shape[1]))[None]
  x = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)(x)
  return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class Encoder(nn.Module):
  config: CaptionerConfig

  @nn.compact
  def __call__(self, features: jax.Array, feature_mask: jax.Array,
               deterministic: bool) -> jax.Array:
    cfg = self.config
    x = videobert.dense(cfg, cfg.hidden_size, (None, "embed"), "input")(features)
    x = _with_positions(cfg, x, cfg.max_feature_len, deterministic)
    mask = (feature_mask > 0)[:, None, None, :]
    for i in range(cfg.num_encoder_layers):
      x = EncoderLayer(cfg, name=f"layer_{i}")(x, mask, deterministic)
    return videobert.layer_norm(cfg, "final_norm")(x)


class Decoder(nn.Module):
  config: CaptionerConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, memory: jax.Array, feature_mask: jax.Array,
               deterministic: bool) -> jax.Array:
    cfg = self.config
    embed = nn.Embed(cfg.padded_vocab, cfg.hidden_size, dtype=cfg.compute_dtype,
                     param_dtype=cfg.weight_dtype,
                     embedding_init=videobert.kernel_init(cfg, ("vocab", "embed")),
                     name="token_embeddings")
    length = tokens.shape[1]
    x = _with_positions(cfg, embed(tokens), cfg.max_caption_len, deterministic)
    # Causal only: padding comes after a caption's [EOS], so no real position ever sees it.
    self_mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
    cross_mask = (feature_mask > 0)[:, None, None, :]
    for i in range(cfg.num_decoder_layers):
      x = DecoderLayer(cfg, name=f"layer_{i}")(x, memory, self_mask, cross_mask, deterministic)
    x = videobert.layer_norm(cfg, "final_norm")(x)
    bias = self.param("logits_bias", videobert.zeros_init(("vocab",)), (cfg.padded_vocab,),
                      cfg.weight_dtype)
    logits = jnp.einsum("blh,vh->blv", x, embed.embedding.astype(cfg.compute_dtype),
                        preferred_element_type=jnp.float32) + bias.astype(jnp.float32)
    logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
    real = jnp.arange(cfg.padded_vocab) < cfg.vocab_size
    return jnp.where(real, logits, PAD_LOGIT)


class Captioner(nn.Module):
  """features [B, T, D] (+ mask [B, T]) and decoder input ids [B, L] -> logits [B, L, V_padded]."""
  config: CaptionerConfig

  def setup(self):
    self.encoder = Encoder(self.config)
    self.decoder = Decoder(self.config)

  def encode(self, features: jax.Array, feature_mask: jax.Array | None = None, *,
             deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
    """(memory [B, T, H], feature mask [B, T]); a [B, D] input is one vector per example."""
    features, feature_mask = as_sequence(features, feature_mask)
    return self.encoder(features, feature_mask, deterministic), feature_mask

  def decode(self, tokens: jax.Array, memory: jax.Array, feature_mask: jax.Array, *,
             deterministic: bool = True) -> jax.Array:
    return self.decoder(tokens, memory, feature_mask, deterministic)

  def __call__(self, features: jax.Array, tokens: jax.Array,
               feature_mask: jax.Array | None = None, *,
               deterministic: bool = True) -> jax.Array:
    memory, feature_mask = self.encode(features, feature_mask, deterministic=deterministic)
    return self.decode(tokens, memory, feature_mask, deterministic=deterministic)


def as_sequence(features: jax.Array, feature_mask: jax.Array | None
                ) -> tuple[jax.Array, jax.Array]:
  """[B, D] -> [B, 1, D]; a missing mask means every vector is real."""
  if features.ndim == 2:
    features = features[:, None, :]
  if features.ndim != 3:
    raise ValueError(f"captioner features have shape {features.shape}; expected [batch, dim] or "
                     f"[batch, vectors, dim]")
  if feature_mask is None:
    feature_mask = jnp.ones(features.shape[:2], jnp.int32)
  return features, feature_mask


def init_params(config: CaptionerConfig, rng: jax.Array, *, unbox: bool = True) -> dict:
  """Fresh parameters; `unbox=False` keeps the logical-axis boxes (what a Trainable's init returns)."""
  features = jnp.zeros((1, config.max_feature_len, config.feature_dim), jnp.float32)
  tokens = jnp.zeros((1, config.max_caption_len), jnp.int32)
  # One compilation rather than an eager op-by-op init.
  init = jax.jit(lambda key: Captioner(config).init({"params": key}, features, tokens))
  params = init(rng)["params"]
  return nn.meta.unbox(params) if unbox else params
