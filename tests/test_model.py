"""The model: variants, heads, padding, remat/scan equivalence, bf16, gradients, sharding.

Parity with transformers' BERT lives in test_bert_import.py (it needs the converter).
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vbert_jax import flops
from vbert_jax import model as model_lib
from vbert_jax import objectives
from vbert_jax import sequence
from vbert_jax import masking as masking_lib

SMALL_VOCAB = dict(text_vocab_size=200, visual_vocab_size=100, max_position_embeddings=32)


def _mu(**overrides) -> model_lib.VideoBERTConfig:
  return model_lib.VideoBERTConfig.from_variant("mu", **{**SMALL_VOCAB, **overrides})


def _batch(config: model_lib.VideoBERTConfig, length: int = 16, seed: int = 0) -> dict:
  """Video-text (aligned), text-only, video-only, video-text (negative); masked as in training."""
  vocab = config.vocab
  rng = np.random.default_rng(seed)
  layout = sequence.Layout(vocab, length)
  first_text = int(vocab.specials.as_array().max()) + 1

  def text(n):
    return rng.integers(first_text, vocab.text_size, n)

  def video(n):
    return rng.integers(0, vocab.visual_size, n)

  batch = sequence.stack([layout.pair(text(6), video(6)), layout.text_only(text(9)),
                          layout.video_only(video(10)), layout.pair(text(4), video(7))])
  batch.update(masking_lib.mask_batch(rng, batch["input_ids"], vocab, 3, 3))
  batch["lva_label"] = np.array([1, 0, 0, 0], np.int32)
  batch["lva_weight"] = np.array([1, 0, 0, 1], np.float32)
  return batch


@functools.partial(jax.jit, static_argnames=("config", "deterministic"))
def _apply(config, params, batch, deterministic=True, rngs=None):
  return model_lib.VideoBERT(config).apply(
      {"params": params}, batch["input_ids"], batch["segment_ids"], batch["position_ids"],
      batch["input_mask"], batch["mlm_positions"], batch["mvm_positions"],
      deterministic=deterministic, rngs=rngs)


def _loss(config, params, batch):
  return objectives.compute_loss(_apply(config, params, batch), batch)[0]


def _loss_with_outputs(config, params, batch):
  outputs = _apply(config, params, batch)
  return objectives.compute_loss(outputs, batch)[0], outputs


# ((loss, outputs), grads) in one compilation per config.
_loss_and_grad = jax.jit(jax.value_and_grad(_loss_with_outputs, argnums=1, has_aux=True),
                         static_argnums=0)


@pytest.fixture(scope="module")
def mu():
  config = _mu()
  return config, model_lib.init_params(config, jax.random.key(0)), _batch(config)


# ----------------------------------------------------------------------------------------------
# Config.


@pytest.mark.parametrize("name, sizes", [
    ("mu", (2, 32, 2, 64)), ("tiny", (2, 128, 2, 512)), ("small", (4, 512, 8, 2048)),
    ("base", (12, 768, 12, 3072)), ("large", (24, 1024, 16, 4096))])
def test_variants(name, sizes):
  config = model_lib.VideoBERTConfig.from_variant(name)
  assert (config.num_layers, config.hidden_size, config.num_heads, config.mlp_dim) == sizes
  assert config.vocab.text_padded == 30592 and config.vocab.total_size == 30592 + 20736
  assert hash(config) == hash(model_lib.VideoBERTConfig.from_variant(name))
  assert model_lib.variant_of(sizes[1], sizes[0], sizes[2], sizes[3]) == name


def test_custom_variant_and_bad_configs():
  custom = model_lib.VideoBERTConfig.from_variant("custom", hidden_size=48, num_layers=1,
                                                  num_heads=3, mlp_dim=96)
  assert (custom.hidden_size, custom.head_dim) == (48, 16)
  with pytest.raises(ValueError, match="unknown model variant 'huge'"):
    model_lib.decode_variant("huge")
  with pytest.raises(ValueError, match="hiden_size"):
    model_lib.VideoBERTConfig.from_variant("mu", hiden_size=4)
  with pytest.raises(ValueError, match="hidden_size=30 is not divisible by num_heads=4"):
    model_lib.VideoBERTConfig(hidden_size=30, num_heads=4)
  with pytest.raises(ValueError, match="remat='sometimes'"):
    _mu(remat="sometimes")
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    _mu(attention_impl="flash")
  with pytest.raises(ValueError, match="dtype='float17'"):
    _mu(dtype="float17")


# ----------------------------------------------------------------------------------------------
# Forward pass.


def test_outputs_shapes_and_padding_ids_are_never_predicted(mu):
  config, params, batch = mu
  out = _apply(config, params, batch)
  vocab = config.vocab
  assert out["hidden"].shape == (4, 16, 32) and out["pooled"].shape == (4, 32)
  assert out["lva_logits"].shape == (4,) and out["lva_logits"].dtype == jnp.float32
  assert out["mlm_logits"].shape == (4, 3, vocab.text_padded)
  assert out["mvm_logits"].shape == (4, 3, vocab.visual_padded)
  for logits, real in ((out["mlm_logits"], vocab.text_size),
                       (out["mvm_logits"], vocab.visual_size)):
    assert (logits[..., real:] == model_lib.PAD_LOGIT).all()
    assert np.abs(logits[..., :real]).max() < 100
    assert (np.argmax(logits, -1) < real).all()


def test_heads_are_tied_to_their_rows_of_the_table(mu):
  """Changing one visual row moves exactly that MVM logit column, and no MLM logit."""
  config, params, batch = mu
  vocab = config.vocab
  # Not a token of the batch, so that only the head (not the encoder) sees the change.
  assert vocab.visual_offset + 7 not in batch["input_ids"]
  table = params["embeddings"]["visual_embeddings"]["embedding"]
  assert table.shape[0] == vocab.visual_padded
  changed = jax.tree.map(lambda x: x, params)
  # A random direction: a constant one would vanish against the LayerNormed (zero-mean) state.
  step = jax.random.normal(jax.random.key(5), table.shape[1:])
  changed["embeddings"]["visual_embeddings"]["embedding"] = table.at[7].add(step)
  a, b = _apply(config, params, batch), _apply(config, changed, batch)
  np.testing.assert_array_equal(a["mlm_logits"], b["mlm_logits"])
  moved = np.abs(np.asarray(a["mvm_logits"]) - np.asarray(b["mvm_logits"])).max(axis=(0, 1))
  assert moved[7] > 1e-3 and np.delete(moved, 7).max() == 0


def test_heads_read_the_gathered_positions(mu):
  config, params, batch = mu
  out = _apply(config, params, batch)
  swapped = dict(batch, mlm_positions=batch["mlm_positions"][:, ::-1])
  np.testing.assert_allclose(_apply(config, params, swapped)["mlm_logits"],
                             out["mlm_logits"][:, ::-1], atol=1e-6, rtol=0)


def test_padding_positions_do_not_leak(mu):
  config, params, batch = mu
  out = _apply(config, params, batch)
  noisy = dict(batch)
  pad = batch["input_mask"] == 0
  noisy["input_ids"] = np.where(pad, config.vocab.visual_offset + 3, batch["input_ids"])
  noisy["segment_ids"] = np.where(pad, 1, batch["segment_ids"])
  other = _apply(config, params, noisy)
  real = ~pad
  np.testing.assert_allclose(np.asarray(other["hidden"])[real], np.asarray(out["hidden"])[real],
                             atol=1e-6, rtol=0)
  np.testing.assert_allclose(other["lva_logits"], out["lva_logits"], atol=1e-6, rtol=0)


def test_dropout_is_random_and_reproducible(mu):
  config, params, batch = mu
  det = _apply(config, params, batch)["hidden"]
  a, b, c = (_apply(config, params, batch, deterministic=False,
                    rngs={"dropout": jax.random.key(seed)}) for seed in (1, 1, 2))
  np.testing.assert_array_equal(a["hidden"], b["hidden"])
  assert np.abs(a["hidden"] - c["hidden"]).max() > 1e-2
  assert np.abs(a["hidden"] - det).max() > 1e-2


# ----------------------------------------------------------------------------------------------
# Remat, scan, bf16, gradients.


@pytest.mark.parametrize("options", [
    dict(remat=True), dict(remat="dots_with_no_batch_dims_saveable"), dict(scan_layers=True),
    dict(scan_layers=True, remat="nothing_saveable")])
def test_remat_and_scan_match_the_plain_model(mu, options):
  config, params, batch = mu
  other = dataclasses.replace(config, **options)
  other_params = model_lib.scan_params(params) if other.scan_layers else params
  (want_loss, want_out), want_grads = _loss_and_grad(config, params, batch)
  (got_loss, got_out), got_grads = _loss_and_grad(other, other_params, batch)
  for key, value in want_out.items():
    np.testing.assert_allclose(got_out[key], value, atol=1e-5, rtol=0, err_msg=key)
  np.testing.assert_allclose(got_loss, want_loss, atol=1e-5, rtol=0)
  got_grads = model_lib.unscan_params(got_grads)
  assert jax.tree.structure(got_grads) == jax.tree.structure(want_grads)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_grads),
                          jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=0, err_msg=jax.tree_util.keystr(path))
  assert max(float(np.abs(w).max()) for w in jax.tree.leaves(want_grads["encoder"])) > 1e-3


def test_scanned_init_has_a_layers_axis():
  config = _mu(scan_layers=True)
  boxed = model_lib.init_params(config, jax.random.key(0), unbox=False)
  kernel = boxed["encoder"]["layers"]["attention"]["query"]["kernel"]
  assert kernel.names == ("layers", "embed", "heads", "kv")
  assert kernel.unbox().shape == (2, 32, 2, 16)
  unscanned = model_lib.unscan_params(boxed)
  assert sorted(unscanned["encoder"]) == ["layer_0", "layer_1"]
  # Layers start different (the params rng is split over the scan).
  layer0, layer1 = (unscanned["encoder"][f"layer_{i}"]["output"]["kernel"] for i in (0, 1))
  assert np.abs(layer0 - layer1).max() > 1e-3


def test_bf16_compute_loss_is_within_2_percent_of_f32():
  config = model_lib.VideoBERTConfig.from_variant("tiny", text_vocab_size=2000,
                                                  visual_vocab_size=1000,
                                                  max_position_embeddings=64)
  params = model_lib.init_params(config, jax.random.key(0))
  batch = _batch(config, length=32, seed=3)
  bf16 = dataclasses.replace(config, dtype="bfloat16")
  (_, out32), g32 = _loss_and_grad(config, params, batch)
  (_, out16), g16 = _loss_and_grad(bf16, params, batch)
  assert out16["hidden"].dtype == jnp.bfloat16
  assert out16["mlm_logits"].dtype == jnp.float32 and out16["lva_logits"].dtype == jnp.float32
  loss32, metrics32 = objectives.compute_loss(out32, batch)
  loss16, metrics16 = objectives.compute_loss(out16, batch)
  assert float(metrics32["mlm_count"]) > 0 and float(metrics32["mvm_count"]) > 0
  assert float(metrics32["lva_count"]) == 2
  assert abs(float(loss16) - float(loss32)) <= 0.02 * abs(float(loss32)), (loss16, loss32)
  # The bf16 gradient is a gradient of the same loss: it points the same way.
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g16))
  flat32, flat16 = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]) for g in (g32, g16))
  cosine = flat32 @ flat16 / np.linalg.norm(flat32) / np.linalg.norm(flat16)
  assert cosine > 0.98, cosine


def test_embedding_gradients_sum_in_f32_under_bf16_compute():
  """A table's gradient sums a term for every token of the batch (the token-type table: all of
  them). Under bf16 compute those sums run in f32, so the table's gradient is as close to the
  f32 model's as a weight's (one bf16 rounding of its terms, 2^-8 relative, with room for two),
  however many tokens there are; summed in bf16, this batch's 1,088 tokens put it 8 times
  further off."""
  from helpers.configs import pretrain  # pylint: disable=g-import-not-at-top
  from vbert_jax import synthetic  # pylint: disable=g-import-not-at-top
  from vbert_jax import pretrain as pretrain_lib  # pylint: disable=g-import-not-at-top
  config = pretrain.get_config("variant=custom,runlocal")
  with config.unlocked():
    config.model.update(hidden_size=64, num_layers=1, num_heads=4, mlp_dim=128)
    config.max_len, config.batch_size = 64, 128
    config.masking.max_predictions_text = config.masking.max_predictions_video = 8
  batch = next(synthetic.from_config(config, "train", batch_size=128))
  assert batch["input_mask"].sum() > 1000

  def grads(dtype):
    with config.unlocked():
      config.model.dtype = dtype
    trainable = pretrain_lib.make_trainable(config)
    params = nn.meta.unbox(jax.jit(trainable.init)(jax.random.key(0)))
    return jax.jit(jax.grad(lambda p: trainable.loss(p, batch, None)[0]))(params)

  g32, g16 = grads("float32"), grads("bfloat16")
  for table in ("token_type_embeddings", "position_embeddings", "word_embeddings",
                "visual_embeddings"):
    a, b = (np.asarray(g["embeddings"][table]["embedding"], np.float32) for g in (g32, g16))
    assert np.abs(a - b).max() <= 2 ** -7 * np.abs(a).max(), table


def test_mu_gradients_match_finite_differences():
  with jax.enable_x64(True):
    config = _mu(dtype="float64", param_dtype="float64")
    params = model_lib.init_params(config, jax.random.key(0))
    assert params["mlm_head"]["bias"].dtype == jnp.float64
    batch = _batch(config, length=12, seed=1)
    loss = jax.jit(functools.partial(_loss, config, batch=batch))
    jax.test_util.check_grads(loss, (params,), order=1, modes=("rev",))


# ----------------------------------------------------------------------------------------------
# Parameter trees.


def test_scan_params_roundtrip_and_optimizer_state(mu):
  config, params, _ = mu
  scanned = model_lib.scan_params(params)
  assert set(scanned["encoder"]) == {"layers"}
  assert scanned["encoder"]["layers"]["output"]["kernel"].shape == (2, 64, 32)
  back = model_lib.unscan_params(scanned)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  again = model_lib.scan_params(scanned)  # already scanned: unchanged
  assert jax.tree.structure(again) == jax.tree.structure(scanned)
  np.testing.assert_array_equal(again["encoder"]["layers"]["output"]["kernel"],
                                scanned["encoder"]["layers"]["output"]["kernel"])
  # An optimizer state mirrors the params and converts the same way.
  tx = optax.adamw(1e-3)
  state = jax.tree.map(lambda x: x + 1, tx.init(params))
  converted = model_lib.scan_params(state)
  assert jax.tree.structure(converted) == jax.tree.structure(tx.init(scanned))
  mu_state = converted[0].mu["encoder"]["layers"]["intermediate"]["kernel"]
  np.testing.assert_array_equal(mu_state[1], state[0].mu["encoder"]["layer_1"]["intermediate"]
                                ["kernel"])


def test_parameter_counts(mu):
  config, params, _ = mu
  h, vocab = config.hidden_size, config.vocab
  encoder = model_lib.count_params(params["encoder"])
  assert encoder == flops.encoder_params(config)
  tables = (vocab.total_size + config.max_position_embeddings + config.type_vocab_size) * h
  heads = model_lib.count_params({k: params[k] for k in ("mlm_head", "mvm_head", "lva_head")})
  assert model_lib.count_params(params) == encoder + 2 * h + tables + heads
  base = model_lib.VideoBERTConfig.from_variant("base")
  # BERT-base: 85,054,464 encoder parameters (12 layers of 7,087,872).
  assert flops.encoder_params(base) == 85_054_464


def test_logical_axes_shard_parameters_and_activations(mu):
  config, params, batch = mu
  rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"),
           ("heads", "tensor"), ("vocab", "tensor"), ("layers", None), ("length", None),
           ("kv", None))
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
  boxed = model_lib.init_params(config, jax.random.key(0), unbox=False)
  specs = nn.get_partition_spec(boxed)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  for table in ("word_embeddings", "visual_embeddings"):
    assert shardings["embeddings"][table]["embedding"].spec == P("tensor", "fsdp")
  # Hidden-to-hidden kernels: split over fsdp like any `embed` input, never over `tensor`.
  for head, kernel in (("mlm_head", "transform"), ("mvm_head", "transform"),
                       ("lva_head", "pooler")):
    assert shardings[head][kernel]["kernel"].spec == P("fsdp", None), (head, kernel)
  assert shardings["encoder"]["layer_0"]["attention"]["query"]["kernel"].spec == P(
      "fsdp", "tensor", None)
  sharded = jax.device_put(params, shardings)
  inputs = jax.device_put({k: batch[k] for k in ("input_ids", "segment_ids", "position_ids",
                                                 "input_mask", "mlm_positions", "mvm_positions")},
                          NamedSharding(mesh, P()))

  @jax.jit
  def forward(p, x):
    with nn.logical_axis_rules(rules):
      return model_lib.VideoBERT(config).apply({"params": p}, **x)

  with jax.set_mesh(mesh):
    got = forward(sharded, inputs)
  want = _apply(config, params, batch)
  for key, value in want.items():
    np.testing.assert_allclose(got[key], value, atol=1e-5, rtol=0, err_msg=key)
  assert len(sharded["embeddings"]["word_embeddings"]["embedding"].sharding.device_set) == 8


def _train_step(dtype: str):
  """The trainer's own train step (mu, runlocal: packed rows), lowered, and its model config."""
  from helpers.configs import pretrain  # pylint: disable=g-import-not-at-top
  from vbert_jax import pretrain as pretrain_lib  # pylint: disable=g-import-not-at-top
  from vbert_jax import train  # pylint: disable=g-import-not-at-top
  config = pretrain.get_config("variant=mu,runlocal")
  with config.unlocked():
    config.model.dtype = dtype
    config.compilation_cache_dir = ""
  trainer = train.Trainer(pretrain_lib.make_trainable(config), config)
  return trainer.lower_train_step(), pretrain_lib.model_config(config)


def test_the_step_sums_position_and_type_gradients_without_a_scatter():
  """Position and token-type rows are read by one-hot products, so their gradients are matmuls
  in the compiled step. The word and visual tables (hundreds of rows) keep their
  scatter-adds."""
  import re  # pylint: disable=g-import-not-at-top
  lowered, cfg = _train_step("float32")
  text = lowered.compile().as_text()
  shapes = set(re.findall(r"= f32\[([\d,]+)\][^=]*? scatter\(", text))
  h = cfg.hidden_size
  assert {f"{cfg.vocab.text_padded},{h}", f"{cfg.vocab.visual_padded},{h}"} <= shapes
  assert f"{cfg.max_position_embeddings},{h}" not in shapes
  assert f"{cfg.type_vocab_size},{h}" not in shapes


def test_bf16_compute_runs_the_heads_in_bf16_with_f32_logits():
  """Under bf16 compute the step's MLM and MVM logits are products of bf16 operands with f32
  results (the loss is f32), rather than f32 products of upcast tables."""
  import re  # pylint: disable=g-import-not-at-top
  lowered, cfg = _train_step("bfloat16")
  text = lowered.as_text()
  for size in (cfg.vocab.text_padded, cfg.vocab.visual_padded):
    heads = re.findall(rf"dot_general.*?: \((tensor<[^)]*)\) -> tensor<[\dx]*x{size}x(\w+)>",
                       text)
    assert heads, size
    for operands, result in heads:
      assert result == "f32" and operands.count("xbf16>") == 2, (operands, result)
