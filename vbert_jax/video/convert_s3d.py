"""Converts torchvision's S3D state dict (e.g. the Kinetics-400 `s3d-d76dad2f.pth`) to Flax variables.

    python -m vbert_jax.video.convert_s3d --torch_weights=S3D_kinetics400.pt --out=s3d.msgpack

The .pth/.pt file is read with `torch.load(weights_only=True)` (no code from the file runs); a
`.safetensors` file is read with safetensors. The classifier is dropped: features are taken before it.
"""

from __future__ import annotations

import pathlib
import sys
import types
from typing import Any, Iterator, Mapping, Sequence

from absl import flags
import numpy as np
import safetensors.numpy

from vbert_jax import cli
from vbert_jax import console
from vbert_jax.video import s3d

# torchvision's `features` indices of the layers that carry weights.
_STEM = {"conv1": (0, "sep"), "conv2": (2, "conv"), "conv3": (3, "sep")}
_BLOCK_INDEX = {"mixed_3b": 5, "mixed_3c": 6, "mixed_4b": 8, "mixed_4c": 9, "mixed_4d": 10,
                "mixed_4e": 11, "mixed_4f": 12, "mixed_5b": 14, "mixed_5c": 15}
_BRANCHES = {"branch0": ("branch0", "conv"), "branch1_reduce": ("branch1.0", "conv"),
             "branch1_sep": ("branch1.1", "sep"), "branch2_reduce": ("branch2.0", "conv"),
             "branch2_sep": ("branch2.1", "sep"), "branch3": ("branch3.1", "conv")}
# Entries of the state dict that have no counterpart in the feature extractor.
IGNORED_SUFFIXES = (".num_batches_tracked",)
IGNORED_PREFIXES = ("classifier.",)


def _conv_units() -> Iterator[tuple[tuple[str, ...], str]]:
  """(Flax module path, torchvision prefix) of every Conv3dNormActivation in S3D."""
  def expand(path, prefix, kind):
    if kind == "sep":
      yield path + ("spatial",), f"{prefix}.0"
      yield path + ("temporal",), f"{prefix}.1"
    else:
      yield path, prefix
  for name, (index, kind) in _STEM.items():
    yield from expand((name,), f"features.{index}", kind)
  for block, index in _BLOCK_INDEX.items():
    for branch, (sub, kind) in _BRANCHES.items():
      yield from expand((block, branch), f"features.{index}.{sub}", kind)


def convert_torch_state_dict(state_dict: Mapping[str, Any]) -> s3d.Variables:
  """torchvision S3D state dict (tensors or arrays) -> Flax {"params", "batch_stats"} (float32)."""
  sd = {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v)
        for k, v in state_dict.items()}
  if sd and all(k.startswith("module.") for k in sd):  # saved from a DataParallel wrapper
    sd = {k[len("module."):]: v for k, v in sd.items()}
  used: set[str] = set()

  def take(key: str) -> np.ndarray:
    if key not in sd:
      raise KeyError(f"S3D state dict: missing {key!r} (is this torchvision's s3d?)")
    used.add(key)
    return sd[key].astype(np.float32)

  flat = {}
  for path, prefix in _conv_units():
    # torch Conv3d weight [out, in, kt, kh, kw] -> Flax [kt, kh, kw, in, out].
    flat["params", *path, "kernel"] = np.ascontiguousarray(
        take(f"{prefix}.0.weight").transpose(2, 3, 4, 1, 0))
    flat["params", *path, "scale"] = take(f"{prefix}.1.weight")
    flat["params", *path, "bias"] = take(f"{prefix}.1.bias")
    flat["batch_stats", *path, "mean"] = take(f"{prefix}.1.running_mean")
    flat["batch_stats", *path, "var"] = take(f"{prefix}.1.running_var")
  unexpected = [k for k in sd if k not in used and not k.endswith(IGNORED_SUFFIXES)
                and not k.startswith(IGNORED_PREFIXES)]
  if unexpected:
    raise KeyError(f"S3D state dict: unexpected entries {unexpected[:5]} "
                   f"({len(unexpected)} in all); expected torchvision's s3d")
  variables = s3d.unflatten(flat)
  s3d.check_variables(variables, source="converted S3D state dict")
  return variables


def read_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """Reads a PyTorch state dict without running code from the file (weights only / safetensors)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such weights file")
  if path.suffix == ".safetensors":
    return safetensors.numpy.load_file(str(path))
  try:  # optional: torch is no runtime requirement, and only .pth/.pt files need it
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"{path}: reading a .pth/.pt file needs PyTorch (pip install torch), or "
                      "give the weights as .safetensors") from e
  try:
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types for a file it cannot read
    raise ValueError(f"{path}: not a PyTorch weights file readable with weights_only=True ({e})") from e
  for key in ("state_dict", "model"):  # training checkpoints wrap the state dict
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
      obj = obj[key]
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
  # numpy has no bfloat16: widen floating tensors (half-precision files) to float32.
  return {k: (v.float() if v.is_floating_point() else v).numpy()
          for k, v in obj.items() if isinstance(v, torch.Tensor)}


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("torch_weights", None, "torchvision S3D .pth/.pt or .safetensors",
                      flag_values=fv)
  flags.DEFINE_string("out", None, "output Flax variables (.msgpack)", flag_values=fv)
  flags.mark_flag_as_required("torch_weights", flag_values=fv)
  flags.mark_flag_as_required("out", flag_values=fv)


def parse_args(argv: Sequence[str] | None = None) -> types.SimpleNamespace:
  return cli.parse(define_flags, argv, __doc__)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  console.setup()
  try:
    variables = convert_torch_state_dict(read_state_dict(args.torch_weights))
    out = s3d.save_params(args.out, variables)
  except (OSError, ValueError, KeyError, ImportError) as e:
    print(f"convert_s3d: error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
    return 1
  count = sum(np.size(v) for tree in variables.values() for v in s3d.flatten(tree).values())
  print(f"wrote {out}: {count:,} values (classifier dropped; features are 1024-d)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
