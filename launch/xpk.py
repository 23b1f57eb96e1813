r"""vbert_jax on GKE: the same run as `launch.tpu_vm run`, as an xpk workload (`pip install xpk`).

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

import os
import shlex
import subprocess
import sys
import types
from typing import Mapping, Sequence

from absl import flags

from launch import tpu_vm
from vbert_jax import cli

DEFAULT_BASE_IMAGE = "python:3.11"


LAUNCHER = "python -m launch.xpk"


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("cluster", None, "the GKE cluster xpk made; $XPK_CLUSTER", flag_values=fv)
  flags.DEFINE_string("workload", None, "the workload's name (lowercase, -)", flag_values=fv)
  flags.DEFINE_string("zone", None, "the cluster's zone; $TPU_ZONE", flag_values=fv)
  flags.DEFINE_string("project", None, "Cloud project (gcloud's default if unset); $TPU_PROJECT",
                      flag_values=fv)
  flags.DEFINE_string("accelerator_type", None, "e.g. v5litepod-16, v5p-32; $TPU_TYPE",
                      flag_values=fv)
  # A string, so that $TPU_NUM_SLICES and the flag are checked by the same parse_slices.
  flags.DEFINE_string("num_slices", None, "slices of that type (default 1); $TPU_NUM_SLICES",
                      flag_values=fv)
  flags.DEFINE_string("docker_image", "", "a prebuilt image holding the requirements (and "
                      "jax[tpu]); default: build on --base_docker_image", flag_values=fv)
  flags.DEFINE_string("base_docker_image", DEFAULT_BASE_IMAGE, "the image xpk adds this "
                      "repository to; the run installs the requirements at start",
                      flag_values=fv)
  flags.DEFINE_string("run_name", "vbert", "names the per-host logs", flag_values=fv)
  flags.DEFINE_string("module", tpu_vm.DEFAULT_MODULE, "python -m MODULE", flag_values=fv)
  flags.DEFINE_string("workdir", None, "passed as --workdir (gs://...); $WORKDIR",
                      flag_values=fv)
  flags.DEFINE_multi_string("env", [], "KEY=VALUE: an environment variable for every host "
                            "(repeatable)", flag_values=fv)
  flags.DEFINE_bool("dry_run", False, "print the command instead of running it", flag_values=fv)
  flags.mark_flag_as_required("workload", flag_values=fv)


def parse_args(argv: Sequence[str]) -> types.SimpleNamespace:
  """The launcher's flags, and the module's arguments (all after `--`, untouched) as
  `module_args`."""
  own, rest = tpu_vm.split_rest(argv, LAUNCHER)
  args = cli.parse(define_flags, own, __doc__)
  args.module_args = rest
  return args


def workload_command(args: types.SimpleNamespace, environ: Mapping[str, str]) -> list[str]:
  """The `xpk workload create` command that the parsed arguments stand for; runs nothing."""
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
  module_args = tpu_vm.module_args("xpk", args.module, args.module_args,
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


def plan(argv: Sequence[str], environ: Mapping[str, str]) -> list[str]:
  """The `xpk workload create` command that the arguments stand for; runs nothing."""
  return workload_command(parse_args(argv), environ)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    args = parse_args(argv)
    command = workload_command(args, os.environ if environ is None else environ)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.dry_run:
    print(shlex.join(command))
    return 0
  print(f"+ {shlex.join(command)}", file=sys.stderr, flush=True)
  return subprocess.run(command, check=False).returncode


if __name__ == "__main__":
  sys.exit(main())
