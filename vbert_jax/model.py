"""The joint VideoBERT model in Flax linen: embeddings, a BERT encoder, the MLM / MVM / LVA heads.

The encoder is BERT's, layer for layer (post-LN, exact-erf GELU, LayerNorm epsilon from the
config), so that a BERT checkpoint loads unchanged (see `bert_import`). The joint vocabulary
(`sequence.JointVocab`) is embedded by two tables: the text rows (BERT's word embeddings) and the
visual rows appended to them, kept apart so that each head reads its own table on its own shards
(one table sliced in two would be re-laid across devices at every step). The MLM head scores the
text table and the MVM head the visual table (tied weights, as BERT's decoder), each with its own
transform and bias; both are applied only at the gathered prediction positions. The LVA head is
BERT's tanh pooler on `[CLS]` followed by one logit.

Parameter tree (`params` collection):

    embeddings/   word_embeddings/embedding [text_padded, H],
                  visual_embeddings/embedding [visual_padded, H],
                  position_embeddings/embedding [P, H], token_type_embeddings/embedding [T, H],
                  layer_norm/{scale, bias}
    encoder/      layer_0 ... layer_{N-1}  (or `layers` with a leading [N] axis when scanned), each:
                  attention/{query, key, value}/{kernel [H, heads, d], bias [heads, d]},
                  attention/out/{kernel [heads, d, H], bias [H]}, attention_norm/{scale, bias},
                  intermediate/{kernel [H, M], bias [M]}, output/{kernel [M, H], bias [H]},
                  output_norm/{scale, bias}
    mlm_head/     transform/{kernel, bias}, layer_norm/{scale, bias}, bias [text_padded]
    mvm_head/     transform/{kernel, bias}, layer_norm/{scale, bias}, bias [visual_padded]
    lva_head/     pooler/{kernel, bias}, classifier/{kernel [H, 1], bias [1]}

`scan_params` / `unscan_params` convert between the two encoder layouts.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vbert_jax import attention as attention_lib
from vbert_jax import checkpoints
from vbert_jax import sequence

# Logits of padding ids: finite (unlike -inf) so that 0 * log p stays 0 in a cross-entropy.
PAD_LOGIT = -1e9

VARIANTS: dict[str, dict[str, int]] = {
    "mu": dict(num_layers=2, hidden_size=32, num_heads=2, mlp_dim=64),
    "tiny": dict(num_layers=2, hidden_size=128, num_heads=2, mlp_dim=512),
    "small": dict(num_layers=4, hidden_size=512, num_heads=8, mlp_dim=2048),
    "base": dict(num_layers=12, hidden_size=768, num_heads=12, mlp_dim=3072),
    "large": dict(num_layers=24, hidden_size=1024, num_heads=16, mlp_dim=4096),
}
# Logical axes of a [hidden, hidden] kernel (the heads' transform, the LVA pooler): its output
# feeds a LayerNorm or a tanh over the whole hidden size, so it is not split over `tensor` the
# way an MLP's inner dimension is.
HIDDEN_TO_HIDDEN = ("embed", None)


def decode_variant(name: str) -> dict[str, int]:
  """Sizes of a named variant (`mu`, `tiny`, `small`, `base`, `large`); `custom` gives {}."""
  if name == "custom":
    return {}
  if name not in VARIANTS:
    raise ValueError(f"unknown model variant {name!r}; expected one of "
                     f"{sorted(VARIANTS) + ['custom']}")
  return dict(VARIANTS[name])


def variant_of(hidden_size: int, num_layers: int, num_heads: int, mlp_dim: int) -> str | None:
  """The variant name with these sizes, if any (used in error messages)."""
  sizes = dict(num_layers=num_layers, hidden_size=hidden_size, num_heads=num_heads,
               mlp_dim=mlp_dim)
  return next((name for name, v in VARIANTS.items() if v == sizes), None)


class Precision:
  """Head size and the compute / parameter dtypes of a frozen model config with `hidden_size`,
  `num_heads`, `dtype` and `param_dtype` fields (shared by VideoBERT and the captioner)."""

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)


@dataclasses.dataclass(frozen=True)
class VideoBERTConfig(Precision):
  """Sizes and options of the model. Frozen, so it can be a linen attribute and a jit constant."""
  text_vocab_size: int = 30522
  visual_vocab_size: int = 20736
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  layer_norm_eps: float = 1e-12
  initializer_range: float = 0.02
  dtype: str = "float32"
  param_dtype: str = "float32"
  # False/None: no rematerialisation; True or "full": save nothing; otherwise the name of a
  # `jax.checkpoint_policies` policy such as "dots_with_no_batch_dims_saveable".
  remat: bool | str | None = False
  scan_layers: bool = False
  # "auto", "xla", "cudnn" or "splash" (vbert_jax.attention); `attention_interpret` runs the
  # splash kernel through Pallas's interpreter, on any backend (for tests).
  attention_impl: str = "auto"
  attention_interpret: bool = False
  # [PAD], [UNK], [CLS], [SEP], [MASK], [>] of the text tokenizer; None means BERT's ids.
  special_ids: tuple[int, int, int, int, int, int] | None = None

  def __post_init__(self):
    for key in ("text_vocab_size", "visual_vocab_size", "max_position_embeddings",
                "type_vocab_size", "hidden_size", "num_layers", "num_heads", "mlp_dim"):
      value = getattr(self, key)
      if not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"model config {key}={value!r}: expected a positive integer")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"model config hidden_size={self.hidden_size} is not divisible by "
                       f"num_heads={self.num_heads}")
    for key in ("dtype", "param_dtype"):
      try:
        jnp.dtype(getattr(self, key))
      except TypeError as e:
        raise ValueError(f"model config {key}={getattr(self, key)!r} is not a dtype") from e
    if self.attention_impl not in attention_lib.IMPLS:
      raise ValueError(f"model config attention_impl={self.attention_impl!r}: expected one of "
                       f"{attention_lib.IMPLS}")
    remat_policy(self.remat)  # validates the name

  @classmethod
  def from_variant(cls, variant: str, **overrides) -> "VideoBERTConfig":
    """`from_variant("tiny", dtype="bfloat16")`; `"custom"` takes the sizes from `overrides`."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
      raise ValueError(f"unknown model config keys {unknown}; expected some of {sorted(fields)}")
    return cls(**{**decode_variant(variant), **overrides})

  @property
  def vocab(self) -> sequence.JointVocab:
    specials = (sequence.SpecialIds(*self.special_ids) if self.special_ids
                else sequence.SpecialIds.bert())
    return sequence.JointVocab(self.text_vocab_size, self.visual_vocab_size, specials)


def remat_policy(remat: bool | str | None) -> tuple[bool, Any]:
  """(whether to rematerialise, the jax.checkpoint policy or None for 'save nothing')."""
  if remat in (False, None, "", "none"):
    return False, None
  if remat is True or remat == "full":
    return True, None
  policy = getattr(jax.checkpoint_policies, str(remat), None)
  if policy is None or not callable(policy):
    names = sorted(p for p in dir(jax.checkpoint_policies) if not p.startswith("_"))
    raise ValueError(f"model config remat={remat!r} is not a jax.checkpoint_policies name; "
                     f"expected False, True, 'full' or one of {names}")
  return True, policy


# ----------------------------------------------------------------------------------------------
# Building blocks.


def kernel_init(cfg: Precision, axes: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range), axes)


def zeros_init(axes: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def dense(cfg: Precision, features: int, axes: tuple[str | None, str | None],
           name: str) -> nn.Dense:
  return nn.Dense(features, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
                  kernel_init=kernel_init(cfg, axes), bias_init=zeros_init((axes[1],)), name=name)


def layer_norm(cfg: Precision, name: str) -> nn.LayerNorm:
  # The exact two-pass variance, as torch computes it: the fast one loses digits BERT keeps.
  return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.compute_dtype,
                      param_dtype=cfg.weight_dtype, use_fast_variance=False,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                              ("embed",)),
                      bias_init=zeros_init(("embed",)), name=name)


def _gelu(x: jax.Array) -> jax.Array:
  return nn.gelu(x, approximate=False)  # BERT's "gelu" is the exact erf form


class Embeddings(nn.Module):
  """Token + segment + position embeddings, LayerNorm, dropout.

  The lookups run in the parameters' dtype and only the normalised sum is in the compute dtype,
  so that the tables' gradients (sums over every token of the batch) accumulate in f32 also under
  bf16 compute. Positions and token types are one-hot products, which sum their gradients as
  matmuls rather than as scatters into small tables (serialised on TPU, where every token of a
  packed batch hits the same few rows); HIGHEST precision keeps the f32 rows exact there.
  """
  config: VideoBERTConfig

  def setup(self):
    cfg = self.config
    embed = functools.partial(nn.Embed, features=cfg.hidden_size, dtype=cfg.weight_dtype,
                              param_dtype=cfg.weight_dtype)
    self.word_embeddings = embed(cfg.vocab.text_padded,
                                 embedding_init=kernel_init(cfg, ("vocab", "embed")))
    self.visual_embeddings = embed(cfg.vocab.visual_padded,
                                   embedding_init=kernel_init(cfg, ("vocab", "embed")))
    self.position_embeddings = embed(cfg.max_position_embeddings,
                                     embedding_init=kernel_init(cfg, (None, "embed")))
    self.token_type_embeddings = embed(cfg.type_vocab_size,
                                       embedding_init=kernel_init(cfg, (None, "embed")))
    self.layer_norm = layer_norm(cfg, "layer_norm")
    self.dropout = nn.Dropout(cfg.dropout_rate)

  def __call__(self, input_ids: jax.Array, segment_ids: jax.Array, position_ids: jax.Array,
               deterministic: bool) -> jax.Array:
    cfg = self.config
    offset = cfg.vocab.visual_offset
    visual = input_ids >= offset
    words = self.word_embeddings(jnp.where(visual, 0, input_ids))
    clips = self.visual_embeddings(jnp.where(visual, input_ids - offset, 0))
    x = jnp.where(visual[..., None], clips, words)
    for ids, table in ((segment_ids, self.token_type_embeddings),
                       (position_ids, self.position_embeddings)):
      one_hot = jax.nn.one_hot(ids, table.num_embeddings, dtype=cfg.weight_dtype)
      x = x + jnp.einsum("blt,th->blh", one_hot, table.embedding,
                         precision=jax.lax.Precision.HIGHEST)
    # The LayerNorm normalises the f32 sum and returns the compute dtype.
    x = self.dropout(self.layer_norm(x), deterministic=deterministic)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))

  def text_table(self) -> jax.Array:
    return self.word_embeddings.embedding

  def visual_table(self) -> jax.Array:
    return self.visual_embeddings.embedding


class Projection(nn.Module):
  """A dense layer over `num_in` trailing axes into `features` (BERT's attention projections).

  The kernel is created in its full shape [*in, *features] (not flattened, as nn.DenseGeneral
  does), so that its logical axes apply as named, also inside a mesh.
  """
  config: VideoBERTConfig
  features: tuple[int, ...]
  axes: tuple[str | None, ...]  # logical names of the kernel's axes
  num_in: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    in_shape = x.shape[x.ndim - self.num_in:]
    kernel = self.param("kernel", kernel_init(cfg, self.axes), in_shape + self.features,
                        cfg.weight_dtype)
    bias = self.param("bias", zeros_init(self.axes[self.num_in:]), self.features, cfg.weight_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=cfg.compute_dtype)
    contract = (tuple(range(x.ndim - self.num_in, x.ndim)), tuple(range(self.num_in)))
    return jax.lax.dot_general(x, kernel, (contract, ((), ()))) + bias


class SelfAttention(nn.Module):
  """BERT's multi-head self-attention (without its output LayerNorm)."""
  config: VideoBERTConfig

  @nn.compact
  def __call__(self, x: jax.Array, input_mask: jax.Array, deterministic: bool) -> jax.Array:
    cfg = self.config
    heads = (cfg.num_heads, cfg.head_dim)
    axes = ("batch", "length", "heads", "kv")
    q, k, v = (nn.with_logical_constraint(
        Projection(cfg, heads, ("embed", "heads", "kv"), name=name)(x), axes)
               for name in ("query", "key", "value"))
    if deterministic or cfg.attention_dropout_rate == 0.0:
      # `init` only creates parameters, from dummy rows that a kernel's tiles need not fit.
      impl = "xla" if self.is_initializing() else cfg.attention_impl
      out = attention_lib.attention(q, k, v, input_mask, impl, cfg.attention_interpret)
    else:
      drop = functools.partial(nn.Dropout(cfg.attention_dropout_rate), deterministic=False)
      out = attention_lib.attention_with_dropout(q, k, v, input_mask, drop)
    out = nn.with_logical_constraint(out, axes)
    return Projection(cfg, (cfg.hidden_size,), ("heads", "kv", "embed"), num_in=2,
                      name="out")(out)


class EncoderLayer(nn.Module):
  """One post-LN BERT layer. With `scanned`, returns (x, None) as nn.scan expects."""
  config: VideoBERTConfig
  scanned: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, input_mask: jax.Array, deterministic: bool):
    cfg = self.config
    drop = nn.Dropout(cfg.dropout_rate)
    attn = SelfAttention(cfg, name="attention")(x, input_mask, deterministic)
    x = layer_norm(cfg, "attention_norm")(x + drop(attn, deterministic=deterministic))
    h = _gelu(dense(cfg, cfg.mlp_dim, ("embed", "mlp"), "intermediate")(x))
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    h = dense(cfg, cfg.hidden_size, ("mlp", "embed"), "output")(h)
    x = layer_norm(cfg, "output_norm")(x + drop(h, deterministic=deterministic))
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return (x, None) if self.scanned else x


class Encoder(nn.Module):
  """The stack of layers: a Python loop, or nn.scan over a stacked `layers` axis."""
  config: VideoBERTConfig

  @nn.compact
  def __call__(self, x: jax.Array, input_mask: jax.Array, deterministic: bool) -> jax.Array:
    """`input_mask` [B, L]: each token's example, 0 for padding (see vbert_jax.attention)."""
    cfg = self.config
    layer = EncoderLayer
    use_remat, policy = remat_policy(cfg.remat)
    if use_remat:
      # `deterministic` (argument 3, counting the module) selects Python branches: keep it static.
      layer = nn.remat(layer, policy=policy, static_argnums=(3,),
                       prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      stack = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True,
                                                                       "dropout": True},
                      in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = stack(cfg, scanned=True, name="layers")(x, input_mask, deterministic)
      return x
    for i in range(cfg.num_layers):
      x = layer(cfg, name=f"layer_{i}")(x, input_mask, deterministic)
    return x


class PredictionHead(nn.Module):
  """BERT's prediction head over one part of the joint vocabulary, tied to its embedding rows."""
  config: VideoBERTConfig
  num_real: int  # ids at or beyond this index are padding: their logits are masked out

  @nn.compact
  def __call__(self, x: jax.Array, table: jax.Array) -> jax.Array:
    cfg = self.config
    h = _gelu(dense(cfg, cfg.hidden_size, HIDDEN_TO_HIDDEN, "transform")(x))
    h = layer_norm(cfg, "layer_norm")(h)
    bias = self.param("bias", zeros_init(("vocab",)), (table.shape[0],), cfg.weight_dtype)
    logits = jnp.einsum("bph,vh->bpv", h, table.astype(cfg.compute_dtype),
                        preferred_element_type=jnp.float32)
    logits = logits + bias.astype(jnp.float32)
    logits = nn.with_logical_constraint(logits, ("batch", None, "vocab"))
    real = jnp.arange(table.shape[0]) < self.num_real
    return jnp.where(real, logits, PAD_LOGIT)


class AlignmentHead(nn.Module):
  """LVA: BERT's tanh pooler on an example's [CLS] state, then one logit."""
  config: VideoBERTConfig

  @nn.compact
  def __call__(self, cls: jax.Array) -> tuple[jax.Array, jax.Array]:
    cfg = self.config
    pooled = jnp.tanh(dense(cfg, cfg.hidden_size, HIDDEN_TO_HIDDEN, "pooler")(cls))
    logit = dense(cfg, 1, ("embed", None), "classifier")(pooled)
    return pooled, logit[..., 0].astype(jnp.float32)


attention_mask = attention_lib.attention_mask


def gather_positions(hidden: jax.Array, positions: jax.Array) -> jax.Array:
  """hidden [B, L, H], positions [B, P] -> [B, P, H]."""
  return jnp.take_along_axis(hidden, positions[..., None].astype(jnp.int32), axis=1)


class VideoBERT(nn.Module):
  """The joint model. Returns hidden, pooled, lva_logits and, given positions, mlm/mvm logits."""
  config: VideoBERTConfig

  def setup(self):
    cfg = self.config
    self.embeddings = Embeddings(cfg)
    self.encoder = Encoder(cfg)
    self.mlm_head = PredictionHead(cfg, num_real=cfg.vocab.text_size)
    self.mvm_head = PredictionHead(cfg, num_real=cfg.vocab.visual_size)
    self.lva_head = AlignmentHead(cfg)

  def __call__(self, input_ids: jax.Array, segment_ids: jax.Array, position_ids: jax.Array,
               input_mask: jax.Array, mlm_positions: jax.Array | None = None,
               mvm_positions: jax.Array | None = None, cls_positions: jax.Array | None = None,
               *, deterministic: bool = True) -> dict[str, jax.Array]:
    """`input_mask` [B, L]: the example of each token (1, 2, ... in a packed row; a 0/1 mask
    for one example per row), 0 for padding. `cls_positions` [B, E]: the [CLS] of each example
    of a packed row, which gives `pooled` [B, E, H] and `lva_logits` [B, E]; without it, the
    first token of each row ([B, H] and [B])."""
    x = self.embeddings(input_ids, segment_ids, position_ids, deterministic)
    hidden = self.encoder(x, input_mask, deterministic)
    cls = hidden[:, 0] if cls_positions is None else gather_positions(hidden, cls_positions)
    pooled, lva_logits = self.lva_head(cls)
    out = {"hidden": hidden, "pooled": pooled, "lva_logits": lva_logits}
    heads = (("mlm", self.mlm_head, mlm_positions, self.embeddings.text_table()),
             ("mvm", self.mvm_head, mvm_positions, self.embeddings.visual_table()))
    for name, head, positions, rows in heads:
      if positions is not None:
        out[f"{name}_logits"] = head(gather_positions(hidden, positions), rows)
      elif self.is_initializing():
        head(hidden[:, :1], rows)  # so that `init` creates every parameter
    return out


# ----------------------------------------------------------------------------------------------
# Initialisation, parameter counts, and the scanned <-> unscanned layouts.


def dummy_inputs(config: VideoBERTConfig, batch_size: int = 1, seq_len: int = 8,
                 num_predictions: int = 1) -> dict[str, jax.Array]:
  """Inputs of the right shapes and dtypes (for `init` and `jax.eval_shape`)."""
  seq_len = min(seq_len, config.max_position_embeddings)
  ids = jnp.zeros((batch_size, seq_len), jnp.int32)
  slots = jnp.zeros((batch_size, num_predictions), jnp.int32)
  return dict(input_ids=ids, segment_ids=ids, position_ids=ids + jnp.arange(seq_len),
              input_mask=jnp.ones_like(ids), mlm_positions=slots, mvm_positions=slots)


def init_params(config: VideoBERTConfig, rng: jax.Array, *, unbox: bool = True) -> dict:
  """Fresh parameters; `unbox=False` keeps the logical-axis boxes (for sharding specs)."""
  # One compilation rather than an eager op-by-op init.
  init = jax.jit(functools.partial(VideoBERT(config).init, **dummy_inputs(config)))
  params = init(rng)["params"]
  return nn.meta.unbox(params) if unbox else params


def count_params(params: Any) -> int:
  """Number of scalars in a parameter tree (boxed or not)."""
  leaves = jax.tree.leaves(nn.meta.unbox(params))
  return int(sum(np.prod(np.shape(x), dtype=np.int64) for x in leaves))


_LAYER_KEY = re.compile(r"^layer_(\d+)$")


def _map_encoders(tree: Any, fn) -> Any:
  """Applies `fn` to every mapping found under an `encoder` key (params and optimizer states)."""
  if isinstance(tree, Mapping):
    return {k: fn(dict(v)) if k == "encoder" and isinstance(v, Mapping) else _map_encoders(v, fn)
            for k, v in tree.items()}
  if isinstance(tree, tuple) and hasattr(tree, "_fields"):
    return type(tree)(*(_map_encoders(v, fn) for v in tree))
  if isinstance(tree, (list, tuple)):
    return type(tree)(_map_encoders(v, fn) for v in tree)
  return tree


def _stack_layers(encoder: dict) -> dict:
  found = {int(m.group(1)): k for k in encoder if (m := _LAYER_KEY.match(k))}
  if not found:
    return encoder
  if sorted(found) != list(range(len(found))) or len(found) != len(encoder):
    raise ValueError(f"encoder parameters {sorted(encoder)} are not layer_0..layer_N-1")
  layers = [encoder[found[i]] for i in range(len(found))]
  return {"layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


def _split_layers(encoder: dict) -> dict:
  if set(encoder) != {"layers"}:
    return encoder
  stacked = encoder["layers"]
  n = {int(np.shape(x)[0]) for x in jax.tree.leaves(stacked)}
  if len(n) != 1:
    raise ValueError(f"scanned encoder parameters disagree on the number of layers: {n}")
  return {f"layer_{i}": jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n.pop())}


def scan_params(params: Any) -> Any:
  """Unscanned (`encoder/layer_i`) -> scanned (`encoder/layers` with a leading layer axis).

  Works on any tree that holds the parameter layout under `encoder` keys (a params dict, a
  variables dict, optimizer states). Boxes are dropped; already-scanned trees pass unchanged.
  """
  return _map_encoders(nn.meta.unbox(params), _stack_layers)


def unscan_params(params: Any) -> Any:
  """Scanned (`encoder/layers`) -> unscanned (`encoder/layer_i`); the inverse of `scan_params`."""
  return _map_encoders(nn.meta.unbox(params), _split_layers)


# The layer names: `encoder/layers` when scanned, `encoder/layer_{i}` when not.
SCANNED = "layers"
UNSCANNED_0 = "layer_0"


def _has_key(tree: Any, key: str) -> bool:
  return isinstance(tree, Mapping) and any(
      k == key or _has_key(v, key) for k, v in tree.items())


def convert_layout(params: Mapping, abstract_params: Mapping) -> Mapping:
  """Converts `params` to the scanned (`encoder/layers`, leading layer axis) or unscanned
  (`encoder/layer_{i}`) layout that `abstract_params` uses, from either."""
  params = _split_joint_table(params, abstract_params)
  stored_scanned, wanted_scanned = _has_key(params, SCANNED), _has_key(abstract_params, SCANNED)
  if _has_key(params, UNSCANNED_0) and wanted_scanned and not stored_scanned:
    return scan_params(params)
  if stored_scanned and _has_key(abstract_params, UNSCANNED_0) and not wanted_scanned:
    return unscan_params(params)
  return params


def _split_joint_table(params: Mapping, abstract_params: Mapping) -> Mapping:
  """Exports that kept text and visual rows in one word table, in today's two tables."""
  stored, wanted = params.get("embeddings"), abstract_params.get("embeddings")
  if not (isinstance(stored, Mapping) and isinstance(wanted, Mapping)
          and "visual_embeddings" in wanted and "visual_embeddings" not in stored
          and "word_embeddings" in stored):
    return params
  table = stored["word_embeddings"]["embedding"]
  text = wanted["word_embeddings"]["embedding"].shape[0]
  if table.shape[0] != text + wanted["visual_embeddings"]["embedding"].shape[0]:
    return params  # another config: check_shapes names it
  embeddings = {**stored, "word_embeddings": {"embedding": table[:text]},
                "visual_embeddings": {"embedding": table[text:]}}
  return {**params, "embeddings": embeddings}


def load(path: Any, abstract_params: Any = None) -> Any:
  """Parameters exported by `checkpoints.export_params`, in the layout (scanned or not) and on
  the shardings of `abstract_params`; host arrays as saved without it."""
  return checkpoints.load_params(path, abstract_params, convert=convert_layout)
