"""Greedy and beam-search decoding of the captioner, jit-compiled with fixed shapes.

Both loop over positions with `lax.while_loop` on a fixed [batch, max_len + 1] token buffer that
starts with [BOS]; each step runs the decoder over the whole buffer (causal, so later padding does
not change position t) and reads the logits at position t. There is no key/value cache: captions
are short (tens of tokens), and the loop stops as soon as every row has produced [EOS].

Only ids the captioner may produce are scored: real text ids and [EOS]
(`CaptionerConfig.generation_mask`); the step's log-probabilities are normalised over them, for
greedy and beam search alike. After [EOS] a row emits padding at no cost.

Beam search keeps `beam_size` hypotheses per example, ranked by total log-probability; finished
hypotheses keep their score and compete with the unfinished ones. The winner is chosen at the end
by log-probability divided by the GNMT length penalty ((5 + length) / 6) ** length_penalty
(length_penalty 0, the default, ranks by log-probability alone). With beam_size 1 it is greedy
decoding exactly.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vbert_jax.captioning import model as model_lib

# Stands for log(0) without the NaNs of -inf - -inf.
NEG = -1e9


def _default_len(config: model_lib.CaptionerConfig, max_len: int | None) -> int:
  max_len = config.max_caption_len - 1 if max_len is None else int(max_len)
  if not 1 <= max_len <= config.max_caption_len - 1:
    raise ValueError(f"decoding max_len={max_len}: expected 1 to max_caption_len - 1 = "
                     f"{config.max_caption_len - 1} (the decoder's positions, [BOS] included)")
  return max_len


def _encode(config, params, features, feature_mask):
  return model_lib.Captioner(config).apply({"params": params}, features, feature_mask,
                                           method=model_lib.Captioner.encode)


def _step_log_probs(config, params, tokens, memory, feature_mask, t):
  """log p(token at position t + 1 | tokens up to t), over the ids decoding may produce."""
  logits = model_lib.Captioner(config).apply({"params": params}, tokens, memory, feature_mask,
                                             method=model_lib.Captioner.decode)
  logits = jax.lax.dynamic_index_in_dim(logits, t, axis=1, keepdims=False)
  allowed = jnp.asarray(config.generation_mask())
  return jax.nn.log_softmax(jnp.where(allowed, logits, NEG), axis=-1)


def _running(max_len: int):
  """The loop condition of both searches: a position is left and some row has no [EOS] yet."""
  def cond(state):
    t, _, done, _ = state
    return (t < max_len) & ~jnp.all(done)
  return cond


def _inputs(features: Any, feature_mask: Any) -> tuple[jax.Array, jax.Array]:
  mask = None if feature_mask is None else jnp.asarray(feature_mask, jnp.int32)
  return model_lib.as_sequence(jnp.asarray(features, jnp.float32), mask)


def _start(config, rows: int, max_len: int) -> jax.Array:
  tokens = jnp.full((rows, max_len + 1), config.pad_id, jnp.int32)
  return tokens.at[:, 0].set(config.bos_id)


@functools.partial(jax.jit, static_argnames=("config", "max_len"))
def _greedy(params, features, feature_mask, *, config, max_len):
  memory, feature_mask = _encode(config, params, features, feature_mask)
  rows = memory.shape[0]

  def body(state):
    t, tokens, done, score = state
    logp = _step_log_probs(config, params, tokens, memory, feature_mask, t)
    best = jnp.argmax(logp, axis=-1).astype(jnp.int32)
    best = jnp.where(done, config.pad_id, best)
    gain = jnp.take_along_axis(logp, best[:, None], axis=-1)[:, 0]
    score = score + jnp.where(done, 0.0, gain)
    tokens = tokens.at[:, t + 1].set(best)
    return t + 1, tokens, done | (best == config.eos_id), score

  state = (jnp.int32(0), _start(config, rows, max_len), jnp.zeros((rows,), bool),
           jnp.zeros((rows,), jnp.float32))
  _, tokens, _, score = jax.lax.while_loop(_running(max_len), body, state)
  return tokens[:, 1:], score


def greedy(params: Any, config: model_lib.CaptionerConfig, features: Any,
           max_len: int | None = None, feature_mask: Any = None) -> tuple[jax.Array, jax.Array]:
  """(tokens [B, max_len] after [BOS], padded after [EOS]; their total log-probability [B])."""
  max_len = _default_len(config, max_len)
  features, feature_mask = _inputs(features, feature_mask)
  return _greedy(params, features, feature_mask, config=config, max_len=max_len)


def _gather_beams(x: jax.Array, beams: jax.Array) -> jax.Array:
  """x [B, K, ...], beams [B, K] -> x[b, beams[b, k], ...]."""
  index = beams.reshape(beams.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


@functools.partial(jax.jit, static_argnames=("config", "max_len", "beam_size",
                                             "length_penalty"))
def _beam_search(params, features, feature_mask, *, config, max_len, beam_size, length_penalty):
  memory, feature_mask = _encode(config, params, features, feature_mask)
  batch, k, vocab = memory.shape[0], beam_size, config.padded_vocab
  memory = jnp.repeat(memory, k, axis=0)
  feature_mask = jnp.repeat(feature_mask, k, axis=0)
  # A finished hypothesis continues with padding only, at no cost.
  pad_row = jnp.full((vocab,), NEG).at[config.pad_id].set(0.0)

  def body(state):
    t, tokens, done, scores = state
    logp = _step_log_probs(config, params, tokens.reshape(batch * k, -1), memory, feature_mask,
                           t).reshape(batch, k, vocab)
    logp = jnp.where(done[..., None], pad_row, logp)
    candidates = (scores[..., None] + logp).reshape(batch, k * vocab)
    scores, index = jax.lax.top_k(candidates, k)  # ties: the lower index first, as argmax
    beams, new = (index // vocab).astype(jnp.int32), (index % vocab).astype(jnp.int32)
    tokens = _gather_beams(tokens, beams).at[:, :, t + 1].set(new)
    done = _gather_beams(done, beams) | (new == config.eos_id)
    return t + 1, tokens, done, scores

  tokens = _start(config, batch * k, max_len).reshape(batch, k, max_len + 1)
  # Only the first beam is live at the start, so the first step does not pick k copies.
  scores = jnp.full((batch, k), NEG).at[:, 0].set(0.0)
  state = (jnp.int32(0), tokens, jnp.zeros((batch, k), bool), scores)
  _, tokens, _, scores = jax.lax.while_loop(_running(max_len), body, state)
  tokens = tokens[:, :, 1:]
  lengths = jnp.sum(tokens != config.pad_id, axis=-1).astype(jnp.float32)
  ranked = scores / ((5.0 + lengths) / 6.0) ** length_penalty
  best = jnp.argmax(ranked, axis=-1)
  pick = lambda x: jnp.take_along_axis(x, best.reshape((batch, 1) + (1,) * (x.ndim - 2)),
                                       axis=1)[:, 0]
  return pick(tokens), pick(scores)


def beam_search(params: Any, config: model_lib.CaptionerConfig, features: Any,
                max_len: int | None = None, beam_size: int = 4, feature_mask: Any = None,
                length_penalty: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """(best tokens [B, max_len], padded after [EOS]; their total log-probability [B])."""
  max_len = _default_len(config, max_len)
  allowed = int(config.generation_mask().sum())
  if not 1 <= beam_size <= allowed:
    raise ValueError(f"beam_size={beam_size}: expected 1 to {allowed} (the ids decoding may "
                     f"produce)")
  features, feature_mask = _inputs(features, feature_mask)
  return _beam_search(params, features, feature_mask, config=config, max_len=max_len,
                      beam_size=int(beam_size), length_penalty=float(length_penalty))


def decode_all(params: Any, config: model_lib.CaptionerConfig, features: np.ndarray,
               feature_mask: np.ndarray | None = None, *, beam_size: int = 1,
               max_len: int | None = None, batch_size: int = 64,
               length_penalty: float = 0.0) -> np.ndarray:
  """Tokens [N, max_len] for any number of examples, in batches of one fixed shape.

  The last batch is padded with copies of its first row, so every call reuses one compilation.
  """
  features = np.asarray(features, np.float32)
  if len(features) == 0:
    raise ValueError("decode_all: no features given (expected at least one example)")
  if batch_size < 1 or beam_size < 1:
    raise ValueError(f"decode_all: batch_size={batch_size}, beam_size={beam_size}; expected at "
                     f"least 1 each")
  mask = None if feature_mask is None else np.asarray(feature_mask, np.int32)
  batch_size = min(batch_size, len(features))
  out = []
  for start in range(0, len(features), batch_size):
    rows = slice(start, start + batch_size)
    chunk = _fill(features[rows], batch_size)
    chunk_mask = None if mask is None else _fill(mask[rows], batch_size)
    if beam_size == 1:
      tokens, _ = greedy(params, config, chunk, max_len, chunk_mask)
    else:
      tokens, _ = beam_search(params, config, chunk, max_len, beam_size, chunk_mask,
                              length_penalty)
    out.append(np.asarray(tokens)[:len(features[rows])])
  return np.concatenate(out)


def _fill(x: np.ndarray, rows: int) -> np.ndarray:
  """x padded to `rows` rows with copies of its first row (dropped after decoding)."""
  return np.concatenate([x, np.repeat(x[:1], rows - len(x), axis=0)])


def to_captions(tokenizer: Any, tokens: np.ndarray, eos_id: int) -> list[str]:
  """Caption strings from decoded tokens: cut at the first [EOS], specials left out."""
  out = []
  for row in np.asarray(tokens):
    ids: Sequence[int] = row.tolist()
    if eos_id in ids:
      ids = ids[:ids.index(eos_id)]
    out.append(tokenizer.decode(ids, skip_special=True))
  return out
