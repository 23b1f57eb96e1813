"""TPU readiness without a TPU: the real train step compiles for described TPU slices.

libtpu (a dev requirement) lets JAX on this CPU machine describe a slice and run XLA's TPU
compiler on the sharded step; the memory XLA assigns per chip is checked against the chip's HBM.
`base` is compiled for a 4-chip and a 16-chip slice, `large` for a slice it fits and one it does
not. Each compile takes from a few seconds to about a minute on two cores, so every one is made
once per module and shared by the tests that read it.
"""

import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import hlo
from helpers.configs import pretrain
from vbert_jax import aot
from vbert_jax import flops
from vbert_jax import model
from vbert_jax import sharding
from vbert_jax import pretrain as pretrain_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
V5E_HBM_BYTES = 16 * aot.GIB


def _config(variant: str, **overrides):
  config = pretrain.get_config(f"variant={variant}")
  with config.unlocked():
    # What a TPU run uses: bf16 compute, one scanned and rematerialised layer body.
    config.model.dtype = "bfloat16"
    config.model.scan_layers = True
    config.model.remat = "full"
    # A smaller batch and sequence than the paper's 128 x 512 keep XLA's TPU compiler at about a
    # minute per step on two cores.
    config.batch_size = 16
    config.max_len = 128
    for key, value in overrides.items():
      node = config
      *parents, leaf = key.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = value
  return config


def _num_params(config) -> int:
  init = pretrain_lib.make_trainable(config).init
  return model.count_params(jax.eval_shape(init, jax.random.key(0)))


@pytest.fixture(scope="module")
def base_v5e_2x2():
  return aot.check(_config("base"), "v5e:2x2")


@pytest.fixture(scope="module")
def base_v5e_4x4():
  # 16 chips: 4-way data parallel x 4-way FSDP, the mesh given as an override.
  return aot.check(_config("base"), "v5e:4x4", mesh={"data": 4, "fsdp": 4})


@pytest.mark.slow
def test_base_train_step_compiles_for_v5e_2x2(base_v5e_2x2, record_property):
  result = base_v5e_2x2
  report = result.report
  summary = report.summary()
  print("\n".join(result.lines()))
  record_property("aot_v5e_2x2_base", summary)

  config = _config("base")
  num_params = _num_params(config)
  assert 100e6 < num_params < 200e6, num_params  # BERT-base plus the visual rows and heads
  # Data parallel over 4 chips: every chip holds the f32 params and both Adam moments ...
  state_bytes = 3 * 4 * num_params
  assert report.argument_bytes >= state_bytes
  # ... and the step writes the new state over the donated old one.
  assert report.alias_bytes >= 0.99 * state_bytes
  assert report.temp_bytes > 0
  assert report.peak_bytes < V5E_HBM_BYTES, summary
  assert result.fits and result.hbm_bytes == V5E_HBM_BYTES
  assert report.device_kind.startswith("TPU v5") and result.num_devices == 4
  assert result.mesh == {"data": 4, "fsdp": 1, "tensor": 1}
  # The executable is a real TPU program for all four chips.
  assert len(result.compiled.input_shardings[0]) > 0
  assert np.isfinite(report.flops) and report.flops > 0
  # FLOPs per step from the model's shape: 16 packed rows of 128 tokens, their prediction slots
  # and their 32 places for LVA.
  mcfg = pretrain_lib.model_config(config)
  text_slots, video_slots = pretrain_lib.slots(config)
  places = pretrain_lib.pack_examples(config)
  expected = flops.flops_per_step(mcfg, 16, 128, 16 * text_slots, 16 * video_slots,
                                  16 * places).total
  assert result.model_flops == pytest.approx(expected)
  # The roofline: XLA's FLOPs per chip at 197 TFLOP/s against its bytes at 819 GB/s.
  assert report.bytes_accessed > state_bytes  # a step reads the state at least once
  assert result.roofline == pytest.approx((report.flops / 197e12, report.bytes_accessed / 819e9))
  assert result.step_seconds == max(result.roofline)
  assert re.search(r"roofline step time: at least [0-9.]+ ms \((compute|memory) bound: .* at 819 "
                   r"GB/s per chip\); XLA counts the scanned layer body once",
                   "\n".join(result.lines()))
  # Position and token-type gradients are matmuls on the TPU too: no scatter into their tables.
  hlo = result.compiled.as_text()
  scattered = set(re.findall(r"= f32\[([\d,]+)\][^=]*? scatter\(", hlo))
  assert f"{mcfg.max_position_embeddings},{mcfg.hidden_size}" not in scattered
  assert f"{mcfg.type_vocab_size},{mcfg.hidden_size}" not in scattered
  # Pure data parallelism (the fsdp and tensor axes have size 1): every chip holds all the state.
  state = [s for s in result.shardings if s.startswith("state")]
  sizes = [re.search(r"([0-9.]+) GiB, ([0-9.]+) GiB per chip", s).groups() for s in state]
  assert state and all(total == local for total, local in sizes), state
  assert any(s.startswith("batch (data+fsdp): 17 arrays") for s in result.shardings)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_the_tpu_step_runs_splash_attention_when_attention_dropout_is_0(dropout):
  """`attention_impl="auto"` on a TPU topology: with no attention dropout, each layer's attention
  is the splash kernel (a Mosaic custom call, forward and backward) and no f32 [B, N, T, S]
  buffer is left; with the paper's 0.1 the probabilities are materialised for dropout."""
  length = 256  # the kernel's row statistics are [.., T, 128]: a length of 128 would match them
  config = _config("mu", **{"max_len": length, "model.attention_dropout_rate": dropout,
                            "model.max_position_embeddings": length,
                            "input.max_example_len": length})
  assert config.model.attention_impl == "auto"
  result = aot.check(config, "v5e:2x2")
  text = result.compiled.as_text()
  kernels = set(re.findall(r'%(\w+?)(?:\.\d+)? = [^\n]*custom_call_target="tpu_custom_call"', text))
  squares = hlo.square_f32_buffers(text, length)
  if dropout:
    assert not kernels and squares
  else:
    assert any(k.startswith("splash_mha_fwd") for k in kernels), kernels
    assert any(k.startswith("splash_mha_dkv") for k in kernels), kernels
    assert any(k.startswith("splash_mha_dq") for k in kernels), kernels
    assert not squares, squares


@pytest.mark.slow
def test_base_fsdp_on_16_chips_shards_the_state(base_v5e_2x2, base_v5e_4x4, record_property):
  result, replicated = base_v5e_4x4, base_v5e_2x2
  print("\n".join(result.lines()))
  record_property("aot_v5e_4x4_base", result.report.summary())
  assert result.fits and result.num_devices == 16
  assert result.mesh == {"data": 4, "fsdp": 4, "tensor": 1}
  # FSDP over 4 splits every weight with an `embed` axis: the state per chip falls well below
  # the replicated copy, and so does the peak.
  assert result.report.argument_bytes < 0.4 * replicated.report.argument_bytes
  assert result.report.peak_bytes < replicated.report.peak_bytes
  assert any("fsdp" in s for s in result.shardings if s.startswith("state"))
  # Same global batch, same model FLOPs; a quarter of the rows per chip, so XLA's FLOPs per chip
  # fall and with them the compute side of the roofline.
  assert result.model_flops == pytest.approx(replicated.model_flops)
  assert result.report.flops < 0.5 * replicated.report.flops
  assert result.roofline[0] < 0.5 * replicated.roofline[0]


@pytest.mark.slow
def test_large_fits_a_v4_2x2x1(record_property):
  config = _config("large")
  result = aot.check(config, "v4:2x2x1")
  print("\n".join(result.lines()))
  record_property("aot_v4_2x2x1_large", result.report.summary())
  num_params = _num_params(config)
  assert 300e6 < num_params < 400e6, num_params
  assert result.device_kind == "TPU v4" and result.num_devices == 4  # one device per chip
  assert result.hbm_bytes == 32 * aot.GIB
  # Replicated f32 params and two Adam moments, donated; plus activations for 4 examples.
  assert result.report.argument_bytes >= 12 * num_params
  assert result.report.alias_bytes >= 0.99 * 12 * num_params
  assert 12 * num_params < result.report.peak_bytes < 32 * aot.GIB
  assert result.fits
  assert result.roofline == pytest.approx((result.report.flops / flops.PEAK_BF16_FLOPS["tpu v4"],
                                           result.report.bytes_accessed / 1200e9))


@pytest.mark.slow
def test_large_at_paper_size_does_not_fit_a_v5e_2x2():
  """The paper's batch 128 x 512 in f32, no rematerialisation: XLA refuses it; the CLI says so."""
  cmd = [sys.executable, "-m", "vbert_jax.aot", "--config=configs/pretrain.py:variant=large",
         "--topology=v5e:2x2", "--config.model.scan_layers=True"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  print(proc.stdout)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "verdict: DOES NOT FIT" in proc.stdout
  needed = float(re.search(r"XLA needs at least ([0-9.]+) GiB", proc.stdout).group(1))
  # 32 examples per chip of 512 tokens through 24 layers keep tens of GiB of activations.
  assert 20 < needed < 500, needed
  error = next(line for line in proc.stderr.splitlines() if line.startswith("error: "))
  assert "does not fit v5e:2x2" in error and f"{needed:.2f} GiB per chip" in error
  assert "16 GiB" in error
  assert re.search(r"FLOPs per step: model [0-9.]+ TFLOP", proc.stdout)
  assert "roofline" not in proc.stdout  # XLA's counts come with a compiled program only


def test_topologies_have_one_device_per_chip():
  for name, chips, kind in (("v5e:2x2", 4, "TPU v5 lite"), ("v5e:4x4", 16, "TPU v5 lite"),
                            ("v4:2x2x1", 4, "TPU v4"), ("v5p:2x2x2", 8, "TPU v5")):
    devices = aot.topology_devices(name)
    assert len(devices) == chips == aot.parse_topology(name).chips, name
    assert {d.device_kind for d in devices} == {kind}
    assert {d.platform for d in devices} == {"tpu"}


@pytest.mark.parametrize("name, message", [
    ("v9:2x2", "unknown TPU topology 'v9:2x2'"),
    ("v5e", "shape '' is not"),
    ("v5e:2by2", "shape '2by2' is not"),
])
def test_unknown_topology_fails_naming_it(name, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    aot.check(_config("mu"), name)


def test_mesh_that_does_not_divide_the_chips_fails_before_compiling():
  with pytest.raises(ValueError, match=r"config\.mesh \(data=-1, fsdp=1, tensor=3\) on v5e:2x2 "
                     r"\(4 chips\): axis tensor=3 does not divide the 4 devices"):
    aot.check(_config("mu"), "v5e:2x2", mesh={"tensor": 3})
  with pytest.raises(ValueError, match=r"on v5e:4x4 \(16 chips\) needs 8 devices"):
    aot.check(_config("mu"), "v5e:4x4", mesh={"data": 2, "fsdp": 4})
  with pytest.raises(ValueError, match=r"--mesh: unknown axis 'model'"):
    aot.check(_config("mu"), "v5e:2x2", mesh={"model": 2})
  with pytest.raises(ValueError, match=r"'data:2' is not axis=size"):
    aot.parse_mesh("data:2")
  assert aot.parse_mesh("data=-1, fsdp=4") == {"data": -1, "fsdp": 4}


def test_parse_oom_reads_both_phrasings():
  msg = ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total memory "
         "required for HLO temporaries (63.19G) exceeds available HBM (15.75G).")
  assert aot.parse_oom(msg) == (int(63.19 * aot.GIB), int(15.75 * aot.GIB))
  msg = "RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 20.50G of 15.48G hbm."
  assert aot.parse_oom(msg) == (int(20.5 * aot.GIB), int(15.48 * aot.GIB))
  assert aot.parse_oom("INVALID_ARGUMENT: something else") is None


@pytest.mark.parametrize("topology, process_0", [
    ("v5e:4x4", [0, 1, 6, 15]),  # libtpu's v5e:4x4 puts host 0's chips at these batch shards
    ("v4:2x2x4", [0, 4, 8, 12]),
])
def test_every_host_of_a_pod_reads_the_rows_its_chips_hold(topology, process_0):
  """With data=-1 the mesh follows the topology, so a host's rows are not one block; each host
  reads exactly the rows of its chips, and together they read the batch once."""
  config = pretrain.get_config("variant=base")
  devices = aot.topology_devices(topology)
  mesh = sharding.make_mesh(config.mesh, devices, where=topology)
  placement = sharding.input_placement(128, mesh, sharding.make_rules(config.sharding_rules),
                                       where=topology)
  assert sorted(placement.rows) == [0, 1, 2, 3]
  want = np.concatenate([np.arange(8 * k, 8 * k + 8) for k in process_0])
  np.testing.assert_array_equal(placement.rows[0], want)
  every = np.concatenate(list(placement.rows.values()))
  np.testing.assert_array_equal(np.sort(every), np.arange(128))
  assert placement.summary().startswith(
      "input placement: 4 host(s) feed 32 rows each of the global batch of 128 (16 batch "
      "shard(s) of 8); process 0 reads rows ")
  # The rows each device holds are rows its own host reads.
  index_map = sharding.batch_sharding(mesh, sharding.make_rules(config.sharding_rules)
                                      ).devices_indices_map((128,))
  for device, index in index_map.items():
    assert set(range(128)[index[0]]) <= set(placement.rows[device.process_index].tolist())


@pytest.mark.slow
@pytest.mark.parametrize("topology", ["v5e:4x4", "v4:2x2x4"])
def test_base_on_a_pod_with_data_minus_one_exits_0(topology):
  """The readiness CLI compiles `base` for the whole pod and reports how its hosts feed it."""
  cmd = [sys.executable, "-m", "vbert_jax.aot", "--config=configs/pretrain.py:variant=base",
         f"--topology={topology}", "--mesh=data=-1", "--config.model.dtype=bfloat16",
         "--config.model.scan_layers=True", "--config.model.remat=full",
         "--config.batch_size=32", "--config.max_len=128"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  print(proc.stdout)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  assert "input placement: 4 host(s) feed 8 rows each of the global batch of 32" in proc.stdout
  assert "data=16: across 4 hosts of a slice (ICI)" in proc.stdout
  assert "verdict: fits" in proc.stdout


def test_hosts_that_cannot_feed_their_devices_exit_1():
  cmd = [sys.executable, "-m", "vbert_jax.aot", "--config=configs/pretrain.py:variant=base",
         "--topology=v5e:4x4", "--config.batch_size=24"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
  assert "memory per chip: not compiled, since the batch cannot be fed" in proc.stdout
  # libtpu describes the topology without a TPU here, and says nothing about the missing one.
  for chatter in ("TPU accelerator type", "TPU worker hostnames", "Source Location Trace"):
    assert chatter not in proc.stderr, proc.stderr[-2000:]
  error = next(line for line in proc.stderr.splitlines() if line.startswith("error: "))
  assert ("config.batch_size=24 is not divisible by the 16 batch shards of config.mesh "
          "(data=16 x fsdp=1); expected a multiple of 16. On v5e:4x4, process 0 would feed 6 "
          "rows to its 4 devices") in error


@pytest.mark.slow
def test_base_compiles_for_two_slices_with_data_across_them():
  result = aot.check(_config("base"), "v5e:2x2", num_slices=2)
  lines = result.lines()
  print("\n".join(lines))
  assert result.ready and result.num_devices == 8 and result.num_slices == 2
  assert result.hbm_bytes == V5E_HBM_BYTES
  assert result.mesh == {"data": 8, "fsdp": 1, "tensor": 1}
  assert lines[0].startswith("topology v5e:2x2 x 2 slices: 8 x TPU v5 lite")
  assert "mesh axes: data=8: across 2 slices (DCN) x 4 within a slice" in lines[1]
  assert lines[2].startswith("input placement: 2 host(s) feed 8 rows each of the global "
                             "batch of 16")
  assert result.report.peak_bytes < V5E_HBM_BYTES
  # FSDP and tensor parallelism stay inside a slice: an axis across slices must be data.
  with pytest.raises(ValueError, match=r"axis data=3 must be a multiple of the 2 slices"):
    sharding.make_mesh({"data": 3, "fsdp": 1, "tensor": -1},
                       aot.topology_devices("v4:2x2x1", num_slices=2)[:6])


def test_mesh_that_misses_the_topology_layout_warns(caplog):
  """A device list the topology-aware layout refuses falls back to the listed order, loudly."""
  devices = aot.topology_devices("v5e:4x4")
  odd = devices[:6]  # six chips of a 4x4 slice form no sub-mesh
  with caplog.at_level("WARNING"):
    mesh = sharding.make_mesh({"data": -1}, odd)
  assert [d.id for d in mesh.devices.flat] == [d.id for d in odd]
  assert any("the topology-aware device layout failed" in r.getMessage() for r in caplog.records)


def test_roofline_is_the_slower_of_compute_and_memory_and_bounds_the_mfu():
  """From XLA's counts per chip: FLOPs at the chip's peak against bytes at its bandwidth."""
  report = aot.CompileReport(topology="v5e:2x2", num_devices=4, device_kind="TPU v5 lite",
                             argument_bytes=0, output_bytes=0, alias_bytes=0, temp_bytes=0,
                             generated_code_bytes=0, flops=2 * 197e12 * 0.01,
                             bytes_accessed=819e9 * 0.03)
  common = dict(topology=aot.parse_topology("v5e:2x2"), mesh={"data": 4}, num_devices=4,
                device_kind="TPU v5 lite", hbm_bytes=16 * aot.GIB, model_flops=4 * 197e12 * 0.015,
                peak_flops=197e12, bandwidth=819e9, shardings=(), report=report)
  memory_bound = aot.Readiness(**common)
  assert memory_bound.roofline == pytest.approx((0.02, 0.03))
  assert memory_bound.step_seconds == pytest.approx(0.03)
  line = next(x for x in memory_bound.lines() if x.startswith("roofline"))
  # 4 chips x 197 TFLOP/s x 30 ms could run 4 x 5.91 TFLOP; the model needs half of that.
  assert line.startswith("roofline step time: 30 ms (memory bound: 20 ms at 197 TFLOP/s, 30 ms")
  assert line.endswith("MFU 0.50, the most this step can reach")
  scanned = aot.Readiness(**common, scanned=True)
  line = next(x for x in scanned.lines() if x.startswith("roofline"))
  assert line.startswith("roofline step time: at least 30 ms") and "lower bound" in line
