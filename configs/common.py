"""Helpers shared by the config files."""

from __future__ import annotations

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
