"""Masking statistics and slots; the three losses against NumPy; loss weights and regimes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vbert_jax import model as model_lib
from vbert_jax import objectives, sequence
from vbert_jax.sequence import JointVocab, Layout
from vbert_jax import masking as masking_lib

VOCAB = JointVocab(text_size=1000, visual_size=300)
SPECIALS = VOCAB.specials.as_array()


def _text_ids(rng, n):
  pool = np.setdiff1d(np.arange(VOCAB.text_size), SPECIALS)
  return rng.choice(pool, size=n).tolist()


def _pair(rng, n_text, n_video, max_len=64):
  return Layout(VOCAB, max_len).pair(_text_ids(rng, n_text),
                                     rng.integers(0, VOCAB.visual_size, n_video).tolist())


@pytest.fixture(scope="module")
def many_draws():
  """4000 maskings of pair sequences (30 text and 30 video tokens), with their originals."""
  rng = np.random.default_rng(0)
  originals, masked = [], []
  for _ in range(4000):
    packed = _pair(rng, 30, 30)
    originals.append(packed.input_ids)
    masked.append(masking_lib.mask_example(rng, packed.input_ids, VOCAB, 10, 10))
  return np.stack(originals), masked


def test_masking_statistics_match_bert_recipe(many_draws):
  originals, masked = many_draws
  outcomes = {"text": np.zeros(3), "video": np.zeros(3)}  # [MASK], random, unchanged
  per_position = np.zeros(originals.shape[1])
  for orig, m in zip(originals, masked):
    for name, pos_key, w_key in (("text", "mlm_positions", "mlm_weights"),
                                 ("video", "mvm_positions", "mvm_weights")):
      pos = m[pos_key][m[w_key] > 0]
      new, old = m["input_ids"][pos], orig[pos]
      outcomes[name] += [(new == VOCAB.specials.mask).sum(),
                         ((new != VOCAB.specials.mask) & (new != old)).sum(),
                         (new == old).sum()]
      per_position[pos] += 1
      # Nothing outside the chosen slots changes.
      untouched = np.setdiff1d(np.arange(len(orig)), np.concatenate(
          [m["mlm_positions"][m["mlm_weights"] > 0], m["mvm_positions"][m["mvm_weights"] > 0]]))
      np.testing.assert_array_equal(m["input_ids"][untouched], orig[untouched])
  for name, counts in outcomes.items():
    frac = counts / counts.sum()
    # 4000 draws x 4 or 5 slots: the binomial standard error is below 0.003.
    assert abs(frac[0] - 0.8) < 0.015, (name, frac)
    assert abs(frac[1] - 0.1) < 0.012, (name, frac)  # a random pick equal to the original is rare
    assert abs(frac[2] - 0.1) < 0.012, (name, frac)
  # 15% of 30 = 4.5 -> 5 text slots; same for video: every eligible position at 5/30.
  eligible = VOCAB.is_text(originals[0]) | VOCAB.is_visual(originals[0])
  rate = per_position[eligible] / len(originals)
  assert abs(rate.mean() - 5 / 30) < 1e-9
  assert np.all(np.abs(rate - 5 / 30) < 0.035), rate
  assert per_position[~eligible].sum() == 0


def test_random_replacements_stay_in_their_modality(many_draws):
  originals, masked = many_draws
  for orig, m in zip(originals[:1000], masked[:1000]):
    text_pos = m["mlm_positions"][m["mlm_weights"] > 0]
    video_pos = m["mvm_positions"][m["mvm_weights"] > 0]
    text_new = m["input_ids"][text_pos]
    video_new = m["input_ids"][video_pos]
    assert np.all(VOCAB.is_text(text_new) | (text_new == VOCAB.specials.mask))
    assert np.all(VOCAB.is_visual(video_new) | (video_new == VOCAB.specials.mask))


def test_special_tokens_and_padding_are_never_masked(many_draws):
  originals, masked = many_draws
  for orig, m in zip(originals, masked):
    not_eligible = ~(VOCAB.is_text(orig) | VOCAB.is_visual(orig))
    np.testing.assert_array_equal(m["input_ids"][not_eligible], orig[not_eligible])
    assert np.all(VOCAB.is_text(orig[m["mlm_positions"][m["mlm_weights"] > 0]]))
    assert np.all(VOCAB.is_visual(orig[m["mvm_positions"][m["mvm_weights"] > 0]]))


def test_targets_are_the_original_ids(many_draws):
  originals, masked = many_draws
  for orig, m in zip(originals[:500], masked[:500]):
    real = m["mlm_weights"] > 0
    np.testing.assert_array_equal(m["mlm_ids"][real], orig[m["mlm_positions"][real]])
    real = m["mvm_weights"] > 0
    np.testing.assert_array_equal(m["mvm_ids"][real] + VOCAB.visual_offset,
                                  orig[m["mvm_positions"][real]])
    assert np.all((m["mvm_ids"] >= 0) & (m["mvm_ids"] < VOCAB.visual_size))


def test_fixed_seed_gives_the_same_masks():
  packed = _pair(np.random.default_rng(1), 40, 20)
  a = masking_lib.mask_example(np.random.default_rng(7), packed.input_ids, VOCAB, 8, 8)
  b = masking_lib.mask_example(np.random.default_rng(7), packed.input_ids, VOCAB, 8, 8)
  c = masking_lib.mask_example(np.random.default_rng(8), packed.input_ids, VOCAB, 8, 8)
  for key in masking_lib.MASK_KEYS:
    np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(a["mlm_positions"], c["mlm_positions"])


@pytest.mark.parametrize("n_text,n_video,max_text,max_video,want_text,want_video", [
    (3, 4, 20, 20, 1, 1),      # 0.45 -> at least 1, 0.6 -> 1
    (10, 20, 20, 20, 2, 3),    # 1.5 -> 2 (halves round up), 3.0 -> 3
    (100, 25, 20, 20, 15, 4),  # 15.0 -> 15, 3.75 -> 4
    (120, 7, 12, 20, 12, 1),   # 18 capped at 12, 1.05 -> 1
    (0, 60, 5, 5, 0, 5),       # no text at all; 9 capped at 5
])
def test_slot_counts_and_padding(n_text, n_video, max_text, max_video, want_text, want_video):
  rng = np.random.default_rng(3)
  packed = _pair(rng, n_text, n_video, max_len=160)
  m = masking_lib.mask_example(rng, packed.input_ids, VOCAB, max_text, max_video)
  for prefix, want, size in (("mlm", want_text, max_text), ("mvm", want_video, max_video)):
    pos, ids, w = m[f"{prefix}_positions"], m[f"{prefix}_ids"], m[f"{prefix}_weights"]
    assert pos.shape == ids.shape == w.shape == (size,)
    assert pos.dtype == ids.dtype == np.int32 and w.dtype == np.float32
    np.testing.assert_array_equal(w, [1.0] * want + [0.0] * (size - want))
    np.testing.assert_array_equal(pos[want:], 0)
    np.testing.assert_array_equal(ids[want:], 0)
    assert len(set(pos[:want].tolist())) == want


def test_text_only_and_video_only_fill_one_modality():
  rng = np.random.default_rng(4)
  text = Layout(VOCAB, 48).text_only(_text_ids(rng, 40))
  video = Layout(VOCAB, 48).video_only(rng.integers(0, VOCAB.visual_size, 40).tolist())
  batch = masking_lib.mask_batch(rng, np.stack([text.input_ids, video.input_ids]), VOCAB, 8, 8)
  np.testing.assert_array_equal(batch["mlm_weights"].sum(1), [6, 0])
  np.testing.assert_array_equal(batch["mvm_weights"].sum(1), [0, 6])
  assert batch["input_ids"].shape == (2, 48) and batch["mvm_ids"].shape == (2, 8)


def test_masking_config_matches_function():
  cfg = masking_lib.MaskingConfig(max_predictions_text=6, max_predictions_video=4)
  ids = _pair(np.random.default_rng(5), 30, 30).input_ids
  a = cfg.mask_example(np.random.default_rng(2), ids, VOCAB)
  b = masking_lib.mask_example(np.random.default_rng(2), ids, VOCAB, 6, 4)
  for key in masking_lib.MASK_KEYS:
    np.testing.assert_array_equal(a[key], b[key])


def test_video_suffix_masking_hides_the_last_clips_only():
  video = Layout(VOCAB, 48).video_only(list(range(100, 120)))
  pair = _pair(np.random.default_rng(6), 10, 12)
  for packed in (video, pair):
    visual = np.flatnonzero(VOCAB.is_visual(packed.input_ids))
    suffixed, plain = [], []
    for seed in range(200):
      m = masking_lib.mask_example(np.random.default_rng(seed), packed.input_ids, VOCAB, 8, 4,
                                  rate=0.4, video_suffix_rate=0.5)
      pos = m["mvm_positions"][m["mvm_weights"] > 0]
      is_suffix = np.array_equal(pos, visual[-len(pos):])
      (suffixed if is_suffix else plain).append(m)
      if is_suffix:  # always [MASK] (no 80-10-10), targets are the originals
        assert (m["input_ids"][pos] == VOCAB.specials.mask).all()
        np.testing.assert_array_equal(m["mvm_ids"][:len(pos)],
                                      VOCAB.joint_to_visual(packed.input_ids[pos]))
        past = visual[:len(visual) - len(pos)]  # the clips before the masked ones are intact
        np.testing.assert_array_equal(m["input_ids"][past], packed.input_ids[past])
    assert 70 < len(suffixed) < 130, len(suffixed)  # about half of 200
  # Rate 0 (the paper's recipe) draws exactly what masking without the option draws.
  a = masking_lib.mask_example(np.random.default_rng(3), pair.input_ids, VOCAB, 8, 4)
  b = masking_lib.mask_example(np.random.default_rng(3), pair.input_ids, VOCAB, 8, 4,
                              video_suffix_rate=0.0)
  for key in masking_lib.MASK_KEYS:
    np.testing.assert_array_equal(a[key], b[key])
  cfg = masking_lib.MaskingConfig.from_config({"rate": 0.4, "video_suffix_rate": 1.0})
  assert (cfg.rate, cfg.video_suffix_rate, cfg.max_predictions_text) == (0.4, 1.0, 20)


def test_bad_masking_arguments_are_named():
  with pytest.raises(ValueError, match="mask_prob"):
    masking_lib.mask_example(np.random.default_rng(0), np.zeros(8, np.int32), VOCAB, 2, 2,
                            mask_prob=0.95, random_prob=0.1)
  with pytest.raises(ValueError, match="video_suffix_rate=1.5"):
    masking_lib.mask_example(np.random.default_rng(0), np.zeros(8, np.int32), VOCAB, 2, 2,
                            video_suffix_rate=1.5)
  with pytest.raises(ValueError, match=r"\[batch, length\]"):
    masking_lib.mask_batch(np.random.default_rng(0), np.zeros(8, np.int32), VOCAB, 2, 2)


# ---------------------------------------------------------------------------------------------
# Losses.


def _np_ce(logits, targets):
  logits = np.asarray(logits, np.float64)
  m = logits.max(-1, keepdims=True)
  lse = np.log(np.exp(logits - m).sum(-1)) + m[..., 0]
  return lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]


def _fake_batch(rng, regimes, pt=3, pv=4):
  b = len(regimes)
  regimes = np.asarray(regimes, np.int32)
  mlm_w = (rng.random((b, pt)) < 0.7).astype(np.float32)
  mvm_w = (rng.random((b, pv)) < 0.7).astype(np.float32)
  mlm_w[regimes == sequence.REGIME_VIDEO] = 0
  mvm_w[regimes == sequence.REGIME_TEXT] = 0
  return {"regime": regimes,
          "mlm_ids": rng.integers(0, VOCAB.text_size, (b, pt)).astype(np.int32),
          "mlm_weights": mlm_w,
          "mvm_ids": rng.integers(0, VOCAB.visual_size, (b, pv)).astype(np.int32),
          "mvm_weights": mvm_w,
          "lva_label": rng.integers(0, 2, b).astype(np.int32),
          "lva_weight": (regimes == sequence.REGIME_PAIR).astype(np.float32)}


def _fake_outputs(rng, batch):
  b, pt = batch["mlm_ids"].shape
  pv = batch["mvm_ids"].shape[1]
  return {"mlm_logits": rng.normal(size=(b, pt, VOCAB.text_padded)).astype(np.float32) * 3,
          "mvm_logits": rng.normal(size=(b, pv, VOCAB.visual_padded)).astype(np.float32) * 3,
          "lva_logits": rng.normal(size=(b,)).astype(np.float32) * 2}


def test_losses_and_metrics_match_numpy():
  rng = np.random.default_rng(11)
  batch = _fake_batch(rng, [2, 2, 0, 1, 2, 0])
  outputs = _fake_outputs(rng, batch)
  # Make some predictions right so that accuracy is not trivially zero.
  outputs["mlm_logits"][0, 0, batch["mlm_ids"][0, 0]] = 50.0
  outputs["mvm_logits"][1, :, :] = 0.0
  outputs["mvm_logits"][1, np.arange(4), batch["mvm_ids"][1]] = 50.0
  loss, m = jax.jit(objectives.compute_loss, static_argnums=(2, 3, 4))(
      outputs, batch, 1.0, 0.5, 2.0)

  def weighted(values, w):
    return (values * w).sum() / w.sum()
  mlm_ce = _np_ce(outputs["mlm_logits"], batch["mlm_ids"])
  mvm_ce = _np_ce(outputs["mvm_logits"], batch["mvm_ids"])
  z, y, lw = outputs["lva_logits"].astype(np.float64), batch["lva_label"], batch["lva_weight"]
  bce = np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))
  want = {
      "mlm_loss": weighted(mlm_ce, batch["mlm_weights"]),
      "mvm_loss": weighted(mvm_ce, batch["mvm_weights"]),
      "lva_loss": weighted(bce, lw),
      "mlm_accuracy": weighted(outputs["mlm_logits"].argmax(-1) == batch["mlm_ids"],
                               batch["mlm_weights"]),
      "mvm_accuracy": weighted(outputs["mvm_logits"].argmax(-1) == batch["mvm_ids"],
                               batch["mvm_weights"]),
      "lva_accuracy": weighted((z > 0) == y, lw),
      "mlm_count": batch["mlm_weights"].sum(), "mvm_count": batch["mvm_weights"].sum(),
      "lva_count": lw.sum(),
  }
  for key, value in want.items():
    np.testing.assert_allclose(m[key], value, rtol=1e-5, err_msg=key)
  assert m["mlm_accuracy"] > 0 and m["mvm_accuracy"] > 0
  np.testing.assert_allclose(
      loss, want["mlm_loss"] + 0.5 * want["mvm_loss"] + 2.0 * want["lva_loss"], rtol=1e-5)


def test_regime_overrides_slot_weights():
  """A video-only example's text slots (and a text-only one's video slots) never count."""
  rng = np.random.default_rng(12)
  batch = _fake_batch(rng, [0, 1])
  batch["mlm_weights"][:] = 1.0
  batch["mvm_weights"][:] = 1.0
  batch["lva_weight"][:] = 1.0
  outputs = _fake_outputs(rng, batch)
  _, m = objectives.compute_loss(outputs, batch)
  np.testing.assert_allclose(m["mlm_loss"], _np_ce(outputs["mlm_logits"][0],
                                                   batch["mlm_ids"][0]).mean(), rtol=1e-5)
  np.testing.assert_allclose(m["mvm_loss"], _np_ce(outputs["mvm_logits"][1],
                                                   batch["mvm_ids"][1]).mean(), rtol=1e-5)
  assert float(m["lva_count"]) == 0 and float(m["lva_loss"]) == 0


def test_masked_losses_can_skip_alignment_negatives():
  """Pair examples 0 (positive) and 1 (negative): without masked_on_negatives only 0 counts."""
  rng = np.random.default_rng(14)
  batch = _fake_batch(rng, [2, 2])
  batch["mlm_weights"][:] = 1.0
  batch["mvm_weights"][:] = 1.0
  batch["lva_weight"][:] = 1.0
  batch["lva_label"][:] = [1, 0]
  outputs = _fake_outputs(rng, batch)
  _, both = objectives.compute_loss(outputs, batch)
  _, kept = objectives.compute_loss(outputs, batch, masked_on_negatives=False)
  for head, ids in (("mlm", "mlm_ids"), ("mvm", "mvm_ids")):
    logits = outputs[f"{head}_logits"]
    np.testing.assert_allclose(both[f"{head}_loss"], np.concatenate(
        [_np_ce(logits[i], batch[ids][i]) for i in (0, 1)]).mean(), rtol=1e-5)
    np.testing.assert_allclose(kept[f"{head}_loss"], _np_ce(logits[0], batch[ids][0]).mean(),
                               rtol=1e-5)
  # Alignment itself still learns from both.
  assert float(kept["lva_count"]) == 2 and float(kept["lva_loss"]) == float(both["lva_loss"])


def test_missing_head_output_is_named():
  rng = np.random.default_rng(13)
  batch = _fake_batch(rng, [2])
  outputs = _fake_outputs(rng, batch)
  del outputs["mvm_logits"]
  with pytest.raises(KeyError, match="mvm_logits"):
    objectives.compute_loss(outputs, batch)


# ---------------------------------------------------------------------------------------------
# With the real model: loss weights and the three regimes.

MODEL_CFG = model_lib.VideoBERTConfig.from_variant(
    "mu", text_vocab_size=VOCAB.text_size, visual_vocab_size=VOCAB.visual_size,
    max_position_embeddings=32)


def _model_batch(regime, batch_size=4, max_len=32, seed=0):
  """A masked batch of one regime, built by the layout helpers and `mask_batch`."""
  rng = np.random.default_rng(seed)
  layout = Layout(VOCAB, max_len)
  packed = []
  for _ in range(batch_size):
    text = _text_ids(rng, int(rng.integers(12, 20)))
    video = rng.integers(0, VOCAB.visual_size, int(rng.integers(10, 16))).tolist()
    packed.append({sequence.REGIME_TEXT: lambda: layout.text_only(text),
                   sequence.REGIME_VIDEO: lambda: layout.video_only(video),
                   sequence.REGIME_PAIR: lambda: layout.pair(text, video)}[regime]())
  batch = sequence.stack(packed)
  batch.update(masking_lib.mask_batch(rng, batch["input_ids"], VOCAB, 4, 4))
  is_pair = batch["regime"] == sequence.REGIME_PAIR
  batch["lva_label"] = (np.arange(batch_size) % 2).astype(np.int32)
  batch["lva_weight"] = is_pair.astype(np.float32)
  return batch


@pytest.fixture(scope="module")
def model_params():
  return model_lib.init_params(MODEL_CFG, jax.random.PRNGKey(0))


def _apply(params, batch):
  return model_lib.VideoBERT(MODEL_CFG).apply(
      {"params": params}, batch["input_ids"], batch["segment_ids"], batch["position_ids"],
      batch["input_mask"], batch["mlm_positions"], batch["mvm_positions"], deterministic=True)


@jax.jit
def _loss_and_grad(params, batch, weights):
  def loss_fn(p):
    return objectives.compute_loss(_apply(p, batch), batch, *weights)
  return jax.value_and_grad(loss_fn, has_aux=True)(params)


def _max_abs(tree):
  return max(float(jnp.abs(x).max()) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("zeroed,head", [(0, "mlm_head"), (1, "mvm_head"), (2, "lva_head")])
def test_zero_loss_weight_removes_exactly_that_gradient(model_params, zeroed, head):
  batch = {**_model_batch(sequence.REGIME_PAIR), "regime": np.array(
      [sequence.REGIME_PAIR, sequence.REGIME_TEXT, sequence.REGIME_VIDEO,
       sequence.REGIME_PAIR], np.int32)}
  batch["lva_weight"] = (batch["regime"] == sequence.REGIME_PAIR).astype(np.float32)
  weights = np.array([0.7, 1.3, 0.4], np.float32)
  only = np.zeros(3, np.float32)
  only[zeroed] = weights[zeroed]
  without = weights.copy()
  without[zeroed] = 0.0
  (_, m_full), g_full = _loss_and_grad(model_params, batch, weights)
  (loss_without, m_without), g_without = _loss_and_grad(model_params, batch, without)
  (_, _), g_only = _loss_and_grad(model_params, batch, only)
  # The removed gradient is exactly the term's own, and it was not zero to begin with.
  jax.tree.map(lambda a, b, c: np.testing.assert_allclose(a, b - c, atol=2e-6),
               g_without, g_full, g_only)
  assert _max_abs(g_only) > 1e-4  # 50x the tolerance above
  # The term's own head gets no gradient at all once its weight is zero.
  assert _max_abs(g_without[head]) == 0.0 and _max_abs(g_full[head]) > 0
  names = ("mlm_loss", "mvm_loss", "lva_loss")
  want = sum(w * float(m_full[n]) for w, n in zip(without, names))
  np.testing.assert_allclose(loss_without, want, rtol=1e-6)


@pytest.mark.parametrize("regime,terms", [
    (sequence.REGIME_TEXT, ("mlm",)),
    (sequence.REGIME_VIDEO, ("mvm",)),
    (sequence.REGIME_PAIR, ("mlm", "mvm", "lva")),
])
def test_each_regime_gives_finite_losses_with_its_terms(model_params, regime, terms):
  batch = _model_batch(regime, seed=regime)
  (loss, m), grads = _loss_and_grad(model_params, batch, np.ones(3, np.float32))
  assert np.isfinite(float(loss)) and np.isfinite(_max_abs(grads))
  for name in ("mlm", "mvm", "lva"):
    if name in terms:
      assert float(m[f"{name}_count"]) > 0 and float(m[f"{name}_loss"]) > 0.1, name
    else:
      assert float(m[f"{name}_count"]) == 0 and float(m[f"{name}_loss"]) == 0, name
  np.testing.assert_allclose(loss, sum(float(m[f"{n}_loss"]) for n in terms), rtol=1e-6)
  # An untrained model predicts near chance: MLM / MVM loss about log(vocabulary size).
  if "mlm" in terms:
    assert abs(float(m["mlm_loss"]) - np.log(VOCAB.text_size)) < 1.0
  if "mvm" in terms:
    assert abs(float(m["mvm_loss"]) - np.log(VOCAB.visual_size)) < 1.0
