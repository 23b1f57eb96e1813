"""The demo's stage runner, baselines, results table and config checks (fast, no model)."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

from helpers.configs import demo as demo_config
from vbert_jax.demo.world import recipes
from vbert_jax.demo.world import words
from vbert_jax.demo import baselines
from vbert_jax.demo import boundaries
from vbert_jax.demo import captioning
from vbert_jax.demo import evaluate
from vbert_jax.demo import prepare
from vbert_jax.demo import report
from vbert_jax.demo import stages
from vbert_jax.text import tokenizers


def _stage(name, calls, config=None, inputs=(), resumable=False, fail=False, files=("out.txt",)):
  def run(folder):
    calls.append(name)
    for f in files:
      (folder / f).write_text(f"{name}:{config}")
    if fail:
      raise RuntimeError(f"{name} interrupted")
    return {"name": name, "config": config}
  return stages.Stage(name, run, config=config, inputs=inputs, resumable=resumable)


def test_second_run_skips_finished_stages(tmp_path):
  calls = []
  first = stages.Runner(tmp_path, log=lambda s: None).run_all(
      [_stage("a", calls, 1), _stage("b", calls, 2, inputs=("a",))])
  assert calls == ["a", "b"] and not first["a"].reused
  assert json.loads((tmp_path / f"a.{stages.DONE}").read_text())["summary"] == {
      "name": "a", "config": 1}
  again = stages.Runner(tmp_path, log=lambda s: None).run_all(
      [_stage("a", calls, 1), _stage("b", calls, 2, inputs=("a",))])
  assert calls == ["a", "b"]  # nothing ran
  assert again["b"].reused and again["b"].summary == {"name": "b", "config": 2}


def test_interrupted_stage_is_rebuilt_not_mixed(tmp_path):
  calls, lines = [], []
  runner = stages.Runner(tmp_path, log=lines.append)
  runner.run(_stage("a", calls, 1))
  with pytest.raises(RuntimeError, match="interrupted"):
    runner.run(_stage("b", calls, 1, inputs=("a",), fail=True, files=("half.txt",)))
  assert (tmp_path / "b" / "half.txt").exists() and not (tmp_path / f"b.{stages.DONE}").exists()
  runner = stages.Runner(tmp_path, log=lines.append)
  runner.run(_stage("a", calls, 1))
  runner.run(_stage("b", calls, 1, inputs=("a",), files=("whole.txt",)))
  # The half-written file of the interrupted run is gone: the folder was rebuilt from nothing.
  assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["whole.txt"]
  assert (tmp_path / f"b.{stages.DONE}").exists()
  assert any("interrupted run; removing it and rebuilding" in line for line in lines)


def test_resumable_stage_continues_in_place(tmp_path):
  calls = []
  runner = stages.Runner(tmp_path, log=lambda s: None)
  with pytest.raises(RuntimeError):
    runner.run(_stage("a", calls, 1, resumable=True, fail=True, files=("part1.txt",)))
  runner = stages.Runner(tmp_path, log=lambda s: None)
  assert runner.status(_stage("a", calls, 1, resumable=True)) == "resume"
  assert runner.status(_stage("a", calls, 2, resumable=True)) == "rebuild"  # other config
  runner.run(_stage("a", calls, 1, resumable=True, files=("part2.txt",)))
  assert {"part1.txt", "part2.txt"} <= {p.name for p in (tmp_path / "a").iterdir()}


def test_changed_config_rebuilds_the_stage_and_those_after_it(tmp_path):
  calls = []
  stages.Runner(tmp_path, log=lambda s: None).run_all(
      [_stage("a", calls, 1), _stage("b", calls, 1, inputs=("a",)), _stage("c", calls, 1)])
  calls.clear()
  stages.Runner(tmp_path, log=lambda s: None).run_all(
      [_stage("a", calls, 2), _stage("b", calls, 1, inputs=("a",)), _stage("c", calls, 1)])
  assert calls == ["a", "b"]  # c reads nothing of a
  assert (tmp_path / "a" / "out.txt").read_text() == "a:2"


def test_rebuilt_stage_rebuilds_the_stages_that_read_it(tmp_path):
  calls = []
  first = [_stage("a", calls, 1), _stage("b", calls, 1, inputs=("a",)), _stage("c", calls, 1)]
  stages.Runner(tmp_path, log=lambda s: None).run_all(first)
  (tmp_path / f"a.{stages.DONE}").unlink()  # as if a's run had been interrupted
  calls.clear()
  stages.Runner(tmp_path, log=lambda s: None).run_all(first)
  assert calls == ["a", "b"]


def test_stage_reading_a_stage_that_has_not_run_is_an_error(tmp_path):
  with pytest.raises(ValueError, match="reads stages \\['x'\\]"):
    stages.Runner(tmp_path, log=lambda s: None).run(_stage("a", [], inputs=("x",)))


def test_nearest_neighbour_is_cosine():
  train = np.array([[1.0, 0.0], [0.0, 1.0], [10.0, 10.5]])
  test = np.array([[0.9, 0.1], [0.1, 3.0], [1.0, 1.0]])
  np.testing.assert_array_equal(baselines.nearest_neighbour(train, test), [0, 1, 2])
  assert baselines.nearest_neighbour_accuracy(train, np.array([5, 6, 7]), test,
                                              np.array([5, 7, 7])) == pytest.approx(2 / 3)


def test_bigram_counts_successors_by_hand():
  model = baselines.Bigram([[1, 2, 1, 2, 1, 3], [4, 4, 1, 3]])
  # 1 -> 2 twice, 1 -> 3 twice: the tie goes to the smaller token; 4 -> 4 once, 4 -> 1 once.
  assert model.predict(1) == 2 and model.predict(2) == 1 and model.predict(4) == 1
  assert model.fallback == 1 and model.predict(99) == 1
  accuracy, n = model.accuracy([[1, 2, 1, 3], [5, 1]])
  assert n == 4 and accuracy == pytest.approx(3 / 4)  # 1->2 yes, 2->1 yes, 1->3 no, 5->1 yes


def test_most_frequent_caption_and_label_prior():
  assert baselines.most_frequent(["b", "a", "b", "a", "c"]) == "a"
  np.testing.assert_allclose(baselines.label_prior(np.array([0, 2, 2, -1]), 3), [1 / 3, 0, 2 / 3])


def test_token_naive_bayes_by_hand():
  # Label 0 saw tokens 0, 0, 1; label 1 saw token 2. Add-one: P(t | 0) = (3, 2, 1) / 6,
  # P(t | 1) = (1, 1, 2) / 4; priors 2/3 and 1/3 (two steps of label 0, one of label 1).
  nb = baselines.TokenNaiveBayes([np.array([0, 0]), np.array([1]), np.array([2])], [0, 0, 1],
                                 2, 3)
  joint = np.array([2 / 3 * (3 / 6) * (1 / 6), 1 / 3 * (1 / 4) * (2 / 4)])  # tokens [0, 2]
  np.testing.assert_allclose(np.exp(nb.log_posterior(np.array([0, 2]))), joint / joint.sum())
  assert nb.log_ratio(np.array([2, 2]), 1) > 0 > nb.log_ratio(np.array([2, 2]), 0)
  with pytest.raises(ValueError, match="no training steps"):
    baselines.TokenNaiveBayes([], [], 2, 3)


def _video(vid: str, split: str, steps: list[tuple[str, str]]) -> evaluate.Video:
  made = [evaluate.Step(vid, i, v, n, 2.0 * i, 2.0 * i + 2, np.array([i], np.int32),
                        np.zeros(4, np.float32), np.array([i])) for i, (v, n) in enumerate(steps)]
  return evaluate.Video(vid, split, f"{vid}.mp4", np.arange(len(steps), dtype=np.int32),
                        np.zeros(len(steps), np.int32), np.zeros(len(steps), np.int32), {},
                        made)


def test_annotated_steps_caption_every_step_and_are_its_only_reference():
  videos = [_video("a", "train", [("cut", "tomato"), ("stir", "egg")]),
            _video("b", "val", [("flip", "fish")])]
  train_tokens, train_caps, test_tokens, test_refs = captioning.annotated_steps(videos)
  assert train_caps == {"a/0": ["cut the tomato in half on the board"],
                        "a/1": ["stir the egg in the pot"]}
  assert test_refs == {"b/0": ["flip the fish with a spatula"]}
  assert list(train_tokens) == ["a/0", "a/1"] and list(test_tokens) == ["b/0"]
  np.testing.assert_array_equal(train_tokens["a/1"], [1])


def test_annotations_name_the_step_and_their_tokenizer_knows_every_word(tmp_path):
  config = demo_config.get_config("size=small")
  captions = sorted({words.annotation(v, n)
                     for v, n in recipes.steps_of_dishes(recipes.dishes())})
  for verb in words.VERBS:
    caption = words.annotation(verb, "egg").split()
    assert caption[:3] == [verb, "the", "egg"] and len(caption) >= 5, caption
  text = captioning.caption_text(config, None, captions, tmp_path)
  tok = tokenizers.load_tokenizer({"text": text})
  for caption in captions:
    ids = tok.encode(caption)
    assert tok.specials.unk not in ids and tok.decode(ids) == caption


def test_unknown_caption_source_is_named(tmp_path):
  config = demo_config.get_config("size=small")
  config.captioning.captions = "annotation"
  with pytest.raises(ValueError, match="captioning.captions='annotation'"):
    captioning.run(config, tmp_path, tmp_path)


def test_results_table_puts_chance_and_baselines_beside_each_figure():
  tasks = {
      "zero_shot": {"steps": 10, "verb_chance": 0.1, "noun_chance": 0.1, "top_k": 5,
                    "nn_verb_top1": 0.8, "nn_noun_top1": 0.6,
                    "orders": {"video_first": {"verb_top1": 0.4, "noun_top1": 0.5,
                                               "verb_top5": 0.9, "noun_top5": 0.95}},
                    "language_prior": {"verb_top1": 0.2, "noun_top1": 0.1, "verb_top5": 0.7,
                                       "noun_top5": 0.6},
                    "verb_majority": 0.3, "noun_majority": 0.25},
      "alignment": {"accuracy": 0.9, "chance": 0.5, "token_ceiling": 0.85, "pairs": 200},
      "retrieval": {"pairs": 40, "chance": {"r1": 0.025, "r5": 0.125, "r10": 0.25,
                                            "median_rank": 20.5},
                    "model": {w: {"r1": 0.3, "r5": 0.6, "r10": 0.8, "median_rank": 4.0}
                              for w in ("text_to_video", "video_to_text")},
                    "bag_of_tokens": {w: {"r1": 0.2, "r5": 0.5, "r10": 0.7, "median_rank": 5.5}
                                      for w in ("text_to_video", "video_to_text")}},
      "text_to_video": {"verb_match": 0.5, "noun_match": 0.6, "verb_chance": 0.1,
                        "noun_chance": 0.12, "clips": 96, "prompts": 12},
      "forecast": {"accuracy": 0.3, "bigram_accuracy": 0.2, "predictions": 480,
                   "boundaries": {"boundaries": 50, "model_token": 0.1, "bigram_token": 0.05,
                                  "token_vs_bigram": {"difference": 0.05,
                                                      "standard_error": 0.02},
                                  "told_step_token": 0.4, "boundary_bigram_token": 0.08,
                                  **{f"{who}_{key}": 0.25 for who in ("model", "bigram",
                                                                      "step_ngram")
                                     for key in ("verb", "noun")}}}}
  caps = {"test_steps": 206, "model": {"Bleu_4": 0.2, "CIDEr": 1.5}, "most_frequent": {"Bleu_4": 0.1, "CIDEr": 0.2},
          "shuffled_features": {"Bleu_4": 0.12, "CIDEr": 0.3}}
  next_step = {"boundaries": 140, "distinct_steps": 40, "chance": 0.025, "ngram2": 0.55,
               "ngram3": 0.7, "oracle": 0.78}
  table = report.rows(tasks, caps, next_step)
  text = report.markdown(table)
  assert ("| world: next step by a step trigram of the training recipes | top-1 | 0.700 | 0.025 | "
          "0.780 (oracle that knows the dish) | between 3x chance and 0.8 | yes | 140 held-out "
          "step boundaries, true steps |") in text
  assert "| zero-shot noun (video_first) | top-1 | 0.500 | 0.100 | 0.600 (1-NN raw S3D) |" in text
  assert "| zero-shot verb (video_first) | top-5 | 0.900 | 0.500 |" in text
  assert ("| zero-shot verb (language prior, no video) | top-1 | 0.200 | 0.100 | 0.300 (most "
          "frequent label) |") in text
  assert "| forecasting next clip token | top-1 | 0.300 |  | 0.200 (bigram) | > bigram |" in text
  assert "| captioning CIDEr | score | 1.500 |  | 0.300 (shuffled features) |" in text
  assert ("| alignment (LVA), balanced | accuracy | 0.900 | 0.500 | 0.850 (naive Bayes on "
          "tokens, true labels) | >= 0.8 |") in text
  assert ("| retrieval video-to-text | R@5 | 0.600 | 0.125 | 0.500 (bag of tokens, naive Bayes) "
          "| > bag of tokens | yes | 40 held-out steps |") in text
  assert ("| retrieval text-to-video | median rank | 4.000 | 20.500 | 5.500 (bag of tokens, naive "
          "Bayes) |  |  | 40 held-out steps |") in text
  assert ("| forecasting at step boundaries: first clip's token | top-1 | 0.100 |  | 0.050 "
          "(token bigram) | > bigram + 2 s.e. (0.040) | yes | 50 held-out step boundaries |") in text
  assert ("| forecasting at step boundaries: next step's noun (nearest clips) | share | 0.250 "
          "| 0.100 | 0.250 (step n-gram of the narration) |  |  |") in text
  assert ("| text-to-video: nearest clips' noun | share | 0.600 | 0.120 |  | > chance | yes | 96 "
          "training clips nearest 12 prompts |") in text
  assert "| zero-shot verb (video_first) | top-1 | 0.400 | 0.100 | 0.800 (1-NN raw S3D) | >= 2x " \
      "chance | yes | 10 held-out steps |" in text
  assert "| zero-shot noun (video_first) | top-1 | 0.500 | 0.100 | 0.600 (1-NN raw S3D) | >= 3x " \
      "chance | yes |" in text
  assert ("| forecasting at step boundaries: first clip's token | top-1 | 0.100 |  | 0.400 (told "
          "the next step: its commonest first token) |  |  | 50 held-out step boundaries |") in text
  assert ("| forecasting at step boundaries: first clip's token | top-1 | 0.100 |  | 0.080 (token "
          "bigram told that a step ends) |  |  | 50 held-out step boundaries |") in text
  assert len(table) == 2 + 4 + 2 + 1 + 8 + 2 + 1 + 7 + 4


def test_alignment_auc_matches_scikit_learn():
  from sklearn import metrics
  rng = np.random.default_rng(0)
  # Rounded scores, so that ties between a positive and a negative occur and count half.
  pos, neg = np.round(rng.normal(1, 1, 40), 1), np.round(rng.normal(0, 1, 55), 1)
  want = metrics.roc_auc_score(np.r_[np.ones(40), np.zeros(55)], np.r_[pos, neg])
  assert evaluate.roc_auc(pos, neg) == pytest.approx(want, abs=1e-12)
  assert evaluate.roc_auc(np.array([2.0, 3.0]), np.array([1.0, 2.0])) == 0.875


def test_boundary_prompts_ask_after_the_separator_at_each_boundary(monkeypatch):
  asked = []

  def forecast(layout, tokens, horizon, kind, context):
    asked.append((len(tokens), kind, context))
    return None, np.array([len(tokens) + 2])

  monkeypatch.setattr(evaluate.prompts, "forecast", forecast)
  monkeypatch.setattr(evaluate.t2v, "visual_log_probs",
                      lambda bundle, packed, slots: np.zeros((len(packed), 1, 5)))
  steps = [evaluate.Step("v", i, "cut", "egg", 0, 1, np.zeros(2), np.zeros(1), np.array(clips))
           for i, clips in enumerate(([0, 1], [2, 3, 4], [5]))]
  video = evaluate.Video("v", "val", "", np.arange(6), np.zeros(6), np.zeros(6), {}, steps)
  config = demo_config.get_config("size=small")
  bundle = types.SimpleNamespace(layout=None)
  got = evaluate._next_tokens(config, bundle, [video], "pair", boundaries.positions)
  # Boundaries at the first clips of the second and third steps, each asked after [>].
  assert sorted(got["v"]) == [2, 5] and all(k == "pair" for _, k, _ in asked)
  assert [n for n, _, _ in asked] == [2, 5]
  assert {c for _, _, c in asked} == {config.tasks.forecast_context}


@pytest.mark.parametrize("target, value, met", [
    (">= 2x chance", 0.2, True), (">= 2x chance", 0.19, False), ("> chance", 0.11, True),
    (">= 0.8", 0.8, True), (">= 0.8", 0.79, False), ("> bigram", 0.31, True),
    ("> bigram", 0.3, False), ("> bigram + 2 s.e. (0.040)", 0.35, True),
    ("> bigram + 2 s.e. (0.040)", 0.33, False), ("between 3x chance and 0.8", 0.31, True),
    ("between 3x chance and 0.8", 0.29, False), ("between 3x chance and 0.8", 0.81, False),
    ("", 0.5, None)])
def test_targets_are_read_from_their_text(target, value, met):
  row = {"task": "t", "value": value, "chance": 0.1, "baseline": 0.3, "target": target}
  assert report.target_met(row) is met


def test_a_target_it_cannot_read_is_an_error():
  with pytest.raises(ValueError, match="'about 0.5' of 't': not a form"):
    report.target_met({"task": "t", "value": 1.0, "chance": 0.1, "baseline": 0.3,
                       "target": "about 0.5"})


@pytest.mark.parametrize("changes, message", [
    ({"tasks.verbs": "cut,juggle"}, "tasks.verbs='cut,juggle': \\['juggle'\\] not among"),
    ({"tasks.nouns": "tomato,unicorn"}, "tasks.nouns='tomato,unicorn': \\['unicorn'\\] not among"),
    ({"tasks.forecast_horizon": 500}, "tasks.forecast_horizon=500: a video may have as few as"),
    ({"world.min_steps": 5, "world.max_steps": 3}, "world.min_steps=5, world.max_steps=3"),
    ({"vocab.branching": 12, "vocab.depth": 4}, "20736 visual tokens but the training videos"),
    ({"tasks.t2v_prompts": 500}, "tasks.t2v_prompts=500: the world has only 41"),
    ({"world.min_steps": 9, "world.max_steps": 12}, r"\(9, 12\): no dish has that many steps"),
    ({"world.num_videos": 1}, "expected at least one of each"),
    ({"world_seeds.test": (3, 1)}, r"world_seeds: \[1\] are both validation and test seeds"),
    ({"tasks.retrieval_normalize": "softmax"}, "tasks.retrieval_normalize='softmax': expected"),
])
def test_config_that_asks_for_more_than_the_world_has_says_so(changes, message):
  c = demo_config.get_config("size=small")
  prepare.check_config(c)
  for key, value in changes.items():
    section, name = key.split(".")
    c[section][name] = value
  with pytest.raises(ValueError, match=message):
    prepare.check_config(c)


def test_unknown_demo_size_is_named():
  with pytest.raises(ValueError, match="size='huge'"):
    demo_config.get_config("size=huge")


def _table(value, baseline, on):
  return [{"task": "alignment (LVA), balanced", "metric": "accuracy", "value": value,
           "chance": 0.5, "baseline": baseline, "baseline_name": "naive Bayes",
           "target": ">= 0.8", "on": on},
          {"task": "forecasting", "metric": "top-1", "value": value / 2, "chance": None,
           "baseline": None, "baseline_name": "", "target": "", "on": on}]


def test_worlds_summary_gives_mean_spread_and_each_worlds_verdict(tmp_path, monkeypatch):
  from vbert_jax.demo import worlds  # pylint: disable=g-import-not-at-top
  tables = {10: _table(0.82, 0.9, "200 held-out pairs"), 11: _table(0.78, 0.8, "198 pairs"),
            12: _table(0.86, 0.85, "202 pairs")}
  summary = worlds.summarize(tables)
  lva = summary[0]
  assert lva["values"] == [0.82, 0.78, 0.86] and lva["seeds"] == [10, 11, 12]
  assert lva["mean"] == pytest.approx(0.82) and lva["std"] == pytest.approx(0.04)
  assert (lva["min"], lva["max"]) == (0.78, 0.86) and lva["met"] == [True, False, True]
  assert summary[1]["met"] is None
  text = worlds.markdown(summary, "three worlds")
  assert ("| alignment (LVA), balanced | accuracy | 0.820 | 0.040 | 0.780-0.860 | 0.500 | 0.850 "
          "(naive Bayes) | >= 0.8 | 2 of 3 | 200 held-out pairs |") in text
  with pytest.raises(ValueError, match=r"missing from the tables of worlds \[11\]"):
    worlds.summarize({10: tables[10], 11: tables[11][1:]})
  # The command's loop: one workdir per seed, each world's own seed in its config.
  seen = []
  paired = lambda d, se: {"difference": d, "standard_error": se}  # noqa: E731
  at = {seed: {"boundaries": n, **{f"{w}_vs_bigram": paired(d, se) for w in ("token", "verb",
                                                                             "noun")}}
        for seed, n, d, se in ((10, 100, 0.1, 0.04), (11, 200, 0.05, 0.02), (12, 100, 0.0, 0.03))}

  def fake_run(config, workdir, until="", log=None):
    seen.append((config.world.seed, workdir.name))
    folder = workdir / "results"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(
        {"rows": tables[config.world.seed],
         "tasks": {"forecast": {"boundaries": at[config.world.seed]}}}))
    return {"results": stages.StageResult("results", folder, {}, False, 0.0)}
  monkeypatch.setattr(worlds.demo_pipeline, "run", fake_run)
  config = demo_config.get_config("size=small")
  config.unlock()
  config.world_seeds.test = (10, 11, 12)
  out = worlds.run(config, tmp_path, "test")
  assert seen == [(10, "world_10"), (11, "world_11"), (12, "world_12")]
  saved = json.loads((tmp_path / "worlds.json").read_text())
  assert saved["seeds"] == [10, 11, 12] and saved["rows"] == out["summary"]
  assert "over 3 test worlds (seeds 10, 11, 12)" in (tmp_path / "worlds.md").read_text()
  # Boundaries pooled: (10 + 10 + 0) / 400; s.e. sqrt(100^2 .04^2 + 200^2 .02^2 + 100^2 .03^2)
  # / 400 = sqrt(41) / 400.
  pooled = saved["boundaries_pooled"]["token"]
  assert saved["boundaries_pooled"]["boundaries"] == 400 and pooled["met"]
  assert pooled["difference"] == pytest.approx(0.05, abs=1e-12)
  assert pooled["standard_error"] == pytest.approx(41 ** 0.5 / 400, abs=1e-12)
  assert "pooled over 400 boundaries: model - token bigram = +0.050 (s.e. 0.016)" in (
      tmp_path / "worlds.md").read_text()
