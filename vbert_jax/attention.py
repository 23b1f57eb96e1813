"""Self-attention over packed rows: XLA's, cuDNN's (GPU) or Pallas splash attention (TPU).

Every implementation takes `input_mask` [B, L], the example of each token (1, 2, ... in a packed
row, 0 for padding), and keeps each example to itself:

- `xla` and `cudnn` go through `jax.nn.dot_product_attention` with the dense [B, 1, L, L] mask of
  `attention_mask`. XLA materialises the [B, N, L, L] logits in f32; cuDNN fuses them away.
- `splash` is Pallas's TPU flash kernel with the example numbers as segment ids: the logits live
  in on-chip blocks of 128 x 128. Under a mesh it runs in `shard_map`, one kernel per shard of
  the batch and heads. With `interpret`, Pallas runs the same kernel as XLA ops on any backend,
  which is how the CPU tests check it.
- `auto` is splash on TPU (when the row length is a multiple of its block), cuDNN on GPU (for
  bf16 or f16 compute and head sizes it takes), and XLA otherwise.

Attention dropout needs the probabilities themselves, so with a nonzero rate training takes the
materialised path (`attention_with_dropout`) whatever the choice; deterministic passes and a
zero rate use the fused one.
"""

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash

IMPLS = ("auto", "xla", "cudnn", "splash")
SPLASH_BLOCK = 128  # the kernel's tile along queries and keys: a multiple of the TPU's 128 lanes
# The logical axes of q, k, v [B, L, N, d] and of the segment ids [B, L], as the model names them.
QKV_AXES = ("batch", "length", "heads", "kv")
SEGMENT_AXES = ("batch", "length")


def attention_mask(input_mask: jax.Array) -> jax.Array:
  """[B, 1, L, L] from `input_mask` [B, L] (the example of each token, 0 for padding).

  A token attends to the tokens of its own example. A padding position attends to every real
  token, as BERT's padding mask lets it: one example per row (a 0/1 mask) gives BERT's mask
  exactly, and no row of the mask is empty.
  """
  q, k = input_mask[:, None, :, None], input_mask[:, None, None, :]
  return (k > 0) & ((q == k) | (q == 0))


def platform() -> str:
  """The platform being compiled for: the mesh's (a TPU topology described on a CPU host, for
  the AOT check) when one is set, else the default backend's."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    return mesh.abstract_device.platform
  return jax.default_backend()


def resolve(impl: str, q: jax.Array) -> str:
  """The implementation `impl` stands for on this platform, for queries `q` [B, L, N, d]."""
  if impl != "auto":
    return impl
  _, length, _, dim = q.shape
  where = platform()
  if where == "tpu" and length % SPLASH_BLOCK == 0:
    return "splash"
  # cuDNN's fused attention takes half-precision inputs and head sizes up to 128 in steps of 8.
  if where == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and dim % 8 == 0 and dim <= 128:
    return "cudnn"
  return "xla"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, input_mask: jax.Array, impl: str,
              interpret: bool = False) -> jax.Array:
  """Fused softmax attention; q, k, v [B, L, N, d] -> [B, L, N, d]."""
  impl = resolve(impl, q)
  if impl == "splash":
    return splash_attention(q, k, v, input_mask, interpret=interpret)
  return jax.nn.dot_product_attention(q, k, v, mask=attention_mask(input_mask),
                                      implementation=impl)


def attention_with_dropout(q: jax.Array, k: jax.Array, v: jax.Array, input_mask: jax.Array,
                           dropout: Callable[[jax.Array], jax.Array]) -> jax.Array:
  """Softmax attention with dropout on the probabilities, which the fused kernels lack."""
  logits = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1]).astype(q.dtype)
  wide = jnp.promote_types(q.dtype, jnp.float32)  # softmax in at least f32, also under bf16
  logits = jnp.where(attention_mask(input_mask), logits.astype(wide), jnp.finfo(wide).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
  return jnp.einsum("bnts,bsnh->btnh", dropout(probs), v)


def _splash_kernel(length: int, heads: int, interpret: bool):
  block = splash.BlockSizes(
      block_q=SPLASH_BLOCK, block_kv=SPLASH_BLOCK, block_kv_compute=SPLASH_BLOCK,
      block_q_dkv=SPLASH_BLOCK, block_kv_dkv=SPLASH_BLOCK, block_kv_dkv_compute=SPLASH_BLOCK,
      block_q_dq=SPLASH_BLOCK, block_kv_dq=SPLASH_BLOCK)
  # Every pair is allowed by the static mask; the segment ids alone separate the examples.
  mask = splash.MultiHeadMask([splash.FullMask((length, length))] * heads)
  return splash.make_splash_mha(mask, block_sizes=block, head_shards=1, q_seq_shards=1,
                                interpret=interpret)


def _splash_local(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array,
                  interpret: bool) -> jax.Array:
  """The kernel on one shard: q, k, v [b, L, n, d] and segments [b, L]."""
  _, length, heads, dim = q.shape
  kernel = _splash_kernel(length, heads, interpret)
  # The kernel leaves the 1/sqrt(d) scaling to its caller; it takes [heads, L, d] per example.
  q = q * jnp.asarray(1 / np.sqrt(dim), q.dtype)
  q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))
  one = lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(q=s, kv=s))
  return jnp.swapaxes(jax.vmap(one)(q, k, v, segments), 1, 2)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, input_mask: jax.Array, *,
                     interpret: bool = False) -> jax.Array:
  """Splash attention with the example numbers of `input_mask` as segment ids.

  Padding (segment 0) attends to padding only, where the dense mask lets it see every real
  token: the real tokens' outputs are the same, and a padding position's output is never read.
  """
  length = q.shape[1]
  if length % SPLASH_BLOCK:
    raise ValueError(f"splash attention needs rows of a multiple of {SPLASH_BLOCK} tokens; "
                     f"these have {length} (set config.max_len, or attention_impl='auto')")
  segments = input_mask.astype(jnp.int32)
  local = lambda q, k, v, s: _splash_local(q, k, v, s, interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return local(q, k, v, segments)
  # A Pallas kernel has no partitioning rule of its own: each device runs it on its shard.
  qkv, seg = nn.logical_to_mesh_axes(QKV_AXES), nn.logical_to_mesh_axes(SEGMENT_AXES)
  if qkv[1] is not None:
    raise ValueError(f"splash attention needs whole rows on each device; the length axis is "
                     f"split over mesh axis {qkv[1]!r} by config.sharding_rules")
  return jax.shard_map(local, in_specs=(qkv, qkv, qkv, seg), out_specs=qkv,
                       check_vma=False)(q, k, v, segments)
