"""The captioner: pairs files and their source, training through the CLI, decoding, evaluation."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers.configs import captioner as captioner_config
from vbert_jax import metrics as metrics_lib
from vbert_jax.captioning import decode
from vbert_jax.captioning import evaluate
from vbert_jax.captioning import model as model_lib
from vbert_jax.captioning import training

REPO = pathlib.Path(__file__).resolve().parents[1]
WORDS = ("cut fry boil chop onion garlic pan pot oil salt water stir add pour mix egg flour "
         "knife bowl heat").split()
NUM_VIDEOS, FEATURE_DIM, STEPS = 16, 24, 60


def write_vocab(path: pathlib.Path) -> pathlib.Path:
  """A WordPiece vocab.txt: the special symbols at 0..5, then whole words."""
  path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[>]", *WORDS]) + "\n")
  return path


def generated_pairs(seed: int = 0) -> training.Pairs:
  """One random caption of 3-6 words per video, and one random feature vector per video."""
  rng = np.random.default_rng(seed)
  captions = [" ".join(rng.choice(WORDS, size=rng.integers(3, 7))) for _ in range(NUM_VIDEOS)]
  features = rng.normal(size=(NUM_VIDEOS, FEATURE_DIM)).astype(np.float32)
  return training.Pairs(features, None, captions, [f"video{i}" for i in range(NUM_VIDEOS)])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A captioner trained by the train CLI on the generated pairs (8 CPU devices, data parallel)."""
  root = tmp_path_factory.mktemp("captioner")
  vocab = write_vocab(root / "vocab.txt")
  pairs = generated_pairs()
  pairs.write(root / "pairs.npz")
  workdir = root / "work"
  overrides = dict(total_steps=STEPS, batch_size=16, log_every_steps=10, **{
      "model.hidden_size": 64, "model.mlp_dim": 128, "optimizer.learning_rate": 3e-3,
      "eval.every_steps": STEPS // 2, "eval.num_batches": 1, "eval.batch_size": 16,
      "checkpoint.every_steps": STEPS, "input.pairs": root / "pairs.npz",
      "input.eval_pairs": root / "pairs.npz",
      "text.vocab": vocab, "compilation_cache_dir": REPO / ".cache" / "jax"})
  cmd = [sys.executable, "-m", "vbert_jax.captioning.train",
         "--config=configs/captioner.py:variant=tiny,runlocal", f"--workdir={workdir}",
         *(f"--config.{k}={v}" for k, v in overrides.items())]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  config, cfg, params, tokenizer, step = evaluate.load_captioner(workdir)
  return dict(root=root, workdir=workdir, pairs=pairs, config=config, cfg=cfg, params=params,
              tokenizer=tokenizer, step=step)


@pytest.mark.slow
def test_captioner_learns_the_pairs(trained):
  history = metrics_lib.read_jsonl(trained["workdir"], "train")
  losses = [row["caption_loss"] for row in history]
  assert trained["step"] == STEPS and len(losses) == STEPS // 10
  assert losses[-1] < 0.25 * losses[0], losses
  # Held-out loss on config.input.eval_pairs (here the training rows, read in order).
  evals = metrics_lib.read_jsonl(trained["workdir"], "eval")
  assert [row["step"] for row in evals] == [STEPS // 2, STEPS]
  assert evals[-1]["caption_loss"] < evals[0]["caption_loss"] < losses[0]
  cfg, pairs = trained["cfg"], trained["pairs"]
  assert cfg.feature_dim == FEATURE_DIM and cfg.max_feature_len == 1  # read from the pairs file
  tokens, _ = decode.greedy(trained["params"], cfg, pairs.features)
  captions = decode.to_captions(trained["tokenizer"], np.asarray(tokens), cfg.eos_id)
  right = sum(a == b for a, b in zip(captions, pairs.captions))
  assert right >= 12, list(zip(captions, pairs.captions))


@pytest.mark.slow
def test_beam_search(trained):
  cfg, params, features = trained["cfg"], trained["params"], trained["pairs"].features[:8]
  greedy_tokens, greedy_scores = decode.greedy(params, cfg, features)
  one_tokens, one_scores = decode.beam_search(params, cfg, features, beam_size=1)
  np.testing.assert_array_equal(np.asarray(one_tokens), np.asarray(greedy_tokens))
  np.testing.assert_allclose(np.asarray(one_scores), np.asarray(greedy_scores), rtol=1e-6)
  four_tokens, four_scores = decode.beam_search(params, cfg, features, beam_size=4)
  # Not guaranteed in general (the beam may prune greedy's prefix), but on captions this model
  # has learned, the wider beam finds greedy's answer or a likelier one.
  assert (np.asarray(four_scores) >= np.asarray(greedy_scores) - 1e-4).all()
  # Scores are the log-probabilities of the returned tokens under the model (teacher forcing).
  tokens = np.asarray(four_tokens)
  inputs = np.concatenate([np.full((len(tokens), 1), cfg.bos_id), tokens[:, :-1]], axis=1)
  logits = model_lib.Captioner(cfg).apply({"params": params}, features, inputs)
  allowed = cfg.generation_mask()
  logp = jax.nn.log_softmax(np.where(allowed, np.asarray(logits), decode.NEG), axis=-1)
  picked = np.take_along_axis(np.asarray(logp), tokens[..., None], axis=-1)[..., 0]
  real = np.cumsum(tokens == cfg.eos_id, axis=1) - (tokens == cfg.eos_id) == 0
  np.testing.assert_allclose((picked * real).sum(1), np.asarray(four_scores), rtol=1e-4,
                             atol=1e-4)
  # Nothing after [EOS] but padding, and no banned id anywhere.
  after = ~real & (tokens != cfg.eos_id)
  assert (tokens[after] == cfg.pad_id).all()
  assert not np.isin(tokens, [cfg.bos_id, *cfg.banned_ids]).any()


@pytest.mark.slow
def test_evaluate_cli_writes_results(trained, capsys):
  # Two references per video: the training caption and one that shares only its first word.
  pairs = trained["pairs"]
  rows = list(range(NUM_VIDEOS)) * 2
  second = [c.split()[0] + " it" for c in pairs.captions]
  eval_pairs = training.Pairs(pairs.features[rows], None, pairs.captions + second,
                          pairs.video_ids * 2)
  eval_path = eval_pairs.write(trained["root"] / "eval_pairs.npz")
  out = trained["root"] / "results"
  assert evaluate.main([f"--workdir={trained['workdir']}", f"--pairs={eval_path}",
                        f"--out={out}", "--beam_size=1", "--java=no"]) == 0
  assert "wrote" in capsys.readouterr().out
  results = json.loads((out / "results.json").read_text())
  assert results["num_videos"] == NUM_VIDEOS and results["tokenization"] == "python"
  assert results["decoding"]["method"] == "greedy" and results["checkpoint"]["step"] == STEPS
  assert set(results["metrics"]) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}
  by_video = {c["video_id"]: c for c in results["captions"]}
  assert by_video["video3"]["references"] == [pairs.captions[3], second[3]]
  right = sum(by_video[v]["caption"] == c for v, c in zip(pairs.video_ids, pairs.captions))
  assert right >= 12
  assert results["metrics"]["Bleu_4"] > 0.7 and results["metrics"]["ROUGE_L"] > 0.8


def test_source_is_resumable_and_covers_each_epoch(tmp_path):
  tokenizer = training.load_tokenizer(_config(tmp_path))
  pairs = generated_pairs()

  def source():
    return training.PairsSource(pairs, tokenizer, max_caption_len=16, max_feature_len=2,
                            batch_size=4, seed=3)
  first = source()
  batches = [next(first) for _ in range(6)]
  # An epoch (4 batches of 4) visits every row once; features padded to max_feature_len.
  seen = np.concatenate([b["features"][:, 0] for b in batches[:4]])
  assert sorted(map(tuple, seen)) == sorted(map(tuple, pairs.features[:, 0]))
  assert batches[0]["features"].shape == (4, 2, FEATURE_DIM)
  np.testing.assert_array_equal(batches[0]["feature_mask"], [[1, 0]] * 4)
  resumed = source()
  resumed.set_state(json.loads(json.dumps(_state_at(source(), 4))))
  for expected in batches[4:]:
    got = next(resumed)
    for key in training.BATCH_FIELDS:
      np.testing.assert_array_equal(got[key], expected[key])
  with pytest.raises(ValueError, match="another stream"):
    training.PairsSource(pairs, tokenizer, max_caption_len=16, max_feature_len=2, batch_size=4,
                     seed=4).set_state(first.get_state())


def _state_at(source, steps):
  for _ in range(steps):
    next(source)
  return source.get_state()


def test_caption_encoding(tmp_path):
  tokenizer = training.load_tokenizer(_config(tmp_path))
  sp = tokenizer.specials
  dec, tgt, w, cut = training.encode_caption(tokenizer, "Cut onion", 6)
  ids = [tokenizer.token_to_id("cut"), tokenizer.token_to_id("onion")]
  np.testing.assert_array_equal(dec, [sp.cls, *ids, sp.pad, sp.pad, sp.pad])
  np.testing.assert_array_equal(tgt, [*ids, sp.sep, sp.pad, sp.pad, sp.pad])
  np.testing.assert_array_equal(w, [1, 1, 1, 0, 0, 0])
  assert not cut
  dec, tgt, w, cut = training.encode_caption(tokenizer, "cut onion fry pan oil salt", 4)
  assert cut and tgt[-1] == sp.sep and w.sum() == 4 and dec[0] == sp.cls


def test_bad_pairs_files(tmp_path):
  rng = np.random.default_rng(0)
  path = tmp_path / "bad.npz"
  np.savez(path, features=rng.normal(size=(3, 4)), captions=np.array(["a", "b"]),
           video_ids=np.array(["x", "y", "z"]))
  with pytest.raises(ValueError, match=r"bad.npz: row counts differ \(features=3, captions=2, "
                                       r"video_ids=3\)"):
    training.Pairs.read(path)
  np.savez(path, features=rng.normal(size=(3, 4)), captions=np.array(["a", "b", "c"]))
  with pytest.raises(ValueError, match=r"missing arrays \['video_ids'\]"):
    training.Pairs.read(path)
  with pytest.raises(FileNotFoundError, match="no such file"):
    training.Pairs.read(tmp_path / "absent.npz")
  with pytest.raises(ValueError, match="rows \\[1\\] have no real feature vector"):
    training.Pairs(rng.normal(size=(2, 2, 4)), np.array([[1, 0], [0, 0]]), ["a", "b"], ["x", "y"])
  config = _config(tmp_path)
  config.model.feature_dim = 5
  with pytest.raises(ValueError, match="feature_dim=5 but pairs has features of size 4"):
    training.resolve_features(config, training.Pairs(rng.normal(size=(2, 4)), None, ["a", "b"],
                                             ["x", "y"]))


def test_batch_check_and_config_errors(tmp_path):
  config = _config(tmp_path)
  config.model.feature_dim, config.model.max_feature_len = FEATURE_DIM, 1
  cfg = training.captioner_config(config)
  tokenizer = training.load_tokenizer(config)
  batch = next(training.PairsSource(generated_pairs(), tokenizer, max_caption_len=16,
                                max_feature_len=1, batch_size=2, seed=0))
  training.check_batch(cfg, batch, "batch 0")
  with pytest.raises(ValueError, match="batch 0: features has shape"):
    training.check_batch(cfg, {**batch, "features": batch["features"][..., :3]}, "batch 0")
  with pytest.raises(ValueError, match="targets in"):
    training.check_batch(cfg, {**batch, "targets": batch["targets"] + 100}, "batch 0")
  config.model.feature_dim = 0
  with pytest.raises(ValueError, match="config.model.feature_dim=0: not resolved"):
    training.captioner_config(config)
  with pytest.raises(ValueError, match="beam_size=0"):
    decode.beam_search({}, cfg, np.zeros((1, FEATURE_DIM)), beam_size=0)
  with pytest.raises(ValueError, match="max_len=16"):
    decode.greedy({}, cfg, np.zeros((1, FEATURE_DIM)), max_len=16)
  with pytest.raises(ValueError, match="decode_all: batch_size=0"):
    decode.decode_all({}, cfg, np.zeros((1, FEATURE_DIM)), batch_size=0)


def test_evaluate_cli_names_a_wrong_workdir(tmp_path, capsys):
  code = evaluate.main([f"--workdir={tmp_path}", f"--pairs={tmp_path / 'p.npz'}",
                        f"--out={tmp_path / 'out'}"])
  assert code == 1
  assert f"{tmp_path / 'config.json'}: no run config" in capsys.readouterr().err
  (tmp_path / "config.json").write_text('{"model": {}, "max_len": 32}')
  assert evaluate.main([f"--workdir={tmp_path}", f"--pairs={tmp_path / 'p.npz'}",
                        f"--out={tmp_path / 'out'}"]) == 1
  assert "lacks the keys ['text', 'max_caption_len', 'decode'] of a captioner config" in (
      capsys.readouterr().err)


def _config(tmp_path):
  config = captioner_config.get_config("variant=tiny,runlocal")
  config.text.vocab = str(write_vocab(tmp_path / "vocab.txt"))
  return config


def test_masked_feature_vectors_are_ignored():
  cfg = model_lib.CaptionerConfig(vocab_size=40, feature_dim=6, pad_id=0, bos_id=2, eos_id=3,
                                  max_feature_len=3, max_caption_len=5, hidden_size=16,
                                  num_heads=2, mlp_dim=32, banned_ids=(1, 4, 5))
  params = model_lib.init_params(cfg, jax.random.key(0))
  module = model_lib.Captioner(cfg)
  # One compilation per input shape instead of op-by-op dispatch.
  apply = jax.jit(lambda f, t, m=None: module.apply({"params": params}, f, t, m))
  rng = np.random.default_rng(0)
  features = rng.normal(size=(2, 3, 6)).astype(np.float32)
  mask = np.array([[1, 1, 0], [1, 0, 0]], np.int32)
  tokens = rng.integers(6, 40, size=(2, 5))
  logits = np.asarray(apply(features, tokens, mask))
  changed = features.copy()
  changed[0, 2] += 5.0
  changed[1, 1:] -= 3.0
  np.testing.assert_allclose(apply(changed, tokens, mask), logits, rtol=1e-5, atol=1e-5)
  # Causal: the logits at position t do not depend on later tokens.
  later = tokens.copy()
  later[:, 3:] = 7
  np.testing.assert_allclose(np.asarray(apply(features, later, mask))[:, :3], logits[:, :3],
                             rtol=1e-5, atol=1e-5)
  # Padding rows of the vocabulary never win.
  assert (logits[..., 40:] <= model_lib.PAD_LOGIT).all()
  # [N, D] features are one vector per example.
  np.testing.assert_allclose(apply(features[:, 0], tokens),
                             apply(features[:, :1], tokens, np.ones((2, 1), np.int32)),
                             rtol=1e-6)
