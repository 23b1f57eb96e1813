"""vbert_jax on GKE: the same run as `launch.tpu_vm run`, as an xpk workload (`pip install xpk`).

xpk builds a container from --base_docker_image with this repository in it (--script_dir), or runs
a prebuilt --docker_image that already holds the requirements, and starts the command on every
host of every slice. The command runs launch/run_tpu.sh, as on TPU VMs: one log per host and
VBERT_DISTRIBUTED=1, so that the processes join JAX's distributed runtime (GKE names the hosts and
slices in the environment).

    python -m launch.xpk --cluster=vb-cluster --workload=vb-base --zone=us-west4-a \
        --accelerator_type=v5litepod-16 --num_slices=2 --workdir=gs://bucket/run1 -- \
        --config=configs/pretrain.py:variant=base

--dry_run prints the xpk command (shell-quoted) instead of running it. Flags fall back to the
environment variables of launch.tpu_vm (TPU_ZONE, TPU_PROJECT, TPU_TYPE, TPU_NUM_SLICES, WORKDIR)
and XPK_CLUSTER.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from typing import Mapping, Sequence

from launch import tpu_vm

DEFAULT_BASE_IMAGE = "python:3.11"


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m launch.xpk", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--cluster", help="the GKE cluster xpk made; $XPK_CLUSTER")
  p.add_argument("--workload", required=True, help="the workload's name (lowercase, -)")
  p.add_argument("--zone", help="the cluster's zone; $TPU_ZONE")
  p.add_argument("--project", help="Cloud project (gcloud's default if unset); $TPU_PROJECT")
  p.add_argument("--accelerator_type", help="e.g. v5litepod-16, v5p-32; $TPU_TYPE")
  p.add_argument("--num_slices", help="slices of that type (default 1); $TPU_NUM_SLICES")
  p.add_argument("--docker_image", default="", help="a prebuilt image holding the "
                 "requirements (and jax[tpu]); default: build on --base_docker_image")
  p.add_argument("--base_docker_image", default=DEFAULT_BASE_IMAGE,
                 help="the image xpk adds this repository to; the run installs the "
                 "requirements at start")
  p.add_argument("--run_name", default="vbert", help="names the per-host logs")
  p.add_argument("--module", default=tpu_vm.DEFAULT_MODULE, help="python -m MODULE")
  p.add_argument("--workdir", help="passed as --workdir (gs://...); $WORKDIR")
  p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                 help="an environment variable for every host (repeatable)")
  p.add_argument("--dry_run", action="store_true", help="print the command instead of "
                 "running it")
  return p


def plan(argv: Sequence[str], environ: Mapping[str, str]) -> list[str]:
  """The `xpk workload create` command that the arguments stand for; runs nothing."""
  own, rest = tpu_vm.split_rest(argv, "python -m launch.xpk")
  args = build_parser().parse_args(own)
  get = lambda flag, env: getattr(args, flag) or environ.get(env, "")  # noqa: E731
  cluster, zone = get("cluster", "XPK_CLUSTER"), get("zone", tpu_vm.ENV["zone"])
  accel_type = get("accelerator_type", tpu_vm.ENV["accelerator_type"])
  missing = [name for name, value in (("--cluster (or $XPK_CLUSTER)", cluster),
                                      ("--zone (or $TPU_ZONE)", zone),
                                      ("--accelerator_type (or $TPU_TYPE)", accel_type))
             if not value]
  if missing:
    raise ValueError(f"xpk: missing {' and '.join(missing)}")
  accelerator = tpu_vm.parse_accelerator(accel_type)
  slices = tpu_vm.parse_slices(get("num_slices", tpu_vm.ENV["num_slices"]))
  module_args = tpu_vm.module_args("xpk", args.module, rest,
                                   get("workdir", tpu_vm.ENV["workdir"]),
                                   accelerator.workers * slices)
  line = tpu_vm.run_line(args.run_name, args.module, module_args, foreground=True)
  if args.docker_image:
    image = [f"--docker-image={args.docker_image}"]
  else:
    image = [f"--base-docker-image={args.base_docker_image}", f"--script-dir={tpu_vm.REPO}"]
    line = f"bash launch/run_tpu.sh setup && {line}"
  project = get("project", tpu_vm.ENV["project"])
  env = ["VBERT_DISTRIBUTED=1", *tpu_vm.parse_env(args.env)]
  return ["xpk", "workload", "create", f"--cluster={cluster}", f"--workload={args.workload}",
          f"--tpu-type={accelerator.type}", f"--num-slices={slices}", f"--zone={zone}",
          *([f"--project={project}"] if project else []), *image,
          *[f"--env={e}" for e in env], f"--command={line}"]


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    command = plan(argv, os.environ if environ is None else environ)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if "--dry_run" in tpu_vm.split_rest(argv, "python -m launch.xpk")[0]:
    print(shlex.join(command))
    return 0
  print(f"+ {shlex.join(command)}", file=sys.stderr, flush=True)
  return subprocess.run(command, check=False).returncode


if __name__ == "__main__":
  sys.exit(main())
