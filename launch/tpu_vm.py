r"""Cloud TPU VMs for vbert_jax: create, copy code, set up, run on all workers, logs, stop, delete.

Run from the repository root; every subcommand takes --dry_run, which prints the exact commands
(one per line, shell-quoted) instead of running them.

    python -m launch.tpu_vm create --tpu=vb --zone=us-central2-b --accelerator_type=v4-32
    python -m launch.tpu_vm setup  --tpu=vb --zone=us-central2-b
    python -m launch.tpu_vm run    --tpu=vb --zone=us-central2-b --workdir=gs://bucket/run1 -- \
        --config=configs/pretrain.py:variant=large
    python -m launch.tpu_vm logs   --tpu=vb --zone=us-central2-b --accelerator_type=v4-32 \
        --fetch=logs/
    python -m launch.tpu_vm delete --tpu=vb --zone=us-central2-b

Several slices (`--num_slices=2`) are one queued resource whose nodes are named <tpu>-0, <tpu>-1,
...; commands then go to every worker of every node. A queued `create` waits until the resource
is ACTIVE and fails on FAILED or SUSPENDED. For GKE, `python -m launch.xpk` starts the same run
as an xpk workload.

Flags fall back to environment variables (TPU_NAME, TPU_ZONE, TPU_PROJECT, TPU_TYPE, TPU_RUNTIME,
TPU_QUEUED, TPU_SPOT, TPU_NUM_SLICES, TPU_INTERNAL_IP, TPU_REMOTE_DIR, WORKDIR), so a shell can set
a TPU once and name it no more. On the workers, launch/run_tpu.sh does the work: one venv, stale
processes stopped, one log per worker, and VBERT_DISTRIBUTED=1 so that every process joins JAX's
distributed runtime (Cloud TPU VMs name the workers through their metadata server). A run that
fails to start on any worker is stopped on all of them. Commands on several workers need your
ssh key in an agent (`ssh-add ~/.ssh/google_compute_engine`).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tempfile
import time
import types
from typing import Mapping, Sequence

from absl import flags

from vbert_jax import cli

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_REMOTE_DIR = "~/vbert_jax"
DEFAULT_MODULE = "vbert_jax.main"
# Local files that never go to the workers: environments, caches, outputs of local runs.
TAR_EXCLUDES = (".git", ".venv", ".cache", ".pytest_cache", "__pycache__", "*.egg-info",
                "demo_work", "*.pyc")


# ---------------------------------------------------------------------------------------------
# Accelerator types.


@dataclasses.dataclass(frozen=True)
class Generation:
  """One TPU generation as Cloud TPU names its slices, e.g. `v4-32` or `v5litepod-16`."""
  name: str
  prefix: str
  sizes: tuple[int, ...]
  cores_per_chip: int  # the number in a v4/v5p type counts TensorCores (two per chip)
  chips_per_host: int  # hosts of a multi-host slice
  single_host_chips: int  # the largest slice served by one host
  runtime: str  # the runtime (software) version Cloud TPU documents for it

  def types(self) -> list[str]:
    return [f"{self.prefix}-{n}" for n in self.sizes]


GENERATIONS = (
    Generation("v4", "v4", (8, 16, 32, 64, 128, 256, 512, 1024, 1536, 2048, 4096), 2, 4, 4,
               "tpu-ubuntu2204-base"),
    Generation("v5e", "v5litepod", (1, 4, 8, 16, 32, 64, 128, 256), 1, 4, 8,
               "v2-alpha-tpuv5-lite"),
    Generation("v5p", "v5p", tuple(range(8, 12289, 8)), 2, 4, 4, "v2-alpha-tpuv5"),
    Generation("v6e", "v6e", (1, 4, 8, 16, 32, 64, 128, 256), 1, 4, 8, "v2-alpha-tpuv6e"),
)


@dataclasses.dataclass(frozen=True)
class Accelerator:
  type: str
  generation: Generation
  chips: int

  @property
  def workers(self) -> int:
    """Host VMs of the slice: each runs one process of the job."""
    if self.chips <= self.generation.single_host_chips:
      return 1
    return self.chips // self.generation.chips_per_host


def known_types() -> str:
  parts = []
  for g in GENERATIONS:
    if len(g.sizes) > 12:
      parts.append(f"{g.prefix}-{g.sizes[0]}..{g.prefix}-{g.sizes[-1]} (multiples of "
                   f"{g.sizes[0]})")
    else:
      parts.append(", ".join(g.types()))
  return "; ".join(parts)


def parse_accelerator(name: str) -> Accelerator:
  """`v4-32` -> 16 chips on 4 workers; an unknown type raises, listing the known ones."""
  prefix, _, size = name.strip().rpartition("-")
  for g in GENERATIONS:
    if prefix == g.prefix and size.isdigit() and int(size) in g.sizes:
      return Accelerator(name.strip(), g, int(size) // g.cores_per_chip)
  raise ValueError(f"unknown accelerator type {name!r}; known types: {known_types()}")


# ---------------------------------------------------------------------------------------------
# Settings: flags, else environment variables.

ENV = {"tpu": "TPU_NAME", "zone": "TPU_ZONE", "project": "TPU_PROJECT",
       "accelerator_type": "TPU_TYPE", "runtime_version": "TPU_RUNTIME", "queued": "TPU_QUEUED",
       "spot": "TPU_SPOT", "num_slices": "TPU_NUM_SLICES", "internal_ip": "TPU_INTERNAL_IP",
       "remote_dir": "TPU_REMOTE_DIR", "workdir": "WORKDIR"}


@dataclasses.dataclass(frozen=True)
class Settings:
  tpu: str
  zone: str
  project: str = ""
  accelerator: Accelerator | None = None
  runtime_version: str = ""
  queued: bool = False
  spot: bool = False
  remote_dir: str = DEFAULT_REMOTE_DIR
  num_slices: int = 1
  internal_ip: bool = False

  @property
  def multislice(self) -> bool:
    return self.num_slices > 1


def _truthy(value: str | None) -> bool:
  return (value or "").strip().lower() in ("1", "true", "yes", "on")


def settings_from(args: types.SimpleNamespace, environ: Mapping[str, str]) -> Settings:
  def get(key: str) -> str:
    value = getattr(args, key, None)
    return str(value) if value not in (None, "") else environ.get(ENV[key], "")

  missing = [f"--{k} (or ${ENV[k]})" for k in ("tpu", "zone") if not get(k)]
  if missing:
    raise ValueError(f"{args.command}: missing {' and '.join(missing)}")
  accel_type = get("accelerator_type")
  accelerator = parse_accelerator(accel_type) if accel_type else None
  if args.command == "create" and accelerator is None:
    raise ValueError(f"create: missing --accelerator_type (or ${ENV['accelerator_type']}); "
                     f"known types: {known_types()}")
  runtime = get("runtime_version") or (accelerator.generation.runtime if accelerator else "")
  queued = args.queued if args.queued is not None else _truthy(environ.get(ENV["queued"]))
  spot = args.spot if args.spot is not None else _truthy(environ.get(ENV["spot"]))
  num_slices = parse_slices(get("num_slices"))
  if num_slices > 1:
    if args.queued is False:
      raise ValueError(f"{args.command}: --num_slices={num_slices} is one queued resource of "
                       f"several slices; drop --noqueued")
    queued = True
  internal_ip = (args.internal_ip if args.internal_ip is not None
                 else _truthy(environ.get(ENV["internal_ip"])))
  return Settings(tpu=get("tpu"), zone=get("zone"), project=get("project"),
                  accelerator=accelerator, runtime_version=runtime, queued=queued, spot=spot,
                  remote_dir=get("remote_dir") or DEFAULT_REMOTE_DIR, num_slices=num_slices,
                  internal_ip=internal_ip)


def parse_slices(text: str) -> int:
  text = (text or "1").strip()
  if not text.isdigit() or int(text) < 1:
    raise ValueError(f"--num_slices={text}: expected a positive number of slices")
  return int(text)


# ---------------------------------------------------------------------------------------------
# The commands, as argument lists.

Command = list[str]


def remote_path(path: str) -> str:
  """A worker path for a remote shell: `~/` stays unquoted so that the worker expands it."""
  if path.startswith("~/"):
    return "~/" + shlex.quote(path[2:])
  return shlex.quote(path)


def _where(s: Settings) -> list[str]:
  return [f"--zone={s.zone}"] + ([f"--project={s.project}"] if s.project else [])


def tpu_vm(s: Settings, verb: str, *extra: str) -> Command:
  return ["gcloud", "compute", "tpus", "tpu-vm", verb, s.tpu, *_where(s), *extra]


def queued_resource(s: Settings, verb: str, *extra: str) -> Command:
  return ["gcloud", "compute", "tpus", "queued-resources", verb, s.tpu, *_where(s), *extra]


def _internal_ip(s: Settings) -> list[str]:
  return ["--internal-ip"] if s.internal_ip else []


def ssh(s: Settings, command: str, worker: str = "all", node: str = "all") -> Command:
  """`command` on a worker (or all) of the TPU VM, or of a node (or all) of a multi-slice one."""
  if s.multislice:
    return queued_resource(s, "ssh", f"--node={node}", f"--worker={worker}",
                           f"--command={command}", *_internal_ip(s))
  return tpu_vm(s, "ssh", f"--worker={worker}", f"--command={command}", *_internal_ip(s))


def scp(s: Settings, source: str, destination: str, worker: str = "all",
        node: str = "all") -> Command:
  group, nodes = ("queued-resources", [f"--node={node}"]) if s.multislice else ("tpu-vm", [])
  return ["gcloud", "compute", "tpus", group, "scp", source, destination, *nodes,
          f"--worker={worker}", *_where(s), *_internal_ip(s)]


def create_commands(s: Settings) -> list[Command]:
  assert s.accelerator is not None
  spot = ["--spot"] if s.spot else []
  if s.queued:
    # A queued resource waits for capacity; its node gets the same name as the request, its
    # nodes (one per slice) that name and their index.
    nodes = ([f"--node-count={s.num_slices}", f"--node-prefix={s.tpu}"] if s.multislice
             else [f"--node-id={s.tpu}"])
    return [queued_resource(s, "create", *nodes, f"--accelerator-type={s.accelerator.type}",
                            f"--runtime-version={s.runtime_version}", *spot),
            state_command(s)]
  return [tpu_vm(s, "create", f"--accelerator-type={s.accelerator.type}",
                 f"--version={s.runtime_version}", *spot)]


def state_command(s: Settings) -> Command:
  """Prints the queued resource's state: polled after `create` until it is ACTIVE."""
  return queued_resource(s, "describe", "--format=value(state.state)")


def tarball_path(s: Settings) -> str:
  return os.path.join(tempfile.gettempdir(), f"vbert_jax_{s.tpu}.tar.gz")


def copy_commands(s: Settings, repo: pathlib.Path = REPO) -> list[Command]:
  """Packs the working tree, sends it to every worker, and swaps it in for the old copy."""
  tarball = tarball_path(s)
  pack = (["tar", "-czf", tarball] + [f"--exclude={e}" for e in TAR_EXCLUDES]
          + ["-C", str(repo), "."])
  remote_tar = "~/vbert_jax_code.tar.gz"
  d = remote_path(s.remote_dir)
  # A fresh directory each time, so that files deleted here do not linger on the workers.
  unpack = (f"rm -rf {d}.new && mkdir -p {d}.new && tar -xzf {remote_tar} -C {d}.new && "
            f"rm -rf {d} && mv {d}.new {d} && rm -f {remote_tar}")
  return [pack, scp(s, tarball, f"{s.tpu}:{remote_tar}"), ssh(s, unpack)]


def setup_commands(s: Settings, repo: pathlib.Path = REPO) -> list[Command]:
  return copy_commands(s, repo) + [
      ssh(s, f"bash {remote_path(s.remote_dir)}/launch/run_tpu.sh setup")]


def run_line(run_name: str, module: str, args: Sequence[str], foreground: bool = False,
             env: Sequence[str] = ()) -> str:
  """The shell line that runs `python -m module args` through launch/run_tpu.sh."""
  mode = "run" if foreground else "start"
  prefix = ["env", *env] if env else []
  return shlex.join([*prefix, "bash", "launch/run_tpu.sh", mode, run_name, module, *args])


def run_commands(s: Settings, run_name: str, module: str, args: Sequence[str],
                 foreground: bool = False, env: Sequence[str] = ()) -> list[Command]:
  """Stops stale processes and starts `python -m module args` on all workers at once."""
  line = run_line(run_name, module, args, foreground, env)
  return [ssh(s, f"cd {remote_path(s.remote_dir)} && {line}")]


def stop_commands(s: Settings) -> list[Command]:
  return [ssh(s, f"bash {remote_path(s.remote_dir)}/launch/run_tpu.sh stop")]


# Each line of a worker's log, labelled with the worker (its host name carries its index).
_LABEL = 'sed -u "s/^/[$(hostname)] /"'


def logs_commands(s: Settings, run_name: str, worker: str, lines: int, follow: bool,
                  fetch: str) -> list[Command]:
  pattern = f"~/logs/{shlex.quote(run_name)}_*.log"
  if fetch:
    return fetch_commands(s, pattern, worker, fetch)
  if follow:
    return [ssh(s, f"tail -n {lines} -F {pattern} | {_LABEL}", worker)]
  return [ssh(s, f'for f in {pattern}; do tail -n {lines} "$f" | {_LABEL}; done', worker)]


def fetch_commands(s: Settings, pattern: str, worker: str, destination: str) -> list[Command]:
  """gcloud copies to this machine from one worker at a time: one scp per worker and node."""
  if worker == "all" and s.accelerator is None:
    raise ValueError("logs --fetch: gcloud copies from one worker at a time; pass "
                     "--accelerator_type (or $TPU_TYPE) to fetch from every worker, or --worker=N")
  workers = [worker] if worker != "all" else [str(w) for w in range(s.accelerator.workers)]
  nodes = [str(n) for n in range(s.num_slices)]
  return [scp(s, f"{s.tpu}:{pattern}", destination, worker=w, node=n)
          for n in nodes for w in workers]


def delete_commands(s: Settings) -> list[Command]:
  if s.queued:
    return [queued_resource(s, "delete", "--force", "--quiet")]
  return [tpu_vm(s, "delete", "--quiet")]


def status_commands(s: Settings) -> list[Command]:
  return [queued_resource(s, "describe") if s.queued else tpu_vm(s, "describe")]


# ---------------------------------------------------------------------------------------------
# Command line.


LAUNCHER = "python -m launch.tpu_vm"

SUBCOMMANDS = {
    "create": "create the TPU VM or queued resource",
    "copy": "copy the working tree to every worker",
    "setup": "copy the code and set up the venv on every worker (idempotent)",
    "run": "stop stale processes, then run on all workers; the module's arguments after --",
    "logs": "tail or fetch the per-worker logs of a run",
    "stop": "stop whatever holds the TPU on every worker",
    "delete": "delete the TPU VM or queued resource",
    "status": "describe the TPU VM or queued resource",
}

# The flags that only some subcommands take, and those subcommands; every other flag is shared.
OWN_FLAGS = {
    "run_name": ("run", "logs"), "module": ("run",), "workdir": ("run",),
    "foreground": ("run",), "env": ("run",), "wait": ("create",), "poll_s": ("create",),
    "worker": ("logs",), "lines": ("logs",), "follow": ("logs",), "fetch": ("logs",),
}

HELP = (__doc__ + "\nSubcommands (the first argument):\n"
        + "".join(f"  {name:<8}{text}\n" for name, text in SUBCOMMANDS.items())
        + "\nA flag marked [run], [logs] or [create] is taken by those subcommands only.\n")


def _own(name: str, text: str) -> str:
  return f"[{', '.join(OWN_FLAGS[name])}] {text}"


def define_flags(fv: flags.FlagValues) -> None:
  """The shared flags, then those of each subcommand (see OWN_FLAGS)."""
  flags.DEFINE_string("tpu", None, "TPU VM (or queued resource) name; $TPU_NAME", flag_values=fv)
  flags.DEFINE_string("zone", None, "zone, e.g. us-central2-b; $TPU_ZONE", flag_values=fv)
  flags.DEFINE_string("project", None, "Cloud project (gcloud's default if unset); $TPU_PROJECT",
                      flag_values=fv)
  flags.DEFINE_string("accelerator_type", None, "e.g. v4-32, v5litepod-16, v5p-16; $TPU_TYPE",
                      flag_values=fv)
  flags.DEFINE_string("runtime_version", None, "TPU software version (default: the "
                      "generation's); $TPU_RUNTIME", flag_values=fv)
  # Unset (None) defers to the environment; --noqueued etc. override it.
  flags.DEFINE_bool("queued", None, "use a queued resource rather than a plain TPU VM; "
                    "$TPU_QUEUED=1", flag_values=fv)
  flags.DEFINE_bool("spot", None, "spot capacity; $TPU_SPOT=1", flag_values=fv)
  # A string, so that $TPU_NUM_SLICES and the flag are checked by the same parse_slices.
  flags.DEFINE_string("num_slices", None, "slices joined over the data-center network: one "
                      "queued resource whose nodes are <tpu>-0, <tpu>-1, ... (default 1); "
                      "$TPU_NUM_SLICES", flag_values=fv)
  flags.DEFINE_bool("internal_ip", None, "reach the workers on their internal IPs (from a VM in "
                    "the same network); $TPU_INTERNAL_IP=1", flag_values=fv)
  flags.DEFINE_string("remote_dir", None, f"code directory on the workers (default "
                      f"{DEFAULT_REMOTE_DIR}); $TPU_REMOTE_DIR", flag_values=fv)
  flags.DEFINE_bool("dry_run", False, "print the commands, one per line, instead of running "
                    "them", flag_values=fv)

  flags.DEFINE_string("run_name", "vbert", _own("run_name", "names the logs: "
                      "~/logs/RUN_NAME_<hostname>.log"), flag_values=fv)
  flags.DEFINE_string("module", DEFAULT_MODULE, _own("module", "python -m MODULE"),
                      flag_values=fv)
  flags.DEFINE_string("workdir", None, _own("workdir", "passed as --workdir (gs://... on a "
                      "pod); $WORKDIR"), flag_values=fv)
  flags.DEFINE_bool("foreground", False, _own("foreground", "wait for the run to end, streaming "
                    "worker output"), flag_values=fv)
  flags.DEFINE_multi_string("env", [], _own("env", "KEY=VALUE: an environment variable for the "
                            "run on every worker (repeatable), e.g. LIBTPU_INIT_ARGS=... or "
                            "XLA_FLAGS=..."), flag_values=fv)
  flags.DEFINE_bool("wait", True, _own("wait", "after a queued create, wait until the resource "
                    "is ACTIVE"), flag_values=fv)
  flags.DEFINE_float("poll_s", 30.0, _own("poll_s", "seconds between two looks at a queued "
                     "resource's state"), flag_values=fv)
  flags.DEFINE_string("worker", "all", _own("worker", "worker index, or all"), flag_values=fv)
  flags.DEFINE_integer("lines", 100, _own("lines", "lines of each log to show"), flag_values=fv)
  flags.DEFINE_bool("follow", False, _own("follow", "keep showing lines as they are written"),
                    flag_values=fv)
  flags.DEFINE_string("fetch", "", _own("fetch", "local directory to copy the logs into"),
                      flag_values=fv)


def parse_args(argv: Sequence[str]) -> types.SimpleNamespace:
  """The flags of the launcher's own arguments (those before any `--`), with the subcommand as
  `command`; a missing or unknown subcommand, a stray argument or a flag of another subcommand
  is one line on stderr and exit status 2."""
  registry = []

  def define(fv: flags.FlagValues) -> None:
    define_flags(fv)
    registry.append(fv)  # kept to see which flags the command line set

  args = cli.parse(define, argv, HELP, positional="command")
  choices = ", ".join(SUBCOMMANDS)
  if not args.command:
    cli.usage_error(f"{LAUNCHER}: missing the subcommand, one of {choices}")
  command, *extra = args.command
  if command not in SUBCOMMANDS:
    cli.usage_error(f"{LAUNCHER}: unknown subcommand {command!r}; choose one of {choices}")
  if extra:
    after = "; the module's arguments go after --" if command == "run" else ""
    cli.usage_error(f"{command}: unexpected arguments {extra}{after}")
  fv = registry[0]
  for name, takers in OWN_FLAGS.items():
    if fv[name].present and command not in takers:
      cli.usage_error(f"{command}: takes no --{name} (a flag of {' and '.join(takers)})")
  args.command = command
  return args


def module_args(command: str, module: str, rest: Sequence[str], workdir: str,
                workers: int) -> list[str]:
  """The module's arguments, with the workdir passed through; checked before anything runs."""
  out = list(rest)
  given = [a for a in out if a.startswith("--workdir=") or a == "--workdir"]
  if workdir and not given:
    out.append(f"--workdir={workdir}")
    given = [workdir]
  if module == DEFAULT_MODULE:
    if not given:
      raise ValueError(f"{command}: missing --workdir (or $WORKDIR): where checkpoints and "
                       f"metrics go")
    if not any(a.startswith("--config") for a in out):
      raise ValueError(f"{command}: give the config after --, e.g. -- "
                       f"--config=configs/pretrain.py:variant=large")
  if workdir and workers > 1 and "://" not in workdir:
    raise ValueError(f"{command}: --workdir={workdir} is local to each worker, but the run has "
                     f"{workers} workers that must share it; use gs://bucket/path")
  return out


_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_env(items: Sequence[str]) -> list[str]:
  """KEY=VALUE items for the workers' environment; a malformed one raises, naming it."""
  for item in items:
    key, eq, _ = item.partition("=")
    if not eq or not _ENV_KEY.match(key):
      raise ValueError(f"--env {item!r}: expected KEY=VALUE with a shell variable name as KEY")
  return list(items)


def _total_workers(s: Settings) -> int:
  return s.accelerator.workers * s.num_slices if s.accelerator else s.num_slices


def split_rest(argv: Sequence[str], launcher: str) -> tuple[list[str], list[str]]:
  """(the launcher's arguments, the module's after `--`); --dry_run after `--` is refused, so
  that a dry run is never run by mistake."""
  argv = list(argv)
  if "--" not in argv:
    return argv, []
  cut = argv.index("--")
  if "--dry_run" in argv[cut + 1:]:
    raise ValueError(f"{launcher}: --dry_run comes after --, where the module's arguments go; "
                     f"put it before --")
  return argv[:cut], argv[cut + 1:]


def plan(argv: Sequence[str], environ: Mapping[str, str] | None = None
         ) -> tuple[types.SimpleNamespace, Settings, list[Command]]:
  """Parses the command line and returns the commands it stands for; runs nothing."""
  environ = os.environ if environ is None else environ
  own, rest = split_rest(argv, LAUNCHER)
  args = parse_args(own)
  if rest and args.command != "run":
    raise ValueError(f"{args.command}: takes no arguments after --, got {rest}")
  s = settings_from(args, environ)
  if args.command == "create":
    cmds = create_commands(s)
  elif args.command == "copy":
    cmds = copy_commands(s)
  elif args.command == "setup":
    cmds = setup_commands(s)
  elif args.command == "run":
    workdir = args.workdir or environ.get(ENV["workdir"], "")
    cmds = run_commands(s, args.run_name, args.module,
                        module_args("run", args.module, rest, workdir, _total_workers(s)),
                        args.foreground, parse_env(args.env))
  elif args.command == "logs":
    if args.worker != "all" and s.accelerator and not (
        args.worker.isdigit() and int(args.worker) < s.accelerator.workers):
      raise ValueError(f"logs: --worker={args.worker}; {s.accelerator.type} has workers 0.."
                       f"{s.accelerator.workers - 1}")
    cmds = logs_commands(s, args.run_name, args.worker, args.lines, args.follow, args.fetch)
  elif args.command == "stop":
    cmds = stop_commands(s)
  elif args.command == "delete":
    cmds = delete_commands(s)
  else:
    cmds = status_commands(s)
  return args, s, cmds


def execute(commands: Sequence[Command]) -> None:
  for cmd in commands:
    print(f"+ {shlex.join(cmd)}", file=sys.stderr, flush=True)
    code = subprocess.run(cmd, check=False).returncode
    if code:
      raise SystemExit(f"command failed with exit status {code}: {shlex.join(cmd)}")


# States of a queued resource that will not become ACTIVE by waiting.
FAILED_STATES = ("FAILED", "SUSPENDING", "SUSPENDED")


def wait_until_active(s: Settings, poll_s: float) -> None:
  """Polls the queued resource until ACTIVE; a failed or suspended one stops the launcher."""
  cmd = state_command(s)
  print(f"+ {shlex.join(cmd)} (until ACTIVE, every {poll_s:g} s)", file=sys.stderr, flush=True)
  while True:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    state = proc.stdout.strip()
    if proc.returncode:
      raise SystemExit(f"cannot read the state of queued resource {s.tpu}: "
                       f"{proc.stderr.strip()}")
    if state == "ACTIVE":
      print(f"queued resource {s.tpu} is ACTIVE", file=sys.stderr, flush=True)
      return
    if state in FAILED_STATES:
      raise SystemExit(f"queued resource {s.tpu} is {state}: it will not start; see "
                       f"`python -m launch.tpu_vm status` for the reason, then delete it")
    print(f"queued resource {s.tpu}: {state or 'no state yet'}", file=sys.stderr, flush=True)
    time.sleep(poll_s)


def start_or_stop(s: Settings, commands: Sequence[Command]) -> None:
  """Runs the start; if it fails on any worker, stops the run on all rather than leave the
  others waiting for it at their first barrier."""
  try:
    execute(commands)
  except SystemExit as e:
    print(f"error: the run failed on a worker ({e}); stopping it on every worker",
          file=sys.stderr, flush=True)
    for cmd in stop_commands(s):
      print(f"+ {shlex.join(cmd)}", file=sys.stderr, flush=True)
      subprocess.run(cmd, check=False)
    raise SystemExit(1) from e


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    args, s, commands = plan(argv, environ)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if s.accelerator:
    a = s.accelerator
    slices = f" x {s.num_slices} slices" if s.multislice else ""
    print(f"# {a.type}{slices}: {a.chips} chips on {a.workers} worker(s)"
          f"{' per slice' if s.multislice else ''}", file=sys.stderr)
  if args.dry_run:
    for cmd in commands:
      print(shlex.join(cmd))
    return 0
  if args.command == "logs" and args.fetch:
    os.makedirs(args.fetch, exist_ok=True)
  if args.command == "create" and s.queued:
    execute(commands[:-1])  # the last one reads the state, polled here
    if args.wait:
      wait_until_active(s, args.poll_s)
    return 0
  if args.command == "run":
    start_or_stop(s, commands)
    return 0
  execute(commands)
  return 0


if __name__ == "__main__":
  sys.exit(main())
