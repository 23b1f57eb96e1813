"""Retrieval: rows built on the device against `Layout.pair`, the cross-encoder's scores against
the bundle's own forward pass, the shortlist, the metrics with ties, the bag-of-tokens baseline
against scikit-learn's MultinomialNB, the readers of YouCook II and MSR-VTT, and the command."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import naive_bayes

from helpers import tolerance
from helpers import trained_model as tm
from vbert_jax import sequence
from vbert_jax.tasks import annotations
from vbert_jax.tasks import bag_of_tokens
from vbert_jax.tasks import ranking
from vbert_jax.tasks import retrieval
from vbert_jax.tasks import zero_shot as zs


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  return tm.trained_bundle(tmp_path_factory)


def _random_pairs(seed=0):
  rng = np.random.default_rng(seed)
  # Empty, short and long captions and segments: pairs that fit and pairs cut in proportion.
  texts = [rng.integers(6, len(tm.WORDS), n).astype(np.int32) for n in (0, 1, 3, 9, 17, 30)]
  videos = [rng.integers(0, tm.VISUAL_SIZE, n).astype(np.int32) for n in (1, 2, 5, 12, 25)]
  return texts, videos


def test_rows_built_on_the_device_are_layout_pair_rows(world):
  texts, videos = _random_pairs()
  layout = world.bundle.layout
  pairs = np.array([(i, j) for i in range(len(texts)) for j in range(len(videos))], np.int32)
  tables = [jnp.asarray(a) for a in (*retrieval._table(texts), *retrieval._table(videos))]
  rows = retrieval.pair_rows(layout.vocab, layout.max_len, layout.max_len, *tables,
                             jnp.asarray(pairs))
  want = sequence.stack([layout.pair(texts[i], videos[j]) for i, j in pairs])
  assert any(layout.pair(texts[i], videos[j]).truncated for i, j in pairs)
  for key in ("input_ids", "segment_ids", "position_ids", "input_mask"):
    np.testing.assert_array_equal(np.asarray(rows[key]), want[key], err_msg=key)


def test_pair_scores_are_the_models_lva_logits(world):
  """Batched, each row only as wide as its pair's width bucket, against `Bundle.apply` on one
  `Layout.pair` row at a time at max_len: the same sums, over the same real tokens, in another
  order."""
  texts, videos = _random_pairs(1)
  pairs = np.array([(i, j) for i in range(len(texts)) for j in range(len(videos))], np.int32)
  scorer = retrieval.PairScorer(world.bundle, texts, videos, batch_size=7)
  got = scorer(pairs)
  assert len(np.unique(scorer.widths(pairs))) >= 3  # rows of several widths, batched apart
  want = np.array([world.bundle.apply(sequence.stack([world.bundle.layout.pair(
      texts[i], videos[j])]))["lva_logits"].reshape(()) for i, j in pairs])
  assert got.shape == (len(pairs),) and got.dtype == np.float32
  # Padding differs, real tokens do not: what differs is the order of float32 sums. Each layer
  # sums at most max_len keys and mlp_dim (the widest) products of LayerNorm outputs of order
  # one, and re-normalises; the classifier then sums `hidden` pooled values below 1 in size,
  # weighed by its kernel.
  cfg = world.bundle.model_config
  head = world.bundle.params["lva_head"]["classifier"]
  weight = float(np.abs(np.asarray(head["kernel"])).sum() + np.abs(np.asarray(head["bias"])).sum())
  atol = cfg.num_layers * (tm.MAX_LEN + cfg.mlp_dim) * tolerance.EPS32 * weight
  np.testing.assert_allclose(got, want, rtol=0, atol=atol)
  assert np.ptp(want) > 100 * atol  # the scores differ between pairs: the check can fail
  np.testing.assert_allclose(
      retrieval.score_matrix(world.bundle, texts, videos, batch_size=64),
      got.reshape(len(texts), len(videos)), rtol=0, atol=atol)
  # The 8 devices of this process each took a share of every batch (7 pairs: 8, one a device);
  # on one device the scores are the same.
  assert scorer.batch_size == 8 and scorer.devices == jax.devices() and len(jax.devices()) == 8
  one = retrieval.PairScorer(world.bundle, texts, videos, batch_size=7,
                             devices=jax.devices()[:1])
  assert one.batch_size == 7
  np.testing.assert_allclose(one(pairs), got, rtol=0, atol=atol)


def test_a_shortlist_ranks_its_candidates_by_the_model(world):
  texts, videos = _random_pairs(2)
  texts, videos = texts[:5], videos
  full = retrieval.retrieve(world.bundle, texts, videos)
  assert full.pairs_scored == 25
  # A shortlist from the model's own scores keeps every order: the same metrics.
  exact = retrieval.score_matrix(world.bundle, texts, videos)
  same = retrieval.retrieve(world.bundle, texts, videos, shortlist=2, shortlist_scores=exact)
  assert same.text_to_video == full.text_to_video and same.video_to_text == full.video_to_text
  assert same.pairs_scored < 25
  # Against a cheap score that is the reverse of the model's: the shortlisted two lead, in the
  # model's order, and the rest follow in the cheap order.
  cheap = -exact
  got = retrieval.retrieve(world.bundle, texts, videos, shortlist=2, shortlist_scores=cheap)
  for q in range(5):
    order = np.argsort(-got.t2v_scores[q], kind="stable")
    shortlisted = np.argsort(-cheap[q], kind="stable")[:2]
    assert set(order[:2]) == set(shortlisted)
    assert exact[q, order[0]] >= exact[q, order[1]]
    rest = order[2:]
    assert list(cheap[q, rest]) == sorted(cheap[q, rest], reverse=True)
  with pytest.raises(ValueError, match=r"a shortlist needs shortlist_scores \[5, 5\]"):
    retrieval.retrieve(world.bundle, texts, videos, shortlist=2)
  with pytest.raises(ValueError, match="5 captions and 4 segments"):
    retrieval.retrieve(world.bundle, texts, videos[:4])
  with pytest.raises(ValueError, match=r"segments \[1\] have no visual tokens"):
    retrieval.PairScorer(world.bundle, texts[:2], [videos[0], []])
  with pytest.raises(ValueError, match=r"caption ids must lie in \[0, 33\)"):
    retrieval.PairScorer(world.bundle, [[5, 40]], videos[:1])
  with pytest.raises(ValueError, match=r"visual tokens must lie in \[0, 64\)"):
    retrieval.PairScorer(world.bundle, texts[:1], [[3, 64]])


def test_dual_softmax_takes_away_a_candidates_pull_on_every_query(world):
  rng = np.random.default_rng(4)
  # Each caption matches its own segment by 2; segment 0 scores 5 higher with every caption,
  # caption 1 4 higher with every segment.
  logits = rng.normal(0, 0.3, (6, 6)) + 2 * np.eye(6)
  logits[:, 0] += 5
  logits[1] += 4
  truth = np.arange(6)
  assert ranking.metrics(logits, truth)["r1"] < 0.5  # segment 0 wins every caption
  assert ranking.metrics(logits.T, truth)["r1"] < 0.5  # caption 1 wins every segment
  t2v, v2t = retrieval.dual_softmax(logits)
  assert ranking.metrics(t2v, truth)["r1"] == ranking.metrics(v2t, truth)["r1"] == 1.0
  # Each candidate's scores are log-probabilities over the queries.
  np.testing.assert_allclose(np.exp(t2v).sum(axis=0), 1.0, rtol=1e-12)
  np.testing.assert_allclose(np.exp(v2t).sum(axis=0), 1.0, rtol=1e-12)
  texts, videos = _random_pairs(5)
  texts = texts[:5]
  exact = retrieval.score_matrix(world.bundle, texts, videos)
  got = retrieval.retrieve(world.bundle, texts, videos, normalize="dual_softmax")
  want = retrieval.dual_softmax(exact)
  assert got.text_to_video == ranking.metrics(want[0], np.arange(5))
  assert got.video_to_text == ranking.metrics(want[1], np.arange(5))
  with pytest.raises(ValueError, match="cannot be used with a shortlist"):
    retrieval.retrieve(world.bundle, texts, videos, normalize="dual_softmax", shortlist=2,
                       shortlist_scores=exact)
  with pytest.raises(ValueError, match="normalize='softmax'"):
    retrieval.retrieve(world.bundle, texts, videos, normalize="softmax")


def test_metrics_take_the_expectation_over_ties():
  scores = np.array([[3.0, 1.0, 2.0, 0.0],    # correct (0) first
                     [3.0, 1.0, 2.0, 0.0],    # correct (1) third
                     [1.0, 1.0, 1.0, 1.0],    # a four-way tie: rank 1-4, each 1/4
                     [5.0, 2.0, 2.0, 2.0]])   # correct (3) tied with two others behind one
  m = ranking.metrics(scores, [0, 1, 2, 3], recall=(1, 2, 3))
  assert m["r1"] == pytest.approx((1 + 0 + 0.25 + 0) / 4)
  assert m["r2"] == pytest.approx((1 + 0 + 0.5 + 1 / 3) / 4)
  assert m["r3"] == pytest.approx((1 + 1 + 0.75 + 2 / 3) / 4)
  # Expected ranks 1, 3, 2.5, 3: the median is 2.75.
  assert m["median_rank"] == pytest.approx(2.75) and m["mean_rank"] == pytest.approx(2.375)
  assert m["queries"] == 4 and m["candidates"] == 4
  flat = ranking.metrics(np.zeros((50, 50)), np.arange(50))
  assert {k: flat[k] for k in ("r1", "r5", "r10", "median_rank")} == pytest.approx(
      {k: v for k, v in ranking.chance(50).items() if k != "mean_rank"})
  with pytest.raises(ValueError, match="not finite"):
    ranking.metrics(np.array([[np.nan, 1.0]]), [0])


def test_bag_of_tokens_is_multinomial_naive_bayes():
  rng = np.random.default_rng(3)
  texts = [rng.choice(np.arange(6, 30), rng.integers(1, 6), replace=False) for _ in range(40)]
  videos = [rng.integers(0, 16, rng.integers(1, 8)) for _ in range(40)]
  bag = bag_of_tokens.BagOfTokens(texts, videos, 16, alpha=0.5)
  # scikit-learn's reference: one example per (pair, distinct word), the pair's token counts.
  x = np.stack([np.bincount(v, minlength=16) for v, t in zip(videos, texts) for _ in set(t)])
  y = np.concatenate([sorted(set(t)) for t in texts])
  nb = naive_bayes.MultinomialNB(alpha=0.5).fit(x, y)
  assert list(nb.classes_) == list(bag.words)
  test = [rng.integers(0, 16, rng.integers(1, 8)) for _ in range(10)]
  counts = np.stack([np.bincount(v, minlength=16) for v in test])
  want = nb.predict_log_proba(counts)
  # log-probabilities of order 10, summed over at most 8 tokens and 24 words, in float64.
  np.testing.assert_allclose(bag.log_posterior(test), want, rtol=0, atol=1e-12)
  # A caption's score: the mean lift of its fitted words; an unknown word adds nothing.
  caption = [int(bag.words[0]), int(bag.words[3]), 999]
  lift = want - nb.class_log_prior_
  np.testing.assert_allclose(bag.scores([caption], test)[0], lift[:, [0, 3]].mean(axis=1),
                             rtol=0, atol=1e-12)
  assert (bag.scores([[999]], test) == 0).all()


def test_readers_of_youcook2_and_msrvtt(tmp_path):
  csv_path = tmp_path / "MSRVTT_JSFUSION_test.csv"
  # As the file is shipped: an unnamed index column first; here with a byte-order mark too,
  # and a caption with a comma inside quotes.
  csv_path.write_text("\ufeff,key,vid_key,video_id,sentence\n"
                      "0,ret0,msr7579,video7579,a girl wearing red top and black trouser is "
                      "putting a sweater on a dog\n"
                      '1,ret1,msr7725,video7725,"young people sit around the edges, talking"\n',
                      encoding="utf-8")
  got = annotations.read_captions(csv_path)
  assert [(s.video_id, s.start, s.end) for s in got] == [("video7579", 0.0, math.inf),
                                                         ("video7725", 0.0, math.inf)]
  assert got[1].sentence == "young people sit around the edges, talking"
  data = {"videos": [{"video_id": "video0", "split": "train"},
                     {"video_id": "video9", "split": "test"}],
          "sentences": [{"video_id": "video0", "caption": "a man cooks", "sen_id": 0},
                        {"video_id": "video9", "caption": "a dog runs", "sen_id": 1},
                        {"video_id": "video0", "caption": "someone is cooking", "sen_id": 2}]}
  json_path = tmp_path / "MSRVTT_data.json"
  json_path.write_text(json.dumps(data))
  assert [s.sentence for s in annotations.read_captions(json_path, "training")] == [
      "a man cooks", "someone is cooking"]
  assert [s.video_id for s in annotations.read_captions(json_path, "test")] == ["video9"]
  youcook = tmp_path / "youcookii_annotations_trainval.json"
  youcook.write_text(json.dumps({"database": {"GLd3aX16zBg": {"subset": "validation",
                                                              "annotations": [
      {"id": 0, "segment": [90, 102], "sentence": "spread margarine on two slices"}]}}}))
  assert annotations.read_captions(youcook, "validation") == [
      zs.Segment("GLd3aX16zBg", 90.0, 102.0, sentence="spread margarine on two slices")]
  labels = tmp_path / "labels.tsv"
  labels.write_text("v1\t0\t3\tcut\tegg\nv1\t3\t6\tcut\tegg\tcut the egg\n")
  kept, skipped = annotations.without_captions(annotations.read_captions(labels))
  assert [s.sentence for s in kept] == ["cut the egg"]
  assert skipped == [{"video_id": "v1", "start": 0.0, "end": 3.0, "reason": "no sentence"}]
  labels.write_text("v1\t0\t3\tcut\tegg\n")
  with pytest.raises(ValueError, match="no segment has a sentence"):
    annotations.read_captions(labels)
  csv_path.write_text("video,caption\nvideo1,a cat\n")
  with pytest.raises(ValueError, match=r"lacks the columns \['video_id', 'sentence'\]"):
    annotations.read_captions(csv_path)
  csv_path.write_text("video_id,sentence\nvideo1,\n")
  with pytest.raises(ValueError, match=r"MSRVTT_JSFUSION_test.csv:2: empty video_id or sentence"):
    annotations.read_captions(csv_path)
  (tmp_path / "other.json").write_text("{}")
  with pytest.raises(ValueError, match="neither YouCook II annotations"):
    annotations.read_captions(tmp_path / "other.json")


@pytest.fixture(scope="module")
def features(tmp_path_factory):
  return tm.fit_world_vocab(tmp_path_factory.mktemp("retrieval_vocab"))


def test_command_ranks_both_ways_and_lists_what_it_skips(world, features, tmp_path):
  rng = np.random.default_rng(6)
  feats = tmp_path / "features"
  steps = [(v, n) for v in tm.VERBS for n in tm.NOUNS]
  database = {}
  for i, (verb, noun) in enumerate(steps * 2):
    tm.write_video_features(feats, f"v{i}", features.clips(rng, rng.choice(
        tm.step_tokens(verb, noun), 6)))
    database[f"v{i}"] = {"subset": "validation" if i < 16 else "training", "annotations": [
        {"segment": [0, 9], "sentence": tm.SENTENCE.format(verb=verb, noun=noun)}]}
  database["v0"]["annotations"].append({"segment": [9, 12], "sentence": ""})
  database["gone"] = {"subset": "validation", "annotations": [
      {"segment": [0, 9], "sentence": "now let me show you how to cut the egg"}]}
  captions = tmp_path / "youcookii_annotations_trainval.json"
  captions.write_text(json.dumps({"database": database}))
  out = tmp_path / "out"
  args = [f"--workdir={world.workdir}", f"--features={feats}", f"--captions={captions}",
          f"--visual_vocab={features.vocab_path}", f"--out={out}"]
  assert retrieval.main(args) == 0
  results = json.loads((out / "results.json").read_text())
  assert results["segments"] == 16 and results["pairs_scored"] == 256
  assert results["skipped"] == [{"video_id": "v0", "start": 9.0, "end": 12.0,
                                 "reason": "no sentence"},
                                {"video_id": "gone", "start": 0.0, "end": 9.0,
                                 "reason": f"no feature file in {feats}"}]
  for way in ("text_to_video", "video_to_text"):
    assert set(results[way]) >= {"r1", "r5", "r10", "median_rank"}
    assert 1 <= results[way]["median_rank"] <= 16
  assert results["chance"]["r1"] == pytest.approx(1 / 16)
  ranked = [json.loads(line) for line in (out / "rankings.jsonl").read_text().splitlines()]
  assert len(ranked) == 16 and len(ranked[0]["best"]) == 10
  # The bag of tokens fitted on the training videos tells each validation step apart: its
  # verb-noun pair owns its tokens, and its sentence names it.
  assert retrieval.main(args + [f"--fit={captions}", "--fit_split=training",
                                "--shortlist=3"]) == 0
  results = json.loads((out / "results.json").read_text())
  assert results["bag_of_tokens"]["fit_pairs"] == 16
  assert results["bag_of_tokens"]["text_to_video"]["r1"] == 1.0
  assert results["bag_of_tokens"]["video_to_text"]["r1"] == 1.0
  # Only shortlisted pairs reach the model, and each query's correct one is among its three.
  assert results["shortlist"] == 3 and 16 * 3 <= results["pairs_scored"] <= 16 * 3 * 2
  assert results["text_to_video"]["r5"] == 1.0 and results["video_to_text"]["r5"] == 1.0


def test_command_errors(world, tmp_path, capsys):
  labels = tmp_path / "labels.tsv"
  labels.write_text("v1\t0\t3\tcut\tegg\tcut the egg\n")
  code = retrieval.main([f"--workdir={world.workdir}", f"--features={tmp_path}",
                         f"--captions={labels}", f"--out={tmp_path / 'out'}", "--shortlist=5"])
  assert code == 1
  assert "--shortlist ranks by the bag-of-tokens score: give --fit" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    retrieval.parse_args(["--help"])
  text = capsys.readouterr().out
  for words in ("MSRVTT_JSFUSION_test.csv", "--shortlist", "R@1", "skipped"):
    assert words in text
