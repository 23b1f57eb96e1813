"""configs/pretrain.py: the paper's recipe as defaults, runlocal, overrides, locked keys."""

import os
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from helpers.configs import pretrain
from vbert_jax import pretrain as pretrain_lib


def _parse(argv):
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config", flag_values=values,
                                  lock_config=True, sys_argv=argv)
  values(argv)
  return values.config


def test_defaults_are_the_papers_recipe():
  c = pretrain.get_config()
  assert c.variant == "large"
  assert (c.model.num_layers, c.model.hidden_size, c.model.num_heads, c.model.mlp_dim) == (
      24, 1024, 16, 4096)
  assert (c.model.text_vocab_size, c.model.visual_vocab_size) == (30522, 20736)
  assert c.batch_size == 128 and c.total_steps == 500_000
  assert c.optimizer.learning_rate == 1e-5 and c.optimizer.end_learning_rate == 0.0
  assert 0 < c.optimizer.warmup_steps < c.total_steps
  assert (c.loss.alpha, c.loss.beta, c.loss.gamma) == (1.0, 1.0, 1.0)
  assert c.masking.rate == 0.15 and (c.masking.mask_prob, c.masking.random_prob) == (0.8, 0.1)
  assert c.max_len == 512 and c.model.max_position_embeddings >= c.max_len
  assert c.input.source == "tfds" and not c.input.tfds_name  # a run must name its dataset
  assert c.mesh.to_dict() == {"data": -1, "fsdp": 1, "tensor": 1}
  assert c.checkpoint.every_steps > 0 and c.eval.every_steps > 0
  # The model config it describes builds.
  assert pretrain_lib.model_config(c).hidden_size == 1024


@pytest.mark.parametrize("variant,sizes", [("mu", (2, 32)), ("tiny", (2, 128)),
                                           ("small", (4, 512)), ("base", (12, 768))])
def test_variant_argument_sets_the_sizes(variant, sizes):
  c = pretrain.get_config(f"variant={variant}")
  assert (c.model.num_layers, c.model.hidden_size) == sizes
  assert c.batch_size == 128  # the variant changes the model only


def test_runlocal_shrinks_for_a_laptop():
  c = pretrain.get_config("variant=tiny,runlocal")
  assert c.model.hidden_size == 128
  assert c.batch_size <= 32 and c.total_steps <= 1000 and c.max_len <= 32
  assert c.input.max_example_len <= 32 and c.input.pack_examples > 1
  assert c.model.text_vocab_size < 30522 and c.model.visual_vocab_size < 20736
  assert c.eval.every_steps <= c.total_steps and c.checkpoint.every_steps <= c.total_steps


def test_unknown_argument_or_variant_is_named():
  with pytest.raises(KeyError, match="config argument 'varient' is unknown"):
    pretrain.get_config("varient=tiny")
  with pytest.raises(ValueError, match="unknown model variant 'huge'"):
    pretrain.get_config("variant=huge")


def test_locked_config_names_a_mistyped_key():
  c = pretrain.get_config("variant=tiny,runlocal")
  with pytest.raises(AttributeError, match='Key "batchsize" does not exist'):
    c.batchsize = 4
  with pytest.raises(AttributeError, match="lrate"):
    c.optimizer.lrate = 1.0
  with pytest.raises(TypeError, match="learning_rate"):
    c.optimizer.learning_rate = "fast"


def test_command_line_overrides():
  c = _parse(["prog", "--config=configs/pretrain.py:variant=tiny,runlocal",
              "--config.optimizer.learning_rate=3e-4", "--config.mesh.fsdp=2",
              "--config.model.dtype=bfloat16"])
  assert c.optimizer.learning_rate == 3e-4 and c.mesh.fsdp == 2
  assert pretrain_lib.model_config(c).dtype == "bfloat16"
  with pytest.raises(AttributeError, match="lrate"):
    _parse(["prog", "--config=configs/pretrain.py:variant=tiny",
            "--config.optimizer.lrate=1"])


def test_main_names_a_mistyped_key(repo_root, tmp_path):
  env = dict(os.environ)
  proc = subprocess.run(
      [sys.executable, "-m", "vbert_jax.main", "--config=configs/pretrain.py:variant=tiny",
       "--config.optimizer.lrate=1", f"--workdir={tmp_path}"],
      cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert ("unknown config key 'lrate' in --config.optimizer.lrate=1" in proc.stderr), (
      proc.stderr[-2000:])
  assert not (tmp_path / "checkpoints").exists()
