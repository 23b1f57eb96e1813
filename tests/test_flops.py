"""Model FLOPs against torch's FLOP counter on transformers' BERT of the same shape."""

import dataclasses
import os
import re
import subprocess
import sys

import jax
import pytest
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

from vbert_jax import flops
from vbert_jax import model as model_lib


@dataclasses.dataclass(frozen=True)
class Shape:
  hidden_size: int = 64
  num_layers: int = 2
  num_heads: int = 4
  mlp_dim: int = 256
  text_vocab_size: int = 300
  visual_vocab_size: int = 200


SHAPE = Shape()


@pytest.fixture(scope="module")
def bert():
  torch.manual_seed(0)
  cfg = transformers.BertConfig(
      vocab_size=SHAPE.text_vocab_size, hidden_size=SHAPE.hidden_size,
      num_hidden_layers=SHAPE.num_layers, num_attention_heads=SHAPE.num_heads,
      intermediate_size=SHAPE.mlp_dim, max_position_embeddings=64, hidden_act="gelu")
  return transformers.BertForPreTraining(cfg)


def _numel(module, matrices_only=False):
  return sum(p.numel() for p in module.parameters() if not matrices_only or p.ndim == 2)


def _counted(fn):
  with FlopCounterMode(display=False) as counter:
    fn()
  return counter.get_total_flops()


def test_parameter_counts_match_bert(bert):
  assert flops.encoder_params(SHAPE) == _numel(bert.bert.encoder)
  transform = _numel(bert.cls.predictions.transform)
  table = bert.bert.embeddings.word_embeddings.weight.numel()
  bias = bert.cls.predictions.bias.numel()
  assert flops.head_params(SHAPE)["mlm"] == transform + table + bias
  # LVA: BERT's pooler and one row of its two-way next-sentence classifier.
  lva = _numel(bert.bert.pooler) + _numel(bert.cls.seq_relationship) // 2
  assert flops.head_params(SHAPE)["lva"] == lva


def test_parameter_counts_match_our_model():
  cfg = model_lib.VideoBERTConfig.from_variant(
      "mu", text_vocab_size=SHAPE.text_vocab_size, visual_vocab_size=SHAPE.visual_vocab_size)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  assert flops.encoder_params(cfg) == model_lib.count_params(params["encoder"])
  heads = flops.head_params(cfg)
  # Our tables are padded to 128 rows; the FLOP count uses the real rows only.
  vocab = cfg.vocab
  padding = {"mlm": (vocab.text_padded - vocab.text_size) * (cfg.hidden_size + 1),
             "mvm": (vocab.visual_padded - vocab.visual_size) * (cfg.hidden_size + 1)}
  for name, rows in (("mlm", vocab.text_padded), ("mvm", vocab.visual_padded)):
    table = rows * cfg.hidden_size
    assert heads[name] + padding[name] == model_lib.count_params(params[f"{name}_head"]) + table
  assert heads["lva"] == model_lib.count_params(params["lva_head"])


def test_encoder_flops_match_torch_counter(bert):
  batch, seq = 3, 40
  ids = torch.randint(0, SHAPE.text_vocab_size, (batch, seq))

  def step():
    hidden = bert.bert(ids).last_hidden_state
    hidden.sum().backward()
  measured = _counted(step)
  tokens = batch * seq
  encoder = flops.flops_per_step(SHAPE, batch, seq, 0, 0, 0).encoder
  assert encoder == tokens * flops.flops_per_token(SHAPE, seq)
  # The counter sees matmuls only (and the pooler's forward, whose output gets no gradient);
  # our count adds 6 FLOPs per bias or LayerNorm parameter.
  vector_params = _numel(bert.bert.encoder) - _numel(bert.bert.encoder, matrices_only=True)
  pooler_forward = 2 * batch * SHAPE.hidden_size ** 2
  assert encoder - 6 * vector_params * tokens == measured - pooler_forward


def test_head_flops_match_torch_counter(bert):
  slots = 7
  states = torch.randn(slots, SHAPE.hidden_size, requires_grad=True)

  def step():
    bert.cls.predictions(states).sum().backward()
  measured = _counted(step)
  step_flops = flops.flops_per_step(SHAPE, 1, 1, mlm_slots=slots, mvm_slots=0, lva_examples=0)
  vector_params = (_numel(bert.cls.predictions.transform)
                   - _numel(bert.cls.predictions.transform, matrices_only=True)
                   + bert.cls.predictions.bias.numel())
  assert step_flops.mlm - 6 * vector_params * slots == measured
  assert step_flops.mvm == 0 and step_flops.lva == 0


def test_forward_only_is_a_third():
  train = flops.flops_per_step(SHAPE, 2, 16, 5, 6)
  infer = flops.flops_per_step(SHAPE, 2, 16, 5, 6, training=False)
  assert train.total == pytest.approx(3 * infer.total)
  assert train.mvm == 6 * 6 * flops.head_params(SHAPE)["mvm"]
  assert train.lva == 6 * 2 * flops.head_params(SHAPE)["lva"]


@pytest.mark.parametrize("kind,peak", [
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5p", 459e12),
    ("TPU v5", 459e12), ("TPU v6 lite", 918e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
    ("cpu", None),
])
def test_peak_table(kind, peak):
  assert flops.peak_flops(kind) == peak


def test_mfu():
  assert flops.mfu(2e12, 0.5, 1e12, num_devices=2) == pytest.approx(2.0)


@pytest.mark.slow
def test_train_step_bench_prints_its_headline(repo_root):
  """bench/train_step.py end to end on the `mu` shape: table, FLOP accounting, BENCH line."""
  # One CPU device, as a user's shell has (conftest asks for 8 fake ones).
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run(
      [sys.executable, str(repo_root / "bench" / "train_step.py"), "--variant", "mu",
       "--batch", "4", "--seq", "32", "--rounds", "2", "--sharded_steps", "1"],
      capture_output=True, text=True, timeout=600, env=env, cwd=repo_root)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  match = re.fullmatch(
      r"BENCH train_step: ours_tokens_per_s=(\S+) peer_tokens_per_s=(\S+) "
      r"same_work_ratio=(\S+) mfu=(\S+) sharded_tokens_per_s=(\S+) sharded_peak_rss_gb=(\S+) "
      r"ratio=(\S+)", lines[-1])
  assert match, lines[-1]
  ours, peer, same_work_ratio, mfu, sharded, rss, ratio = map(float, match.groups())
  assert ours > 0 and peer > 0 and same_work_ratio > 0 and 0 < mfu < 1
  assert sharded > 0 and 0.1 < rss < 20  # the 8-device trainer ran; its host peak in GB
  assert ratio == pytest.approx(ours / peer, rel=2e-3)
  assert any(line.startswith("peer_same") for line in lines)
