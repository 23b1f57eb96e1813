"""BERT import: a tiny transformers BertForPreTraining, every weight random, through the converter.

The reference's outputs (hidden states, prediction scores, seq-relationship scores) are compared
with ours on the same ids, segments, positions and mask.
"""

import functools
import shutil
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import transformers

from helpers import bert_dir
from vbert_jax import bert_import
from vbert_jax import model as model_lib

TEXT_SIZE = 200
MAX_POSITIONS = 64
SIZES = model_lib.VARIANTS["mu"]


def _randomize(module: torch.nn.Module) -> None:
  """Every parameter and buffer random, so that a dropped bias or scale cannot hide."""
  torch.manual_seed(0)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if "LayerNorm.weight" in name:
        p.copy_(torch.rand_like(p) + 0.5)
      else:
        p.copy_(torch.randn_like(p) * 0.2)
    for name, b in module.named_buffers():
      b.copy_(torch.randint_like(b, 0, 2))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """(torch model in eval mode, safetensors dir, pytorch_model.bin dir with old key names)."""
  hf_config = transformers.BertConfig(
      vocab_size=TEXT_SIZE, hidden_size=SIZES["hidden_size"],
      num_hidden_layers=SIZES["num_layers"], num_attention_heads=SIZES["num_heads"],
      intermediate_size=SIZES["mlp_dim"], max_position_embeddings=MAX_POSITIONS,
      type_vocab_size=2, hidden_act="gelu")
  torch_model = transformers.BertForPreTraining(hf_config)
  _randomize(torch_model)
  torch_model.eval()
  assert torch.equal(torch_model.cls.predictions.decoder.weight,
                     torch_model.bert.embeddings.word_embeddings.weight)

  st_dir = tmp_path_factory.mktemp("bert_st")
  torch_model.save_pretrained(st_dir)
  (st_dir / "vocab.txt").write_text("\n".join(bert_dir.vocab_tokens(TEXT_SIZE)) + "\n")
  assert (st_dir / "model.safetensors").is_file()

  # The original Google checkpoints name LayerNorm parameters gamma/beta.
  bin_dir = tmp_path_factory.mktemp("bert_bin")
  old_names = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias",
                                                                         "LayerNorm.beta"): v
               for k, v in torch_model.state_dict().items()}
  torch.save(old_names, bin_dir / "pytorch_model.bin")
  shutil.copy(st_dir / "config.json", bin_dir / "config.json")
  shutil.copy(st_dir / "vocab.txt", bin_dir / "vocab.txt")
  return torch_model, st_dir, bin_dir


def _config(**overrides) -> model_lib.VideoBERTConfig:
  base = dict(text_vocab_size=TEXT_SIZE, visual_vocab_size=40,
              max_position_embeddings=MAX_POSITIONS)
  return model_lib.VideoBERTConfig.from_variant("mu", **{**base, **overrides})


def _inputs(batch=3, length=24, slots=5):
  rng = np.random.default_rng(1)
  ids = rng.integers(0, TEXT_SIZE, (batch, length)).astype(np.int32)
  segments = rng.integers(0, 2, (batch, length)).astype(np.int32)
  positions = rng.integers(0, MAX_POSITIONS, (batch, length)).astype(np.int32)
  mask = np.ones((batch, length), np.int32)
  mask[1, 15:] = 0
  mask[2, 7:] = 0
  mlm_positions = rng.integers(0, length, (batch, slots)).astype(np.int32)
  return ids, segments, positions, mask, mlm_positions


def _reference_outputs(torch_model, ids, segments, positions, mask):
  with torch.no_grad():
    out = torch_model(input_ids=torch.from_numpy(ids).long(),
                      token_type_ids=torch.from_numpy(segments).long(),
                      position_ids=torch.from_numpy(positions).long(),
                      attention_mask=torch.from_numpy(mask).long(), output_hidden_states=True)
  return (out.hidden_states[-1].numpy(), out.prediction_logits.numpy(),
          out.seq_relationship_logits.numpy())


@functools.partial(jax.jit, static_argnums=0)
def _ours(config, params, ids, segments, positions, mask, mlm_positions):
  return model_lib.VideoBERT(config).apply({"params": params}, ids, segments, positions, mask,
                                           mlm_positions=mlm_positions,
                                           mvm_positions=mlm_positions[:, :2])


@pytest.fixture(scope="module")
def imported(reference):
  _, st_dir, _ = reference
  config = _config()
  fresh = model_lib.init_params(config, jax.random.key(0))
  return config, fresh, bert_import.init_from_bert(fresh, st_dir, config)


def test_parity_with_bert_for_pretraining(reference, imported):
  torch_model = reference[0]
  config, _, params = imported
  ids, segments, positions, mask, mlm_positions = _inputs()
  hidden, scores, seq_rel = _reference_outputs(torch_model, ids, segments, positions, mask)
  out = _ours(config, params, ids, segments, positions, mask, mlm_positions)

  np.testing.assert_allclose(out["hidden"], hidden, atol=1e-5, rtol=0)
  assert np.abs(hidden).max() > 0.5  # the comparison is not between near-zero tensors

  expected = np.take_along_axis(scores, mlm_positions[..., None], axis=1)
  mlm = np.asarray(out["mlm_logits"])
  np.testing.assert_allclose(mlm[..., :TEXT_SIZE], expected, atol=1e-5, rtol=0)
  assert (mlm[..., TEXT_SIZE:] == model_lib.PAD_LOGIT).all()  # padding ids never win

  np.testing.assert_allclose(out["lva_logits"], seq_rel[:, 0] - seq_rel[:, 1], atol=1e-5,
                             rtol=1e-5)


def test_visual_rows_and_mvm_head_keep_their_init(imported):
  config, fresh, params = imported
  table, before = (params["embeddings"]["word_embeddings"]["embedding"],
                   fresh["embeddings"]["word_embeddings"]["embedding"])
  np.testing.assert_array_equal(table[TEXT_SIZE:], before[TEXT_SIZE:])
  assert not np.array_equal(table[:TEXT_SIZE], before[:TEXT_SIZE])
  for a, b in zip(jax.tree.leaves(params["mvm_head"]), jax.tree.leaves(fresh["mvm_head"])):
    np.testing.assert_array_equal(a, b)
  assert config.vocab.visual_offset == 256


def test_scanned_and_boxed_params_import_the_same(reference, imported):
  _, st_dir, _ = reference
  config, _, params = imported
  scanned_config = _config(scan_layers=True)
  boxed = model_lib.init_params(scanned_config, jax.random.key(0), unbox=False)
  scanned = bert_import.init_from_bert(boxed, st_dir, scanned_config)
  kernel = scanned["encoder"]["layers"]["intermediate"]["kernel"]
  assert isinstance(kernel, nn.LogicallyPartitioned)  # the boxes survive the import
  assert kernel.names == ("layers", "embed", "mlp")
  unscanned = model_lib.unscan_params(scanned)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(unscanned["encoder"]),
                          jax.tree.leaves(params["encoder"])):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  inputs = _inputs()
  a = _ours(scanned_config, model_lib.scan_params(scanned), *inputs)
  b = _ours(config, params, *inputs)
  np.testing.assert_allclose(a["hidden"], b["hidden"], atol=1e-5, rtol=0)


def test_pytorch_bin_reads_like_safetensors(reference):
  _, st_dir, bin_dir = reference
  st_state, st_config, st_vocab = bert_import.load_hf_bert(st_dir)
  bin_state, bin_config, bin_vocab = bert_import.load_hf_bert(bin_dir)
  assert st_config == bin_config and st_vocab == bin_vocab
  assert "bert.embeddings.LayerNorm.weight" in bin_state  # gamma/beta renamed
  assert set(st_state) <= set(bin_state)
  for key, value in st_state.items():
    np.testing.assert_array_equal(bin_state[key], value, err_msg=key)
  config = _config()
  fresh = model_lib.init_params(config, jax.random.key(0))
  a = bert_import.init_from_bert(fresh, st_dir, config)
  b = bert_import.init_from_bert(fresh, bin_dir, config)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("missing", ["config.json", "vocab.txt", "model.safetensors"])
def test_missing_file_is_named(reference, tmp_path, missing):
  _, st_dir, _ = reference
  target = tmp_path / "bert"
  shutil.copytree(st_dir, target)
  (target / missing).unlink()
  with pytest.raises(bert_import.BertImportError, match=missing.replace(".", r"\.")):
    bert_import.load_hf_bert(target)


def test_missing_heads_name_the_key(reference, tmp_path):
  torch_model, st_dir, _ = reference
  target = tmp_path / "bert_model_only"
  target.mkdir()
  for name in ("config.json", "vocab.txt"):
    shutil.copy(st_dir / name, target / name)
  torch.save({k: v for k, v in torch_model.state_dict().items() if not k.startswith("cls.")},
             target / "pytorch_model.bin")
  config = _config()
  with pytest.raises(bert_import.BertImportError, match="cls.seq_relationship"):
    bert_import.init_from_bert(model_lib.init_params(config, jax.random.key(0)), target, config)


def test_missing_torch_is_a_clear_error(reference, monkeypatch):
  _, _, bin_dir = reference
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(bert_import.BertImportError, match="needs PyTorch"):
    bert_import.load_hf_bert(bin_dir)


@pytest.mark.parametrize("overrides, expected", [
    (dict(hidden_size=128, num_heads=2, mlp_dim=64), ["hidden_size=128", "hidden_size=32",
                                                      "variant 'mu'"]),
    (dict(num_layers=3), ["num_layers=3", "num_hidden_layers=2"]),
    (dict(num_heads=4), ["num_heads=4", "num_attention_heads=2"]),
    (dict(mlp_dim=128), ["mlp_dim=128", "intermediate_size=64"]),
    (dict(text_vocab_size=300), ["text_vocab_size=300", "vocab_size=200"]),
    (dict(max_position_embeddings=128), ["max_position_embeddings=128",
                                         "max_position_embeddings=64"]),
    (dict(layer_norm_eps=1e-5), ["layer_norm_eps=1e-05", "layer_norm_eps=1e-12"]),
])
def test_config_mismatch_names_key_and_values(reference, overrides, expected):
  _, st_dir, _ = reference
  _, hf_config, vocab = bert_import.load_hf_bert(st_dir)
  with pytest.raises(bert_import.BertImportError) as err:
    bert_import.check_compatible(_config(**overrides), hf_config, vocab)
  for text in expected:
    assert text in str(err.value), (text, str(err.value))


def test_variant_mismatch_names_the_sizes(reference):
  _, st_dir, _ = reference
  config = model_lib.VideoBERTConfig.from_variant(
      "tiny", text_vocab_size=TEXT_SIZE, visual_vocab_size=40,
      max_position_embeddings=MAX_POSITIONS)
  # The check comes before any parameter is touched.
  with pytest.raises(bert_import.BertImportError, match=r"hidden_size=128 .*hidden_size=32"):
    bert_import.init_from_bert({}, st_dir, config)


def test_max_len_and_vocab_file_checks(reference, tmp_path):
  _, st_dir, _ = reference
  _, hf_config, vocab = bert_import.load_hf_bert(st_dir)
  with pytest.raises(bert_import.BertImportError,
                     match=r"max_len=100 .*max_position_embeddings=64"):
    bert_import.check_compatible(_config(), hf_config, vocab, max_len=100)
  short = dict(list(vocab.items())[:150])
  with pytest.raises(bert_import.BertImportError, match=r"150 tokens .*vocab_size=200"):
    bert_import.check_compatible(_config(), hf_config, short)
  moved = {("[MASK]" if t == "tok104" else "tok103" if t == "[MASK]" else t): i
           for t, i in vocab.items()}
  with pytest.raises(bert_import.BertImportError, match="special ids"):
    bert_import.check_compatible(_config(), hf_config, moved)


def test_fewer_positions_take_the_first_rows(reference):
  torch_model, st_dir, _ = reference
  config = _config(max_position_embeddings=32)
  params = bert_import.init_from_bert(model_lib.init_params(config, jax.random.key(0)), st_dir,
                                      config)
  expected = torch_model.bert.embeddings.position_embeddings.weight.detach().numpy()[:32]
  np.testing.assert_array_equal(params["embeddings"]["position_embeddings"]["embedding"],
                                expected)


def test_sharded_params_keep_their_sharding(reference, imported):
  _, st_dir, _ = reference
  config, fresh, params = imported
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("tensor",))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("tensor"))
  placed = jax.tree.map(lambda x: jax.device_put(x, rows) if x.shape[0] % 8 == 0 else x, fresh)
  got = bert_import.init_from_bert(placed, st_dir, config)
  table = got["embeddings"]["word_embeddings"]["embedding"]
  assert table.sharding == rows
  np.testing.assert_array_equal(table, params["embeddings"]["word_embeddings"]["embedding"])
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
