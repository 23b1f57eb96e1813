"""Masking: BERT's recipe applied to each modality separately, on the host, in NumPy.

The input pipeline runs it as it builds each example. Of the n eligible positions of a modality
(real text tokens, or visual tokens; never special tokens or padding),
min(max(1, round(rate * n)), max_predictions) are chosen (BERT's floor of one: short clip runs
would otherwise rarely be masked at all); each chosen position becomes [MASK] with probability
0.8, a random token of the same modality with probability 0.1, and stays unchanged otherwise. The
chosen positions fill a fixed number of slots (padding slots point at position 0 with weight 0)
so that shapes are static under jit; `vbert_jax.objectives` computes the losses over them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from vbert_jax.sequence import JointVocab

# Keys that `mask_example` adds to (or overwrites in) a packed example.
MASK_KEYS = ("input_ids", "mlm_positions", "mlm_ids", "mlm_weights", "mvm_positions", "mvm_ids",
             "mvm_weights")


def num_to_predict(num_eligible: int, max_predictions: int, rate: float = 0.15) -> int:
  """min(max(1, round(rate * n)), max), rounding halves up (0.15 * 10 = 1.5 -> 2).

  At least one of n >= 1 eligible tokens, as BERT's `max(1, round(n * rate))`; none at rate 0
  (an example shown unmasked) or without eligible tokens.
  """
  if num_eligible <= 0 or rate <= 0:
    return 0
  return int(min(max(1.0, np.floor(rate * num_eligible + 0.5)), max_predictions, num_eligible))


@functools.lru_cache(maxsize=16)
def _random_text_ids(vocab: JointVocab) -> np.ndarray:
  """The real text ids a random replacement may take: every text id but the specials."""
  ids = np.arange(vocab.text_size, dtype=np.int32)
  return ids[~vocab.is_special(ids)]


def _mask_modality(rng: np.random.Generator, ids: np.ndarray, eligible: np.ndarray,
                   max_predictions: int, rate: float, mask_prob: float, random_prob: float,
                   mask_id: int, draw_random, suffix: bool = False, last_only: bool = False
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Masks one modality of `ids` in place; returns (positions, original ids, weights) slots.

  `suffix`: the last eligible tokens are the ones masked, all by `mask_id` (a forecast: the
  model sees the past only), instead of a random choice split 80-10-10. `last_only`: the last
  eligible token alone, whatever the rate.
  """
  candidates = np.flatnonzero(eligible)
  if last_only:
    count, suffix = min(1, len(candidates), max_predictions), True
  else:
    count = num_to_predict(len(candidates), max_predictions, rate)
  if suffix:
    chosen = candidates[len(candidates) - count:]
  else:
    chosen = np.sort(rng.choice(candidates, size=count, replace=False))
  original = ids[chosen].copy()
  u = np.zeros(count) if suffix else rng.random(count)
  replace_mask = u < mask_prob
  replace_random = (u >= mask_prob) & (u < mask_prob + random_prob)
  ids[chosen[replace_mask]] = mask_id
  ids[chosen[replace_random]] = draw_random(int(replace_random.sum()))
  positions = np.zeros(max_predictions, np.int32)
  targets = np.zeros(max_predictions, np.int32)
  weights = np.zeros(max_predictions, np.float32)
  positions[:count] = chosen
  targets[:count] = original
  weights[:count] = 1.0
  return positions, targets, weights


def mask_example(rng: np.random.Generator, packed_input_ids: np.ndarray, vocab: JointVocab,
                 max_predictions_text: int, max_predictions_video: int, rate: float = 0.15,
                 mask_prob: float = 0.8, random_prob: float = 0.1,
                 video_suffix_rate: float = 0.0, video_forecast: bool = False
                 ) -> dict[str, np.ndarray]:
  """BERT masking of one packed sequence [L], per modality.

  With probability `video_suffix_rate` the video's masked tokens are its last ones, all
  replaced by [MASK]: the forecasting task, which random masking (a gap with both neighbours
  in view) rarely poses. `video_forecast`: the last visual token alone is masked (the input
  pipeline's forecast of a segment's first clip from the segments before it).

  Returns `input_ids` (masked copy), `mlm_positions` / `mlm_ids` (original text ids) /
  `mlm_weights` with `max_predictions_text` slots, and `mvm_positions` / `mvm_ids` (original
  visual indices in [0, visual_size)) / `mvm_weights` with `max_predictions_video` slots.
  """
  ids = np.array(packed_input_ids, dtype=np.int32, copy=True)
  if ids.ndim != 1:
    raise ValueError(f"mask_example: packed_input_ids must be one sequence [L], got shape "
                     f"{ids.shape}")
  if not (0 <= rate <= 1 and mask_prob >= 0 and random_prob >= 0
          and mask_prob + random_prob <= 1 and 0 <= video_suffix_rate <= 1):
    raise ValueError(f"mask_example: rate={rate}, mask_prob={mask_prob}, random_prob="
                     f"{random_prob}, video_suffix_rate={video_suffix_rate}; expected rate and "
                     f"video_suffix_rate in [0, 1] and mask_prob + random_prob <= 1")
  # Drawn only when asked for, so that recipes without it keep their random streams.
  suffix = (video_suffix_rate > 0 and not video_forecast
            and bool(rng.random() < video_suffix_rate))
  text_pool = _random_text_ids(vocab)
  # Eligibility is decided on the unmasked ids, before either modality is changed.
  is_text, is_visual = vocab.is_text(ids), vocab.is_visual(ids)
  mlm = _mask_modality(rng, ids, is_text, max_predictions_text, rate, mask_prob, random_prob,
                       vocab.specials.mask, lambda k: rng.choice(text_pool, size=k))
  mvm = _mask_modality(rng, ids, is_visual, max_predictions_video, rate, mask_prob, random_prob,
                       vocab.specials.mask,
                       lambda k: vocab.visual_offset + rng.integers(0, vocab.visual_size, size=k),
                       suffix, video_forecast)
  mvm_ids = np.where(mvm[2] > 0, mvm[1] - vocab.visual_offset, 0).astype(np.int32)
  return {"input_ids": ids,
          "mlm_positions": mlm[0], "mlm_ids": mlm[1], "mlm_weights": mlm[2],
          "mvm_positions": mvm[0], "mvm_ids": mvm_ids, "mvm_weights": mvm[2]}


def mask_batch(rng: np.random.Generator, input_ids: np.ndarray, vocab: JointVocab,
               max_predictions_text: int, max_predictions_video: int, rate: float = 0.15,
               mask_prob: float = 0.8, random_prob: float = 0.1,
               video_suffix_rate: float = 0.0) -> dict[str, np.ndarray]:
  """`mask_example` over each row of [B, L] `input_ids`, stacked into [B, ...] arrays."""
  input_ids = np.asarray(input_ids)
  if input_ids.ndim != 2:
    raise ValueError(f"mask_batch: input_ids must be [batch, length], got shape "
                     f"{input_ids.shape}")
  rows = [mask_example(rng, row, vocab, max_predictions_text, max_predictions_video, rate,
                       mask_prob, random_prob, video_suffix_rate) for row in input_ids]
  return {k: np.stack([r[k] for r in rows]) for k in MASK_KEYS}


@dataclasses.dataclass(frozen=True)
class MaskingConfig:
  """The masking recipe as it sits in a config: slot counts, the 15% / 80-10-10 split, and how
  often the video's masked tokens are its last ones (`video_suffix_rate`)."""
  max_predictions_text: int = 20
  max_predictions_video: int = 20
  rate: float = 0.15
  mask_prob: float = 0.8
  random_prob: float = 0.1
  video_suffix_rate: float = 0.0

  @classmethod
  def from_config(cls, m: Any) -> "MaskingConfig":
    """From a config's `masking` block; keys it lacks (older runs' configs) keep defaults."""
    return cls(**{f.name: m[f.name] for f in dataclasses.fields(cls) if f.name in m})

  def mask_example(self, rng: np.random.Generator, packed_input_ids: np.ndarray,
                   vocab: JointVocab, video_forecast: bool = False) -> dict[str, np.ndarray]:
    return mask_example(rng, packed_input_ids, vocab, self.max_predictions_text,
                        self.max_predictions_video, self.rate, self.mask_prob, self.random_prob,
                        self.video_suffix_rate, video_forecast)

  def mask_batch(self, rng: np.random.Generator, input_ids: np.ndarray,
                 vocab: JointVocab) -> dict[str, np.ndarray]:
    return mask_batch(rng, input_ids, vocab, self.max_predictions_text,
                      self.max_predictions_video, self.rate, self.mask_prob, self.random_prob,
                      self.video_suffix_rate)
