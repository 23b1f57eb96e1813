"""TPU readiness without a TPU: the real `base` train step compiles for a described v5e:2x2.

libtpu (a dev requirement) lets JAX on this CPU machine describe the slice and run XLA's TPU
compiler on the sharded step; the memory XLA assigns per chip is reported and must fit a v5e's
16 GiB of HBM.
"""

import jax
import numpy as np
import pytest

from configs import pretrain
from vbert_jax import aot
from vbert_jax import model
from vbert_jax import train

V5E_HBM_BYTES = 16 * aot.GIB


@pytest.mark.slow
def test_base_train_step_compiles_for_v5e_2x2(record_property):
  config = pretrain.get_config("variant=base")
  with config.unlocked():
    # What a v5e run of base uses: bf16 compute, one scanned and rematerialised layer body.
    config.model.dtype = "bfloat16"
    config.model.scan_layers = True
    config.model.remat = "full"
    # A smaller batch and sequence than the paper's 128 x 512: XLA's TPU compiler takes about a
    # minute for this on two cores, against four for the full size (README records both).
    config.batch_size = 16
    config.max_len = 128
  devices = aot.topology_devices("v5e:2x2", (2, 2, 1))
  assert len(devices) == 4 and {d.platform for d in devices} == {"tpu"}
  compiled, report = aot.compile_train_step(config, devices, "v5e:2x2")
  summary = report.summary()
  print(summary)
  record_property("aot_v5e_2x2_base", summary)

  params = jax.eval_shape(train.videobert_task(config).init, jax.random.key(0))
  num_params = model.count_params(params)
  assert 100e6 < num_params < 200e6, num_params  # BERT-base plus the visual rows and heads
  # Data parallel over 4 chips: every chip holds the f32 params and both Adam moments ...
  state_bytes = 3 * 4 * num_params
  assert report.argument_bytes >= state_bytes
  # ... and the step writes the new state over the donated old one.
  assert report.alias_bytes >= 0.99 * state_bytes
  assert report.temp_bytes > 0
  assert report.peak_bytes < V5E_HBM_BYTES, summary
  assert report.device_kind.startswith("TPU v5")
  # The executable is a real TPU program for all four chips.
  assert len(compiled.input_shardings[0]) > 0
  assert np.isfinite(report.flops) and report.flops > 0
