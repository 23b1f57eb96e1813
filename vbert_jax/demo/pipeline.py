"""The demo's stages in order, from the generated world to the results table (no flags: the
commands `vbert_jax.demo.main` and `vbert_jax.demo.worlds` call it)."""

from __future__ import annotations

import os
import pathlib

import jax
import ml_collections

from vbert_jax.demo import captioning
from vbert_jax.demo import evaluate
from vbert_jax.demo import prepare
from vbert_jax.demo import report
from vbert_jax.demo import stages


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
