"""S3D (Xie et al., 2018), as torchvision's `s3d`, in Flax: clips -> 1024-d features.

Separable spatio-temporal convolutions (1xkxk then kx1x1, each followed by BatchNorm and ReLU) in
inception blocks, without S3D-G's feature gating. The network returns the activations before the
classifier. Layout is channels-last: clips are [B, T, H, W, 3], normalised by `normalize`.

Pooling of the final map: where it is at least 2x7x7 (224-pixel inputs), torchvision's AvgPool3d
(kernel 2x7x7, stride 1) followed by a mean over the remaining positions, which is exactly what the
torchvision classifier sees; on smaller maps (e.g. 112-pixel inputs) that pool does not fit, so the
map is averaged globally. `pooling_mode` names the choice so that it is stored with the features.

Inference folds each BatchNorm into its convolution (exact with running statistics) and merges the
parallel 1x1x1 convolutions of each inception block into one matrix product; `train=True` runs the
plain convolution, BatchNorm with batch statistics, and updates the running statistics.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax import lax

from vbert_jax import tagged_msgpack

FEATURE_DIM = 1024
BN_EPS = 1e-3
# torchvision's BatchNorm momentum 0.001 weights the new batch by 0.001.
BN_MOMENTUM = 0.001
# torchvision's Kinetics video statistics (S3D_Weights transforms), on values in [0, 1].
MEAN = (0.43216, 0.394666, 0.37645)
STD = (0.22803, 0.22145, 0.216989)
POOL_AVG = "avgpool_2x7x7"
POOL_GLOBAL = "global_mean"
AVGPOOL_WINDOW = (2, 7, 7)
FORMAT = "vbert_jax.s3d"
FORMAT_VERSION = 1

Variables = dict[str, Any]
# (name, in, b0, b1_mid, b1_out, b2_mid, b2_out, b3), in torchvision's order; "pool" marks its
# max pools between the blocks.
BLOCKS = (
    ("mixed_3b", 192, 64, 96, 128, 16, 32, 32),
    ("mixed_3c", 256, 128, 128, 192, 32, 96, 64),
    "pool_3x3x3",
    ("mixed_4b", 480, 192, 96, 208, 16, 48, 64),
    ("mixed_4c", 512, 160, 112, 224, 24, 64, 64),
    ("mixed_4d", 512, 128, 128, 256, 24, 64, 64),
    ("mixed_4e", 512, 112, 144, 288, 32, 64, 64),
    ("mixed_4f", 528, 256, 160, 320, 32, 128, 128),
    "pool_2x2x2",
    ("mixed_5b", 832, 256, 160, 320, 32, 128, 128),
    ("mixed_5c", 832, 384, 192, 384, 48, 128, 128),
)


def normalize(frames: Any) -> jnp.ndarray:
  """uint8 RGB frames [..., 3] -> float32, as torchvision's S3D transforms: x / 255, then mean/std."""
  x = jnp.asarray(frames).astype(jnp.float32) / 255.0
  return (x - jnp.asarray(MEAN, jnp.float32)) / jnp.asarray(STD, jnp.float32)


# ----------------------------------------------------------------------------- shapes and pooling


def _out_len(n: int, k: int, s: int, p: int) -> int:
  return (n + 2 * p - k) // s + 1


def final_map_shape(frames: int, height: int, width: int) -> tuple[int, int, int]:
  """(T, H, W) of the last feature map; raises if the input is too small for the network."""
  t, h, w = frames, height, width
  # conv1 (7, stride 2, padding 3), then the max pools that stride: (1,3,3)/2 twice, 3x3x3/2, 2x2x2/2.
  steps = [((7, 7, 7), (2, 2, 2), (3, 3, 3)), ((1, 3, 3), (1, 2, 2), (0, 1, 1)),
           ((1, 3, 3), (1, 2, 2), (0, 1, 1)), ((3, 3, 3), (2, 2, 2), (1, 1, 1)),
           ((2, 2, 2), (2, 2, 2), (0, 0, 0))]
  for k, s, p in steps:
    t, h, w = (_out_len(n, kk, ss, pp) for n, kk, ss, pp in zip((t, h, w), k, s, p))
    if min(t, h, w) < 1:
      raise ValueError(f"S3D input of {frames} frames x {height}x{width} pixels is too small: "
                       "expected at least 5 frames and 17x17 pixels")
  return t, h, w


def pooling_mode(frames: int, height: int, width: int) -> str:
  """How the final map of an input this size is pooled: POOL_AVG (torchvision's) or POOL_GLOBAL."""
  shape = final_map_shape(frames, height, width)
  return POOL_AVG if all(n >= k for n, k in zip(shape, AVGPOOL_WINDOW)) else POOL_GLOBAL


def _pool_features(x: jnp.ndarray) -> jnp.ndarray:
  """[B, T, H, W, C] -> [B, C]: torchvision's avgpool + mean where the map fits, else global mean."""
  _, t, h, w, _ = x.shape
  if any(n < k for n, k in zip((t, h, w), AVGPOOL_WINDOW)):
    return jnp.mean(x, axis=(1, 2, 3))
  # A stride-1 average pool followed by a mean is a weighted mean: position i along an axis of
  # length n lies in min(i + 1, k, n - i, n - k + 1) of the windows of size k.
  weights = [np.minimum.reduce([np.arange(n) + 1, np.full(n, k), n - np.arange(n),
                                np.full(n, n - k + 1)]) / (k * (n - k + 1))
             for n, k in zip((t, h, w), AVGPOOL_WINDOW)]
  return jnp.einsum("bthwc,t,h,w->bc", x, *(jnp.asarray(wt, x.dtype) for wt in weights))


# ----------------------------------------------------------------------------- layers


def _along(axis: int, values: Sequence[int], fill: int) -> list[int]:
  return [v if i == axis else fill for i, v in enumerate(values)]


def _max_pool(x: jnp.ndarray, window: Sequence[int], strides: Sequence[int],
              padding: Sequence[int]) -> jnp.ndarray:
  """Max pool over (T, H, W) of [B, T, H, W, C]; padding never wins (it is -inf)."""
  if min(window) > 1:
    # A max over a box is a max along each axis in turn: 3 + 3 + 3 comparisons instead of 27,
    # which XLA's CPU reduce_window runs 5-10x faster on the inception blocks' 3x3x3 pools.
    for axis in range(3):
      x = _max_pool(x, _along(axis, window, 1), _along(axis, strides, 1), _along(axis, padding, 0))
    return x
  pads = [(0, 0)] + [(p, p) for p in padding] + [(0, 0)]
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, *window, 1), (1, *strides, 1), pads)


def _conv(x: jnp.ndarray, kernel: jnp.ndarray, strides: Sequence[int],
          padding: Sequence[int]) -> jnp.ndarray:
  """Channels-last 3-D convolution, routed to the cheapest equivalent lower-rank operation.

  On CPU, XLA's 2-D convolutions (and matrix products for 1x1x1) ran S3D's layers 1.3-2.5x faster
  than its 3-D convolution did on the same shapes; all forms give the same result.
  """
  kt, kh, kw = kernel.shape[:3]
  if (kt, kh, kw) == (1, 1, 1) and tuple(strides) == (1, 1, 1):
    return jnp.einsum("bthwc,cd->bthwd", x, kernel[0, 0, 0])
  if kt == 1 and strides[0] == 1 and padding[0] == 0:
    # Spatial (1xkxk): a 2-D convolution over every frame.
    b, t, h, w, c = x.shape
    y = lax.conv_general_dilated(
        x.reshape(b * t, h, w, c), kernel[0], tuple(strides[1:]),
        [(p, p) for p in padding[1:]], dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y.reshape(b, t, *y.shape[1:])
  if (kh, kw) == (1, 1) and tuple(strides[1:]) == (1, 1) and tuple(padding[1:]) == (0, 0):
    # Temporal (kx1x1): a 2-D convolution over (time, pixels).
    b, t, h, w, c = x.shape
    y = lax.conv_general_dilated(
        x.reshape(b, t, h * w, c), kernel[:, 0], (strides[0], 1), [(padding[0],) * 2, (0, 0)],
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y.reshape(b, y.shape[1], h, w, -1)
  return lax.conv_general_dilated(x, kernel, tuple(strides), [(p, p) for p in padding],
                                  dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))


class ConvBN(nn.Module):
  """Conv3d (no bias) + BatchNorm3d + ReLU, torchvision's Conv3dNormActivation."""
  in_features: int
  features: int
  kernel_size: tuple[int, int, int] = (1, 1, 1)
  strides: tuple[int, int, int] = (1, 1, 1)
  padding: tuple[int, int, int] = (0, 0, 0)

  def setup(self):
    shape = (*self.kernel_size, self.in_features, self.features)
    # He initialisation keeps activations at unit scale through the ~20 layers of a random network.
    self.kernel = self.param("kernel", nn.initializers.kaiming_normal(), shape)
    self.scale = self.param("scale", nn.initializers.ones, (self.features,))
    self.bias = self.param("bias", nn.initializers.zeros, (self.features,))
    self.mean = self.variable("batch_stats", "mean", jnp.zeros, (self.features,))
    self.var = self.variable("batch_stats", "var", jnp.ones, (self.features,))

  def folded(self) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(kernel, bias) of the convolution with the inference-mode BatchNorm folded in."""
    inv = self.scale * lax.rsqrt(self.var.value + BN_EPS)
    return self.kernel * inv, self.bias - self.mean.value * inv

  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    if not train:
      kernel, bias = self.folded()
      return nn.relu(_conv(x, kernel, self.strides, self.padding) + bias)
    y = _conv(x, self.kernel, self.strides, self.padding)
    mean = jnp.mean(y, axis=(0, 1, 2, 3))
    var = jnp.var(y, axis=(0, 1, 2, 3))
    if not self.is_initializing():
      n = y.size // y.shape[-1]
      self.mean.value = (1 - BN_MOMENTUM) * self.mean.value + BN_MOMENTUM * mean
      # torch keeps the unbiased variance as its running statistic.
      self.var.value = (1 - BN_MOMENTUM) * self.var.value + BN_MOMENTUM * var * n / max(n - 1, 1)
    y = (y - mean) * lax.rsqrt(var + BN_EPS) * self.scale + self.bias
    return nn.relu(y)


class SepConv(nn.Module):
  """A kxkxk convolution factored as 1xkxk (spatial) then kx1x1 (temporal): TemporalSeparableConv."""
  in_features: int
  features: int
  kernel: int
  stride: int
  padding: int

  def setup(self):
    k, s, p = self.kernel, self.stride, self.padding
    self.spatial = ConvBN(self.in_features, self.features, (1, k, k), (1, s, s), (0, p, p))
    self.temporal = ConvBN(self.features, self.features, (k, 1, 1), (s, 1, 1), (p, 0, 0))

  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    return self.temporal(self.spatial(x, train), train)


class Inception(nn.Module):
  """SepInceptionBlock3D: 1x1x1 | 1x1x1 -> sep 3 | 1x1x1 -> sep 3 | maxpool 3 -> 1x1x1."""
  in_features: int
  b0: int
  b1_mid: int
  b1_out: int
  b2_mid: int
  b2_out: int
  b3: int

  def setup(self):
    c = self.in_features
    self.branch0 = ConvBN(c, self.b0)
    self.branch1_reduce = ConvBN(c, self.b1_mid)
    self.branch1_sep = SepConv(self.b1_mid, self.b1_out, 3, 1, 1)
    self.branch2_reduce = ConvBN(c, self.b2_mid)
    self.branch2_sep = SepConv(self.b2_mid, self.b2_out, 3, 1, 1)
    self.branch3 = ConvBN(c, self.b3)

  def _reduce(self, x: jnp.ndarray, train: bool) -> list[jnp.ndarray]:
    convs = (self.branch0, self.branch1_reduce, self.branch2_reduce)
    if train:
      return [conv(x, train) for conv in convs]
    # The three 1x1x1 convolutions read the same input: one matrix product serves them all.
    kernels, biases = zip(*(conv.folded() for conv in convs))
    y = nn.relu(_conv(x, jnp.concatenate(kernels, -1), (1, 1, 1), (0, 0, 0)) +
                jnp.concatenate(biases))
    return jnp.split(y, [self.b0, self.b0 + self.b1_mid], axis=-1)

  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    x0, x1, x2 = self._reduce(x, train)
    x3 = self.branch3(_max_pool(x, (3, 3, 3), (1, 1, 1), (1, 1, 1)), train)
    return jnp.concatenate(
        [x0, self.branch1_sep(x1, train), self.branch2_sep(x2, train), x3], axis=-1)


class S3D(nn.Module):
  """S3D trunk: [B, T, H, W, 3] normalised clips -> [B, 1024] pooled pre-classifier features.

  The pooling used for an input shape is `pooling_mode(T, H, W)`.
  """

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    if x.ndim != 5 or x.shape[-1] != 3:
      raise ValueError(f"S3D expects clips [batch, frames, height, width, 3], got {x.shape}")
    final_map_shape(*x.shape[1:4])
    x = SepConv(3, 64, 7, 2, 3, name="conv1")(x, train)
    x = _max_pool(x, (1, 3, 3), (1, 2, 2), (0, 1, 1))
    x = ConvBN(64, 64, name="conv2")(x, train)
    x = SepConv(64, 192, 3, 1, 1, name="conv3")(x, train)
    x = _max_pool(x, (1, 3, 3), (1, 2, 2), (0, 1, 1))
    for block in BLOCKS:
      if block == "pool_3x3x3":
        x = _max_pool(x, (3, 3, 3), (2, 2, 2), (1, 1, 1))
      elif block == "pool_2x2x2":
        x = _max_pool(x, (2, 2, 2), (2, 2, 2), (0, 0, 0))
      else:
        x = Inception(*block[1:], name=block[0])(x, train)
    return _pool_features(x)


# ----------------------------------------------------------------------------- parameters


def init_params(seed: int, image_size: int = 224, frames: int = 30) -> Variables:
  """Random S3D variables ({"params", "batch_stats"}) for clips of this size.

  Kernels are He-normal (unit-scale activations through the ~20 layers), BatchNorm is the
  identity. Drawn with numpy from the variable shapes: compiling `S3D().init`, with its dozens of
  random-number graphs, takes about a minute on a small CPU, drawing takes a fraction of a second.
  Parameter shapes do not depend on the input size, which is only checked.
  """
  final_map_shape(frames, image_size, image_size)
  rng = np.random.default_rng(seed)

  def draw(path: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
    if path[-1] == "kernel":
      fan_in = int(np.prod(shape[:-1]))
      return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    return (np.ones if path[-1] in ("scale", "var") else np.zeros)(shape, np.float32)

  return unflatten({path: draw(path, shape) for path, shape in _flat_shapes().items()})


def save_params(path, variables: Variables) -> epath.Path:
  """Writes S3D variables as msgpack (with a format tag and version), atomically."""
  return tagged_msgpack.write(path, FORMAT, FORMAT_VERSION, {"variables": dict(variables)})


def load_params(path) -> Variables:
  """Reads variables written by `save_params` and checks them against the network's shapes."""
  payload, _ = tagged_msgpack.read(
      path, FORMAT, FORMAT_VERSION, "S3D parameter",
      "convert torchvision weights with `python -m vbert_jax.video.convert_s3d`")
  variables = payload["variables"]
  check_variables(variables, source=str(path))
  return variables


@functools.lru_cache(maxsize=1)
def _flat_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
  shapes = jax.eval_shape(lambda: S3D().init(jax.random.key(0), jnp.zeros((1, 5, 17, 17, 3))))
  return {k: tuple(v.shape) for k, v in flatten(dict(shapes)).items()}


def check_variables(variables: Variables, source: str = "S3D variables") -> None:
  """Raises ValueError naming every missing, unexpected or misshapen entry."""
  want = {"/".join(k): v for k, v in _flat_shapes().items()}
  got = {"/".join(k): tuple(np.shape(v)) for k, v in flatten(variables).items()}
  problems = [f"missing {k}" for k in sorted(want.keys() - got.keys())]
  problems += [f"unexpected {k}" for k in sorted(got.keys() - want.keys())]
  problems += [f"{k} has shape {got[k]}, expected {want[k]}"
               for k in sorted(want.keys() & got.keys()) if got[k] != want[k]]
  if problems:
    raise ValueError(f"{source}: does not match S3D: " + "; ".join(problems[:10]) +
                     (f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""))


def flatten(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  """Nested mappings -> {(key, ...): leaf}."""
  if isinstance(tree, Mapping):
    out = {}
    for k, v in tree.items():
      out.update(flatten(v, prefix + (str(k),)))
    return out
  return {prefix: tree}


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
  """{(key, ...): leaf} -> nested dicts."""
  out: dict = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out
