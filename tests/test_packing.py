"""Packing: several examples in a row give each example what it gives alone in its own row.

The packed batches come from the production sources (the generated-token source and the TFDS
pipeline over records shaped like real ones), the model and the loss are the trainer's.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vbert_jax import masking as masking_lib
from vbert_jax import model as model_lib
from vbert_jax import objectives
from vbert_jax import packing
from vbert_jax import sequence
from vbert_jax import synthetic
from vbert_jax import input_pipeline as ip

EPS32 = float(np.finfo(np.float32).eps)
VOCAB = sequence.JointVocab(300, 128)
EXAMPLE_LEN = 24
MASKING = masking_lib.MaskingConfig(max_predictions_text=4, max_predictions_video=4)


def _source(pack_examples: int, max_len: int, batch_size: int, seed: int = 3):
  world = synthetic.World.generate(VOCAB, 12, 3, 12, seed)
  return synthetic.SyntheticSource(
      vocab=VOCAB, max_len=max_len, batch_size=batch_size, masking=MASKING,
      regime_weights=(1.0, 1.0, 2.0), lva_negative_rate=0.5, world=world, seed=seed,
      pack_examples=pack_examples, max_example_len=EXAMPLE_LEN if pack_examples > 1 else 0)


@functools.partial(jax.jit, static_argnames=("config",))
def _apply(config, params, batch):
  return model_lib.VideoBERT(config).apply(
      {"params": params}, batch["input_ids"], batch["segment_ids"], batch["position_ids"],
      batch["input_mask"], batch["mlm_positions"], batch["mvm_positions"],
      batch.get("cls_positions"))


@pytest.fixture(scope="module")
def packed_and_alone():
  """A packed batch (4 rows of 96 tokens, up to 8 examples each) and the same examples one per
  row of EXAMPLE_LEN tokens, with the outputs of a `mu` model with real weights on both."""
  config = model_lib.VideoBERTConfig.from_variant(
      "mu", text_vocab_size=VOCAB.text_size, visual_vocab_size=VOCAB.visual_size,
      max_position_embeddings=EXAMPLE_LEN)
  params = model_lib.init_params(config, jax.random.key(1))
  packed = next(_source(8, 96, 4))
  alone_source = _source(1, EXAMPLE_LEN, 1)
  places = packed["regime"] >= 0
  # Row s of the packed stream holds the candidates at s * 8 + j: the same examples alone.
  index = [s * 8 + j for s, j in zip(*np.nonzero(places))]
  alone = packing.stack_rows([alone_source.example(i) for i in index])
  return (config, packed, alone, {k: np.asarray(v) for k, v in _apply(config, params, packed).items()},
          {k: np.asarray(v) for k, v in _apply(config, params, alone).items()})


def _slots_of(batch, prefix, row):
  w = batch[f"{prefix}_weights"][row] > 0
  return np.flatnonzero(w)


def test_packed_batch_is_well_formed(packed_and_alone):
  _, packed, alone, _, _ = packed_and_alone
  places = packed["regime"] >= 0
  counts = places.sum(axis=1)
  assert (counts >= 2).all() and set(np.unique(packed["regime"][places])) == {0, 1, 2}
  # Every token of an example is where the example says, in order, with its own positions.
  for r, row_places in enumerate(places):
    for k in np.flatnonzero(row_places):
      span = np.flatnonzero(packed["input_mask"][r] == k + 1)
      assert span[0] == packed["cls_positions"][r, k]
      np.testing.assert_array_equal(packed["position_ids"][r, span], np.arange(len(span)))
      assert packed["input_ids"][r, span[0]] == VOCAB.specials.cls
  assert (packed["input_mask"] > 0).sum() == (alone["input_mask"] > 0).sum()


def test_packed_examples_give_their_alone_logits(packed_and_alone):
  """Per example: MLM, MVM and LVA logits equal those of the example alone (f32)."""
  _, packed, alone, out_p, out_a = packed_and_alone
  places = list(zip(*np.nonzero(packed["regime"] >= 0)))
  seen = {"mlm": 0, "mvm": 0}
  # Attention over a row of 96 keys rather than 24 adds exact zeros (masked keys) to the same
  # sums, which XLA may block in another order: two orders of a 96-term sum differ by at most
  # 95 * eps * sum|terms| (the probabilities sum to one, the values read LayerNorm outputs of
  # order one), and the heads carry that at the scale of what they output.
  def tol(x):
    return 95 * EPS32 * max(1.0, float(np.abs(x).max(initial=0)))
  for i, (r, k) in enumerate(places):
    np.testing.assert_allclose(out_p["lva_logits"][r, k], out_a["lva_logits"][i], rtol=0,
                               atol=tol(out_a["lva_logits"]))
    np.testing.assert_allclose(out_p["pooled"][r, k], out_a["pooled"][i], rtol=0,
                               atol=tol(out_a["pooled"]))
    for prefix in ("mlm", "mvm"):
      mine = _slots_of(packed, prefix, r)
      mine = mine[packed[f"{prefix}_example"][r, mine] == k]
      theirs = _slots_of(alone, prefix, i)
      assert len(mine) == len(theirs)
      np.testing.assert_array_equal(packed[f"{prefix}_ids"][r, mine], alone[f"{prefix}_ids"][i, theirs])
      np.testing.assert_array_equal(packed[f"{prefix}_positions"][r, mine] - packed["cls_positions"][r, k],
                                    alone[f"{prefix}_positions"][i, theirs])
      expected = out_a[f"{prefix}_logits"][i, theirs][..., :VOCAB.text_size if prefix == "mlm"
                                                      else VOCAB.visual_size]
      np.testing.assert_allclose(out_p[f"{prefix}_logits"][r, mine][..., :expected.shape[-1]],
                                 expected, rtol=0, atol=tol(expected))
      seen[prefix] += len(mine)
  assert seen["mlm"] > 10 and seen["mvm"] > 10


@pytest.mark.parametrize("masked_on_negatives", [True, False])
def test_losses_and_metrics_are_the_same_packed_or_not(packed_and_alone, masked_on_negatives):
  """Each loss is a mean over the same predictions and examples, packed or not."""
  _, packed, alone, out_p, out_a = packed_and_alone
  loss_p, m_p = objectives.compute_loss(out_p, packed, masked_on_negatives=masked_on_negatives)
  loss_a, m_a = objectives.compute_loss(out_a, alone, masked_on_negatives=masked_on_negatives)
  np.testing.assert_allclose(float(loss_p), float(loss_a), rtol=1e-5)
  for term in objectives.LOSS_TERMS:
    assert float(m_p[f"{term}_count"]) == float(m_a[f"{term}_count"]) > 0
    for kind in ("loss", "accuracy"):
      np.testing.assert_allclose(float(m_p[f"{term}_{kind}"]), float(m_a[f"{term}_{kind}"]),
                                 rtol=1e-5)
  for term in ("mlm", "mvm"):
    key = f"predictions_per_example_{term}"
    np.testing.assert_allclose(float(m_p[key]), float(m_a[key]), rtol=1e-6)
  assert float(m_p["examples_count"]) == float(m_a["examples_count"]) == len(alone["regime"])
  # The same real tokens, in far less padding: rows of 96 against one example per 24 tokens.
  real = (packed["input_mask"] > 0).sum()
  assert float(m_p["tokens_real"]) == pytest.approx(real / packed["input_mask"].size)
  assert float(m_a["tokens_real"]) == pytest.approx(real / alone["input_mask"].size)
  assert float(m_p["tokens_real"]) > 0.8 > float(m_a["tokens_real"])


def test_row_slots_never_run_out():
  """ceil(rate * max_len) + E slots hold any row's predictions, at any rate."""
  for rate in (0.15, 0.6, 1.0):
    masking = masking_lib.MaskingConfig(max_predictions_text=50, max_predictions_video=50,
                                        rate=rate)
    spec = packing.PackSpec.for_masking(64, 16, masking)
    rng = np.random.default_rng(0)
    layout = sequence.Layout(VOCAB, 64)
    for _ in range(200):
      n = int(rng.integers(1, 62))
      ex = layout.text_only(rng.integers(10, VOCAB.text_size, n)).as_dict()
      ex.update(masking.mask_example(rng, ex["input_ids"], VOCAB))
      assert (ex["mlm_weights"] > 0).sum() <= masking.rate * n + 1
    assert spec.text_slots == min(16 * 50, int(np.ceil(rate * 64)) + 16, 64)


def test_a_row_ends_at_the_first_example_that_does_not_fit():
  layout = sequence.Layout(VOCAB, 30)
  rng = np.random.default_rng(0)
  lengths = [10, 12, 20, 3]  # 12 + 14 tokens fit in 30; the third (22) does not

  def make(j):
    ex = layout.text_only(rng.integers(10, 200, lengths[j])).as_dict()
    ex.update(MASKING.mask_example(rng, ex["input_ids"], VOCAB))
    return ex
  row = packing.pack_row(make, packing.PackSpec(30, 4, 8, 8), VOCAB.specials.pad)
  np.testing.assert_array_equal(row["regime"], [0, 0, -1, -1])
  assert (row["input_mask"] == 1).sum() == 12 and (row["input_mask"] == 2).sum() == 14
  assert (row["input_mask"] == 0).sum() == 4 and (row["input_ids"][26:] == VOCAB.specials.pad).all()


def test_an_example_that_needs_more_slots_than_a_row_has_is_an_error():
  layout = sequence.Layout(VOCAB, 30)
  rng = np.random.default_rng(0)
  masking = dataclasses.replace(MASKING, rate=1.0, max_predictions_text=20)

  def make(_):
    ex = layout.text_only(rng.integers(10, 200, 20)).as_dict()
    ex.update(masking.mask_example(rng, ex["input_ids"], VOCAB))
    return ex
  with pytest.raises(ValueError, match="20 text and 0 visual prediction slots; a row has 8"):
    packing.pack_row(make, packing.PackSpec(30, 4, 8, 8), VOCAB.specials.pad)


def test_pipeline_packing_keeps_the_example_mix_and_counts_cuts():
  """The TFDS pipeline's packed rows against its unpacked stream, over records shaped like real
  ones: the regime shares agree within sampling error, padding is a few percent, and examples
  cut to max_example_len are counted."""
  records = synthetic.random_records(60, VOCAB, seed=1)
  base = ip.PipelineConfig(vocab=VOCAB, max_len=256, batch_size=16, masking=MASKING,
                           max_example_len=48, examples_per_video=4, seed=2)
  packed = ip.make_pipeline(dataclasses.replace(base, pack_examples=24), records)
  alone = ip.make_pipeline(dataclasses.replace(base, max_len=48, batch_size=256), records)
  rows = packing.stack_rows([next(packed) for _ in range(4)])
  places = rows["regime"] >= 0
  share_p = np.bincount(rows["regime"][places], minlength=3) / places.sum()
  batches = [next(alone) for _ in range(4)]
  ex = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  share_a = np.bincount(ex["regime"], minlength=3) / len(ex["regime"])
  n = min(places.sum(), len(ex["regime"]))
  # Two independent samples of shares p: each differs from p by sqrt(p (1 - p) / n); 4 sigma
  # of their difference, plus the stop rule's lean to short examples (one example a row).
  sigma = np.sqrt(2 * share_a * (1 - share_a) / n)
  assert (np.abs(share_p - share_a) <= 4 * sigma + 1 / places.sum(axis=1).mean()).all()
  assert (rows["input_mask"] > 0).mean() > 0.9
  cut = rows["truncated"][places]
  lengths = packing.example_lengths(rows["input_mask"])
  assert cut.sum() > 0 and lengths.max() == 48 and (lengths[cut.astype(bool)] == 48).all()
  assert (ex["truncated"] > 0).mean() == pytest.approx(cut.mean(), abs=0.05)
