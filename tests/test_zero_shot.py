"""Zero-shot verb and noun classification on a model trained in the test where the answer is
learnable, label sets (one piece and several), top-k accuracy, the readers and the command."""

import json

import numpy as np
import pytest

from helpers import trained_model as tm
from vbert_jax import sequence
from vbert_jax.tasks import prompts
from vbert_jax.tasks import zero_shot as zs


@pytest.fixture(scope="session")
def world(tmp_path_factory):
  return tm.trained_bundle(tmp_path_factory)


def _videos(seed=0):
  rng = np.random.default_rng(seed)
  pairs = [(v, n) for v in tm.VERBS for n in tm.NOUNS]
  return [tm.sample_video(rng, v, n) for v, n in pairs], pairs


@pytest.mark.parametrize("order", ["video_first", "text_first"])
def test_trained_model_names_the_verb_and_noun(world, order):
  videos, pairs = _videos()
  preds = zs.classify(world.bundle, videos, verbs=tm.VERBS, nouns=tm.NOUNS, order=order)
  verb1 = zs.topk_accuracy([p.verbs for p in preds], [v for v, _ in pairs], 1)
  noun1 = zs.topk_accuracy([p.nouns for p in preds], [n for _, n in pairs], 1)
  print(f"{order}: verb top-1 {verb1:.3f}, noun top-1 {noun1:.3f}")
  if order == "video_first":  # the order the model was trained on
    assert verb1 == 1.0 and noun1 == 1.0
  else:  # never trained with masked text after the video: better than chance (0.25) still
    assert verb1 > 0.5 and noun1 > 0.5
  for p in preds:
    assert sorted(p.verbs) == sorted(tm.VERBS) and len(p.nouns) == len(tm.NOUNS)
    assert p.verb_scores == sorted(p.verb_scores, reverse=True)
    assert p.noun_scores == sorted(p.noun_scores, reverse=True)


def test_open_vocabulary_ranks_text_tokens_without_specials(world):
  videos, pairs = _videos(1)
  single = [(i, p) for i, p in enumerate(pairs) if p[1] != "pineapple"]
  preds = zs.classify(world.bundle, [videos[i] for i, _ in single], top_k=4)
  assert [p.verbs[0] for p in preds] == [v for _, (v, _) in single]
  assert [p.nouns[0] for p in preds] == [n for _, (_, n) in single]
  specials = set(tm.WORDS[:6])
  assert not any(set(p.verbs + p.nouns) & specials for p in preds)
  assert all(len(p.verbs) == 4 and p.verb_scores == sorted(p.verb_scores, reverse=True)
             for p in preds)
  # Asked for more than there are: every word of the vocabulary, once, specials left out.
  (everything,) = zs.classify(world.bundle, videos[:1], top_k=1000)
  assert sorted(everything.verbs) == sorted(tm.WORDS[6:])


def test_label_set_restricts_the_answers(world):
  videos, pairs = _videos(2)
  preds = zs.classify(world.bundle, videos, verbs=["cut", "flip"], nouns=["egg", "bread"],
                      top_k=5)
  for p, (verb, noun) in zip(preds, pairs):
    assert sorted(p.verbs) == ["cut", "flip"] and sorted(p.nouns) == ["bread", "egg"]
    if verb in ("cut", "flip"):
      assert p.verbs[0] == verb
    if noun == "egg":
      assert p.nouns[0] == "egg"


def _direct_lp(bundle, video, template, mask, piece):
  """log P(piece) at the template's mask number `mask`, built directly (`video` None: the
  template alone, [CLS] text [SEP])."""
  if video is None:
    packed = bundle.layout.text_only(template.ids)
    pos = 1 + np.asarray(template.slots, np.int32)
  else:  # [CLS] video [>] text [SEP]; the masks already filled in are text now
    packed = bundle.layout.video_then_text(video, template.ids)
    pos = len(video) + 2 + np.asarray(template.slots, np.int32)
  lp = bundle.log_probs(sequence.stack([packed]), mlm_positions=pos[None])["mlm_log_probs"][0]
  return float(lp[mask, piece])


def _chain(bundle, video, counts, slot, pieces):
  """log P(p0) + log P(p1 | p0) + ...: each piece at its mask with the earlier ones written in."""
  tpl = prompts.Template.parse(zs.DEFAULT_TEMPLATE, bundle.tokenizer, 2).expand(counts)
  masks = tpl.slot_groups(counts)[slot]
  return sum(_direct_lp(bundle, video, tpl.fill({m: p for m, p in zip(masks, pieces[:k])}),
                        masks[k], pieces[k]) for k in range(len(pieces)))


def test_multi_piece_label_is_scored_by_the_chain_rule_over_its_pieces(world):
  b = world.bundle
  assert b.tokenizer.tokenize("pineapple") == ["pine", "##apple"]
  rng = np.random.default_rng(3)
  video = tm.sample_video(rng, "stir", "pineapple")
  nouns = ["egg", "pineapple", "apple", "tomato"]
  (pred,) = zs.classify(b, [video], verbs=tm.VERBS, nouns=nouns)
  assert pred.nouns[0] == "pineapple" and pred.verbs[0] == "stir"
  scores = dict(zip(pred.nouns, pred.noun_scores))
  # The noun slot widened to two [MASK]s: P(pine) P(##apple | pine), the verb slot one mask.
  pieces = b.tokenizer.encode("pineapple")
  want = _chain(b, video, [1, 2], 1, pieces)
  assert scores["pineapple"] == pytest.approx(want, abs=1e-5)
  # Not the mean of the pieces predicted together, as labels were once scored.
  tpl = prompts.Template.parse(zs.DEFAULT_TEMPLATE, b.tokenizer, 2).expand([1, 2])
  together = np.mean([_direct_lp(b, video, tpl, 1 + k, p) for k, p in enumerate(pieces)])
  assert abs(scores["pineapple"] - together) > 1e-3
  for one_piece in ("egg", "apple"):
    want = _chain(b, video, [1, 1], 1, b.tokenizer.encode(one_piece))
    assert scores[one_piece] == pytest.approx(want, abs=1e-5)
  # A multi-piece verb label widens the verb slot instead.
  (pred,) = zs.classify(b, [video], verbs=["stir", "pineapple"], nouns=["egg"])
  want = _chain(b, video, [2, 1], 0, pieces)
  assert dict(zip(pred.verbs, pred.verb_scores))["pineapple"] == pytest.approx(want, abs=1e-5)


def test_the_language_prior_and_calibrated_scores(world):
  """prior: the same chain without the video, one answer for every video; calibrated: the
  score with the video less the prior's, label by label."""
  b = world.bundle
  videos, pairs = _videos(7)
  nouns = ["egg", "pineapple", "apple", "tomato"]
  kwargs = dict(verbs=tm.VERBS, nouns=nouns, top_k=4)
  chain = zs.classify(b, videos, **kwargs)
  prior = zs.classify(b, videos, scoring="prior", **kwargs)
  calibrated = zs.classify(b, videos, scoring="calibrated", **kwargs)
  assert all(p.nouns == prior[0].nouns and p.noun_scores == prior[0].noun_scores for p in prior)
  pieces = b.tokenizer.encode("pineapple")
  want = _chain(b, None, [1, 2], 1, pieces)
  assert dict(zip(prior[0].nouns, prior[0].noun_scores))["pineapple"] == pytest.approx(
      want, abs=1e-5)
  for c, p, k in zip(chain, calibrated, prior):
    for side in ("verb", "noun"):
      with_video = dict(zip(getattr(c, f"{side}s"), getattr(c, f"{side}_scores")))
      alone = dict(zip(getattr(k, f"{side}s"), getattr(k, f"{side}_scores")))
      got = dict(zip(getattr(p, f"{side}s"), getattr(p, f"{side}_scores")))
      for label, value in got.items():
        assert value == pytest.approx(with_video[label] - alone[label], abs=1e-5)
  # Blind to the video, the prior names one verb for all: right only where the truth is it.
  verb1 = zs.topk_accuracy([p.verbs for p in prior], [v for v, _ in pairs], 1)
  assert verb1 == pytest.approx(np.mean([v == prior[0].verbs[0] for v, _ in pairs]))
  assert zs.topk_accuracy([p.verbs for p in calibrated], [v for v, _ in pairs], 1) > 0.5
  with pytest.raises(ValueError, match="scoring='prior' compares each label"):
    zs.classify(b, videos[:1], scoring="prior")
  with pytest.raises(ValueError, match="scoring='fair': expected one of"):
    zs.classify(b, videos[:1], verbs=tm.VERBS, nouns=nouns, scoring="fair")


def test_batched_and_one_at_a_time_agree(world):
  videos, _ = _videos(4)
  batched = zs.classify(world.bundle, videos, verbs=tm.VERBS, nouns=tm.NOUNS, batch_size=64)
  single = zs.classify(world.bundle, videos[:5], verbs=tm.VERBS, nouns=tm.NOUNS, batch_size=1)
  for a, b in zip(batched, single):
    assert a.verbs == b.verbs and a.nouns == b.nouns
    np.testing.assert_allclose(a.verb_scores, b.verb_scores, atol=1e-5)


def test_prompt_ensemble_averages_each_labels_scores(world):
  videos, pairs = _videos(6)
  other = "next , [MASK] the [MASK] now"
  both = zs.classify(world.bundle, videos, verbs=tm.VERBS, nouns=tm.NOUNS,
                     template=[zs.DEFAULT_TEMPLATE, other], top_k=4)
  alone = [zs.classify(world.bundle, videos, verbs=tm.VERBS, nouns=tm.NOUNS, template=t,
                       top_k=4) for t in (zs.DEFAULT_TEMPLATE, other)]
  for i, p in enumerate(both):
    for key in ("verb", "noun"):
      mine = dict(zip(getattr(p, f"{key}s"), getattr(p, f"{key}_scores")))
      each = [dict(zip(getattr(a[i], f"{key}s"), getattr(a[i], f"{key}_scores"))) for a in alone]
      for label, score in mine.items():
        assert score == pytest.approx((each[0][label] + each[1][label]) / 2, abs=1e-5)
      assert getattr(p, f"{key}_scores") == sorted(mine.values(), reverse=True)
  # One template in a list is that template.
  (one,) = zs.classify(world.bundle, videos[:1], verbs=tm.VERBS, nouns=tm.NOUNS,
                       template=[other])
  assert one == zs.classify(world.bundle, videos[:1], verbs=tm.VERBS, nouns=tm.NOUNS,
                            template=other)[0]
  with pytest.raises(ValueError, match="needs both label sets"):
    zs.classify(world.bundle, videos[:1], verbs=tm.VERBS, template=[other, other])
  with pytest.raises(ValueError, match="no template given"):
    zs.classify(world.bundle, videos[:1], verbs=tm.VERBS, nouns=tm.NOUNS, template=[])


def test_bad_inputs_are_named(world):
  videos, _ = _videos()
  b = world.bundle
  with pytest.raises(ValueError, match=r"has 1 \[MASK\] markers; expected 2"):
    zs.classify(b, videos, template="now let me show you how to [MASK] the egg .")
  with pytest.raises(ValueError, match=r"video 1 is empty"):
    zs.classify(b, [videos[0], []])
  with pytest.raises(ValueError, match=r"noun label '  ' tokenizes to nothing"):
    zs.classify(b, videos[:1], nouns=["egg", "  "])
  unknown = next(w for w in ("qzx", "§", "\u4e00") if b.tokenizer.specials.unk in
                 b.tokenizer.encode(w))
  with pytest.raises(ValueError, match=r"is unknown to the text tokenizer"):
    zs.classify(b, videos[:1], verbs=["cut", unknown])
  with pytest.raises(ValueError, match=r"verb label set is empty"):
    zs.classify(b, videos[:1], verbs=[])
  with pytest.raises(ValueError, match=r"repeats \['egg'\]"):
    zs.classify(b, videos[:1], nouns=["egg", "egg"])
  with pytest.raises(ValueError, match=r"^order='sideways': expected one of"):
    zs.classify(b, videos[:1], order="sideways")


def test_topk_accuracy_on_a_hand_made_example():
  predicted = [["cut", "stir", "pour"], ["stir", "cut", "pour"], ["pour", "stir", "cut"],
               ["flip", "pour", "stir"]]
  truth = ["cut", "cut", "cut", "cut"]
  assert zs.topk_accuracy(predicted, truth, 1) == 0.25
  assert zs.topk_accuracy(predicted, truth, 2) == 0.5
  assert zs.topk_accuracy(predicted, truth, 3) == 0.75
  assert zs.topk_accuracy(predicted, truth, 5) == 0.75
  with pytest.raises(ValueError, match=r"3 predictions for 4 true labels"):
    zs.topk_accuracy(predicted[:3], truth, 1)


# Readers.


def test_read_youcook2_annotations(tmp_path):
  path = tmp_path / "youcookii_annotations.json"
  path.write_text(json.dumps({"database": {
      "v1": {"subset": "training", "annotations": [
          {"segment": [5, 12], "sentence": "crack the eggs"},
          {"segment": [14, 30], "sentence": "whisk the eggs"}]},
      "v2": {"subset": "validation", "annotations": [
          {"segment": [0, 8], "sentence": "slice the bread"}]}}}))
  all_segments = zs.read_youcook2(path)
  assert [(s.video_id, s.start, s.end, s.sentence) for s in all_segments] == [
      ("v1", 5.0, 12.0, "crack the eggs"), ("v1", 14.0, 30.0, "whisk the eggs"),
      ("v2", 0.0, 8.0, "slice the bread")]
  assert [s.video_id for s in zs.read_youcook2(path, "validation")] == ["v2"]
  with pytest.raises(ValueError, match=r"split='val'"):
    zs.read_youcook2(path, "val")
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"database": {"v1": {"annotations": [{"sentence": "x"}]}}}))
  with pytest.raises(ValueError, match=rf"{bad}: database.v1.annotations\[0\]"):
    zs.read_youcook2(bad)
  bad.write_text("[1, 2]")
  with pytest.raises(ValueError, match=r"'database'"):
    zs.read_youcook2(bad)


def test_read_labels_in_both_formats(tmp_path):
  tsv = tmp_path / "labels.tsv"
  tsv.write_text("video_id\tstart\tend\tverb\tnoun\n# a comment\n\n"
                 "v1\t5\t12\tcrack\tegg\tcrack the eggs\nv2\t0\t8.5\tslice\tbread\n")
  jsonl = tmp_path / "labels.jsonl"
  jsonl.write_text('{"video_id": "v1", "start": 5, "end": 12, "verb": "crack", "noun": "egg", '
                   '"sentence": "crack the eggs"}\n'
                   '{"video_id": "v2", "start": 0, "end": 8.5, "verb": "slice", '
                   '"noun": "bread"}\n')
  want = [zs.Segment("v1", 5.0, 12.0, "crack", "egg", "crack the eggs"),
          zs.Segment("v2", 0.0, 8.5, "slice", "bread", "")]
  assert zs.read_labels(tsv) == want
  assert zs.read_labels(jsonl) == want
  tsv.write_text("v1\t5\t12\tcrack\n")
  with pytest.raises(ValueError, match=rf"{tsv}:1: expected 5 or 6 tab-separated fields"):
    zs.read_labels(tsv)
  tsv.write_text("v1\t5\t12\tcrack\tegg\nv1\t9\t3\tcut\tegg\n")
  with pytest.raises(ValueError, match=rf"{tsv}:2: end 3.0 must be after start 9.0"):
    zs.read_labels(tsv)
  jsonl.write_text('{"video_id": "v1", "start": 5}\n')
  with pytest.raises(ValueError, match=rf"{jsonl}:1: .*missing keys \['end', 'verb', 'noun'\]"):
    zs.read_labels(jsonl)


# Features to tokens, and the command.


@pytest.fixture(scope="module")
def features(tmp_path_factory):
  return tm.fit_world_vocab(tmp_path_factory.mktemp("world_vocab"))


def test_segment_tokens_take_the_clips_inside_each_segment(features, tmp_path):
  from vbert_jax.vocab import vocabulary  # pylint: disable=g-import-not-at-top
  vocab = vocabulary.VisualVocabulary.load(features.vocab_path)
  rng = np.random.default_rng(0)
  tokens = [5, 9, 9, 40, 41, 63]
  tm.write_video_features(tmp_path, "v1", features.clips(rng, tokens))
  # Clip middles: 0.75, 2.25, 3.75, 5.25, 6.75, 8.25 s.
  segs = [zs.Segment("v1", 2.0, 5.3), zs.Segment("v1", 0.0, 0.7), zs.Segment("v1", 6.0, 99)]
  got = zs.segment_tokens(tmp_path, vocab, segs)
  assert [g.tolist() for g in got] == [[9, 9, 40], [], [41, 63]]
  with pytest.raises(FileNotFoundError, match=r"v9.npz: no feature file for video 'v9'"):
    zs.segment_tokens(tmp_path, vocab, [zs.Segment("v9", 0, 1)])


def test_command_runs_the_protocol_and_writes_results(world, features, tmp_path):
  rng = np.random.default_rng(5)
  feats = tmp_path / "features"
  lines = ["video_id\tstart\tend\tverb\tnoun"]
  for i, (verb, noun) in enumerate([(v, n) for v in tm.VERBS for n in tm.NOUNS]):
    step = tm.step_tokens(verb, noun)
    other = tm.step_tokens(tm.VERBS[(i + 1) % 4], tm.NOUNS[(i + 2) % 4])
    # Six clips of the step between two clips of another step.
    tokens = [other[0], *rng.choice(step, 6), other[1]]
    tm.write_video_features(feats, f"v{i}", features.clips(rng, tokens))
    lines.append(f"v{i}\t1.5\t10.5\t{verb}\t{noun}")
  lines.append("v0\t30\t40\tcut\tegg")  # after the video's end: no clips
  lines.append("gone\t0\t3\tcut\tegg")  # no feature file
  labels = tmp_path / "labels.tsv"
  labels.write_text("\n".join(lines) + "\n")
  out = tmp_path / "out"
  code = zs.main([f"--workdir={world.workdir}", f"--features={feats}", f"--labels={labels}",
                  f"--visual_vocab={features.vocab_path}", f"--out={out}"])
  assert code == 0
  results = json.loads((out / "results.json").read_text())
  assert results["segments"] == 16 and results["verbs"] == sorted(tm.VERBS)
  assert results["templates"] == [zs.DEFAULT_TEMPLATE]
  assert results["orders"]["video_first"]["verb_top1"] == 1.0
  assert results["orders"]["video_first"]["noun_top1"] == 1.0
  assert results["orders"]["text_first"]["verb_top5"] == 1.0  # 4 labels: all in the top 5
  reasons = sorted((s["video_id"], s["reason"].split()[0]) for s in results["skipped"])
  assert reasons == [("gone", "no"), ("v0", "no")]
  predictions = (out / "predictions.jsonl").read_text().splitlines()
  assert len(predictions) == 32 and json.loads(predictions[0])["order"] == "video_first"
  # With YouCook II's annotations: only the labelled segments of the chosen split, with their
  # sentences; a labelled segment its video does not list is named.
  database = {f"v{i}": {"subset": "validation" if i < 6 else "training", "annotations": [
      {"segment": [1.5, 10.5], "sentence": f"step {i}"}]} for i in range(16)}
  annotations = tmp_path / "youcookii_annotations.json"
  annotations.write_text(json.dumps({"database": database}))
  code = zs.main([f"--workdir={world.workdir}", f"--features={feats}", f"--labels={labels}",
                  f"--visual_vocab={features.vocab_path}", f"--out={out}", "--order=video_first",
                  f"--youcook2={annotations}", "--split=validation",
                  f"--template={zs.DEFAULT_TEMPLATE}", "--template=next , [MASK] the [MASK] now"])
  assert code == 0
  results = json.loads((out / "results.json").read_text())
  assert len(results["templates"]) == 2
  assert results["segments"] == 6 and list(results["orders"]) == ["video_first"]
  assert [s["reason"] for s in results["skipped"]] == [
      "not a segment of the YouCook II annotations"]
  first = json.loads((out / "predictions.jsonl").read_text().splitlines()[0])
  assert first["sentence"] == "step 0" and first["verbs"][0] == first["verb"]
  # One word list for both slots, a word of two pieces among them, calibrated.
  words = tmp_path / "words.txt"
  vocabulary = list(tm.VERBS + tm.NOUNS)
  words.write_text("\n".join(vocabulary) + "\n")
  code = zs.main([f"--workdir={world.workdir}", f"--features={feats}", f"--labels={labels}",
                  f"--visual_vocab={features.vocab_path}", f"--out={out}", "--order=video_first",
                  f"--vocabulary=@{words}", "--scoring=calibrated", "--top_k=8"])
  assert code == 0
  results = json.loads((out / "results.json").read_text())
  assert results["verbs"] == results["nouns"] == vocabulary
  assert results["scoring"] == "calibrated"
  first = json.loads((out / "predictions.jsonl").read_text().splitlines()[0])
  assert sorted(first["nouns"]) == sorted(vocabulary) and "pineapple" in first["verbs"]
  assert results["orders"]["video_first"]["verb_top1"] > 0.5


def test_command_help_and_errors(world, tmp_path, capsys):
  with pytest.raises(SystemExit):
    zs.parse_args(["--help"])
  text = capsys.readouterr().out
  for words in ("--features", "--labels", "tab-separated", "top-1 and top-5", "--youcook2"):
    assert words in text
  labels = tmp_path / "labels.tsv"
  labels.write_text("v1\t0\t3\tcut\tegg\n")
  code = zs.main([f"--workdir={world.workdir}", f"--features={tmp_path}",
                  f"--labels={labels}", f"--out={tmp_path / 'out'}"])
  assert code == 1
  assert "no visual vocabulary: pass --visual_vocab" in capsys.readouterr().err
  code = zs.main([f"--workdir={world.workdir}", f"--features={tmp_path}", f"--labels={labels}",
                  f"--out={tmp_path / 'out'}", "--vocabulary=cut,egg", "--verbs=cut"])
  assert code == 1
  assert "--vocabulary replaces the label sets" in capsys.readouterr().err


def test_segments_of_every_length_compile_a_few_shapes(world):
  """Prompt widths are a few (16, 20, 24, then max_len here): segments of 1 to 60 clips, eight to
  a pass, compile at most one forward pass per width for each pass that one segment needs."""
  rng = np.random.default_rng(5)
  videos = [tm.sample_video(rng, "cut", "egg", length=n) for n in range(1, 61)]
  world.bundle._jitted.clear_cache()
  zs.classify(world.bundle, videos[:1], verbs=tm.VERBS, nouns=tm.NOUNS, batch_size=8)
  per_width = world.bundle._jitted._cache_size()
  world.bundle._jitted.clear_cache()
  zs.classify(world.bundle, videos, verbs=tm.VERBS, nouns=tm.NOUNS, batch_size=8)
  widths = {prompts.prompt_width(n, tm.MAX_LEN) for n in range(1, 200)}
  assert widths == {16, 20, 24, tm.MAX_LEN}
  assert per_width <= world.bundle._jitted._cache_size() <= per_width * len(widths)
