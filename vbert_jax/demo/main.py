"""The demo: the whole pipeline on the generated world, and what the model learned.

    python -m vbert_jax.demo.main --config=configs/demo.py --workdir=demo_work
    python -m vbert_jax.demo.main --config=configs/demo.py:size=small --workdir=/tmp/d \
        --config.pretrain.total_steps=300 [--until=pretrain]

Each stage writes one folder under --workdir and a done-marker last; a second run reuses the
finished stages and rebuilds a stage that an interrupted run left half-written. The results
table is printed at the end and written to <workdir>/results/results.md and results.json.
"""

from __future__ import annotations

import os
import pathlib
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
import jax
import ml_collections
from ml_collections import config_flags

from vbert_jax import console
from vbert_jax.demo import captioning
from vbert_jax.demo import evaluate
from vbert_jax.demo import prepare
from vbert_jax.demo import report
from vbert_jax.demo import stages

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/demo.py", "Demo config file and arguments, e.g. configs/demo.py:size=small",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "demo_work", "Folder for every stage's outputs.")
_UNTIL = flags.DEFINE_string("until", "", "Stop after this stage (a stage name).")


def run(config, workdir, until: str = "", log=None) -> dict:
  """Runs the stages (up to `until`); returns {stage name: StageResult}."""
  prepare.check_config(config)
  workdir = pathlib.Path(workdir)
  jax.config.update("jax_compilation_cache_dir",
                    os.path.expanduser(config.pretrain.compilation_cache_dir))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  all_stages = prepare.build_stages(config, workdir) + evaluation_stages(config, workdir)
  names = [s.name for s in all_stages]
  if until and until not in names:
    raise ValueError(f"--until={until!r}: expected one of {names}")
  if until:
    all_stages = all_stages[:names.index(until) + 1]
  runner = stages.Runner(workdir, log=log)
  return runner.run_all(all_stages)


def evaluation_stages(config: ml_collections.ConfigDict, workdir: pathlib.Path
                      ) -> list[stages.Stage]:
  """The stages after pretraining: the tasks, captioning (when enabled), the results table."""
  tasks_config = {**config.tasks.to_dict(), "seed": config.seed}
  out = [stages.Stage(evaluate.TASKS, lambda f: evaluate.run_tasks(config, workdir, f),
                      config=tasks_config, inputs=(prepare.PRETRAIN,),
                      description="zero-shot, alignment, text-to-video, forecasting")]
  names = [evaluate.TASKS]
  if config.captioning.enabled:
    out.append(stages.Stage(evaluate.CAPTIONING, lambda f: captioning.run(config, workdir, f),
                            config=config.captioning.to_dict(), inputs=(prepare.PRETRAIN,),
                            description="captioning held-out steps"))
    names.append(evaluate.CAPTIONING)
  out.append(stages.Stage(evaluate.RESULTS, lambda f: report.run_results(config, workdir, f),
                          config={"size": config.size, "captioning": config.captioning.enabled},
                          inputs=tuple(names), description="the results table"))
  return out


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  console.setup()
  t0 = time.time()
  try:
    results = run(_CONFIG.value, _WORKDIR.value, _UNTIL.value)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  table = results.get("results")
  if table is not None:
    print((table.folder / "results.md").read_text())
  print(f"demo finished in {time.time() - t0:.0f} s; outputs in {_WORKDIR.value}")


if __name__ == "__main__":
  app.run(main)
