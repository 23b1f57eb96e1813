"""The captioner for the generic trainer, and its input: (features, caption) pairs files.

A pairs file is one `.npz` (numpy, no pickles) with these arrays, one row per caption:

    features      float32 [N, D] (one vector per video segment, the paper's features)
                  or [N, T, D] (a short sequence of vectors per row)
    feature_mask  int32 [N, T], 1 for real vectors (optional; [N, T, D] features only)
    captions      str [N], the caption of each row
    video_ids     str [N], the video (segment) each row describes

A video with several reference captions has one row per caption (its features repeated);
training sees every row, evaluation groups the rows by video_id. `features.make_pairs` writes one
from a VideoBERT bundle; `Pairs.write` from arrays.

Captions become decoder inputs `[BOS] w1 ... wn` and targets `w1 ... wn [EOS]` with the text
tokenizer of the captioner's config (`config.text`), [BOS] and [EOS] being its [CLS] and [SEP];
a caption longer than `max_caption_len - 1` pieces is cut (counted in a warning).

`PairsSource` follows the trainer's input contract (next / get_state / set_state): example i of a
split is a pure function of (seed, split, i), each epoch visiting the rows in a fresh seeded order,
so a resumed run sees exactly the examples an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from vbert_jax import atomic
from vbert_jax import sharding
from vbert_jax import stream
from vbert_jax import train as train_lib
from vbert_jax.captioning import model as model_lib
from vbert_jax.text import tokenizers

SPLITS = {"train": 0, "eval": 1}
BATCH_FIELDS = ("features", "feature_mask", "decoder_input", "targets", "target_weights")


# ---------------------------------------------------------------------------------------------
# The pairs file.


@dataclasses.dataclass
class Pairs:
  """Rows of (features, caption, video id); features as [N, T, D] with a [N, T] mask."""
  features: np.ndarray
  feature_mask: np.ndarray
  captions: list[str]
  video_ids: list[str]
  source: str = "pairs"

  def __post_init__(self):
    self.features = np.asarray(self.features, np.float32)
    if self.features.ndim == 2:
      self.features = self.features[:, None, :]
    if self.features.ndim != 3:
      raise ValueError(f"{self.source}: features have shape {self.features.shape}; expected "
                       f"[N, D] or [N, T, D]")
    n, t = self.features.shape[:2]
    if self.feature_mask is None:
      self.feature_mask = np.ones((n, t), np.int32)
    self.feature_mask = np.asarray(self.feature_mask, np.int32)
    self.captions = [str(c) for c in self.captions]
    self.video_ids = [str(v) for v in self.video_ids]
    counts = {"features": n, "captions": len(self.captions), "video_ids": len(self.video_ids)}
    if len(set(counts.values())) != 1:
      found = ", ".join(f"{k}={v}" for k, v in counts.items())
      raise ValueError(f"{self.source}: row counts differ ({found}); expected one caption and "
                       f"one video id per row of features")
    if self.feature_mask.shape != (n, t):
      raise ValueError(f"{self.source}: feature_mask has shape {self.feature_mask.shape}; "
                       f"expected {(n, t)} to match features {self.features.shape}")
    if n == 0:
      raise ValueError(f"{self.source}: no rows (expected at least one (features, caption) pair)")
    empty = np.flatnonzero(self.feature_mask.sum(axis=1) == 0)
    if empty.size:
      raise ValueError(f"{self.source}: rows {empty[:8].tolist()} have no real feature vector "
                       f"(feature_mask all 0)")
    if not np.isfinite(self.features).all():
      raise ValueError(f"{self.source}: features hold NaN or infinite values")

  def __len__(self) -> int:
    return len(self.captions)

  @property
  def feature_dim(self) -> int:
    return int(self.features.shape[2])

  @property
  def feature_len(self) -> int:
    return int(self.features.shape[1])

  @classmethod
  def read(cls, path: Any) -> "Pairs":
    path = pathlib.Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"pairs file {path}: no such file (expected an .npz with features, "
                              f"captions and video_ids)")
    try:
      data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
      raise ValueError(f"pairs file {path}: not a readable .npz ({e})") from e
    with data:
      missing = [k for k in ("features", "captions", "video_ids") if k not in data.files]
      if missing:
        raise ValueError(f"pairs file {path}: missing arrays {missing}; found {data.files}, "
                         f"expected features, captions, video_ids (and optional feature_mask)")
      mask = data["feature_mask"] if "feature_mask" in data.files else None
      return cls(data["features"], mask, data["captions"].tolist(), data["video_ids"].tolist(),
                 source=f"pairs file {path}")

  def write(self, path: Any) -> pathlib.Path:
    """Writes the .npz atomically (a reader never sees half a file)."""
    def save(tmp: str) -> None:
      with open(tmp, "wb") as f:
        np.savez(f, features=self.features, feature_mask=self.feature_mask,
                 captions=np.asarray(self.captions, dtype=str),
                 video_ids=np.asarray(self.video_ids, dtype=str))
    return atomic.write_atomic(path, save)

  def by_video(self) -> tuple[list[str], np.ndarray, np.ndarray, dict[str, list[str]]]:
    """(video ids in first-seen order, their features [V, T, D] and masks (first row of each),
    references {video_id: [captions]})."""
    first: dict[str, int] = {}
    references: dict[str, list[str]] = {}
    for row, (vid, caption) in enumerate(zip(self.video_ids, self.captions)):
      first.setdefault(vid, row)
      references.setdefault(vid, []).append(caption)
    rows = list(first.values())
    return list(first), self.features[rows], self.feature_mask[rows], references


# ---------------------------------------------------------------------------------------------
# Captions as decoder inputs and targets.


def encode_caption(tokenizer: tokenizers.TextTokenizer, text: str, max_caption_len: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
  """(decoder_input [L], targets [L], target_weights [L], whether it was cut)."""
  sp = tokenizer.specials
  ids = tokenizer.encode(text)
  cut = len(ids) > max_caption_len - 1
  ids = ids[:max_caption_len - 1]
  decoder_input = np.full(max_caption_len, sp.pad, np.int32)
  targets = np.full(max_caption_len, sp.pad, np.int32)
  weights = np.zeros(max_caption_len, np.float32)
  decoder_input[:len(ids) + 1] = [sp.cls, *ids]
  targets[:len(ids) + 1] = [*ids, sp.sep]
  weights[:len(ids) + 1] = 1.0
  return decoder_input, targets, weights, cut


class PairsSource:
  """This process's rows of global batches of (features, caption) pairs (`vbert_jax/stream.py`);
  the trainer's iterator contract."""

  def __init__(self, pairs: Pairs, tokenizer: tokenizers.TextTokenizer, *, max_caption_len: int,
               max_feature_len: int, batch_size: int, seed: int, split: str = "train",
               shuffle: bool = True, rows: Sequence[int] | None = None):
    if split not in SPLITS:
      raise ValueError(f"pairs source: split={split!r}; expected one of {sorted(SPLITS)}")
    self.rows = stream.check_rows(rows, batch_size, "pairs source")
    if pairs.feature_len > max_feature_len:
      raise ValueError(f"{pairs.source}: {pairs.feature_len} feature vectors per row but the "
                       f"captioner takes max_feature_len={max_feature_len}")
    self.pairs, self.batch_size, self.seed, self.split = pairs, batch_size, seed, split
    self.shuffle = shuffle
    pad = max_feature_len - pairs.feature_len
    self.features = np.pad(pairs.features, ((0, 0), (0, pad), (0, 0)))
    self.feature_mask = np.pad(pairs.feature_mask, ((0, 0), (0, pad)))
    encoded = [encode_caption(tokenizer, c, max_caption_len) for c in pairs.captions]
    self.decoder_input, self.targets, self.weights = (np.stack([e[i] for e in encoded])
                                                      for i in range(3))
    cut = sum(e[3] for e in encoded)
    if cut:
      logging.warning("%s: %d of %d captions are longer than max_caption_len - 1 = %d pieces "
                      "and were cut", pairs.source, cut, len(encoded), max_caption_len - 1)
    self.position = 0  # of the next global batch's first pair in the stream
    self._cached_epoch, self._cached_order = -1, np.arange(len(pairs))

  def __iter__(self) -> "PairsSource":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rows = np.array([self.row(self.position + int(r)) for r in self.rows])
    self.position += self.batch_size
    return {"features": self.features[rows], "feature_mask": self.feature_mask[rows],
            "decoder_input": self.decoder_input[rows], "targets": self.targets[rows],
            "target_weights": self.weights[rows]}

  def get_state(self) -> dict[str, Any]:
    return {"position": self.position, "seed": self.seed, "split": self.split,
            "rows": len(self.pairs)}

  def set_state(self, state: Mapping[str, Any]) -> None:
    mine = {"seed": self.seed, "split": self.split, "rows": len(self.pairs)}
    if any(state.get(k) != v for k, v in mine.items()):
      raise stream.StreamMismatchError(f"pairs source: saved state {dict(state)} is for another "
                                       f"stream; this one has {mine}")
    self.position = stream.position_of(state, self.batch_size, "pairs source")

  def row(self, index: int) -> int:
    """The pairs row of a global example index: a fresh seeded order in every epoch."""
    epoch, position = divmod(index, len(self.pairs))
    if not self.shuffle:
      return position
    return int(self._order(epoch)[position])

  def _order(self, epoch: int) -> np.ndarray:
    # Batches read one epoch after the other: keeping the latest order is enough.
    if self._cached_epoch != epoch:
      rng = np.random.default_rng([self.seed, SPLITS[self.split], epoch])
      self._cached_order, self._cached_epoch = rng.permutation(len(self.pairs)), epoch
    return self._cached_order


# ---------------------------------------------------------------------------------------------
# The trainable.


def load_tokenizer(config: ml_collections.ConfigDict) -> tokenizers.TextTokenizer:
  """The caption tokenizer that `config.text` names (a VideoBERT run's, or any other)."""
  return tokenizers.load_tokenizer({"text": dict(config.text)})


def captioner_config(config: ml_collections.ConfigDict,
                     tokenizer: tokenizers.TextTokenizer | None = None
                     ) -> model_lib.CaptionerConfig:
  """The CaptionerConfig of a captioner config; token ids and vocabulary size from the tokenizer."""
  tokenizer = tokenizer or load_tokenizer(config)
  m = config.model
  for key in ("feature_dim", "max_feature_len"):
    if int(m[key]) <= 0:
      raise ValueError(f"config.model.{key}={m[key]}: not resolved; the train CLI sets it from "
                       f"config.input.pairs (or set it to the pairs file's feature size)")
  sp = tokenizer.specials
  return model_lib.CaptionerConfig(
      vocab_size=tokenizer.vocab_size, feature_dim=int(m.feature_dim),
      max_feature_len=int(m.max_feature_len), max_caption_len=int(config.max_caption_len),
      pad_id=sp.pad, bos_id=sp.cls, eos_id=sp.sep,
      banned_ids=tuple(sorted({sp.mask, sp.video_sep, sp.unk} - {sp.pad, sp.cls, sp.sep})),
      hidden_size=int(m.hidden_size), num_encoder_layers=int(m.num_encoder_layers),
      num_decoder_layers=int(m.num_decoder_layers), num_heads=int(m.num_heads),
      mlp_dim=int(m.mlp_dim), dropout_rate=float(m.dropout_rate), dtype=str(m.dtype),
      param_dtype=str(m.param_dtype))


def batch_spec(cfg: model_lib.CaptionerConfig, batch_size: int
               ) -> dict[str, jax.ShapeDtypeStruct]:
  t, d, length = cfg.max_feature_len, cfg.feature_dim, cfg.max_caption_len
  shapes = {"features": ((t, d), jnp.float32), "feature_mask": ((t,), jnp.int32),
            "decoder_input": ((length,), jnp.int32), "targets": ((length,), jnp.int32),
            "target_weights": ((length,), jnp.float32)}
  return {k: jax.ShapeDtypeStruct((batch_size,) + s, dt) for k, (s, dt) in shapes.items()}


def check_batch(cfg: model_lib.CaptionerConfig, batch: Mapping[str, Any], where: str) -> None:
  """Fields, shapes and id ranges of a host batch; errors name `where` and the field."""
  missing = sorted(set(BATCH_FIELDS) - set(batch))
  if missing:
    raise ValueError(f"{where}: missing fields {missing}")
  spec = batch_spec(cfg, len(np.asarray(batch["features"])))
  for name, s in spec.items():
    if tuple(np.shape(batch[name])) != s.shape:
      raise ValueError(f"{where}: {name} has shape {tuple(np.shape(batch[name]))}; expected "
                       f"{s.shape} (batch, max_feature_len={cfg.max_feature_len}, feature_dim="
                       f"{cfg.feature_dim}, max_caption_len={cfg.max_caption_len})")
  for name in ("decoder_input", "targets"):
    ids = np.asarray(batch[name])
    if ids.min() < 0 or ids.max() >= cfg.vocab_size:
      raise ValueError(f"{where}: {name} in [{ids.min()}, {ids.max()}] fall outside the text "
                       f"vocabulary [0, {cfg.vocab_size})")


def caption_denominators(batch: Mapping[str, Any]) -> dict[str, jax.Array]:
  """What the caption loss averages over: the real target tokens of a batch."""
  return {"caption": jnp.sum(batch["target_weights"])}


def caption_loss(cfg: model_lib.CaptionerConfig, params: Any, batch: Mapping[str, Any],
                 rng: jax.Array | None, over: Mapping[str, jax.Array] | None = None
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Token cross-entropy over the caption (targets and [EOS]), and token accuracy.

  The loss averages over this batch's tokens, or over `over["caption"]` tokens (a micro-batch's
  share of a whole batch); the metrics describe this batch.
  """
  logits = model_lib.Captioner(cfg).apply(
      {"params": params}, batch["features"], batch["decoder_input"], batch["feature_mask"],
      deterministic=rng is None, rngs=None if rng is None else {"dropout": rng})
  xent = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  weights = batch["target_weights"]
  count = jnp.sum(weights)
  denominator = jnp.maximum(count, 1.0)
  loss = jnp.sum(xent * weights) / (denominator if over is None
                                    else jnp.maximum(over["caption"], 1.0))
  correct = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
  metrics = {"caption_loss": jnp.sum(xent * weights) / denominator,
             "caption_accuracy": jnp.sum(correct * weights) / denominator,
             "caption_count": count}
  return loss, metrics


def make_trainable(config: ml_collections.ConfigDict,
                   tokenizer: tokenizers.TextTokenizer | None = None) -> train_lib.Trainable:
  """The captioner under the generic trainer (its checkpoints, metrics and sharding)."""
  cfg = captioner_config(config, tokenizer)
  module = model_lib.Captioner(cfg)

  def init(rng: jax.Array) -> Any:
    features = jnp.zeros((1, cfg.max_feature_len, cfg.feature_dim), jnp.float32)
    tokens = jnp.zeros((1, cfg.max_caption_len), jnp.int32)
    return module.init({"params": rng}, features, tokens)["params"]

  return train_lib.Trainable(init=init, loss=functools.partial(caption_loss, cfg),
                        denominators=caption_denominators,
                        check_batch=functools.partial(check_batch, cfg),
                        batch_spec=functools.partial(batch_spec, cfg),
                        tokens_per_example=cfg.max_caption_len)


# ---------------------------------------------------------------------------------------------
# Training as configured.


def resolve_features(config: ml_collections.ConfigDict, pairs: Pairs) -> None:
  """Sets config.model.feature_dim / max_feature_len from the pairs file (0 means "from it")."""
  m = config.model
  for key, found in (("feature_dim", pairs.feature_dim), ("max_feature_len", pairs.feature_len)):
    if int(m[key]) == 0:
      m[key] = found
  if int(m.feature_dim) != pairs.feature_dim:
    raise ValueError(f"config.model.feature_dim={m.feature_dim} but {pairs.source} has features "
                     f"of size {pairs.feature_dim}")
  if int(m.max_feature_len) < pairs.feature_len:
    raise ValueError(f"config.model.max_feature_len={m.max_feature_len} but {pairs.source} has "
                     f"{pairs.feature_len} feature vectors per row")


def make_source(config: ml_collections.ConfigDict, pairs: Pairs,
                tokenizer: tokenizers.TextTokenizer, split: str, batch_size: int,
                mesh: jax.sharding.Mesh) -> PairsSource:
  """This process's iterator over a pairs file (training shuffles, evaluation reads in order)."""
  rows = sharding.process_rows(batch_size, mesh, sharding.make_rules(config.sharding_rules))
  return PairsSource(pairs, tokenizer, max_caption_len=int(config.max_caption_len),
                     max_feature_len=int(config.model.max_feature_len), batch_size=batch_size,
                     seed=int(config.seed), split=split, shuffle=split == "train", rows=rows)


def train_captioner(config: ml_collections.ConfigDict, workdir: Any,
                    mesh: jax.sharding.Mesh | None = None) -> train_lib.LoopResult:
  """Trains on config.input.pairs (evaluating on config.input.eval_pairs when given)."""
  if not config.input.pairs:
    raise ValueError("config.input.pairs is empty: pass --config.input.pairs=PATH.npz, a pairs "
                     "file of (features, caption) rows")
  pairs = Pairs.read(config.input.pairs)
  resolve_features(config, pairs)
  tokenizer = load_tokenizer(config)
  mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
  rules = sharding.make_rules(config.sharding_rules)
  sharding.check_batch_size(config.batch_size, mesh, rules,
                            micro_steps=int(config.grad_accum_steps))
  trainable = make_trainable(config, tokenizer)
  train_iter = make_source(config, pairs, tokenizer, "train", int(config.batch_size), mesh)
  eval_fn = None
  if config.input.eval_pairs and config.eval.every_steps > 0 and config.eval.num_batches > 0:
    eval_pairs = Pairs.read(config.input.eval_pairs)
    if eval_pairs.feature_dim != pairs.feature_dim:
      raise ValueError(f"{eval_pairs.source} has features of size {eval_pairs.feature_dim}; "
                       f"{pairs.source} has {pairs.feature_dim}")
    eval_fn = functools.partial(make_source, config, eval_pairs, tokenizer, "eval",
                                int(config.eval.batch_size), mesh)
  return train_lib.train_loop(trainable, config, workdir, train_iter, eval_fn, mesh)
