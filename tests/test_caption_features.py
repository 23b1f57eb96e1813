"""Caption features from a (tiny, random) VideoBERT, and pairs files made from them."""

import json

import jax
import numpy as np
import pytest

from helpers.configs import pretrain
from helpers import trained_model as tm
from vbert_jax import model as model_lib
from vbert_jax import pretrain as pretrain_lib
from vbert_jax.captioning import features as features_lib
from vbert_jax.captioning import training
from vbert_jax.tasks import bundle as bundle_lib
from vbert_jax.text import tokenizers

WORDS = "now let ' s the to , and then . cut onion pan fry".split()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
  path = tmp_path_factory.mktemp("caption_features") / "vocab.txt"
  path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[>]", *WORDS]) + "\n")
  tokenizer = tokenizers.WordPieceTokenizer(path)
  config = pretrain.get_config("variant=mu,runlocal")
  config.model.text_vocab_size = tokenizer.vocab_size
  config.model.special_ids = "0,1,2,3,4,5"
  config.max_len = config.input.max_example_len = 32
  config.text.vocab = str(path)
  params = model_lib.init_params(pretrain_lib.model_config(config), jax.random.key(0))
  return bundle_lib.Bundle.from_parts(config, params, tokenizer)


VIDEOS = [[1, 2, 3], [40, 41], [7, 8, 9, 10]]


def test_shapes_and_s3d(bundle):
  hidden = bundle.model_config.hidden_size
  got = features_lib.caption_features(bundle, VIDEOS)
  assert got.shape == (3, 2 * hidden) and got.dtype == np.float32
  rng = np.random.default_rng(0)
  s3d = [rng.normal(size=(n, 1024)).astype(np.float32) for n in (3, 2, 4)]
  with_s3d = features_lib.caption_features(bundle, VIDEOS, s3d=s3d)
  assert with_s3d.shape == (3, 2 * hidden + 1024)
  np.testing.assert_allclose(with_s3d[:, :2 * hidden], got, rtol=1e-6)
  np.testing.assert_allclose(with_s3d[:, 2 * hidden:], [x.mean(0) for x in s3d], rtol=1e-6)


def test_means_at_the_video_and_mask_positions(bundle):
  hidden = bundle.model_config.hidden_size
  got = features_lib.caption_features(bundle, VIDEOS[:1])[0]
  # [CLS] v1 v2 v3 [>] now let ' s [MASK] the [MASK] to the [MASK] , and then [MASK] the
  # [MASK] . [SEP]: the videos at 1..3, the masks at 9, 11, 14, 18, 20.
  tok = bundle.tokenizer
  text = tok.encode(features_lib.CAPTION_TEMPLATE)
  ids = [tok.specials.cls, *bundle.vocab.visual_to_joint(VIDEOS[0]), tok.specials.video_sep,
         *text, tok.specials.sep]
  assert [i for i, t in enumerate(ids) if t == tok.specials.mask] == [9, 11, 14, 18, 20]
  n = len(ids)
  pad = bundle.layout.max_len - n
  batch = {"input_ids": np.array([ids + [0] * pad]),
           "segment_ids": np.array([[0] + [1] * 3 + [0] * (n - 4) + [0] * pad]),
           "position_ids": np.arange(bundle.layout.max_len)[None],
           "input_mask": np.array([[1] * n + [0] * pad])}
  states = bundle.apply(batch)["hidden"][0]
  np.testing.assert_allclose(got[:hidden], states[1:4].mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got[hidden:], states[[9, 11, 14, 18, 20]].mean(0), rtol=1e-5,
                             atol=1e-6)


def test_masked_text_half_depends_on_the_video(bundle):
  hidden = bundle.model_config.hidden_size
  got = features_lib.caption_features(bundle, [VIDEOS[0], VIDEOS[1], VIDEOS[0]], batch_size=2)
  text = got[:, hidden:]
  assert np.abs(text[0] - text[1]).max() > 1e-3
  np.testing.assert_allclose(got[0], got[2], rtol=1e-6)  # batch padding does not leak
  one_by_one = features_lib.caption_features(bundle, VIDEOS, batch_size=1)
  np.testing.assert_allclose(features_lib.caption_features(bundle, VIDEOS), one_by_one,
                             rtol=1e-5, atol=1e-6)
  text_first = features_lib.caption_features(bundle, VIDEOS, order="text_first")
  assert np.abs(text_first - one_by_one).max() > 1e-3


def test_bad_inputs(bundle):
  with pytest.raises(ValueError, match=r"has no \[MASK\] marker"):
    features_lib.caption_features(bundle, VIDEOS, template="now let's cut the onion.")
  with pytest.raises(ValueError, match=r"video 1: empty video"):
    features_lib.caption_features(bundle, [VIDEOS[0], []])
  with pytest.raises(ValueError, match="2 S3D arrays for 3 videos"):
    features_lib.caption_features(bundle, VIDEOS, s3d=[np.zeros((1, 8))] * 2)
  with pytest.raises(ValueError, match="no videos"):
    features_lib.caption_features(bundle, [])


def test_make_pairs(bundle, tmp_path):
  videos = {"a": VIDEOS[0], "b": VIDEOS[1]}
  captions = {"a": ["cut the onion", "cut onion"], "b": ["fry the pan"]}
  path = tmp_path / "pairs.npz"
  features_lib.make_pairs(bundle, videos, captions, path)
  pairs = training.Pairs.read(path)
  assert pairs.video_ids == ["a", "a", "b"]
  assert pairs.captions == ["cut the onion", "cut onion", "fry the pan"]
  expected = features_lib.caption_features(bundle, VIDEOS[:2])
  np.testing.assert_allclose(pairs.features[:, 0], expected[[0, 0, 1]], rtol=1e-6)
  ids, feats, _, refs = pairs.by_video()
  assert ids == ["a", "b"] and refs == captions and feats.shape == (2, 1, expected.shape[1])
  with pytest.raises(ValueError, match=r"videos without captions \['b'\]"):
    features_lib.make_pairs(bundle, videos, {"a": ["x"]}, tmp_path / "other.npz")


def test_pairs_command_on_youcook2_segments(tmp_path, tmp_path_factory, capsys):
  world = tm.trained_bundle(tmp_path_factory)
  vocab_world = tm.fit_world_vocab(tmp_path)
  rng = np.random.default_rng(0)
  feats = tmp_path / "features"
  clips = vocab_world.clips(rng, [*tm.step_tokens("cut", "egg"), *tm.step_tokens("stir", "egg")])
  tm.write_video_features(feats, "v0", clips)  # 8 clips, middles 0.75 ... 11.25 s
  database = {
      "v0": {"subset": "training", "annotations": [
          {"segment": [0, 6], "sentence": "cut the egg"},
          {"segment": [6, 12], "sentence": "stir the egg"},
          {"segment": [30, 40], "sentence": "after the end"}]},
      "gone": {"subset": "training", "annotations": [{"segment": [0, 3], "sentence": "x"}]},
      "v9": {"subset": "validation", "annotations": [{"segment": [0, 3], "sentence": "y"}]}}
  annotations = tmp_path / "youcookii_annotations.json"
  annotations.write_text(json.dumps({"database": database}))
  out = tmp_path / "out"
  code = features_lib.main([f"--workdir={world.workdir}", f"--features={feats}",
                            f"--youcook2={annotations}", f"--visual_vocab={vocab_world.vocab_path}",
                            f"--out={out}", "--s3d"])
  assert code == 0, capsys.readouterr().err
  pairs = training.Pairs.read(out / "pairs.npz")
  assert pairs.video_ids == ["v0/0-6", "v0/6-12"]
  assert pairs.captions == ["cut the egg", "stir the egg"]
  # Each row: the library's features of the segment's clips, then their mean clip feature.
  want = features_lib.caption_features(
      world.bundle, [tm.step_tokens("cut", "egg"), tm.step_tokens("stir", "egg")],
      s3d=[clips[:4], clips[4:]])
  np.testing.assert_allclose(pairs.features[:, 0], want, rtol=1e-5, atol=1e-6)
  results = json.loads((out / "results.json").read_text())
  assert results["rows"] == 2 and results["s3d"]
  assert sorted((s["video_id"], s["reason"].split()[0]) for s in results["skipped"]) == [
      ("gone", "no"), ("v0", "no")]
  code = features_lib.main([f"--workdir={world.workdir}", f"--features={feats}",
                            f"--youcook2={annotations}", f"--out={out}"])
  assert code == 1 and "pass --visual_vocab" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    features_lib.parse_args(["--help"])
  assert "--youcook2" in capsys.readouterr().out


def test_pairs_command_on_a_label_file_with_sentences(tmp_path, tmp_path_factory, capsys):
  world = tm.trained_bundle(tmp_path_factory)
  vocab_world = tm.fit_world_vocab(tmp_path)
  rng = np.random.default_rng(0)
  feats = tmp_path / "features"
  clips = vocab_world.clips(rng, [*tm.step_tokens("cut", "egg"), *tm.step_tokens("stir", "egg")])
  tm.write_video_features(feats, "v0", clips)
  labels = tmp_path / "labels.tsv"
  labels.write_text("video_id\tstart\tend\tverb\tnoun\tsentence\n"
                    "v0\t0\t6\tcut\tegg\tnow we cut the egg\n"
                    "v0\t6\t12\tstir\tegg\t\n")  # no sentence: nothing to caption
  out = tmp_path / "out"
  code = features_lib.main([f"--workdir={world.workdir}", f"--features={feats}",
                            f"--labels={labels}", f"--visual_vocab={vocab_world.vocab_path}",
                            f"--out={out}"])
  assert code == 0, capsys.readouterr().err
  pairs = training.Pairs.read(out / "pairs.npz")
  assert pairs.video_ids == ["v0/0-6"] and pairs.captions == ["now we cut the egg"]
  want = features_lib.caption_features(world.bundle, [tm.step_tokens("cut", "egg")])
  np.testing.assert_allclose(pairs.features[:, 0], want, rtol=1e-5, atol=1e-6)
  labels.write_text("v0\t0\t6\tcut\tegg\n")
  code = features_lib.main([f"--workdir={world.workdir}", f"--features={feats}",
                            f"--labels={labels}", f"--visual_vocab={vocab_world.vocab_path}",
                            f"--out={out}"])
  assert code == 1 and "no row has a sentence" in capsys.readouterr().err
