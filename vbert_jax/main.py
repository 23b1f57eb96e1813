"""Pretraining entry point.

    python -m vbert_jax.main --config=configs/pretrain.py:variant=tiny,runlocal --workdir=DIR
    python -m vbert_jax.main --config=configs/pretrain.py:variant=large --workdir=gs://b/run \
        --config.input.tfds_name=videobert/bert --config.input.data_dir=gs://b/tfds

Run the same command on every worker of a TPU pod (launch/tpu_vm.py does): with
VBERT_DISTRIBUTED=1 the processes find each other through the TPU environment. Elsewhere, several processes join when given a coordinator, by flags
(--coordinator_address=host:port --num_processes=N --process_id=i) or by the environment
(JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID). A run resumes by itself from the
newest checkpoint in its workdir.
"""

from __future__ import annotations

from absl import app
from absl import logging

from vbert_jax import console
from vbert_jax import entry
from vbert_jax import pretrain as pretrain_lib


def main(argv: list[str]) -> None:
  console.setup()
  config, workdir = entry.check_args(argv, "configs/pretrain.py:variant=tiny")
  entry.initialize_distributed()
  result = pretrain_lib.train_and_evaluate(config, workdir)
  state = "preempted" if result.preempted else "finished"
  logging.info("%s at step %d", state, result.step)


if __name__ == "__main__":
  app.run(main, flags_parser=entry.parse_flags)
