"""Model FLOPs of VideoBERT and the peak rates of accelerators, for throughput and MFU.

Per token of a sequence of length S, forward and backward (the usual 6N rule, PaLM appendix B):

    6 * N_encoder + 12 * layers * S * hidden

where N_encoder counts every encoder parameter that is not an embedding (weights, biases and
LayerNorm scales of all layers). The heads are counted only where they run, at the prediction
slots: 6 * (transform + output table) per MLM or MVM slot, 6 * (pooler + classifier) per example
for LVA. Output tables count the real vocabulary sizes, not the padding rows. A forward pass alone
is a third of each figure.

Any object with the fields of `VideoBERTConfig` (hidden_size, num_layers, mlp_dim,
text_vocab_size, visual_vocab_size) works, so this module does not import the model.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Protocol

# Dense bf16 matmul peak of one device (one chip for TPUs), in FLOP/s, from vendor data sheets.
PEAK_BF16_FLOPS = {
    "tpu v4": 275e12,
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v6e": 918e12,
    "a100": 312e12,
    "h100": 989e12,  # SXM; the PCIe card is matched separately below
    "h100 pcie": 756e12,
    "h200": 989e12,
}

# jax's `device.device_kind` spellings -> keys above. Order matters: the first match wins.
_KIND_PATTERNS = (
    (r"tpu v5 ?lite|tpu v5e", "tpu v5e"),
    (r"tpu v6 ?lite|tpu v6e", "tpu v6e"),
    (r"tpu v5p|tpu v5$", "tpu v5p"),
    (r"tpu v4", "tpu v4"),
    (r"a100", "a100"),
    (r"h100.*pcie", "h100 pcie"),
    (r"h100", "h100"),
    (r"h200", "h200"),
)


class ModelShape(Protocol):
  hidden_size: int
  num_layers: int
  mlp_dim: int
  text_vocab_size: int
  visual_vocab_size: int


def peak_flops(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of a device kind (jax's `device_kind`), or None if unknown."""
  kind = device_kind.strip().lower()
  for pattern, key in _KIND_PATTERNS:
    if re.search(pattern, kind):
      return PEAK_BF16_FLOPS[key]
  return None


def encoder_params(cfg: ModelShape) -> int:
  """Parameters of the encoder layers: attention, MLP and two LayerNorms per layer."""
  h, m = cfg.hidden_size, cfg.mlp_dim
  attention = 4 * (h * h + h)
  mlp = h * m + m + m * h + h
  layer_norms = 2 * 2 * h
  return cfg.num_layers * (attention + mlp + layer_norms)


def head_params(cfg: ModelShape) -> dict[str, int]:
  """Parameters each head applies per prediction: transform (dense + LayerNorm) and table."""
  h = cfg.hidden_size
  transform = h * h + h + 2 * h
  return {"mlm": transform + h * cfg.text_vocab_size + cfg.text_vocab_size,
          "mvm": transform + h * cfg.visual_vocab_size + cfg.visual_vocab_size,
          "lva": h * h + h + h + 1}


def flops_per_token(cfg: ModelShape, seq_len: int, training: bool = True) -> float:
  """Encoder FLOPs per token: 6 N + 12 layers S hidden (a third of it without backward)."""
  total = 6 * encoder_params(cfg) + 12 * cfg.num_layers * seq_len * cfg.hidden_size
  return total if training else total / 3


@dataclasses.dataclass(frozen=True)
class StepFlops:
  """FLOPs of one step, split into the encoder and the three heads."""
  encoder: float
  mlm: float
  mvm: float
  lva: float

  @property
  def total(self) -> float:
    return self.encoder + self.mlm + self.mvm + self.lva


def flops_per_step(cfg: ModelShape, batch_size: int, seq_len: int, mlm_slots: float,
                   mvm_slots: float, lva_examples: float | None = None,
                   training: bool = True) -> StepFlops:
  """FLOPs of a step over `batch_size` sequences of `seq_len` tokens.

  `mlm_slots` / `mvm_slots` are the prediction slots the heads run at in the whole step;
  `lva_examples` the examples the LVA head runs on (default: every example).
  """
  factor = 6 if training else 2
  heads = head_params(cfg)
  lva_examples = batch_size if lva_examples is None else lva_examples
  return StepFlops(encoder=batch_size * seq_len * flops_per_token(cfg, seq_len, training),
                   mlm=factor * heads["mlm"] * mlm_slots,
                   mvm=factor * heads["mvm"] * mvm_slots,
                   lva=factor * heads["lva"] * lva_examples)


def flops_of_examples(cfg: ModelShape, tokens: float, attended_pairs: float, mlm_slots: float,
                      mvm_slots: float, lva_examples: float, training: bool = True) -> float:
  """FLOPs of the useful work in a step: `tokens` real tokens, attention over `attended_pairs`
  (the sum of each example's length squared: an example attends only within itself), and the
  heads at real prediction slots. Equals `flops_per_step(...).total` for one example per row
  without padding."""
  factor = 6 if training else 2
  heads = head_params(cfg)
  encoder = (factor * encoder_params(cfg) * tokens
             + 2 * factor * cfg.num_layers * cfg.hidden_size * attended_pairs)
  return (encoder + factor * (heads["mlm"] * mlm_slots + heads["mvm"] * mvm_slots
                              + heads["lva"] * lva_examples))


def mfu(step_flops: float, step_seconds: float, peak: float, num_devices: int = 1) -> float:
  """Model FLOPs utilisation: achieved model FLOP/s over the devices' peak."""
  return step_flops / step_seconds / (peak * num_devices)
