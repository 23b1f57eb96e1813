"""Hyperparameter sweeps: override sets expanded into runs, run, and their final metrics tabled.

A sweep file is a Python module with `get_sweep()` (or `get_sweep(h)` / `sweep(h)`, where `h` is
this module, in the big_vision style) returning override sets built with the helpers below, and
optionally `CONFIG`, the config the runs start from:

    CONFIG = "configs/pretrain.py:variant=mu,runlocal"

    def get_sweep(h):
      return h.product(h.sweep("optimizer.learning_rate", [1e-3, 3e-3]),
                       h.zipit(h.sweep("loss.beta", [1.0, 0.5]), h.sweep("loss.gamma", [1.0, 0.5])))

    python -m vbert_jax.sweep --sweep=configs/sweeps/mu_lr_loss.py --workdir=runs/lr_loss \
        -- --config.total_steps=200

Each run gets a readable workdir named by its settings (`optimizer.learning_rate=0.001,
loss.beta=0.5,loss.gamma=0.5`) under --workdir. The runs go one after another as local processes
(`python -m vbert_jax.main`), or each to the TPU launcher (`--launcher=tpu`, through
`python -m launch.tpu_vm run --foreground`). At the end, the last train (and eval) record of every
run's metrics.jsonl lands in one CSV (WORKDIR/results.csv) and a printed table. Every key is
checked against the config before anything starts; an unknown one is an error that names it.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import difflib
import inspect
import io
import itertools
import json
import os
import posixpath
import re
import shlex
import subprocess
import sys
import time
import types
from typing import Any, Iterable, Mapping, Sequence

from absl import flags
import ml_collections
from etils import epath

from vbert_jax import cli
from vbert_jax import console
from vbert_jax import config_lib

Overrides = dict[str, Any]
TABLE_METRICS = ("loss", "mlm_loss", "mvm_loss", "lva_loss")


# ---------------------------------------------------------------------------------------------
# Helpers that sweep files use.


def _key(key: str) -> str:
  return key[len("config."):] if key.startswith("config.") else key


def sweep(key: str, values: Iterable[Any]) -> list[Overrides]:
  """One axis: `key` takes each of `values` in turn."""
  values = list(values)
  if not values:
    raise ValueError(f"sweep({key!r}, ...): no values")
  return [{_key(key): v} for v in values]


def fixed(key: str, value: Any) -> list[Overrides]:
  """`key` set to one value in every run (combine with product)."""
  return [{_key(key): value}]


def _merge(parts: Sequence[Mapping[str, Any]], how: str) -> Overrides:
  out: Overrides = {}
  for part in parts:
    twice = sorted(set(out) & set(part))
    if twice:
      raise ValueError(f"{how}: key {twice[0]!r} is set by more than one of its parts")
    out.update(part)
  return out


def product(*sweeps: Sequence[Overrides]) -> list[Overrides]:
  """Every combination, the last axis varying fastest."""
  return [_merge(combo, "product") for combo in itertools.product(*sweeps)]


def zipit(*sweeps: Sequence[Overrides]) -> list[Overrides]:
  """Settings taken together, position by position; the parts must have equal lengths."""
  lengths = [len(s) for s in sweeps]
  if len(set(lengths)) > 1:
    raise ValueError(f"zipit: its parts have different lengths {lengths}")
  return [_merge(parts, "zipit") for parts in zip(*sweeps)]


def chainit(*sweeps: Sequence[Overrides]) -> list[Overrides]:
  """One list of runs after another."""
  return [dict(o) for s in sweeps for o in s]


# ---------------------------------------------------------------------------------------------
# Loading and checking.


def load_sweep(path: str) -> tuple[list[Overrides], str | None]:
  """The override sets of a sweep file, and its CONFIG if it names one."""
  module = config_lib.load_module(path, "sweep")
  fn = getattr(module, "get_sweep", None) or getattr(module, "sweep", None)
  if not callable(fn):
    raise ValueError(f"sweep file {path}: defines neither get_sweep() nor sweep(h)")
  this = sys.modules[__name__]
  runs = fn(this) if inspect.signature(fn).parameters else fn()
  runs = list(runs)
  if not runs:
    raise ValueError(f"sweep file {path}: the sweep is empty")
  for i, run in enumerate(runs):
    if not isinstance(run, Mapping):
      raise ValueError(f"sweep file {path}: run {i} is {run!r}; expected a dict of overrides")
  return [{_key(k): v for k, v in run.items()} for run in runs], getattr(module, "CONFIG", None)


def check_key(config: ml_collections.ConfigDict, key: str, value: Any, where: str) -> None:
  """Sets `key` on a copy of `config` as the run would; an unknown key or a bad type raises."""
  node = config
  parts = key.split(".")
  for depth, part in enumerate(parts):
    fields = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
    if part not in fields:
      prefix = ".".join(parts[:depth])
      near = difflib.get_close_matches(part, fields, n=3)
      hint = f"; did you mean {', '.join(repr('.'.join(parts[:depth] + [n])) for n in near)}" \
          if near else ""
      raise KeyError(f"{where}: the config has no key {key!r} (no {part!r} in "
                     f"{'config.' + prefix if prefix else 'config'}){hint}")
    if depth < len(parts) - 1:
      node = node[part]
  try:
    node[parts[-1]] = value
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where}: {key}={value!r} does not fit the config ({e})") from e


def check_runs(config: ml_collections.ConfigDict, runs: Sequence[Overrides], where: str) -> None:
  for i, run in enumerate(runs):
    trial = copy.deepcopy(config)
    for key, value in run.items():
      check_key(trial, key, value, f"{where}, run {i}")


# ---------------------------------------------------------------------------------------------
# Runs: names and command lines.


def _value_text(value: Any, exact: bool = False) -> str:
  if isinstance(value, bool):
    return str(value)
  if isinstance(value, float):
    return repr(value) if exact else f"{value:g}"
  return str(value)


def _safe(text: str) -> str:
  """Keeps a workdir name to one path component that shells and gcloud take as it is."""
  return re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)


def run_names(runs: Sequence[Overrides]) -> list[str]:
  """Distinct names from the settings that vary between runs, e.g. `loss.beta=0.5,...`."""
  keys = list(dict.fromkeys(k for run in runs for k in run))
  varying = [k for k in keys if len({repr(run.get(k)) for run in runs}) > 1]
  for exact in (False, True):
    names = [",".join(_safe(f"{k}={_value_text(run.get(k), exact)}") for k in varying
                      if k in run) or "run" for run in runs]
    if len(set(names)) == len(names):
      return names
  dup = next(n for n in names if names.count(n) > 1)
  first = names.index(dup)
  raise ValueError(f"runs {first} and {names.index(dup, first + 1)} have the same settings "
                   f"({dup}); a sweep must not repeat a run")


@dataclasses.dataclass
class Run:
  name: str
  overrides: Overrides
  workdir: str
  command: list[str]
  status: str = "not run"
  seconds: float = 0.0


def join(root: str, name: str) -> str:
  return posixpath.join(root, name) if "://" in root else os.path.join(root, name)


def _flag(key: str, value: Any) -> str:
  return f"--config.{key}={_value_text(value, exact=True)}"


def plan_runs(config_spec: str, runs: Sequence[Overrides], root: str,
              extra: Sequence[str] = (), launcher: str = "local",
              tpu_flags: Sequence[str] = (), dry_run: bool = False) -> list[Run]:
  """The runs of a sweep with their workdirs and exact command lines."""
  out = []
  for name, overrides in zip(run_names(runs), runs):
    workdir = join(root, name)
    args = [f"--config={config_spec}", *[_flag(k, v) for k, v in overrides.items()], *extra]
    if launcher == "local":
      cmd = [sys.executable, "-m", "vbert_jax.main", f"--workdir={workdir}", *args]
    elif launcher == "tpu":
      cmd = [sys.executable, "-m", "launch.tpu_vm", "run", "--foreground",
             f"--run_name={name}", *tpu_flags, *(["--dry_run"] if dry_run else []),
             f"--workdir={workdir}", "--", *args]
    else:
      raise ValueError(f"--launcher={launcher!r}: expected 'local' or 'tpu'")
    out.append(Run(name, dict(overrides), workdir, cmd))
  return out


def execute(runs: Sequence[Run], log_dir: str | None, environ: Mapping[str, str] | None = None,
            out: Any = None, dry_run: bool = False) -> None:
  """Runs one after another; a failed run is recorded and the next one starts."""
  out = out or sys.stdout
  environ = dict(os.environ if environ is None else environ, PYTHONUNBUFFERED="1")
  for i, run in enumerate(runs):
    print(f"[{i + 1}/{len(runs)}] {run.name}", file=out, flush=True)
    print(f"  {shlex.join(run.command)}", file=out, flush=True)
    start = time.monotonic()
    if log_dir:
      with open(os.path.join(log_dir, f"{run.name}.log"), "w") as log:
        code = subprocess.run(run.command, stdout=log, stderr=subprocess.STDOUT,
                              env=environ, check=False).returncode
    else:
      code = subprocess.run(run.command, env=environ, check=False).returncode
    run.seconds = time.monotonic() - start
    run.status = "ok" if code == 0 else f"failed (exit {code})"
    if dry_run:
      run.status = "dry run" if code == 0 else f"dry run failed (exit {code})"
    print(f"  {run.status} in {run.seconds:.1f} s", file=out, flush=True)


# ---------------------------------------------------------------------------------------------
# Results.


def final_records(workdir: str) -> tuple[dict[str, float], dict[str, float]]:
  """The last train and eval records of a run's metrics.jsonl ({} where there are none)."""
  path = epath.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return {}, {}
  last: dict[str, dict[str, float]] = {"train": {}, "eval": {}}
  for line in path.read_text().splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:  # a line cut short by a killed run
      continue
    kind = row.get("kind")
    if kind in last and row.get("step", -1) >= last[kind].get("step", -1):
      last[kind] = row
  return last["train"], last["eval"]


def collect(runs: Sequence[Run]) -> tuple[list[str], list[dict[str, Any]]]:
  """One row per run: its settings, status, and final metrics (eval ones prefixed `eval_`)."""
  keys = list(dict.fromkeys(k for run in runs for k in run.overrides))
  rows, metrics = [], []
  for run in runs:
    train_row, eval_row = final_records(run.workdir)
    row: dict[str, Any] = {"run": run.name, **{k: run.overrides.get(k, "") for k in keys}}
    status = run.status
    if not train_row and status in ("ok", "not run"):
      status = "no metrics"
    elif status == "not run":
      status = "found"
    row["status"] = status
    row["step"] = train_row.get("step", "")
    values = {k: v for k, v in train_row.items() if k not in ("step", "kind")}
    values.update({f"eval_{k}": v for k, v in eval_row.items() if k not in ("step", "kind")})
    metrics.extend(k for k in values if k not in metrics)
    row.update(values)
    row["workdir"] = run.workdir
    rows.append(row)
  first = [m for m in TABLE_METRICS if m in metrics]
  columns = ["run", *keys, "status", "step", *first,
             *sorted(m for m in metrics if m not in first), "workdir"]
  return columns, rows


def write_csv(path: str, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=list(columns), restval="")
  writer.writeheader()
  writer.writerows(rows)
  epath.Path(path).write_text(buffer.getvalue())


def _cell(value: Any) -> str:
  return f"{value:.4g}" if isinstance(value, float) else str(value)


def best_run(rows: Sequence[Mapping[str, Any]], metric: str, mode: str
             ) -> Mapping[str, Any] | None:
  scored = [r for r in rows if isinstance(r.get(metric), (int, float))]
  if not scored:
    return None
  pick = min if mode == "min" else max
  return pick(scored, key=lambda r: r[metric])


def format_table(columns: Sequence[str], rows: Sequence[Mapping[str, Any]], metric: str = "loss",
                 mode: str = "min") -> str:
  """An aligned table of the runs (named by their settings) and the headline metrics, the best
  run marked `*`; the CSV has every metric and a column per swept key."""
  shown = ["run", "status", "step",
           *[m for m in (*TABLE_METRICS, "eval_loss") if m in columns]]
  if metric in columns and metric not in shown:
    shown.append(metric)
  best = best_run(rows, metric, mode)
  cells = [["" if r is not best else "*"] + [_cell(r.get(c, "")) for c in shown] for r in rows]
  header = [""] + shown
  widths = [max(len(x) for x in col) for col in zip(header, *cells)]
  lines = ["  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip()
           for line in [header, *cells]]
  if best is not None:
    lines.append(f"best by {metric} ({mode}): {best['run']} ({metric}={_cell(best[metric])})")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line.


def _split_extra(extra: Sequence[str]) -> list[tuple[str, str]]:
  """`--config.a.b=v` arguments for every run; anything else is refused."""
  out = []
  for arg in extra:
    m = re.fullmatch(r"--config\.([A-Za-z0-9_.]+)=(.*)", arg)
    if not m:
      # Not only what follows --: a non-flag argument before it comes here too.
      raise ValueError(f"argument {arg!r}: expected --config.KEY=VALUE overrides for every run "
                       f"(after --)")
    out.append((m.group(1), m.group(2)))
  return out


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("sweep", None, "sweep file, e.g. configs/sweeps/mu_lr_loss.py",
                      flag_values=fv)
  flags.DEFINE_string("workdir", None, "parent of the runs' workdirs (local or gs://)",
                      flag_values=fv)
  flags.DEFINE_string("config", None, "config the runs start from (default: the sweep file's "
                      "CONFIG)", flag_values=fv)
  flags.DEFINE_enum("launcher", "local", ("local", "tpu"), "where the runs go: local processes "
                    "one after another, or the TPU launcher", flag_values=fv)
  flags.DEFINE_string("tpu_flags", "", "flags for `python -m launch.tpu_vm run`, e.g. "
                      "\"--tpu=vb --zone=us-central2-b\" (or set TPU_NAME, TPU_ZONE)",
                      flag_values=fv)
  flags.DEFINE_bool("dry_run", False, "print the runs' command lines only (with --launcher=tpu: "
                    "the gcloud commands too)", flag_values=fv)
  flags.DEFINE_bool("collect_only", False, "only gather the table from the runs' workdirs",
                    flag_values=fv)
  flags.DEFINE_string("metric", "loss", "final metric that picks the best run", flag_values=fv)
  flags.DEFINE_enum("mode", "min", ("min", "max"), "whether the best run has the lowest or the "
                    "highest --metric", flag_values=fv)
  flags.mark_flag_as_required("sweep", flag_values=fv)
  flags.mark_flag_as_required("workdir", flag_values=fv)


def parse_args(argv: Sequence[str] | None = None) -> types.SimpleNamespace:
  """The sweep's flags; `extra` lists the other arguments, those after `--` being the overrides
  for every run."""
  return cli.parse(define_flags, argv, __doc__, positional="extra")


def main(argv: Sequence[str] | None = None, out: Any = None) -> int:
  out = out or sys.stdout
  args = parse_args(argv)
  console.setup()
  extra = args.extra
  try:
    runs, default_config = load_sweep(args.sweep)
    config_spec = args.config or default_config
    if not config_spec:
      raise ValueError(f"sweep file {args.sweep}: names no CONFIG; pass --config=FILE.py:ARGS")
    config = config_lib.load_config(config_spec)
    for key, _ in _split_extra(extra):
      check_key(copy.deepcopy(config), key, _any_value(config, key), "arguments after --")
    check_runs(config, runs, f"sweep file {args.sweep}")
    planned = plan_runs(config_spec, runs, args.workdir, extra, args.launcher,
                        shlex.split(args.tpu_flags), args.dry_run)
  except (KeyError, ValueError, FileNotFoundError) as e:
    message = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"error: {message}", file=sys.stderr)
    return 2
  print(f"{len(planned)} runs of {config_spec} under {args.workdir}", file=out)
  if args.collect_only:
    pass
  elif args.dry_run and args.launcher == "local":
    for run in planned:
      print(shlex.join(run.command), file=out)
    return 0
  else:
    log_dir = None  # a dry run's launcher prints its gcloud commands to the terminal
    if "://" not in args.workdir and not args.dry_run:
      os.makedirs(args.workdir, exist_ok=True)
      log_dir = args.workdir
    execute(planned, log_dir, out=out, dry_run=args.dry_run)
    if args.dry_run:
      return 0 if all(r.status == "dry run" for r in planned) else 1
  columns, rows = collect(planned)
  table_path = join(args.workdir, "results.csv")
  write_csv(table_path, columns, rows)
  print(format_table(columns, rows, args.metric, args.mode), file=out)
  print(f"results: {table_path}", file=out, flush=True)
  return 0 if all(r["status"] in ("ok", "found") for r in rows) else 1


def _any_value(config: ml_collections.ConfigDict, key: str) -> Any:
  """The current value of `key` (a type-compatible stand-in for a string given after --)."""
  node: Any = config
  for part in key.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return None  # check_key reports the missing key
    node = node[part]
  return node


if __name__ == "__main__":
  sys.exit(main())
