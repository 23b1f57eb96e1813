"""The results table: each figure of the demo beside its chance level, its baseline, what it is
computed on, and whether its target is met."""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any, Mapping, Sequence

import ml_collections

from vbert_jax.demo import evaluate
from vbert_jax.demo import prepare
from vbert_jax.demo.world import words
from vbert_jax.demo.world import world

Row = dict[str, Any]


def _row(task: str, metric: str, value: float, chance: float | None = None,
         baseline: float | None = None, baseline_name: str = "", target: str = "",
         on: str = "") -> Row:
  return {"task": task, "metric": metric, "value": value, "chance": chance,
          "baseline": baseline, "baseline_name": baseline_name, "target": target, "on": on}


_TARGETS: list[tuple[str, Any]] = [
    (r"between ([\d.]+)x chance and ([\d.]+)",
     lambda r, k, x: float(k) * r["chance"] <= r["value"] <= float(x)),
    (r">= ([\d.]+)x chance", lambda r, k: r["value"] >= float(k) * r["chance"]),
    (r"> chance", lambda r: r["value"] > r["chance"]),
    (r">= ([\d.]+)", lambda r, x: r["value"] >= float(x)),
    (r"> [a-z ]+\+ 2 s\.e\. \(([\d.]+)\)", lambda r, m: r["value"] > r["baseline"] + float(m)),
    (r"> [a-z ]+", lambda r: r["value"] > r["baseline"]),
]


def target_met(row: Row) -> bool | None:
  """Whether the row's value meets its target (None: the row has none)."""
  if not row["target"]:
    return None
  for pattern, check in _TARGETS:
    match = re.fullmatch(pattern, row["target"])
    if match:
      return bool(check(row, *match.groups()))
  raise ValueError(f"target {row['target']!r} of {row['task']!r}: not a form that "
                   f"report.target_met reads")


def zero_shot_rows(zs: Mapping[str, Any]) -> list[Row]:
  """The prompt ensemble's rows (with targets), the paper template's, then the language
  prior's (the ensemble without the video)."""
  rows = []
  k = zs["top_k"]
  on = f"{zs['steps']} held-out steps"
  runs = [(zs["orders"], "", True), (zs.get("paper_template", {}), ", paper template", False)]
  for results, label, targets in runs:
    for order, r in results.items():
      for key in ("verb", "noun"):
        times = 2 if key == "verb" else 3
        task = f"zero-shot {key} ({order}{label})"
        rows.append(_row(task, "top-1", r[f"{key}_top1"], zs[f"{key}_chance"],
                         zs[f"nn_{key}_top1"], "1-NN raw S3D",
                         f">= {times}x chance" if targets else "", on))
        rows.append(_row(task, f"top-{k}", r[f"{key}_top{k}"],
                         min(1.0, k * zs[f"{key}_chance"]), on=on))
  prior = zs.get("language_prior")
  for key in ("verb", "noun") if prior else ():
    rows.append(_row(f"zero-shot {key} (language prior, no video)", "top-1", prior[f"{key}_top1"],
                     zs[f"{key}_chance"], zs[f"{key}_majority"], "most frequent label", on=on))
  return rows


def retrieval_rows(rt: Mapping[str, Any] | None) -> list[Row]:
  """R@1, R@5, R@10 and the median rank, both ways, beside the bag of tokens."""
  if not rt:
    return []
  rows = []
  for way, name in (("text_to_video", "text-to-video"), ("video_to_text", "video-to-text")):
    for key, metric in (("r1", "R@1"), ("r5", "R@5"), ("r10", "R@10"),
                        ("median_rank", "median rank")):
      rows.append(_row(f"retrieval {name}", metric, rt["model"][way][key], rt["chance"][key],
                       rt["bag_of_tokens"][way][key], "bag of tokens, naive Bayes",
                       "> bag of tokens" if key in ("r1", "r5") else "",
                       f"{rt['pairs']} held-out steps"))
  return rows


def boundary_rows(at: Mapping[str, Any] | None) -> list[Row]:
  """Forecasting at step boundaries: the token beside the token bigram, then the next step's
  verb and noun as the predicted token's nearest clips show them, beside the token bigram's
  and the step-level bigram of the training narration."""
  if not at:
    return []
  task, on = "forecasting at step boundaries", f"{at['boundaries']} held-out step boundaries"
  se = at["token_vs_bigram"]["standard_error"]
  out = [_row(f"{task}: first clip's token", "top-1", at["model_token"], None,
              at["bigram_token"], "token bigram", f"> bigram + 2 s.e. ({2 * se:.3f})", on)]
  if "boundary_bigram_token" in at:
    out.append(_row(f"{task}: first clip's token", "top-1", at["model_token"], None,
                    at["boundary_bigram_token"], "token bigram told that a step ends", on=on))
  if "told_step_token" in at:
    out.append(_row(f"{task}: first clip's token", "top-1", at["model_token"], None,
                    at["told_step_token"], "told the next step: its commonest first token",
                    on=on))
  for key, names in (("verb", words.VERBS), ("noun", words.NOUNS)):
    what = f"{task}: next step's {key} (nearest clips)"
    out.append(_row(what, "share", at[f"model_{key}"], 1 / len(names), at[f"bigram_{key}"],
                    "token bigram", on=on))
    out.append(_row(what, "share", at[f"model_{key}"], 1 / len(names),
                    at[f"step_ngram_{key}"], "step n-gram of the narration", on=on))
  return out


def world_rows(next_step: Mapping[str, Any] | None) -> list[Row]:
  """How foreseeable the world's next step is, from the true steps: the step n-grams of the
  training recipes beside chance and the oracle that knows the dish."""
  if not next_step:
    return []
  on = f"{next_step['boundaries']} held-out step boundaries, true steps"
  out = []
  for n, name, target in ((3, "trigram", "between 3x chance and 0.8"), (2, "bigram", "")):
    out.append(_row(f"world: next step by a step {name} of the training recipes", "top-1",
                    next_step[f"ngram{n}"], next_step["chance"], next_step["oracle"],
                    "oracle that knows the dish", target, on))
  return out


def rows(tasks: Mapping[str, Any], captioning: Mapping[str, Any] | None = None,
         next_step: Mapping[str, Any] | None = None) -> list[Row]:
  """All rows of the table, from the tasks stage's and the captioning stage's results and the
  world's predictability."""
  out = world_rows(next_step) + zero_shot_rows(tasks["zero_shot"])
  lva = tasks["alignment"]
  out.append(_row("alignment (LVA), balanced", "accuracy", lva["accuracy"], lva["chance"],
                  lva.get("token_ceiling"), "naive Bayes on tokens, true labels",
                  target=">= 0.8", on=f"{lva['pairs']} held-out pairs"))
  out += retrieval_rows(tasks.get("retrieval"))
  t2v = tasks["text_to_video"]
  for key in ("verb", "noun"):
    out.append(_row(f"text-to-video: nearest clips' {key}", "share", t2v[f"{key}_match"],
                    t2v[f"{key}_chance"], target="> chance",
                    on=f"{t2v['clips']} training clips nearest {t2v['prompts']} prompts"))
  fc = tasks["forecast"]
  out.append(_row("forecasting next clip token", "top-1", fc["accuracy"], None,
                  fc["bigram_accuracy"], "bigram", "> bigram",
                  f"{fc['predictions']} held-out clips"))
  out += boundary_rows(fc.get("boundaries"))
  if captioning:
    for key in ("Bleu_4", "CIDEr", "Bleu_3", "METEOR", "ROUGE_L"):
      value = captioning["model"].get(key)
      if value is None:
        continue
      target = "> both baselines" if key in ("Bleu_4", "CIDEr") else ""
      on = f"{captioning['test_steps']} held-out steps"
      out.append(_row(f"captioning {key}", "score", value, None,
                      captioning["most_frequent"].get(key), "most frequent caption", target, on))
      out.append(_row(f"captioning {key}", "score", value, None,
                      captioning["shuffled_features"].get(key), "shuffled features", target,
                      on))
  return out


def _fmt(x: float | None) -> str:
  return "" if x is None else f"{x:.3f}"


def markdown(table: Sequence[Row], title: str = "") -> str:
  lines = [f"## {title}", ""] if title else []
  lines += ["| task | metric | model | chance | baseline | target | met | computed on |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  for r in table:
    base = f"{_fmt(r['baseline'])} ({r['baseline_name']})" if r["baseline"] is not None else ""
    met = {None: "", True: "yes", False: "no"}[target_met(r)]
    lines.append(f"| {r['task']} | {r['metric']} | {_fmt(r['value'])} | {_fmt(r['chance'])} | "
                 f"{base} | {r['target']} | {met} | {r['on']} |")
  return "\n".join(lines) + "\n"


def run_results(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                folder: pathlib.Path) -> dict:
  tasks = json.loads((workdir / evaluate.TASKS / "tasks.json").read_text())
  captioning = None
  if config.captioning.enabled:  # a folder left by an earlier run with captioning is not read
    captioning = json.loads((workdir / evaluate.CAPTIONING / "captioning.json").read_text())
  next_step = world.load_manifest(workdir / prepare.WORLD).get("next_step")
  table = rows(tasks, captioning, next_step)
  seed = config.world.seed
  text = markdown(table, title=f"VideoBERT demo ({config.size}, world seed {seed}): held-out "
                  f"videos")
  (folder / "results.md").write_text(text)
  (folder / "results.json").write_text(json.dumps({"world_seed": seed, "rows": table,
                                                   "tasks": tasks, "captioning": captioning},
                                                  indent=1))
  return {"rows": len(table)}
