"""S3D in Flax against torchvision's s3d, with every parameter and buffer randomised first."""

import numpy as np
import pytest
import torch
import torchvision

import jax
import jax.numpy as jnp

from vbert_jax.video import convert_s3d, s3d

FRAMES = 30


@pytest.fixture(scope="session")
def torch_s3d() -> torch.nn.Module:
  """torchvision's S3D with random values in every parameter and buffer (BatchNorm stats too)."""
  model = torchvision.models.video.s3d()
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
      if name.endswith("num_batches_tracked"):
        t.copy_(torch.randint(1, 1000, t.shape, generator=gen))
      elif t.ndim == 5:  # convolution kernels, He scale so activations stay near unit size
        t.copy_(torch.randn(t.shape, generator=gen) * (2.0 / t[0].numel()) ** 0.5)
      elif name.endswith("running_var"):
        t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
      elif name.endswith("weight"):  # BatchNorm scale
        t.copy_(torch.rand(t.shape, generator=gen) * 0.6 + 0.4)
      else:  # BatchNorm shift, running mean, classifier bias
        t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
  return model.eval()


@pytest.fixture(scope="session")
def variables(torch_s3d):
  return convert_s3d.convert_torch_state_dict(torch_s3d.state_dict())


def _clip(size: int, batch: int = 1, frames: int = FRAMES, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (batch, frames, size, size, 3), np.uint8)


def _torch_input(clip_uint8: np.ndarray) -> torch.Tensor:
  """torchvision's own video transform (no resize at this size), [B,T,H,W,3] -> [B,3,T,H,W]."""
  size = clip_uint8.shape[2]
  transform = torchvision.transforms._presets.VideoClassification(
      crop_size=(size, size), resize_size=(size, size))
  return transform(torch.from_numpy(clip_uint8).permute(0, 1, 4, 2, 3))


def _ours(variables, clip_uint8: np.ndarray) -> np.ndarray:
  fn = jax.jit(lambda v, x: s3d.S3D().apply(v, s3d.normalize(x)))
  return np.asarray(fn(variables, clip_uint8))


def _assert_same(a, b, where: str = "") -> None:
  fa, fb = s3d.flatten(a), s3d.flatten(b)
  assert fa.keys() == fb.keys(), where
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=f"{where} {k}")


def test_every_entry_randomised(torch_s3d):
  fresh = torchvision.models.video.s3d().state_dict()
  for name, t in torch_s3d.state_dict().items():
    assert not torch.equal(t, fresh[name]), name
    if name.endswith("running_var"):
      assert bool((t > 0).all()), name


def test_normalize_matches_torchvision_transform():
  clip = _clip(32, batch=2, frames=4)
  ref = _torch_input(clip).permute(0, 2, 3, 4, 1).numpy()
  np.testing.assert_allclose(np.asarray(s3d.normalize(clip)), ref, atol=1e-6, rtol=0)
  kinetics = torchvision.models.video.S3D_Weights.KINETICS400_V1.transforms()
  assert tuple(kinetics.mean) == s3d.MEAN and tuple(kinetics.std) == s3d.STD


def test_parity_224_avgpool(torch_s3d, variables):
  clip = _clip(224)
  with torch.inference_mode():
    ref = torch_s3d.avgpool(torch_s3d.features(_torch_input(clip))).mean((2, 3, 4)).numpy()
    logits = torch_s3d(_torch_input(clip)).numpy()
  ours = _ours(variables, clip)
  assert s3d.pooling_mode(FRAMES, 224, 224) == s3d.POOL_AVG
  assert ours.shape == (1, s3d.FEATURE_DIM)
  assert np.abs(ref).max() > 0.5  # a live network, not one that collapsed to zeros
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
  # These are the features torchvision's classifier reads: its logits follow from them.
  w = torch_s3d.classifier[1].weight.detach().numpy()[:, :, 0, 0, 0]
  b = torch_s3d.classifier[1].bias.detach().numpy()
  np.testing.assert_allclose(ours @ w.T + b, logits, atol=1e-3, rtol=0)


def test_parity_112_global_mean(torch_s3d, variables):
  clip = _clip(112, seed=1)
  with torch.inference_mode():
    last_map = torch_s3d.features(_torch_input(clip))
  assert tuple(last_map.shape[2:]) == s3d.final_map_shape(FRAMES, 112, 112) == (4, 3, 3)
  ref = last_map.mean((2, 3, 4)).numpy()
  assert s3d.pooling_mode(FRAMES, 112, 112) == s3d.POOL_GLOBAL
  np.testing.assert_allclose(_ours(variables, clip), ref, atol=1e-4, rtol=0)


def test_train_mode_matches_torch_and_updates_running_stats(torch_s3d, variables):
  clip = _clip(64, batch=2, frames=8, seed=2)
  model = torchvision.models.video.s3d()
  model.load_state_dict(torch_s3d.state_dict())
  model.train()
  with torch.no_grad():
    ref = model.features(_torch_input(clip)).mean((2, 3, 4)).numpy()
  fn = jax.jit(lambda v, x: s3d.S3D().apply(v, s3d.normalize(x), train=True,
                                            mutable=["batch_stats"]))
  ours, updates = fn(variables, clip)
  # Batch statistics over the few positions of the last maps (2 clips x 1x2x2) divide by small
  # variances, which magnifies rounding: compare the whole vector, and the statistics tightly.
  ours = np.asarray(ours)
  assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 2e-3
  np.testing.assert_allclose(ours, ref, atol=2e-2, rtol=0)
  new = convert_s3d.convert_torch_state_dict(model.state_dict())["batch_stats"]
  got = s3d.flatten(updates["batch_stats"])
  assert got.keys() == s3d.flatten(new).keys()
  for path, want in s3d.flatten(new).items():
    np.testing.assert_allclose(np.asarray(got[path]), want, atol=1e-5, rtol=1e-4, err_msg=str(path))


def test_pooling_modes_and_small_inputs():
  assert s3d.final_map_shape(30, 224, 224) == (4, 7, 7)
  assert s3d.pooling_mode(30, 256, 256) == s3d.POOL_AVG
  assert s3d.pooling_mode(16, 160, 160) == s3d.POOL_GLOBAL
  with pytest.raises(ValueError, match="4 frames x 224x224 pixels is too small"):
    s3d.final_map_shape(4, 224, 224)
  with pytest.raises(ValueError, match="expects clips"):
    s3d.S3D().init(jax.random.key(0), jnp.zeros((1, 8, 32, 32)))


def test_random_init_is_alive_and_deterministic():
  a, b = s3d.init_params(3, 64, 8), s3d.init_params(3, 64, 8)
  s3d.check_variables(a)
  _assert_same(a, b)
  feats = np.asarray(jax.jit(s3d.S3D().apply)(a, s3d.normalize(_clip(64, 2, 8))))
  # He initialisation: features neither vanish nor explode after ~20 layers.
  assert feats.shape == (2, s3d.FEATURE_DIM) and np.isfinite(feats).all()
  assert 0.05 < feats.std() < 20, feats.std()
  with pytest.raises(ValueError, match="too small"):
    s3d.init_params(0, 16, 30)


def test_save_load_roundtrip_and_errors(tmp_path, variables):
  path = s3d.save_params(tmp_path / "s3d.msgpack", variables)
  _assert_same(s3d.load_params(path), variables)
  (tmp_path / "junk.msgpack").write_bytes(b"not msgpack at all")
  with pytest.raises(ValueError, match="junk.msgpack"):
    s3d.load_params(tmp_path / "junk.msgpack")
  from flax import serialization
  newer = {"format": s3d.FORMAT, "version": s3d.FORMAT_VERSION + 1, "variables": variables}
  (tmp_path / "newer.msgpack").write_bytes(serialization.msgpack_serialize(newer))
  with pytest.raises(ValueError, match="newer.msgpack: S3D parameter format version 2 is newer"):
    s3d.load_params(tmp_path / "newer.msgpack")


def test_converter_rejects_wrong_state_dicts(torch_s3d):
  sd = dict(torch_s3d.state_dict())
  missing = {k: v for k, v in sd.items() if k != "features.5.branch1.1.0.1.running_var"}
  with pytest.raises(KeyError, match=r"missing 'features.5.branch1.1.0.1.running_var'"):
    convert_s3d.convert_torch_state_dict(missing)
  with pytest.raises(KeyError, match=r"unexpected entries \['features.99.weight'\]"):
    convert_s3d.convert_torch_state_dict({**sd, "features.99.weight": torch.zeros(1)})
  wrong = {**sd, "features.2.0.weight": torch.zeros(64, 32, 1, 1, 1)}
  with pytest.raises(ValueError, match=r"conv2/kernel has shape \(1, 1, 1, 32, 64\), expected"):
    convert_s3d.convert_torch_state_dict(wrong)
  wrapped = {f"module.{k}": v for k, v in sd.items()}
  np.testing.assert_array_equal(
      convert_s3d.convert_torch_state_dict(wrapped)["params"]["conv1"]["spatial"]["kernel"],
      sd["features.0.0.0.weight"].numpy().transpose(2, 3, 4, 1, 0))


def test_cli_reads_pth_and_safetensors(tmp_path, torch_s3d, variables, capsys):
  from safetensors.torch import save_file
  torch.save(torch_s3d.state_dict(), tmp_path / "s3d.pth")
  save_file({k: v.contiguous() for k, v in torch_s3d.state_dict().items()},
            str(tmp_path / "s3d.safetensors"))
  for src in ("s3d.pth", "s3d.safetensors"):
    out = tmp_path / f"{src}.msgpack"
    assert convert_s3d.main([f"--torch_weights={tmp_path / src}", f"--out={out}"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    _assert_same(s3d.load_params(out), variables, src)
  (tmp_path / "bad.pth").write_bytes(b"\x00" * 64)
  with pytest.raises(ValueError, match="bad.pth: not a PyTorch weights file"):
    convert_s3d.read_state_dict(tmp_path / "bad.pth")
  assert convert_s3d.main([f"--torch_weights={tmp_path / 'nope.pth'}",
                           f"--out={tmp_path / 'o'}"]) == 1
  assert "nope.pth: no such weights file" in capsys.readouterr().err
  assert not (tmp_path / "o").exists()
