"""A trained run, ready for the tasks: config, parameters, tokenizer, visual vocabulary, model.

    bundle = load_bundle("/runs/videobert")          # the newest checkpoint of a run
    out = bundle.apply(batch, mlm_positions=slots)   # jitted, deterministic (no dropout)

`load_bundle` reads `workdir/config.json` (written by the training loop) and a checkpoint of
`workdir/checkpoints`; the text tokenizer and the visual vocabulary default to the ones the config
names (`config.text.vocab`, `config.init.visual_vocab`) and may be given instead. Whatever is
given must match the model: the tokenizer's size and special ids, the vocabulary's size. A
mismatch stops with an error that names both sides.

The task command lines share their run flags (`define_run_flags`, `bundle_from_args`), their
exit convention (`run_command`) and their results file (`write_results`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import sys
import types
from typing import Any, Callable, Mapping

from absl import flags
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from vbert_jax import atomic
from vbert_jax import console
from vbert_jax import checkpoints
from vbert_jax import model as model_lib
from vbert_jax import sequence
from vbert_jax import pretrain as pretrain_lib
from vbert_jax.text import tokenizers
from vbert_jax.vocab import vocabulary

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
_OUTPUT_KEYS = ("hidden", "pooled", "lva_logits", "mlm_logits", "mvm_logits")
_INPUT_KEYS = ("input_ids", "segment_ids", "position_ids", "input_mask")


def _forward(module: model_lib.VideoBERT, params: Any, inputs: Mapping[str, jax.Array],
             mlm_positions: jax.Array | None, mvm_positions: jax.Array | None,
             ids: Mapping[str, jax.Array | None] | None, log_probs: bool
             ) -> dict[str, jax.Array]:
  out = module.apply({"params": params}, inputs["input_ids"], inputs["segment_ids"],
                     inputs["position_ids"], inputs["input_mask"], mlm_positions, mvm_positions,
                     deterministic=True)
  if not log_probs:
    return out
  # Normalised on the device, and with `ids` gathered there too: only what the task reads
  # travels back, not [B, P, vocabulary] arrays or the hidden states.
  result = {}
  for name in ("mlm", "mvm"):
    if f"{name}_logits" in out:
      lp = jax.nn.log_softmax(out[f"{name}_logits"], axis=-1)
      wanted = (ids or {}).get(name)
      result[f"{name}_log_probs"] = lp if wanted is None else jnp.take(lp, wanted, axis=-1)
  return result


@dataclasses.dataclass
class Bundle:
  """Everything a task needs from a trained run."""
  config: ml_collections.ConfigDict
  model_config: model_lib.VideoBERTConfig
  params: Any
  tokenizer: tokenizers.TextTokenizer
  visual_vocab: vocabulary.VisualVocabulary | None
  layout: sequence.Layout

  def __post_init__(self):
    module = model_lib.VideoBERT(self.model_config)
    # jax.jit caches one executable per input shape; `log_probs` picks the outputs.
    self._jitted = jax.jit(functools.partial(_forward, module), static_argnames=("log_probs",))

  @property
  def vocab(self) -> sequence.JointVocab:
    return self.model_config.vocab

  @classmethod
  def from_parts(cls, config: ml_collections.ConfigDict, params: Any,
                 tokenizer: tokenizers.TextTokenizer,
                 visual_vocab: vocabulary.VisualVocabulary | None = None,
                 source: str = "config") -> "Bundle":
    """A bundle from objects in memory; the same checks as `load_bundle`."""
    model_config = pretrain_lib.model_config(config)
    check_tokenizer(model_config, tokenizer, source)
    if visual_vocab is not None:
      check_visual_vocab(model_config, visual_vocab, source)
    params = _prepare_params(params, model_config, source)
    layout = sequence.Layout(model_config.vocab, pretrain_lib.example_len(config))
    return cls(config, model_config, params, tokenizer, visual_vocab, layout)

  def apply(self, batch: Mapping[str, np.ndarray], mlm_positions=None,
            mvm_positions=None) -> dict[str, np.ndarray]:
    """The model's outputs (host arrays) for a batch of packed sequences, without dropout.

    `batch` holds input_ids, segment_ids, position_ids and input_mask [B, L] (as
    `sequence.stack` gives them); mlm/mvm positions [B, P] ask for the heads' logits there.
    """
    out = self._jitted(self.params, _inputs(batch), _positions(mlm_positions),
                       _positions(mvm_positions), None, log_probs=False)
    return {k: np.asarray(v) for k, v in jax.device_get(out).items()}

  def log_probs(self, batch: Mapping[str, np.ndarray], mlm_positions=None,
                mvm_positions=None, *, mlm_ids=None, mvm_ids=None) -> dict[str, np.ndarray]:
    """Log-softmax of the MLM / MVM logits at the given positions: `mlm_log_probs` [B, P,
    text_padded], `mvm_log_probs` [B, P, visual_padded]; padding ids get about -1e9.

    With `mlm_ids` / `mvm_ids` ([K] ids of that part of the vocabulary), only those columns
    come back: [B, P, K] (normalised over the whole vocabulary all the same).
    """
    out = self.log_probs_async(batch, mlm_positions, mvm_positions, mlm_ids=mlm_ids,
                               mvm_ids=mvm_ids)
    return {k: np.asarray(v) for k, v in jax.device_get(out).items()}

  def log_probs_async(self, batch: Mapping[str, np.ndarray], mlm_positions=None,
                      mvm_positions=None, *, mlm_ids=None,
                      mvm_ids=None) -> dict[str, jax.Array]:
    """`log_probs` without waiting: device arrays, whose computation runs while the caller
    prepares the next batch (reading them, e.g. with np.asarray, waits for it)."""
    ids = {"mlm": _positions(mlm_ids), "mvm": _positions(mvm_ids)}
    return self._jitted(self.params, _inputs(batch), _positions(mlm_positions),
                        _positions(mvm_positions), ids, log_probs=True)


def _inputs(batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
  missing = [k for k in _INPUT_KEYS if k not in batch]
  if missing:
    raise ValueError(f"batch lacks {missing}; expected {list(_INPUT_KEYS)} [batch, max_len] "
                     f"(sequence.stack gives them)")
  return {k: jnp.asarray(np.asarray(batch[k], np.int32)) for k in _INPUT_KEYS}


def _positions(positions) -> jax.Array | None:
  return None if positions is None else jnp.asarray(np.asarray(positions, np.int32))


# ------------------------------------------------------------------------------------ checks


def check_tokenizer(model_config: model_lib.VideoBERTConfig,
                    tokenizer: tokenizers.TextTokenizer, source: str) -> None:
  """The tokenizer must have the model's text vocabulary size and special ids."""
  if tokenizer.vocab_size != model_config.text_vocab_size:
    raise ValueError(f"text tokenizer {tokenizer.source} has {tokenizer.vocab_size} tokens but "
                     f"{source} has model.text_vocab_size={model_config.text_vocab_size}; the "
                     f"model was trained with another text vocabulary")
  ours = model_config.vocab.specials
  if tokenizer.specials != ours:
    raise ValueError(f"text tokenizer {tokenizer.source} has special ids "
                     f"{_special_text(tokenizer.specials)} but {source} has model.special_ids "
                     f"{_special_text(ours)}; the model was trained with another text vocabulary")


def check_visual_vocab(model_config: model_lib.VideoBERTConfig,
                       vocab: vocabulary.VisualVocabulary, source: str,
                       vocab_source: str = "the visual vocabulary") -> None:
  if vocab.size != model_config.visual_vocab_size:
    raise ValueError(f"{vocab_source} has {vocab.size} visual tokens but {source} has "
                     f"model.visual_vocab_size={model_config.visual_vocab_size}; the model was "
                     f"trained with another visual vocabulary")


def _special_text(ids: sequence.SpecialIds) -> str:
  return ", ".join(f"{n}={i}" for n, i in zip(sequence.SPECIAL_TOKENS, ids.as_tuple()))


def _prepare_params(params: Any, model_config: model_lib.VideoBERTConfig, source: str) -> Any:
  """The parameters in the layout (scanned or not) the config asks for, as device arrays."""
  abstract = jax.eval_shape(
      lambda: model_lib.init_params(model_config, jax.random.key(0)))
  params = model_lib.convert_layout(params, abstract)
  checkpoints.check_shapes(params, abstract, where=f"the parameters for {source}")
  return jax.tree.map(lambda p, a: jnp.asarray(np.asarray(p), a.dtype), params, abstract)


# ----------------------------------------------------------------------------------- loading


def read_config(workdir: Any, required: tuple[str, ...] = ("model", "max_len"),
                kind: str = "a pretraining config") -> ml_collections.ConfigDict:
  """The resolved config a training run wrote next to its checkpoints; it must hold the
  `required` keys of `kind` (named in the error)."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no run config (the training loop writes it into the "
                            f"workdir); expected --workdir to be a training run's workdir")
  try:
    data = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e
  missing = [key for key in required if key not in data]
  if missing:
    raise ValueError(f"{path}: lacks the keys {missing} of {kind}; is this the right run?")
  return ml_collections.ConfigDict(data)


def _tokenizer_config(config: ml_collections.ConfigDict, text_vocab: str | None) -> dict:
  text = dict(config.get("text") or {})
  init = dict(config.get("init") or {})
  bert_dir = init.get("bert_dir", "") or ""
  if text_vocab:
    # A vocabulary given by hand replaces the run's, also one that came with a BERT directory.
    text["vocab"], bert_dir = str(text_vocab), ""
  return {"text": {"tokenizer": text.get("tokenizer", "wordpiece"),
                   "vocab": text.get("vocab", ""), "lowercase": text.get("lowercase", "auto")},
          "init": {"bert_dir": bert_dir}}


def load_bundle(workdir: Any, *, step: int | None = None, text_vocab: str | None = None,
                visual_vocab: str | None = None) -> Bundle:
  """A trained run: `workdir/config.json`, the checkpoint at `step` (default the newest), the
  text tokenizer (`text_vocab`, default the config's `text.vocab`) and the visual vocabulary
  (`visual_vocab`, default the config's `init.visual_vocab`; None when neither is set)."""
  config = read_config(workdir)
  source = str(epath.Path(workdir) / CONFIG_FILE)
  model_config = pretrain_lib.model_config(config)
  tokenizer = tokenizers.load_tokenizer(_tokenizer_config(config, text_vocab))
  check_tokenizer(model_config, tokenizer, source)
  vocab_path = visual_vocab or (config.get("init") or {}).get("visual_vocab") or ""
  vocab = None
  if vocab_path:
    vocab = vocabulary.VisualVocabulary.load(vocab_path)
    check_visual_vocab(model_config, vocab, source, f"visual vocabulary {vocab_path}")
  step, params = read_run_params(workdir, step)
  return Bundle.from_parts(config, params, tokenizer, vocab,
                           source=f"{source} (checkpoint step {step})")


def _checkpoint_dir(workdir: Any) -> epath.Path:
  text = os.fspath(workdir)
  return epath.Path(text if "://" in text else os.path.abspath(text)) / \
      checkpoints.CHECKPOINT_SUBDIR


def read_run_params(workdir: Any, step: int | None = None) -> tuple[int, Any]:
  """(step, parameters as host arrays) of a run's checkpoint, the newest by default.

  Only the parameters are read, not the optimizer state (twice their size under Adam).
  """
  directory = _checkpoint_dir(workdir)
  steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) \
      if directory.exists() else []
  if not steps:
    raise FileNotFoundError(f"{directory}: no checkpoints")
  step = steps[-1] if step is None else int(step)
  if step not in steps:
    raise FileNotFoundError(f"{directory}: no checkpoint at step {step}; found {steps}")
  path = directory / str(step) / checkpoints.STATE
  handler = ocp.PyTreeCheckpointHandler()
  try:
    tree = handler.metadata(path)
    tree = getattr(tree, "tree", tree)
    if not isinstance(tree, Mapping) or "params" not in tree:
      raise ValueError(f"{path}: a train state with 'params' was expected; found "
                       f"{sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__}")
    leaf = lambda x: not isinstance(x, (Mapping, list, tuple))  # noqa: E731
    meta = tree["params"]
    item = {"params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta,
                                   is_leaf=leaf)}
    args = {"params": jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta,
                                   is_leaf=leaf)}
    restored = handler.restore(path, args=ocp.args.PyTreeRestore(
        item=item, restore_args=args, partial_restore=True))
  finally:
    handler.close()
  return step, restored["params"]


# ----------------------------------------------------------------------------- command lines


def define_run_flags(fv: flags.FlagValues, *, out_help: str, visual_vocab_help: str) -> None:
  """The flags that name a trained run and the output folder, the same in every task command."""
  flags.DEFINE_string("workdir", None, "The training run's folder (config.json and "
                      "checkpoints/).", flag_values=fv)
  flags.DEFINE_string("out", None, out_help, flag_values=fv)
  flags.DEFINE_string("text_vocab", None, "Text vocabulary (vocab.txt or .model); default: the "
                      "run's config.text.vocab.", flag_values=fv)
  flags.DEFINE_string("visual_vocab", None, visual_vocab_help, flag_values=fv)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).", flag_values=fv)
  flags.mark_flags_as_required(["workdir", "out"], flag_values=fv)


def bundle_from_args(args: types.SimpleNamespace) -> Bundle:
  return load_bundle(args.workdir, step=args.step, text_vocab=args.text_vocab,
                     visual_vocab=args.visual_vocab)


def write_results(results: Mapping[str, Any], out: Any) -> pathlib.Path:
  """`out/results.json`, written atomically (a reader never sees half a file)."""
  path = pathlib.Path(out) / RESULTS_FILE

  def write(tmp: str) -> None:
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2, ensure_ascii=False)
  return atomic.write_atomic(path, write)


def run_command(run: Callable[[types.SimpleNamespace], dict], args: types.SimpleNamespace,
                report: Callable[[dict], None]) -> int:
  """A task command's exit code: bad input is one line on stderr and 1, not a traceback."""
  console.setup()
  try:
    results = run(args)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  report(results)
  print(f"wrote {pathlib.Path(args.out) / RESULTS_FILE}")
  return 0
