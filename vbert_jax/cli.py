"""The command lines of the commands without a config: absl flags, parsed into their own registry.

Commands with a config (`vbert_jax.main`, `vbert_jax.captioning.train`, `vbert_jax.demo.main`,
`vbert_jax.aot`) take `--config` through `ml_collections.config_flags` and absl's global flags.
The others define their flags in a function, `define(fv)`, that `parse` calls on a fresh
`flags.FlagValues`: so the library can import any number of commands without their flags
clashing, and a command can be run from Python (`main([...])`) any number of times, each parse
starting from the defaults. Flags that several commands share are defined once, by a function
of the module that owns them (e.g. `vbert_jax.tasks.bundle.define_run_flags`).

`--help` prints the command's docstring and its flags; a bad flag is one line on stderr and exit
status 2, as with absl's `app.run`.
"""

from __future__ import annotations

import sys
import types
from typing import Callable, Sequence

from absl import flags

Define = Callable[[flags.FlagValues], None]
HELP = ("--help", "-h", "--helpshort", "--helpfull", "-?")


def parse(define: Define, argv: Sequence[str] | None = None, doc: str = "", *,
          positional: str | None = None) -> types.SimpleNamespace:
  """The flags of `argv` (default: sys.argv[1:]) as attributes; with `positional`, the arguments
  that are not flags (and all after `--`) as a list under that name, else they are an error."""
  argv = list(sys.argv[1:] if argv is None else argv)
  fv = flags.FlagValues()
  define(fv)
  before_dashes = argv[:argv.index("--")] if "--" in argv else argv
  if any(a in HELP for a in before_dashes):
    print((doc.strip() + "\n\n" if doc else "") + "flags:\n" + fv.get_help())
    raise SystemExit(0)
  try:
    rest = fv(["command", *argv])[1:]
  except flags.Error as e:
    usage_error(str(e))
  if rest and positional is None:
    usage_error(f"unexpected arguments {rest}; every value is given as --flag=value")
  values = fv.flag_values_dict()
  if positional is not None:
    values[positional] = rest
  return types.SimpleNamespace(**values)


def usage_error(message: str) -> None:
  """Ends a command whose flags are wrong: the reason on stderr, and exit status 2."""
  print(f"error: {message}", file=sys.stderr)
  raise SystemExit(2)
