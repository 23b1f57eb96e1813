"""Example lengths: measured as training draws them, and the settings they give."""

import os
import subprocess
import sys

import numpy as np
import pytest

from helpers.configs import pretrain
from vbert_jax import lengths
from vbert_jax import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**input_overrides):
  config = pretrain.get_config("variant=mu,runlocal")
  with config.unlocked():
    config.input.update(input_overrides)
  return config


def test_measured_lengths_are_the_stream_and_predict_the_packed_padding():
  """The simulated packing of the measured lengths is the padding the packed source gives: the
  same candidates, in the same order, under the same rule."""
  config = _config()
  stats = lengths.measure(config, num_examples=512)
  alone = _config(pack_examples=1, max_example_len=0)
  with alone.unlocked():
    alone.max_len = 64  # the position table: nothing is cut
  first = next(synthetic.from_config(alone, "train", batch_size=512))
  np.testing.assert_array_equal(stats.lengths, (first["input_mask"] > 0).sum(axis=1))
  assert stats.cut == 0 and stats.limit == 64 and stats.lengths.max() <= 15
  packed = synthetic.from_config(config, "train", batch_size=128)  # 128 rows x 4 = 512 examples
  rows = next(packed)
  assert stats.pad_fraction(32, 4) == pytest.approx(1 - (rows["input_mask"] > 0).mean(), abs=0)
  assert stats.pad_fraction(16) == pytest.approx(1 - stats.lengths.mean() / 16)
  q95 = int(np.ceil(np.percentile(stats.lengths, 95)))
  assert stats.percentile(95) == q95 and stats.suggest(95) == -(-q95 // 8) * 8


def test_a_percentile_sets_the_example_length_and_without_packing_the_row():
  config = _config(length_percentile=50.0)
  stats = lengths.apply_percentile(config)
  assert config.input.max_example_len == stats.suggest(50) and config.max_len == 32
  config = _config(length_percentile=100.0, pack_examples=1)
  stats = lengths.apply_percentile(config)
  assert config.max_len == config.input.max_example_len == 16 == stats.suggest(100)
  assert lengths.apply_percentile(_config()) is None  # 0: off
  with pytest.raises(ValueError, match=r"length_percentile=150.0: expected a percentile in "
                                       r"\(0, 100\]"):
    lengths.apply_percentile(_config(length_percentile=150.0))


def test_command_prints_the_distribution_and_the_padding():
  proc = subprocess.run(
      [sys.executable, "-m", "vbert_jax.lengths", "--config=configs/pretrain.py:variant=mu,runlocal",
       "--examples=256", "--row_lengths=32,64", "--pack_examples=4"],
      cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = proc.stdout
  assert out.startswith("256 examples: mean ") and "cut by the position table (64)" in out
  assert "max_len   16 (p100): padding" in out and "max_len   32: 4 places" in out
