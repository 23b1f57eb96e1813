"""What config files share: their argument parser, and loading a config file by its path.

Config files live outside the package (`configs/`), and are read by path, as `config_flags`
reads them. A config that builds on another (`configs/demo.py` on `configs/pretrain.py`) loads it
with `sibling(__file__, "pretrain.py")`, so that it works from any working directory.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import types

import ml_collections


def parse_arg(arg: str | None, lazy: bool = False, **spec) -> ml_collections.ConfigDict:
  """Parses `key=value,flag` strings, typed by the defaults in `spec`.

  `parse_arg("variant=base,runlocal", variant="tiny", runlocal=False)` gives
  variant="base", runlocal=True. An unknown key is an error naming it unless `lazy`.
  """
  out = ml_collections.ConfigDict(dict(spec))
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    key = key.strip()
    if key not in spec:
      if not lazy:
        raise KeyError(f"config argument {key!r} is unknown; expected one of {sorted(spec)}")
      out[key] = value if eq else True
      continue
    default = spec[key]
    if not eq:
      out[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key!r} takes true/false, got {value!r}")
      out[key] = value.lower() in ("true", "1")
    else:
      out[key] = type(default)(value) if default is not None else value
  return out


def load_module(path: str | os.PathLike, what: str = "config") -> types.ModuleType:
  """The Python file at `path`, executed as a module of its own (not put in sys.modules)."""
  file = pathlib.Path(path)
  if not file.is_file():
    raise FileNotFoundError(f"{what} {path}: no such file")
  spec = importlib.util.spec_from_file_location(f"_vbert_{what}_{file.stem}", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def sibling(this_file: str | os.PathLike, name: str) -> types.ModuleType:
  """The config file `name` in the folder of `this_file` (a config's `__file__`)."""
  return load_module(pathlib.Path(this_file).resolve().parent / name)


def load_config(spec: str) -> ml_collections.ConfigDict:
  """`configs/pretrain.py:variant=mu,runlocal` -> that file's get_config(arg)."""
  path, _, arg = spec.partition(":")
  module = load_module(path)
  return module.get_config(arg) if arg else module.get_config()
