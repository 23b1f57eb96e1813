"""The three pretraining losses (MLM, MVM, LVA) with their metrics.

Softmax cross-entropy over the MLM and MVM slots that `vbert_jax.masking` filled on the host,
sigmoid cross-entropy for LVA, combined as alpha * MLM + beta * MVM + gamma * LVA.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import optax

from vbert_jax import sequence

def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
  """num / den, and 0 where nothing was counted (a batch without that modality)."""
  return num / jnp.where(den > 0, den, 1.0)


def _slot_sums(logits: jax.Array, targets: jax.Array, weights: jax.Array
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Weighted sums of cross-entropy and of correct answers over [B, P] slots, and the count."""
  # Logits may be bf16; the softmax over tens of thousands of entries needs f32.
  logits = logits.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return (ce * weights).sum(), (correct * weights).sum(), weights.sum()


def _per_example(batch: Mapping[str, jax.Array], key: str) -> jax.Array:
  """A per-example field as [B, E]: packed batches carry [B, E], one example per row [B]."""
  value = jnp.asarray(batch[key])
  return value[:, None] if value.ndim == 1 else value


def _slot_example(batch: Mapping[str, jax.Array], prefix: str) -> jax.Array:
  """[B, P]: the place in its row of the example each slot belongs to (0 when unpacked)."""
  key = f"{prefix}_example"
  if key in batch:
    return jnp.asarray(batch[key], jnp.int32)
  return jnp.zeros(jnp.shape(batch[f"{prefix}_weights"]), jnp.int32)


def example_weights(batch: Mapping[str, jax.Array], masked_on_negatives: bool = True
                    ) -> dict[str, jax.Array]:
  """Per-example [B, E] weights of each loss: MLM off for video-only, MVM off for text-only,
  nothing for the empty places of a packed row (regime -1).

  With `masked_on_negatives=False`, an alignment negative (text beside another segment's video)
  trains neither masked loss: there the video misleads about the words and the text about the
  video, which on a small corpus teaches the model to ignore the other modality.
  """
  regime = _per_example(batch, "regime")
  lva = (_per_example(batch, "lva_weight").astype(jnp.float32)
         * (regime == sequence.REGIME_PAIR).astype(jnp.float32))
  keep = (regime >= 0).astype(jnp.float32)
  if not masked_on_negatives:
    keep = keep * (1.0 - lva * (_per_example(batch, "lva_label") == 0).astype(jnp.float32))
  return {"mlm": ((regime != sequence.REGIME_VIDEO) & (regime >= 0)).astype(jnp.float32) * keep,
          "mvm": ((regime != sequence.REGIME_TEXT) & (regime >= 0)).astype(jnp.float32) * keep,
          "lva": lva}


LOSS_TERMS = ("mlm", "mvm", "lva")


def loss_weights(batch: Mapping[str, jax.Array], masked_on_negatives: bool = True
                 ) -> dict[str, jax.Array]:
  """The weights that each term of the loss averages over: [B, Pt], [B, Pv] and [B, E]."""
  w = example_weights(batch, masked_on_negatives)
  out = {"lva": w["lva"]}
  for k in ("mlm", "mvm"):
    of_slot = jnp.take_along_axis(w[k], _slot_example(batch, k), axis=1)
    out[k] = jnp.asarray(batch[f"{k}_weights"], jnp.float32) * of_slot
  return out


def denominators(batch: Mapping[str, jax.Array], masked_on_negatives: bool = True
                 ) -> dict[str, jax.Array]:
  """Each term's count of predictions over a batch: what its mean divides by.

  Passed to `compute_loss` for the micro-batches of a larger batch, so that their gradients add
  up to the whole batch's (each prediction weighs the same, however the micro-batches split).
  """
  return {k: v.sum() for k, v in loss_weights(batch, masked_on_negatives).items()}


def _examples_trained(batch: Mapping[str, jax.Array], weights: jax.Array, prefix: str,
                      places: int) -> jax.Array:
  """How many examples have at least one weighted slot of this modality."""
  per_place = jnp.einsum("bp,bpe->be", weights,
                         jax.nn.one_hot(_slot_example(batch, prefix), places))
  return (per_place > 0).astype(jnp.float32).sum()


def compute_loss(outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array],
                 alpha: float = 1.0, beta: float = 1.0, gamma: float = 1.0,
                 masked_on_negatives: bool = True,
                 over: Mapping[str, jax.Array] | None = None
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """alpha * MLM + beta * MVM + gamma * LVA, and metrics with the denominators to average them.

  `outputs` is the model's dict ("mlm_logits" [B,Pt,Vt], "mvm_logits" [B,Pv,Vv],
  "lva_logits" [B]); `batch` the batch dict of the shared contract. Each mean is over real
  slots (or LVA examples) only: this batch's, or the counts `over` gives (`denominators` of the
  whole batch a micro-batch belongs to). The metrics always describe this batch: a metric
  `<name>_count` is its denominator, so that means over steps or devices are
  sum(value * count) / sum(count); `predictions_per_example_{mlm,mvm}` count the masked tokens
  of the examples that train each loss.
  """
  for key in ("mlm_logits", "mvm_logits", "lva_logits"):
    if key not in outputs:
      raise KeyError(f"compute_loss: model outputs lack {key!r}; call the model with "
                     f"mlm_positions and mvm_positions (got keys {sorted(outputs)})")
  w = loss_weights(batch, masked_on_negatives)
  sums = {"mlm": _slot_sums(outputs["mlm_logits"], batch["mlm_ids"], w["mlm"]),
          "mvm": _slot_sums(outputs["mvm_logits"], batch["mvm_ids"], w["mvm"])}
  lva_logits = outputs["lva_logits"].astype(jnp.float32)
  lva_logits = lva_logits[:, None] if lva_logits.ndim == 1 else lva_logits
  labels = _per_example(batch, "lva_label").astype(jnp.float32)
  bce = optax.sigmoid_binary_cross_entropy(lva_logits, labels)
  lva_correct = ((lva_logits > 0).astype(jnp.float32) == labels).astype(jnp.float32)
  sums["lva"] = ((bce * w["lva"]).sum(), (lva_correct * w["lva"]).sum(), w["lva"].sum())

  scale = dict(zip(LOSS_TERMS, (alpha, beta, gamma)))
  loss = sum(scale[k] * _safe_div(sums[k][0], sums[k][2] if over is None else over[k])
             for k in LOSS_TERMS)
  metrics = {"loss": loss}
  for k in LOSS_TERMS:
    total, correct, count = sums[k]
    metrics.update({f"{k}_loss": _safe_div(total, count),
                    f"{k}_accuracy": _safe_div(correct, count), f"{k}_count": count})
  places = w["lva"].shape[1]
  for k in ("mlm", "mvm"):
    trained = _examples_trained(batch, w[k], k, places)
    metrics[f"predictions_per_example_{k}"] = _safe_div(sums[k][2], trained)
  if "input_mask" in batch:
    metrics.update(batch_metrics(batch))
  return loss, metrics


def batch_metrics(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """What a batch holds: `tokens_real` (the share of its tokens that are not padding, over
  `tokens_count`), `packed_examples_per_row`, and `examples_truncated` (the share cut to fit, over
  `examples_count`)."""
  mask = jnp.asarray(batch["input_mask"])
  regime = _per_example(batch, "regime")
  examples = (regime >= 0).astype(jnp.float32)
  tokens = jnp.float32(mask.size)
  out = {"tokens_count": tokens, "tokens_real": (mask > 0).sum() / tokens,
         "examples_count": examples.sum(),
         "packed_examples_per_row": examples.sum() / mask.shape[0]}
  if "truncated" in batch:
    cut = (_per_example(batch, "truncated") > 0).astype(jnp.float32) * examples
    out["examples_truncated"] = _safe_div(cut.sum(), examples.sum())
  return out
