"""The demo: the whole pipeline on the generated world, and what the model learned.

    python -m vbert_jax.demo.main --config=configs/demo.py --workdir=demo_work
    python -m vbert_jax.demo.main --config=configs/demo.py:size=small --workdir=/tmp/d \
        --config.pretrain.total_steps=300 [--until=pretrain]

Each stage writes one folder under --workdir and a done-marker last; a second run reuses the
finished stages and rebuilds a stage that an interrupted run left half-written. The results
table is printed at the end and written to <workdir>/results/results.md and results.json.
"""

from __future__ import annotations

import sys
import time

# With the test requirements installed, importing tensorflow before torchvision segfaults with
# the pinned versions, so torch goes first where it is installed; the demo itself never uses it.
try:
  import torchvision  # noqa: F401  pylint: disable=unused-import
except ImportError:
  pass

from absl import app
from absl import flags
from ml_collections import config_flags

from vbert_jax import console
from vbert_jax.demo import pipeline

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/demo.py", "Demo config file and arguments, e.g. configs/demo.py:size=small",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "demo_work", "Folder for every stage's outputs.")
_UNTIL = flags.DEFINE_string("until", "", "Stop after this stage (a stage name).")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  console.setup()
  t0 = time.time()
  try:
    results = pipeline.run(_CONFIG.value, _WORKDIR.value, _UNTIL.value)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  table = results.get("results")
  if table is not None:
    print((table.folder / "results.md").read_text())
  print(f"demo finished in {time.time() - t0:.0f} s; outputs in {_WORKDIR.value}")


if __name__ == "__main__":
  app.run(main)
