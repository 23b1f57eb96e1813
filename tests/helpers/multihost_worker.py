"""One process of a multi-host pretraining run on CPU, for tests/test_multihost.py.

Runs `pretrain_lib.train_and_evaluate` on the TFDS records the test built, over a mesh whose devices are
listed in a given order of processes (as a TPU topology interleaves hosts), and writes, step by
step, which example of the global stream each of its rows got. Flags:

    --process_id, --num_processes, --coordinator   joining (1 process: none)
    --order=0,1,1,0,0,1,0,1   the process of each mesh position, in mesh order
    --mesh=data=8             mesh sizes
    --fail_read=STEP          test hook: this process cannot read checkpoint STEP
    --override=KEY=VALUE      config overrides (repeatable)
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys

import jax

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from helpers import pretrain_runs  # noqa: E402  pylint: disable=g-import-not-at-top


def _parse(argv):
  p = argparse.ArgumentParser()
  p.add_argument("--workdir", required=True)
  p.add_argument("--data_dir", required=True)
  p.add_argument("--dataset", required=True)
  p.add_argument("--process_id", type=int, default=0)
  p.add_argument("--num_processes", type=int, default=1)
  p.add_argument("--coordinator", default="")
  p.add_argument("--order", default="")
  p.add_argument("--mesh", default="data=8")
  p.add_argument("--fail_read", type=int, default=0)
  p.add_argument("--override", action="append", default=[])
  return p.parse_args(argv)


def _config(args):
  from helpers.configs import pretrain  # pylint: disable=g-import-not-at-top
  config = pretrain.get_config("variant=mu,runlocal")
  overrides = dict(pretrain_runs.OVERRIDES)
  overrides.update({"batch_size": 32, "input.source": "tfds", "input.tfds_name": args.dataset,
                    "input.data_dir": args.data_dir, "input.worker_count": 0})
  overrides.update(dict(item.split("=", 1) for item in args.override))
  for item in args.mesh.split(","):
    axis, size = item.split("=")
    overrides[f"mesh.{axis}"] = size
  with config.unlocked():
    for key, value in overrides.items():
      node = config
      *parents, leaf = key.split(".")
      for part in parents:
        node = node[part]
      node[leaf] = type(node[leaf])(value) if not isinstance(node[leaf], str) else str(value)
  return config


def _devices_in_order(order: str):
  """The global devices arranged so that mesh position i belongs to process order[i]."""
  if not order:
    return jax.devices()
  pools = {}
  for d in jax.devices():
    pools.setdefault(d.process_index, []).append(d)
  return [pools[int(p)].pop(0) for p in order.split(",")]


class RecordingSource:
  """Wraps this process's pipeline: strips the debug fields, logs each row's stream element."""

  def __init__(self, inner, rows, path: pathlib.Path, split: str):
    self.inner, self.rows, self.path, self.split = inner, rows, path, split

  def __next__(self):
    batch = next(self.inner)
    debug = {k: batch.pop(k) for k in list(batch) if k.startswith("debug_")}
    record = {"split": self.split, "position": int(self.inner.get_state()["position"]),
              "rows": [int(r) for r in self.rows],
              "elements": debug["debug_index"].tolist()}
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    return batch

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)

  def close(self):
    self.inner.close()


def main(argv):
  args = _parse(argv)
  if args.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id)
  from vbert_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from vbert_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from vbert_jax import sharding  # pylint: disable=g-import-not-at-top
  from vbert_jax import pretrain as pretrain_lib  # pylint: disable=g-import-not-at-top

  config = _config(args)
  workdir = pathlib.Path(args.workdir)
  ids_path = workdir.parent / f"{workdir.name}.rows.process{jax.process_index()}.jsonl"
  made = pretrain_lib.make_source

  def recording_source(config, split, batch_size, mesh):
    source = made(config, split, batch_size, mesh)
    rows = sharding.process_rows(batch_size, mesh, sharding.make_rules(config.sharding_rules))
    return RecordingSource(source, rows, ids_path, split)

  pretrain_lib.make_source = recording_source
  input_pipeline.create_iterator = functools.partial(input_pipeline.create_iterator, debug=True)
  if args.fail_read:
    read = checkpoints.CheckpointManager._read_step  # pylint: disable=protected-access

    def failing_read(self, step, target):
      if step == args.fail_read:
        raise ValueError(f"injected fault: checkpoint {step} does not parse on this process")
      return read(self, step, target)
    checkpoints.CheckpointManager._read_step = failing_read  # pylint: disable=protected-access

  mesh = sharding.make_mesh(config.mesh, _devices_in_order(args.order))
  result = pretrain_lib.train_and_evaluate(config, workdir, mesh)
  print(f"finished at step {result.step}", flush=True)


if __name__ == "__main__":
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO)
  main(sys.argv[1:])
