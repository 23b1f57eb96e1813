"""The demo on every world of a split: each figure's mean and spread, and whether its target held
on every world.

    python -m vbert_jax.demo.worlds --config=configs/demo.py --split=test --workdir=demo_worlds

Runs the demo's stages (`vbert_jax.demo.pipeline.run`) for each seed of
`config.world_seeds[split]` in `<workdir>/world_<seed>/`, one world after another; finished stages are reused, so a second
run, or one after an interruption, picks up where it stopped. Then writes `<workdir>/worlds.md`
and `worlds.json`: every row of the demo's results table with its value on each world, the mean,
the standard deviation and the range, and whether the target held on each world. Test worlds
report; validation worlds (`--split=validation`) are the ones on which settings are chosen.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time
from typing import Any, Mapping, Sequence

# As in vbert_jax.demo.main: torch before tensorflow where the test requirements are installed.
try:
  import torchvision  # noqa: F401  pylint: disable=unused-import
except ImportError:
  pass

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags
import numpy as np

from vbert_jax import console
from vbert_jax.demo import pipeline as demo_pipeline
from vbert_jax.demo import report

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/demo.py", "Demo config file and arguments.", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", "demo_worlds", "Folder of the worlds' workdirs.")
_SPLIT = flags.DEFINE_enum("split", "test", ("test", "validation"),
                           "Which seeds of config.world_seeds to run.")

SUMMARY = "worlds"


def world_config(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
  out = ml_collections.ConfigDict(config.to_dict())
  out.world.seed = int(seed)
  return out


def _key(row: report.Row) -> tuple[str, str, str]:
  return row["task"], row["metric"], row["baseline_name"]


def summarize(tables: dict[int, Sequence[report.Row]]) -> list[dict[str, Any]]:
  """One entry per row of the first world's table (in its order): the values on each world,
  mean, standard deviation (n - 1), min and max, and the target's verdict on each world."""
  seeds = list(tables)
  by_world = {s: {_key(r): r for r in rows} for s, rows in tables.items()}
  out = []
  for row in tables[seeds[0]]:
    key = _key(row)
    missing = [s for s in seeds if key not in by_world[s]]
    if missing:
      raise ValueError(f"row {key} is missing from the tables of worlds {missing}")
    rows = [by_world[s][key] for s in seeds]
    values = np.array([r["value"] for r in rows], np.float64)
    verdicts = [report.target_met(r) for r in rows]
    out.append({"task": row["task"], "metric": row["metric"], "baseline_name":
                row["baseline_name"], "target": row["target"], "seeds": seeds,
                "values": values.tolist(), "on": [r["on"] for r in rows],
                "chance": [r["chance"] for r in rows], "baseline": [r["baseline"] for r in rows],
                "mean": float(values.mean()),
                "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                "min": float(values.min()), "max": float(values.max()),
                "met": None if verdicts[0] is None else [bool(v) for v in verdicts]})
  return out


def pooled_boundaries(boundaries: Sequence[Mapping[str, Any]]) -> dict | None:
  """The model's paired difference from the token bigram at step boundaries, pooled over
  worlds: the mean over all boundaries, and its standard error from each world's
  (sqrt(sum n_i^2 se_i^2) / N, the worlds independent). The target: above two of them."""
  if not boundaries or any(b is None for b in boundaries):
    return None
  n = np.array([b["boundaries"] for b in boundaries], np.float64)
  out = {"boundaries": int(n.sum())}
  for what in ("token", "verb", "noun"):
    d = np.array([b[f"{what}_vs_bigram"]["difference"] for b in boundaries])
    se = np.array([b[f"{what}_vs_bigram"]["standard_error"] for b in boundaries])
    diff, err = float((n * d).sum() / n.sum()), float(np.sqrt((n * n * se * se).sum()) / n.sum())
    out[what] = {"difference": diff, "standard_error": err, "met": diff > 2 * err}
  return out


def _pooled_line(pooled: Mapping[str, Any] | None) -> str:
  if not pooled:
    return ""
  t = pooled["token"]
  return (f"\nForecasting at step boundaries, pooled over {pooled['boundaries']} boundaries: "
          f"model - token bigram = {t['difference']:+.3f} (s.e. {t['standard_error']:.3f}); "
          f"target: above two standard errors: {'met' if t['met'] else 'not met'}.\n")


def _mean(xs: Sequence[float | None]) -> str:
  xs = [x for x in xs if x is not None]
  return f"{np.mean(xs):.3f}" if xs else ""


def markdown(summary: Sequence[dict], title: str, pooled: Mapping[str, Any] | None = None
             ) -> str:
  lines = [f"## {title}", "",
           "| task | metric | mean | std | range | chance (mean) | baseline (mean) | target | "
           "met on | computed on (first world) |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for e in summary:
    met = "" if e["met"] is None else f"{sum(e['met'])} of {len(e['met'])}"
    base = f"{_mean(e['baseline'])} ({e['baseline_name']})" if _mean(e["baseline"]) else ""
    lines.append(f"| {e['task']} | {e['metric']} | {e['mean']:.3f} | {e['std']:.3f} | "
                 f"{e['min']:.3f}-{e['max']:.3f} | {_mean(e['chance'])} | {base} | "
                 f"{e['target']} | {met} | {e['on'][0]} |")
  return "\n".join(lines) + "\n" + _pooled_line(pooled)


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path, split: str) -> dict:
  seeds = list(config.world_seeds[split])
  if not seeds:
    raise ValueError(f"config.world_seeds.{split} is empty")
  tables, seconds, at_boundaries = {}, {}, []
  for seed in seeds:
    start = time.time()
    print(f"=== world seed {seed} ({split}) ===", flush=True)
    results = demo_pipeline.run(world_config(config, seed), workdir / f"world_{seed}")
    folder = results["results"].folder
    results = json.loads((folder / "results.json").read_text())
    tables[seed] = results["rows"]
    at_boundaries.append(results["tasks"]["forecast"].get("boundaries"))
    seconds[seed] = time.time() - start
  summary, pooled = summarize(tables), pooled_boundaries(at_boundaries)
  title = (f"VideoBERT demo ({config.size}) over {len(seeds)} {split} worlds "
           f"(seeds {', '.join(map(str, seeds))}): held-out videos")
  (workdir / f"{SUMMARY}.md").write_text(markdown(summary, title, pooled))
  (workdir / f"{SUMMARY}.json").write_text(json.dumps(
      {"split": split, "seeds": seeds, "seconds": seconds, "rows": summary,
       "boundaries_pooled": pooled}, indent=1))
  return {"summary": summary, "title": title, "pooled": pooled}


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  console.setup()
  workdir = pathlib.Path(_WORKDIR.value)
  workdir.mkdir(parents=True, exist_ok=True)
  try:
    out = run(_CONFIG.value, workdir, _SPLIT.value)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(markdown(out["summary"], out["title"], out["pooled"]))


if __name__ == "__main__":
  app.run(main)
