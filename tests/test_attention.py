"""Attention over packed rows: Pallas splash attention (in Pallas's interpreter on the CPU)
against XLA's dot_product_attention, alone and inside the trainer's sharded step, and what each
leaves in the compiled step.

The TPU side (the splash kernel in the v5e compile, and no f32 [B, N, T, S] buffer there) is
in test_aot.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import hlo
from helpers import tolerance
from helpers.configs import pretrain
from vbert_jax import attention
from vbert_jax import aot
from vbert_jax import pretrain as pretrain_lib
from vbert_jax import sharding
from vbert_jax import synthetic
from vbert_jax import train

EPS32 = float(np.finfo(np.float32).eps)
LENGTH = 256  # two splash blocks, and unlike the kernel's 128-lane residuals in shape


def _packed_mask(rows: int, length: int, seed: int) -> np.ndarray:
  """Example numbers of packed rows: examples of 5-60 tokens, then padding; one row full."""
  rng = np.random.default_rng(seed)
  out = np.zeros((rows, length), np.int32)
  for r in range(rows):
    at, k, end = 0, 0, length - 23 * r  # rows after the first end in padding
    while at < end:
      n = min(int(rng.integers(5, 61)), end - at)
      k += 1
      out[r, at:at + n] = k
      at += n
  return out


def _qkv(shape, seed):
  keys = jax.random.split(jax.random.key(seed), 3)
  return [jax.random.normal(key, shape) for key in keys]


def test_splash_gives_each_real_token_what_xla_gives_and_the_same_gradients():
  q, k, v = _qkv((3, LENGTH, 2, 16), 0)
  input_mask = jnp.asarray(_packed_mask(3, LENGTH, 0))
  real = np.asarray(input_mask > 0)[..., None, None]
  assert not real.all() and real[0].all()
  splash = jax.jit(lambda q, k, v: attention.splash_attention(q, k, v, input_mask,
                                                              interpret=True))
  xla = jax.jit(lambda q, k, v: attention.attention(q, k, v, input_mask, "xla"))
  # Each output is a convex combination of at most LENGTH rows of v, summed in another order
  # (block by block, with a running maximum) by the kernel.
  scale = float(jnp.abs(v).max())
  np.testing.assert_allclose(np.where(real, splash(q, k, v), 0), np.where(real, xla(q, k, v), 0),
                             atol=LENGTH * EPS32 * scale, rtol=0)
  # The kernel's own backward pass: gradients of the real tokens' outputs.
  weights = jax.random.normal(jax.random.key(9), q.shape) * real
  grads = [jax.grad(lambda *a, f=f: (f(*a) * weights).sum(), argnums=(0, 1, 2))(q, k, v)
           for f in (splash, xla)]
  for got, want, name in zip(*grads, "qkv"):
    bound = LENGTH * EPS32 * float(jnp.abs(want).max()) * 4
    np.testing.assert_allclose(got, want, atol=bound, rtol=0, err_msg=name)


def test_letting_examples_see_each_other_fails_the_comparison():
  """The comparison above can fail: one example per row (segment ids all 1) differs."""
  q, k, v = _qkv((2, LENGTH, 2, 16), 1)
  input_mask = jnp.asarray(_packed_mask(2, LENGTH, 1))
  one_example = (input_mask > 0).astype(jnp.int32)
  got = attention.splash_attention(q, k, v, one_example, interpret=True)
  want = attention.attention(q, k, v, input_mask, "xla")
  real = np.asarray(input_mask > 0)[..., None, None]
  assert np.abs(np.where(real, got - want, 0)).max() > 1e-2


def test_the_dropout_path_without_dropout_is_the_fused_attention():
  q, k, v = _qkv((2, LENGTH, 2, 16), 3)
  input_mask = jnp.asarray(_packed_mask(2, LENGTH, 3))
  fused = attention.attention(q, k, v, input_mask, "xla")
  explicit = attention.attention_with_dropout(q, k, v, input_mask, lambda p: p)
  real = np.asarray(input_mask > 0)[..., None, None]
  np.testing.assert_allclose(np.where(real, explicit, 0), np.where(real, fused, 0),
                             atol=LENGTH * EPS32 * float(jnp.abs(v).max()), rtol=0)


def test_splash_refuses_rows_it_cannot_tile():
  q, k, v = _qkv((1, 96, 2, 16), 2)
  with pytest.raises(ValueError, match="multiple of 128 tokens; these have 96"):
    attention.splash_attention(q, k, v, jnp.ones((1, 96), jnp.int32), interpret=True)


def test_auto_is_splash_on_a_tpu_mesh_and_xla_on_this_cpu():
  q, short = (jax.ShapeDtypeStruct((2, n, 2, 64), jnp.bfloat16) for n in (256, 96))
  assert attention.resolve("auto", q) == "xla"
  assert attention.resolve("cudnn", q) == "cudnn"
  tpu = jax.sharding.Mesh(np.array(aot.topology_devices("v5e:2x2")), ("data",))
  with jax.set_mesh(tpu):
    assert attention.platform() == "tpu"
    assert attention.resolve("auto", q) == "splash"
    assert attention.resolve("auto", short) == "xla"  # rows the kernel cannot tile


# ----------------------------------------------------------------------------------------------
# The trainer's step: mu on packed rows of 256 tokens, sharded over data=4 x tensor=2 (one head
# per device, so the kernel runs in shard_map on shards of both the batch and the heads).


def _config(impl: str):
  config = pretrain.get_config("variant=mu,runlocal")
  with config.unlocked():
    config.max_len = LENGTH
    config.input.pack_examples = 16
    config.model.attention_impl = impl
    config.model.attention_interpret = impl == "splash"
    config.mesh = {"data": 4, "tensor": 2}
    config.compilation_cache_dir = ""
  return config


@pytest.fixture(scope="module")
def steps():
  """For xla and splash: the compiled step's text and its gradients on one packed batch."""
  batch = next(synthetic.from_config(_config("xla"), "train", batch_size=8))
  out = {}
  for impl in ("xla", "splash"):
    config = _config(impl)
    trainable = pretrain_lib.make_trainable(config)
    trainer = train.Trainer(trainable, config, return_grads=True)
    state = trainer.init_state()
    params = jax.device_get(state.params)
    with trainer.activate():
      text = trainer.lower_train_step().compile().as_text()
    _, sums, grads = trainer.train_step(state, trainer.put_batch(batch))
    out[impl] = dict(text=text, grads=jax.device_get(grads), sums=jax.device_get(sums),
                     trainable=trainable, params=params, mesh=trainer.mesh)
  return batch, out


def test_the_sharded_step_with_splash_gives_xla_s_gradients(steps):
  batch, out = steps
  assert sharding.describe_devices(out["splash"]["mesh"]) == "8 cpu devices in 1 process"
  assert (batch["input_mask"].max(axis=1) >= 4).all()  # rows of several examples
  for key in ("mlm_loss", "mvm_loss", "lva_loss"):
    want = np.asarray(out["xla"]["sums"][key])
    np.testing.assert_allclose(out["splash"]["sums"][key], want, rtol=LENGTH * EPS32, err_msg=key)
  trainable, params = out["xla"]["trainable"], out["xla"]["params"]
  over = jax.tree.map(jnp.asarray, trainable.denominators(batch))
  magnitude = tolerance.per_example_abs_grads(trainable.loss, params, batch, over)
  # Softmax sums of LENGTH terms per query, in the kernel's block order.
  atol = tolerance.reordered_sum_atol(magnitude, 8 * LENGTH)
  tolerance.assert_trees_within(out["splash"]["grads"], out["xla"]["grads"], atol,
                                "splash gradient")


def test_the_step_keeps_no_f32_attention_logits_with_splash(steps):
  """XLA's attention materialises f32 [b, heads, L, L] logits per device; splash keeps blocks
  of 128 x 128 (here in Pallas's interpreter, on the TPU in on-chip memory)."""
  _, out = steps
  assert hlo.square_f32_buffers(out["xla"]["text"], LENGTH)
  assert not hlo.square_f32_buffers(out["splash"]["text"], LENGTH)
  assert "f32[128,128]" in out["splash"]["text"]
