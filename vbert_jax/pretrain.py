"""VideoBERT pretraining for the generic trainer (`vbert_jax.train`).

The model a config describes (`model_config`), its batch contract (`pretrain_batch_spec`,
`check_pretrain_batch`), its loss (MLM + MVM + LVA, weighted by `config.loss`), where a fresh run
starts from (an exported checkpoint or a BERT directory, and the visual rows from a visual
vocabulary's centroids), its input sources, and `train_and_evaluate`, which `vbert_jax.main`
runs.

The config keys read here, besides the trainer's: model.*, max_len, masking.*, loss.*, input.*,
init.{checkpoint, bert_dir, visual_vocab}.

With `config.input.pack_examples` E > 1 a row of `max_len` tokens holds up to E examples
(`vbert_jax.packing`): the batch contract gains `cls_positions` and the slots' `*_example`, and
its per-example fields are [batch, E]. An example is at most `example_len(config)` tokens long,
which bounds its positions (not the row's length) by the position table.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vbert_jax import bert_import
from vbert_jax import flops
from vbert_jax import input_pipeline
from vbert_jax import lengths
from vbert_jax import masking
from vbert_jax import model
from vbert_jax import objectives
from vbert_jax import packing
from vbert_jax import sequence
from vbert_jax import sharding
from vbert_jax import synthetic
from vbert_jax import train
from vbert_jax.vocab import vocabulary

Batch = train.Batch
Params = train.Params


def model_config(config: ml_collections.ConfigDict):
  """The VideoBERTConfig a pretraining config describes."""
  fields = dict(config.model)
  fields["remat"] = {"none": False, "full": True}.get(fields["remat"], fields["remat"])
  fields["special_ids"] = sequence.SpecialIds.parse(fields.get("special_ids")).as_tuple()
  longest = example_len(config)
  if longest > fields["max_position_embeddings"]:
    raise ValueError(f"examples of up to {longest} tokens (config.input.max_example_len, or "
                     f"config.max_len={config.max_len} when it is 0) exceed config.model."
                     f"max_position_embeddings={fields['max_position_embeddings']}")
  return model.VideoBERTConfig(**fields)


def pack_examples(config: ml_collections.ConfigDict) -> int:
  """Examples a row may hold (1: one per row; configs of older runs lack the key)."""
  return int(_config_get(config, "input.pack_examples") or 1)


def example_len(config: ml_collections.ConfigDict) -> int:
  """The longest example: config.input.max_example_len, or the row's max_len when it is 0."""
  return int(_config_get(config, "input.max_example_len") or config["max_len"])


def slots(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """The MLM and MVM prediction slots of a row."""
  m = config.masking
  if pack_examples(config) == 1:
    return int(m.max_predictions_text), int(m.max_predictions_video)
  spec = packing.PackSpec.for_masking(int(config.max_len), pack_examples(config),
                                      masking.MaskingConfig.from_config(config.masking))
  return spec.text_slots, spec.video_slots


def pretrain_batch_spec(config: ml_collections.ConfigDict, batch_size: int
                        ) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of a pretraining batch (the shared batch contract)."""
  length, (pt, pv), places = config.max_len, slots(config), pack_examples(config)
  i32, f32 = jnp.int32, jnp.float32
  each = () if places == 1 else (places,)
  shapes = {"input_ids": ((length,), i32), "segment_ids": ((length,), i32),
            "position_ids": ((length,), i32), "input_mask": ((length,), i32), "regime": (each, i32),
            "mlm_positions": ((pt,), i32), "mlm_ids": ((pt,), i32), "mlm_weights": ((pt,), f32),
            "mvm_positions": ((pv,), i32), "mvm_ids": ((pv,), i32), "mvm_weights": ((pv,), f32),
            "lva_label": (each, i32), "lva_weight": (each, f32), "truncated": (each, i32)}
  if places > 1:
    shapes.update({"cls_positions": (each, i32), "mlm_example": ((pt,), i32),
                   "mvm_example": ((pv,), i32)})
  return {k: jax.ShapeDtypeStruct((batch_size,) + s, d) for k, (s, d) in shapes.items()}


def check_pretrain_batch(config: ml_collections.ConfigDict, vocab: Any, batch: Batch,
                         where: str) -> None:
  """Fields, shapes and id ranges of a host batch; errors name `where` and the field."""
  spec = pretrain_batch_spec(config, len(np.asarray(batch["input_ids"])))
  missing = sorted(set(spec) - set(batch))
  if missing:
    raise ValueError(f"{where}: missing fields {missing}")
  for name, s in spec.items():
    if tuple(np.shape(batch[name])) != s.shape:
      raise ValueError(f"{where}: {name} has shape {tuple(np.shape(batch[name]))}; expected "
                       f"{s.shape} (batch, max_len={config.max_len}, slots)")
  vocab.check_ids(batch["input_ids"], where=f"{where}: input_ids")
  for name, size in (("mlm_ids", vocab.text_size), ("mvm_ids", vocab.visual_size)):
    ids = np.asarray(batch[name])
    if ids.size and (ids.min() < 0 or ids.max() >= size):
      raise ValueError(f"{where}: {name} in [{ids.min()}, {ids.max()}] fall outside [0, {size})")
  bounds = {"mlm_positions": ("max_len", config.max_len),
            "mvm_positions": ("max_len", config.max_len),
            "cls_positions": ("max_len", config.max_len),
            "position_ids": ("the longest example", example_len(config)),
            "mlm_example": ("pack_examples", pack_examples(config)),
            "mvm_example": ("pack_examples", pack_examples(config))}
  for name, (what, bound) in bounds.items():
    pos = np.asarray(batch.get(name, np.zeros(0)))
    if pos.size and (pos.min() < 0 or pos.max() >= bound):
      raise ValueError(f"{where}: {name} in [{pos.min()}, {pos.max()}] fall outside "
                       f"[0, {what}={bound})")


def make_trainable(config: ml_collections.ConfigDict) -> train.Trainable:
  """MLM + MVM + LVA pretraining of the joint model, weighted by config.loss."""
  mcfg = model_config(config)
  module = model.VideoBERT(mcfg)
  weights = (config.loss.alpha, config.loss.beta, config.loss.gamma)

  def init(rng: jax.Array) -> Params:
    return module.init({"params": rng}, **model.dummy_inputs(mcfg))["params"]

  def loss(params: Params, batch: Batch, rng: jax.Array | None, over: Any = None):
    outputs = module.apply(
        {"params": params}, batch["input_ids"], batch["segment_ids"], batch["position_ids"],
        batch["input_mask"], batch["mlm_positions"], batch["mvm_positions"],
        batch.get("cls_positions"),
        deterministic=rng is None, rngs=None if rng is None else {"dropout": rng})
    value, metrics = objectives.compute_loss(
        outputs, batch, *weights, masked_on_negatives=config.loss.masked_on_negatives,
        over=over)
    metrics["flops_real_fraction"] = real_flops(batch) / padded_flops(batch)
    return value, metrics

  def padded_flops(batch: Batch) -> float:
    size = lambda k: int(np.prod(batch[k].shape, dtype=np.int64))
    rows, length = batch["input_ids"].shape
    return float(flops.flops_per_step(mcfg, rows, length, size("mlm_weights"),
                                      size("mvm_weights"), size("lva_weight")).total)

  def real_flops(batch: Batch) -> jax.Array:
    """The step's FLOPs over real tokens, attention within each example, real slots."""
    places = int(np.prod(batch["lva_weight"].shape[1:], dtype=np.int64))
    mask = jnp.asarray(batch["input_mask"])
    sizes = jax.nn.one_hot(mask, places + 1, dtype=jnp.float32).sum(axis=1)[:, 1:]
    real = lambda k: (jnp.asarray(batch[k]) > 0).sum().astype(jnp.float32)
    return flops.flops_of_examples(
        mcfg, sizes.sum(), (sizes ** 2).sum(), real("mlm_weights"), real("mvm_weights"),
        (jnp.asarray(batch["regime"]) >= 0).sum().astype(jnp.float32))

  def train_flops(batch_size: int) -> float:
    # Every token and slot of the batch's shape, padding included: what the step computes.
    return padded_flops(pretrain_batch_spec(config, batch_size))

  return train.Trainable(init=init, loss=loss,
              denominators=functools.partial(
                  objectives.denominators,
                  masked_on_negatives=config.loss.masked_on_negatives),
              check_batch=functools.partial(check_pretrain_batch, config, mcfg.vocab),
              batch_spec=functools.partial(pretrain_batch_spec, config),
              train_flops=train_flops, tokens_per_example=int(config.max_len),  # per row
              initial_params=functools.partial(initial_params, config))


def make_source(config: ml_collections.ConfigDict, split: str, batch_size: int,
                mesh: jax.sharding.Mesh) -> Any:
  """This process's rows of the global batches of `split` ("train" or "eval") of
  config.input.source: the rows its devices hold, wherever the mesh puts them."""
  rows = sharding.process_rows(batch_size, mesh, sharding.make_rules(config.sharding_rules))
  kind = config.input.source
  if kind == "synthetic":
    return synthetic.from_config(config, split, batch_size=batch_size, rows=rows)
  if kind == "tfds":
    return input_pipeline.create_iterator(config, split, batch_size=batch_size, rows=rows)
  raise ValueError(f"config.input.source={kind!r}: expected 'tfds' or 'synthetic'")


def check_input(config: ml_collections.ConfigDict) -> None:
  """A run reads a dataset unless it asks for generated tokens, and says so when it does."""
  inp = config.input
  if inp.source == "tfds" and not inp.tfds_name:
    raise ValueError(
        "config.input.tfds_name is empty: pretraining reads a dataset of aligned videos. Build "
        "one with `tfds build data/videobert --manual_dir=CORPUS --data_dir=DIR` (see "
        "data/videobert/README.md), then pass --config.input.tfds_name=videobert/<config> "
        "--config.input.data_dir=DIR. Generated tokens are for trying the trainer: add "
        "`runlocal` to the config argument, or --config.input.source=synthetic.")
  if inp.source == "synthetic":
    logging.warning("input: GENERATED tokens (config.input.source=synthetic), not a dataset: "
                    "this run learns a made-up trainable, for trying the trainer and for tests")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: Any,
                       mesh: jax.sharding.Mesh | None = None) -> train.LoopResult:
  """VideoBERT pretraining as configured: the input sources, the trainable, the loop."""
  check_input(config)
  lengths.apply_percentile(config)
  mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
  trainable = make_trainable(config)
  rules = sharding.make_rules(config.sharding_rules)
  sharding.check_batch_size(config.batch_size, mesh, rules,
                            micro_steps=int(config.grad_accum_steps))
  train_iter = make_source(config, "train", config.batch_size, mesh)
  eval_fn = None
  if config.eval.every_steps > 0 and config.eval.num_batches > 0:
    sharding.check_batch_size(config.eval.batch_size, mesh, rules, key="config.eval.batch_size")
    eval_fn = functools.partial(make_source, config, "eval", config.eval.batch_size, mesh)
  return train.train_loop(trainable, config, workdir, train_iter, eval_fn, mesh)


# --------------------------------------------------------------------------------------------
# Where a fresh run starts.


def _abstract_params(abstract_state: Any) -> Params:
  if hasattr(abstract_state, "params"):
    return abstract_state.params
  if isinstance(abstract_state, Mapping) and "params" in abstract_state:
    return abstract_state["params"]
  raise TypeError(f"abstract_state of type {type(abstract_state).__name__} has no 'params'")


def _config_get(config: Any, dotted: str) -> Any:
  node = config
  for part in dotted.split("."):
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      return None
  return node


def load_initial(config: Any, abstract_state: Any,
                 params: Params | Callable[[], Params] | None = None) -> Params | None:
  """Parameters for a fresh run from `config.init.checkpoint` or `config.init.bert_dir`.

  `config.init.checkpoint` is a directory written by `export_params` (from either layer layout):
  the parameters come back on the shardings of `abstract_state.params`. `config.init.bert_dir` is
  a Hugging Face BERT directory: it replaces the text part of `params`, the freshly initialised
  (sharded) parameters, whose visual rows stay random; `params` may be a function that makes
  them, so that a run without BERT does not pay for them. None when neither is configured; the
  loop builds the optimizer state around what comes back.
  """
  checkpoint = _config_get(config, "init.checkpoint")
  bert_dir = _config_get(config, "init.bert_dir")
  if checkpoint and bert_dir:
    raise ValueError(f"config.init.checkpoint={checkpoint!r} and config.init.bert_dir="
                     f"{bert_dir!r} are both set: choose one initial checkpoint")
  if checkpoint:
    logging.info("initialising parameters from %s", checkpoint)
    return model.load(checkpoint, _abstract_params(abstract_state))
  if bert_dir:
    if params is None:
      raise ValueError(f"config.init.bert_dir={bert_dir!r}: BERT fills the text part of freshly "
                       "initialised parameters; pass them as `params`")
    params = params() if callable(params) else params
    logging.info("initialising the text part of the parameters from the BERT directory %s",
                 bert_dir)
    return bert_import.init_from_bert(params, bert_dir, model_config(config),
                                      max_len=example_len(config))
  return None


def init_visual_rows(params: Params, config: ml_collections.ConfigDict) -> Params:
  """Starts the visual embedding table from `config.init.visual_vocab`'s centroids.

  The centroids are projected to the hidden size (`vocabulary.visual_embedding_init`), so that
  visual tokens that look alike start close together; the table keeps its sharding.
  """
  cfg, path = model_config(config), config.init.visual_vocab
  rows = vocabulary.visual_embedding_init(path, cfg.hidden_size, std=cfg.initializer_range,
                                          seed=config.seed)
  if rows.shape[0] != cfg.visual_vocab_size:
    raise ValueError(f"config.init.visual_vocab={path!r} has {rows.shape[0]} tokens but "
                     f"config.model.visual_vocab_size={cfg.visual_vocab_size}")
  table = params["embeddings"]["visual_embeddings"]["embedding"]
  # The rows past the vocabulary pad the table to a multiple of 128 and stay as they were.
  put = jax.jit(lambda t, r: t.at[:r.shape[0]].set(r.astype(t.dtype)),
                out_shardings=getattr(table, "sharding", None))
  visual = {**params["embeddings"]["visual_embeddings"], "embedding": put(table, rows)}
  return {**params, "embeddings": {**params["embeddings"], "visual_embeddings": visual}}


def initial_params(config: ml_collections.ConfigDict, abstract_state: Any,
                   make_params: Callable[[], Params]) -> Params | None:
  """A fresh run's parameters: `load_initial`'s, with the visual rows from
  `config.init.visual_vocab` when it is set; None when nothing is configured."""
  params = load_initial(config, abstract_state, params=make_params)
  if config.init.get("visual_vocab"):
    params = init_visual_rows(params if params is not None else make_params(), config)
  return params
