"""Text-to-video and forecasting: valid visual tokens only, the requested number of
alternatives in score order, determinism, learned answers on the trained model, exact search
against brute force, bad input, the picture strips and the commands."""

import dataclasses
import itertools
import json

import jax
import numpy as np
import pytest
from PIL import Image

from helpers import trained_model as tm
from vbert_jax import sequence
from vbert_jax.tasks import bundle as bundle_lib
from vbert_jax.tasks import forecast as fc
from vbert_jax.tasks import prompts
from vbert_jax.tasks import strips
from vbert_jax.tasks import text_to_video as t2v

TEXT = "now let me show you how to {} the {} ."


@pytest.fixture(scope="session")
def world(tmp_path_factory):
  return tm.trained_bundle(tmp_path_factory)


def _check_rows(rows, k, slots):
  assert rows.shape == (k, slots) and rows.dtype == np.int32
  assert rows.min() >= 0 and rows.max() < tm.VISUAL_SIZE


# Text-to-video.


@pytest.mark.parametrize("verb,noun", [("cut", "tomato"), ("pour", "egg"), ("stir", "pineapple")])
def test_text_to_video_shows_the_named_step(world, verb, noun):
  rows = t2v.generate(world.bundle, TEXT.format(verb, noun), 5)
  _check_rows(rows, 1, 5)
  assert set(rows[0].tolist()) <= set(tm.step_tokens(verb, noun).tolist())


def test_topk_rows_are_exact_and_in_score_order(world):
  b = world.bundle
  rows, scores = t2v.generate_scored(b, TEXT.format("flip", "lemon"), 3, mode="topk", k=4)
  _check_rows(rows, 4, 3)
  assert len({tuple(r) for r in rows}) == 4
  assert np.all(np.diff(scores) <= 0)
  np.testing.assert_array_equal(rows[0], t2v.generate(b, TEXT.format("flip", "lemon"), 3)[0])
  # The scores are the summed slot log-probabilities of one forward pass.
  packed, pos = prompts.text_to_video(b.layout, b.tokenizer.encode(TEXT.format("flip", "lemon")),
                                      3)
  lp = b.log_probs(sequence.stack([packed]), mvm_positions=pos[None])["mvm_log_probs"][0]
  np.testing.assert_allclose(scores, [lp[np.arange(3), r].sum() for r in rows], atol=1e-5)


def test_k_best_matches_brute_force():
  lp = np.log(np.random.default_rng(0).dirichlet(np.ones(5), size=3))  # 3 slots, 5 tokens
  rows, scores = t2v.k_best(lp, 7)
  every = sorted(((lp[np.arange(3), list(c)].sum(), c)
                  for c in itertools.product(range(5), repeat=3)), reverse=True)[:7]
  np.testing.assert_allclose(scores, [s for s, _ in every])
  assert [tuple(r) for r in rows] == [c for _, c in every]


def test_sampling_is_seeded_sorted_and_tempered(world):
  b, text = world.bundle, TEXT.format("cut", "lemon")
  a, sa = t2v.generate_scored(b, text, 6, mode="sample", k=5, seed=3)
  again = t2v.generate(b, text, 6, mode="sample", k=5, seed=3)
  other = t2v.generate(b, text, 6, mode="sample", k=5, seed=4)
  _check_rows(a, 5, 6)
  np.testing.assert_array_equal(a, again)
  assert not np.array_equal(a, other)
  assert np.all(np.diff(sa) <= 0)
  cold = t2v.generate(b, text, 6, mode="sample", k=3, temperature=1e-4, seed=0)
  np.testing.assert_array_equal(cold, np.repeat(t2v.generate(b, text, 6), 3, axis=0))
  # A hot sample strays beyond the step's four tokens; a tempered one stays with them.
  hot = t2v.generate(b, text, 6, mode="sample", k=20, temperature=5.0, seed=0)
  assert len(set(hot.ravel().tolist())) > 8


def _rigged(world):
  """The trained model with every real visual token pushed below the padding ids' logit."""
  b = world.bundle
  params = jax.tree.map(np.asarray, jax.device_get(b.params))
  bias = params["mvm_head"]["bias"].copy()
  bias[:tm.VISUAL_SIZE] = -1e12
  params["mvm_head"]["bias"] = bias
  return bundle_lib.Bundle.from_parts(b.config, params, b.tokenizer)


def test_padding_ids_are_never_produced_even_when_they_score_best(world):
  rigged = _rigged(world)
  for mode, k in (("argmax", 1), ("topk", 3), ("sample", 3)):
    _check_rows(t2v.generate(rigged, TEXT.format("cut", "egg"), 4, mode=mode, k=k), k, 4)
  for method in fc.METHODS:
    for tokens, _ in fc.forecast(rigged, [1, 2, 3], 2, method=method):
      assert tokens.min() >= 0 and tokens.max() < tm.VISUAL_SIZE


def test_text_to_video_bad_input(world):
  b = world.bundle
  with pytest.raises(ValueError, match=r"mode='best'"):
    t2v.generate(b, "cut the egg", 3, mode="best")
  with pytest.raises(ValueError, match=r"mode='argmax' gives one row; got k=3"):
    t2v.generate(b, "cut the egg", 3, k=3)
  with pytest.raises(ValueError, match=r"temperature=0"):
    t2v.generate(b, "cut the egg", 3, mode="sample", temperature=0)
  with pytest.raises(ValueError, match=r"the text is empty"):
    t2v.generate(b, "  ", 3)
  with pytest.raises(ValueError, match=r"exceed max_len=28"):
    t2v.generate(b, "cut the egg", 40)
  with pytest.raises(ValueError, match=r"k=65: only 64 distinct rows of 1 slots"):
    t2v.generate(b, "cut the egg", 1, mode="topk", k=65)


# Forecasting.


@pytest.mark.parametrize("method", fc.METHODS)
@pytest.mark.parametrize("layout", prompts.FORECAST_LAYOUTS)
def test_forecast_continues_the_step(world, method, layout):
  rng = np.random.default_rng(7)
  video = tm.sample_video(rng, "flip", "egg", 8)
  step = set(tm.step_tokens("flip", "egg").tolist())
  for horizon in (1, 2, 3):
    futures = fc.forecast(world.bundle, video, horizon, method=method, layout=layout)
    assert len(futures) == 3
    assert all(t.shape == (horizon,) and t.dtype == np.int32 for t, _ in futures)
    scores = [s for _, s in futures]
    assert scores == sorted(scores, reverse=True)
    assert len({tuple(t) for t, _ in futures}) == 3
    if layout == "video_only":  # the layout trained for forecasting
      assert set(futures[0][0].tolist()) <= step
    again = fc.forecast(world.bundle, video, horizon, method=method, layout=layout)
    assert [(t.tolist(), s) for t, s in again] == [(t.tolist(), s) for t, s in futures]
  more = fc.forecast(world.bundle, video, 5, top=6, method=method, layout=layout)
  assert len(more) == 6 and all(t.shape == (5,) for t, _ in more)


def test_beam_search_matches_the_exhaustive_joint_score(world):
  b = world.bundle
  video = tm.sample_video(np.random.default_rng(8), "cut", "lemon", 6)
  base, pos = prompts.forecast(b.layout, video, 2, "video_only")
  # Exhaustive: p(first) from the masked input, p(second | first) for every first token.
  first = t2v.visual_log_probs(b, [base], pos[None])[0, 0]
  filled = []
  for t in range(tm.VISUAL_SIZE):
    p = dataclasses.replace(base, input_ids=base.input_ids.copy())
    p.input_ids[pos[0]] = t + b.vocab.visual_offset
    filled.append(p)
  second = t2v.visual_log_probs(b, filled, np.repeat(pos[None], tm.VISUAL_SIZE, 0))[:, 1]
  joint = first[:, None] + second  # [first, second]
  order = np.argsort(-joint.ravel(), kind="stable")[:3]
  want = [(divmod(int(i), tm.VISUAL_SIZE), joint.ravel()[i]) for i in order]
  got = fc.forecast(b, video, 2, top=3, beam_size=tm.VISUAL_SIZE)
  assert [tuple(t.tolist()) for t, _ in got] == [w for w, _ in want]
  np.testing.assert_allclose([s for _, s in got], [s for _, s in want], atol=1e-4)


def test_forecast_bad_input(world):
  b = world.bundle
  with pytest.raises(ValueError, match=r"empty video"):
    fc.forecast(b, [], 2)
  with pytest.raises(ValueError, match=r"horizon=0"):
    fc.forecast(b, [1, 2], 0)
  with pytest.raises(ValueError, match=r"method='greedy'"):
    fc.forecast(b, [1, 2], 1, method="greedy")
  with pytest.raises(ValueError, match=r"layout='text'"):
    fc.forecast(b, [1, 2], 1, layout="text")
  with pytest.raises(ValueError, match=r"visual tokens must lie in \[0, 64\)"):
    fc.forecast(b, [1, 99], 1)
  with pytest.raises(ValueError, match=r"top=65: only 64 distinct futures of 1 clips"):
    fc.forecast(b, [1, 2], 1, top=65)


# Pictures and commands.


COLOURS = np.array([[230, 30, 30], [30, 200, 40], [40, 60, 220], [240, 220, 30]], np.uint8)


@pytest.fixture(scope="module")
def coloured_vocab(tmp_path_factory):
  """A 4-token vocabulary fitted on 8 clips of a real video, clip i filled with COLOURS[i % 4]."""
  from vbert_jax.demo.world import world as world_lib  # pylint: disable=g-import-not-at-top
  from vbert_jax.video import features_io  # pylint: disable=g-import-not-at-top
  from vbert_jax.vocab import kmeans, vocabulary  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("coloured")
  video = root / "colours.mp4"
  frames = [np.broadcast_to(COLOURS[i % 4], (30, 64, 64, 3)).copy() for i in range(8)]
  world_lib.encode_h264(video, frames, world_lib.WorldConfig(width=64, height=64))
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(4, 6)) * 10
  rows = np.stack([centres[i % 4] + rng.normal(size=6) * 0.1 for i in range(8)])
  starts = np.arange(8) * 1.5
  feats = root / "features"
  features_io.save_features(feats, features_io.VideoFeatures(
      "colours", str(video), rows.astype(np.float32), starts, starts + 1.5, "avg", 64))
  vocab = vocabulary.VisualVocabulary.fit(feats, kmeans.KMeansConfig(depth=1, branching=4))
  return vocab


def test_token_strip_shows_each_tokens_nearest_clip(coloured_vocab, tmp_path):
  vocab = coloured_vocab
  tile = 32
  path = strips.token_strip(vocab, [[0, 1], [2, 3, 0]], tmp_path / "strip.png",
                            labels=["a", "b"], tile=tile, label_width=40)
  image = np.asarray(Image.open(path).convert("RGB"))
  assert image.shape == (2 * (tile + 4), 40 + 3 * (tile + 4), 3)
  for r, row in enumerate([[0, 1], [2, 3, 0]]):
    for c, token in enumerate(row):
      clip = vocab.nearest_clips(token, 1)[0].clip
      centre = image[r * (tile + 4) + tile // 2, 40 + c * (tile + 4) + tile // 2].astype(int)
      assert np.abs(centre - COLOURS[clip % 4]).max() < 40, (token, clip, centre)


def test_token_without_clips_gets_a_grey_tile(coloured_vocab, tmp_path):
  vocab = dataclasses.replace(coloured_vocab, nearest=dataclasses.replace(
      coloured_vocab.nearest, video=np.full_like(coloured_vocab.nearest.video, -1)))
  path = strips.token_strip(vocab, [[1]], tmp_path / "grey.png", tile=16, label_width=0)
  image = np.asarray(Image.open(path).convert("RGB"))
  assert tuple(image[8, 8]) == strips.GREY
  with pytest.raises(ValueError, match=r"no tokens to draw"):
    strips.token_strip(vocab, [[]], tmp_path / "none.png")


def test_commands_write_results_and_pictures(world, tmp_path, capsys):
  vocab = tm.fit_world_vocab(tmp_path)
  out = tmp_path / "t2v"
  code = t2v.main([f"--workdir={world.workdir}", f"--out={out}", f"--visual_vocab="
                   f"{vocab.vocab_path}", f"--text={TEXT.format('cut', 'egg')}",
                   "--text=pour the lemon", "--mode=topk", "--k=3", "--num_slots=4", "--tile=16"])
  assert code == 0
  results = json.loads((out / "results.json").read_text())
  assert [len(t["tokens"]) for t in results["texts"]] == [3, 3]
  assert set(results["texts"][0]["tokens"][0]) <= set(tm.step_tokens("cut", "egg").tolist())
  assert Image.open(out / results["texts"][0]["picture"]).size[1] == 3 * (16 + 4)
  out = tmp_path / "forecast"
  video = ",".join(str(t) for t in tm.sample_video(np.random.default_rng(0), "stir", "egg", 6))
  code = fc.main([f"--workdir={world.workdir}", f"--out={out}", f"--tokens={video}",
                  f"--visual_vocab={vocab.vocab_path}", "--tile=16"])
  assert code == 0
  results = json.loads((out / "results.json").read_text())
  assert sorted(results["horizons"]) == ["1", "2", "3"]
  for h, entry in results["horizons"].items():
    assert [len(f["tokens"]) for f in entry["futures"]] == [int(h)] * 3
    assert (out / entry["picture"]).is_file()
  code = fc.main([f"--workdir={world.workdir}", f"--out={out}"])
  assert code == 1 and "exactly one of --tokens or --features" in capsys.readouterr().err
  for module in (t2v, fc):
    with pytest.raises(SystemExit):
      module.parse_args(["--help"])
    assert "--workdir" in capsys.readouterr().out
