"""Starting from a BERT checkpoint: a Hugging Face BERT directory into the text part of VideoBERT.

The directory holds `config.json`, `vocab.txt` and the weights as `model.safetensors` or
`pytorch_model.bin` (or their sharded `*.index.json` forms). A `.bin` is read with
`torch.load(weights_only=True)`, which never runs pickled code. Keys are normalised to
`BertForPreTraining`'s names (`bert.` prefix, `LayerNorm.weight/bias` rather than the old
`gamma/beta`), so a `BertModel` checkpoint and an old TF-converted one read the same way.

What goes where (`init_from_bert`):

    bert.embeddings.*              -> embeddings/* (word rows [0, text_size); visual rows keep init)
    bert.encoder.layer.i.*         -> encoder/layer_i/* (or row i of encoder/layers/* when scanned)
    cls.predictions.transform.*    -> mlm_head/transform, mlm_head/layer_norm
    cls.predictions.bias           -> mlm_head/bias[:text_size]   (decoder weight is the tied table)
    bert.pooler.dense              -> lva_head/pooler
    cls.seq_relationship (w, b)    -> lva_head/classifier: (w0 - w1, b0 - b1)

NSP label 0 means "B follows A", so the logit of "belongs together" is score0 - score1. The MVM
head and the visual rows of the table keep their fresh initialisation.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import numpy as np
from safetensors import numpy as st_numpy

from vbert_jax import model as model_lib
from vbert_jax import sequence

CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.txt"
SAFETENSORS_FILE = "model.safetensors"
TORCH_FILE = "pytorch_model.bin"

# (our config key, the BERT config.json key) pairs that must agree exactly.
_MATCHED_KEYS = (("hidden_size", "hidden_size"), ("num_layers", "num_hidden_layers"),
                 ("num_heads", "num_attention_heads"), ("mlp_dim", "intermediate_size"),
                 ("text_vocab_size", "vocab_size"), ("type_vocab_size", "type_vocab_size"),
                 ("layer_norm_eps", "layer_norm_eps"))
# The keys that make a size variant (an error about them names the variant that fits).
_SIZE_KEYS = ("hidden_size", "num_layers", "num_heads", "mlp_dim")
# What transformers assumes when config.json leaves a key out.
_HF_DEFAULTS = {"layer_norm_eps": 1e-12}


class BertImportError(ValueError):
  """A BERT directory that cannot be read, or that does not fit the model config."""


# ----------------------------------------------------------------------------------------------
# Reading the directory.


def _require(directory: pathlib.Path, name: str) -> pathlib.Path:
  path = directory / name
  if not path.is_file():
    raise BertImportError(f"BERT directory {directory}: missing file {name} (expected "
                          f"{CONFIG_FILE}, {VOCAB_FILE} and {SAFETENSORS_FILE} or {TORCH_FILE})")
  return path


def read_vocab(path: pathlib.Path) -> dict[str, int]:
  """vocab.txt: one token a line, the id is the line number."""
  with open(path, encoding="utf-8") as f:
    tokens = [line.rstrip("\n").rstrip("\r") for line in f]
  while tokens and not tokens[-1]:
    tokens.pop()
  return {token: i for i, token in enumerate(tokens)}


def _load_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  try:
    return st_numpy.load_file(str(path))
  except (TypeError, ValueError) as e:
    # NumPy has no bfloat16: such files go through torch, then to float32.
    torch = _import_torch(path, reason=f"reading it with NumPy failed ({e})")
    # Optional: torch is no runtime requirement; only bfloat16 files and .bin files need it.
    from safetensors import torch as st_torch  # pylint: disable=import-outside-toplevel
    return {k: _torch_to_numpy(torch, v) for k, v in st_torch.load_file(str(path)).items()}


def _import_torch(path: pathlib.Path, reason: str):
  try:
    import torch  # pylint: disable=import-outside-toplevel  (optional, see above)
  except ImportError as e:
    raise BertImportError(f"{path}: reading this file needs PyTorch ({reason}); install torch "
                          f"or convert the checkpoint to {SAFETENSORS_FILE}") from e
  return torch


def _torch_to_numpy(torch, tensor) -> np.ndarray:
  if tensor.dtype in (torch.bfloat16, torch.float16):
    tensor = tensor.float()
  return tensor.detach().cpu().numpy()


def _load_torch(path: pathlib.Path) -> dict[str, np.ndarray]:
  torch = _import_torch(path, reason="it is a PyTorch pickle")
  try:
    state = torch.load(str(path), map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises several types for unsafe or corrupt pickles
    raise BertImportError(f"{path}: not a readable weights-only PyTorch state dict ({e})") from e
  if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"],
                                                                            Mapping):
    state = state["state_dict"]
  if not isinstance(state, Mapping):
    raise BertImportError(f"{path}: expected a state dict (name -> tensor), got {type(state)}")
  return {k: _torch_to_numpy(torch, v) for k, v in state.items() if hasattr(v, "detach")}


def _load_sharded(directory: pathlib.Path, index: pathlib.Path,
                  load: Callable[[pathlib.Path], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  weight_map = json.loads(index.read_text()).get("weight_map", {})
  state: dict[str, np.ndarray] = {}
  for shard in sorted(set(weight_map.values())):
    state.update(load(_require(directory, shard)))
  return state


def _load_weights(directory: pathlib.Path) -> dict[str, np.ndarray]:
  for name, load in ((SAFETENSORS_FILE, _load_safetensors), (TORCH_FILE, _load_torch)):
    if (directory / name).is_file():
      return load(directory / name)
    if (directory / f"{name}.index.json").is_file():
      return _load_sharded(directory, directory / f"{name}.index.json", load)
  raise BertImportError(f"BERT directory {directory}: missing file {SAFETENSORS_FILE} (or "
                        f"{TORCH_FILE}); one of them must hold the weights")


def normalize_keys(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames to BertForPreTraining's keys: `bert.` prefix, LayerNorm weight/bias."""
  out = {}
  for key, value in state.items():
    key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta",
                                                                      "LayerNorm.bias")
    if not key.startswith(("bert.", "cls.")):
      key = "bert." + key
    out[key] = np.asarray(value)
  return out


def load_hf_bert(directory) -> tuple[dict[str, np.ndarray], dict, dict[str, int]]:
  """Reads (state dict with BertForPreTraining keys, config.json contents, vocab token -> id)."""
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise BertImportError(f"BERT directory {directory} does not exist")
  config_path = _require(directory, CONFIG_FILE)
  try:
    hf_config = json.loads(config_path.read_text())
  except json.JSONDecodeError as e:
    raise BertImportError(f"{config_path}: not valid JSON ({e})") from e
  vocab = read_vocab(_require(directory, VOCAB_FILE))
  state = normalize_keys(_load_weights(directory))
  return state, hf_config, vocab


# ----------------------------------------------------------------------------------------------
# Checking that the checkpoint fits the config.


def _mismatch(key: str, ours: Any, hf_key: str, theirs: Any, source: str, hint: str = "") -> str:
  return (f"model config {key}={ours!r} does not fit the BERT checkpoint: {source} has "
          f"{hf_key}={theirs!r}{hint}")


def check_compatible(config: model_lib.VideoBERTConfig, hf_config: Mapping[str, Any],
                     vocab: Mapping[str, int], *, max_len: int | None = None,
                     source: str = CONFIG_FILE) -> None:
  """Raises BertImportError naming the key and both values for the first thing that differs."""
  for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "vocab_size", "max_position_embeddings", "type_vocab_size"):
    if key not in hf_config:
      raise BertImportError(f"{source}: missing key {key!r} (a BERT config.json has it)")
  variant = model_lib.variant_of(hf_config["hidden_size"], hf_config["num_hidden_layers"],
                                 hf_config["num_attention_heads"],
                                 hf_config["intermediate_size"])
  hint = f" (variant {variant!r} has these sizes)" if variant else ""
  for ours, theirs in _MATCHED_KEYS:
    mine, want = getattr(config, ours), hf_config.get(theirs, _HF_DEFAULTS.get(theirs))
    if mine != want:
      raise BertImportError(_mismatch(ours, mine, theirs, want, source,
                                      hint if ours in _SIZE_KEYS else ""))
  positions = hf_config["max_position_embeddings"]
  if config.max_position_embeddings > positions:
    raise BertImportError(_mismatch("max_position_embeddings", config.max_position_embeddings,
                                    "max_position_embeddings", positions, source,
                                    " (at most that many positions can be loaded)"))
  if max_len is not None and max_len > positions:
    raise BertImportError(_mismatch("max_len", max_len, "max_position_embeddings", positions,
                                    source))
  if hf_config.get("hidden_act", "gelu") != "gelu":
    raise BertImportError(f"{source}: hidden_act={hf_config['hidden_act']!r}; the model uses "
                          f"BERT's exact 'gelu'")
  if hf_config.get("position_embedding_type", "absolute") != "absolute":
    raise BertImportError(f"{source}: position_embedding_type="
                          f"{hf_config['position_embedding_type']!r}; expected 'absolute'")
  if len(vocab) != hf_config["vocab_size"]:
    raise BertImportError(f"{VOCAB_FILE} has {len(vocab)} tokens but {source} has "
                          f"vocab_size={hf_config['vocab_size']}; they must agree")
  specials = sequence.SpecialIds.from_vocab(vocab, source=VOCAB_FILE)
  if specials != config.vocab.specials:
    raise BertImportError(f"{VOCAB_FILE}: special ids {specials} differ from the joint "
                          f"vocabulary's {config.vocab.specials}")


# ----------------------------------------------------------------------------------------------
# Filling the parameters.


def _linear(state: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  """torch Linear [out, in] -> flax Dense kernel [in, out]."""
  return {"kernel": state[f"{prefix}.weight"].T, "bias": state[f"{prefix}.bias"]}


def _norm(state: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  return {"scale": state[f"{prefix}.weight"], "bias": state[f"{prefix}.bias"]}


def _layer(state: Mapping[str, np.ndarray], i: int, heads: int) -> dict:
  p = f"bert.encoder.layer.{i}"
  attention = {}
  for ours, theirs in (("query", "query"), ("key", "key"), ("value", "value")):
    w, b = state[f"{p}.attention.self.{theirs}.weight"], state[f"{p}.attention.self.{theirs}.bias"]
    hidden = w.shape[1]
    attention[ours] = {"kernel": w.T.reshape(hidden, heads, -1), "bias": b.reshape(heads, -1)}
  out = _linear(state, f"{p}.attention.output.dense")
  out["kernel"] = out["kernel"].reshape(heads, -1, out["kernel"].shape[-1])
  attention["out"] = out
  return {"attention": attention,
          "attention_norm": _norm(state, f"{p}.attention.output.LayerNorm"),
          "intermediate": _linear(state, f"{p}.intermediate.dense"),
          "output": _linear(state, f"{p}.output.dense"),
          "output_norm": _norm(state, f"{p}.output.LayerNorm")}


def _text_weights(state: Mapping[str, np.ndarray], config: model_lib.VideoBERTConfig) -> dict:
  """The BERT weights in our layout (partial rows for the embedding table and MLM bias)."""
  e = "bert.embeddings"
  positions = state[f"{e}.position_embeddings.weight"][:config.max_position_embeddings]
  nsp_w, nsp_b = state["cls.seq_relationship.weight"], state["cls.seq_relationship.bias"]
  mlm_bias = state.get("cls.predictions.bias", state.get("cls.predictions.decoder.bias"))
  if mlm_bias is None:
    raise KeyError("cls.predictions.bias")
  return {
      "embeddings": {
          "word_embeddings": {"embedding": state[f"{e}.word_embeddings.weight"]},
          "position_embeddings": {"embedding": positions},
          "token_type_embeddings": {"embedding": state[f"{e}.token_type_embeddings.weight"]},
          "layer_norm": _norm(state, f"{e}.LayerNorm")},
      "encoder": {f"layer_{i}": _layer(state, i, config.num_heads)
                  for i in range(config.num_layers)},
      "mlm_head": {"transform": _linear(state, "cls.predictions.transform.dense"),
                   "layer_norm": _norm(state, "cls.predictions.transform.LayerNorm"),
                   "bias": mlm_bias},
      "lva_head": {"pooler": _linear(state, "bert.pooler.dense"),
                   "classifier": {"kernel": (nsp_w[0] - nsp_w[1])[:, None],
                                  "bias": (nsp_b[0] - nsp_b[1])[None]}},
  }


def _check_tied(state: Mapping[str, np.ndarray], source: str) -> None:
  decoder = state.get("cls.predictions.decoder.weight")
  words = state["bert.embeddings.word_embeddings.weight"]
  if decoder is not None and (decoder.shape != words.shape or not np.array_equal(decoder, words)):
    raise BertImportError(f"{source}: cls.predictions.decoder.weight differs from "
                          f"bert.embeddings.word_embeddings.weight; the model ties them, as BERT")


# Text rows of tables that also hold padding (and visual) rows: BERT fills only their first rows.
_PARTIAL_ROWS = ("embeddings/word_embeddings/embedding", "mlm_head/bias")


def _put(old: Any, new: np.ndarray, path: str) -> Any:
  """`new` into the place of `old` (only the first rows of the tables in _PARTIAL_ROWS).

  A jax.Array keeps its sharding, and is never gathered to the host (so that this also works
  when the parameters span several processes).
  """
  target = old.unbox() if isinstance(old, nn.meta.AxisMetadata) else old
  shape, dtype = tuple(np.shape(target)), np.dtype(target.dtype)
  new = np.asarray(new)
  partial = path in _PARTIAL_ROWS and new.shape[1:] == shape[1:] and new.shape[0] < shape[0]
  if new.shape != shape and not partial:
    raise BertImportError(f"parameter {path}: BERT gives shape {new.shape}, the model has {shape}")
  new = new.astype(dtype)
  if isinstance(target, jax.Array):
    if partial:
      value = jax.jit(lambda t, v: t.at[:v.shape[0]].set(v),
                      out_shardings=target.sharding)(target, new)
    else:
      value = jax.device_put(new, target.sharding)
  elif partial:
    value = np.concatenate([new, np.asarray(target)[new.shape[0]:]], axis=0)
  else:
    value = new
  return old.replace_boxed(value) if isinstance(old, nn.meta.AxisMetadata) else value


def _merge(params: Mapping, weights: Mapping, path: str = "") -> dict:
  out = dict(params)
  for key, value in weights.items():
    where = f"{path}/{key}" if path else key
    if key not in params:
      raise BertImportError(f"parameter {where} does not exist in the model")
    if isinstance(value, Mapping):
      out[key] = _merge(params[key], value, where)
    else:
      out[key] = _put(params[key], value, where)
  return out


def init_from_bert(params: Mapping, directory, config: model_lib.VideoBERTConfig, *,
                   max_len: int | None = None) -> dict:
  """Returns `params` with its text part replaced by the BERT checkpoint in `directory`.

  `params` may be scanned or not, boxed (logical axes) or not; the result has the same layout,
  and jax.Array leaves keep their sharding.
  """
  directory = pathlib.Path(directory)
  state, hf_config, vocab = load_hf_bert(directory)
  check_compatible(config, hf_config, vocab, max_len=max_len,
                   source=str(directory / CONFIG_FILE))
  _check_tied(state, str(directory))
  try:
    weights = _text_weights(state, config)
  except KeyError as e:
    raise BertImportError(f"BERT directory {directory}: the weights lack {e.args[0]!r}; "
                          f"expected a BertForPreTraining checkpoint (with the cls.* heads)") from e
  params = dict(params)
  if "layers" in params.get("encoder", {}):
    weights["encoder"] = {"layers": jax.tree.map(lambda *xs: np.stack(xs),
                                                 *[weights["encoder"][f"layer_{i}"]
                                                   for i in range(config.num_layers)])}
  return _merge(params, weights)
