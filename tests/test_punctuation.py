"""The punctuation restorer: its labels, model file, windows, training command and its use in
sentence splitting."""

from __future__ import annotations

import dataclasses

from flax import serialization
import jax
import numpy as np
import pytest

from vbert_jax.text import punctuation as punct
from vbert_jax.text import sentences
from vbert_jax.text import train_punctuation
from vbert_jax.text import transcripts

SMALL = punct.ModelConfig(embed_dim=16, hidden=16, layers=1, suffix_buckets=64,
                          prefix_buckets=64, dropout=0.0, members=1)
LM_VOCAB = 6


def _document(rng: np.random.Generator, sentences_per_doc: int = 12) -> str:
  """Sentences whose ends a tagger can learn: statements end with "done", questions with
  "right", and "then" follows a comma."""
  words = "we cut the onion add salt stir pan heat oil slowly".split()
  out = []
  for _ in range(sentences_per_doc):
    body = " ".join(rng.choice(words, rng.integers(3, 9)))
    kind = rng.integers(3)
    if kind == 0:
      out.append(f"{body.capitalize()} done.")
    elif kind == 1:
      out.append(f"{body.capitalize()} right?")
    else:
      out.append(f"{body.capitalize()}, then {' '.join(rng.choice(words, 3))} done.")
  return " ".join(out)


@pytest.fixture(scope="module")
def corpus() -> list[str]:
  rng = np.random.default_rng(0)
  return [_document(rng) for _ in range(60)]


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
  config = train_punctuation.TrainConfig(steps=150, eval_every=75, batch_size=16,
                                         learning_rate=1e-2, warmup_steps=10, model=SMALL,
                                         lm_vocab=LM_VOCAB)
  model, report = train_punctuation.train(corpus, config, progress=False)
  path = tmp_path_factory.mktemp("punct") / "model.msgpack"
  model.save(path)
  return model, report, path


def test_labels_and_forms():
  assert [punct.mark_class(t) for t in ["word", "word,", "end.", "end!", "why?", "(this.)",
                                        "Dr.", "e.g.", "list;", "pause:", "wait\u2026"]] == [
      punct.NONE, punct.COMMA, punct.PERIOD, punct.PERIOD, punct.QUESTION, punct.PERIOD,
      punct.NONE, punct.NONE, punct.COMMA, punct.COMMA, punct.PERIOD]
  assert [punct.word_form(t) for t in ["Hello,", "don't.", "\"Quoted\"", "50%", "$3", "--"]] == [
      "hello", "don't", "quoted", "50%", "$3", "--"]
  # A bucket that every process agrees on (Python's str hash is salted per process).
  assert punct.suffix_bucket("hello", 4096) == punct.suffix_bucket("jello", 4096) == 820
  assert punct.prefix_bucket("hello", 4096) == punct.prefix_bucket("help", 4096) == 3972


def test_windows_cover_every_word_once_centred():
  assert punct.window_starts(10, 64) == [0]
  assert punct.window_starts(64, 64) == [0]
  assert punct.window_starts(65, 64) == [0, 1]
  assert punct.window_starts(200, 64) == [0, 32, 64, 96, 128, 136]
  # Each word takes the row where it is farthest from a window edge that cuts its context.
  def chosen(n):
    starts = punct.window_starts(n, punct.WINDOW)
    probs = np.zeros((len(starts), punct.WINDOW, 4), np.float32)
    for row in range(len(starts)):
      probs[row, :, 0] = row
    return punct._centred(probs, starts, n)[:, 0].astype(int).tolist()

  # Rows [0, 64) and [1, 65): word 32 is 31 words from an inner edge in both (the first wins);
  # from word 33 on, the second row reaches the transcript's end.
  assert chosen(65) == [0] * 33 + [1] * 32
  # Rows [0, 64), [32, 96), [36, 100): word 50 is 13, 18 and 14 words from an inner edge.
  picks = chosen(100)
  assert (picks[10], picks[50], picks[70], picks[99]) == (0, 1, 2, 2)


def test_training_learns_the_marks(trained):
  model, report, _ = trained
  assert report["validation_f1"] >= 0.95
  assert 0.02 <= report["boundary_threshold"] <= 0.9
  assert report["vocabulary"] == 2 + len(set("we cut the onion add salt stir pan heat oil "
                                             "slowly done right then".split()))
  restored = model.restore("we stir the pan done we add salt right then heat oil done".split())
  assert restored == ["we", "stir", "the", "pan", "done.", "we", "add", "salt", "right?", "then",
                      "heat", "oil", "done."]


def test_short_input_is_not_changed_by_padding(trained):
  model, _, _ = trained
  forms = "we cut the onion done then".split()
  ids, buckets = model.encode(forms)
  params = jax.tree.map(lambda x: x[0], model.params)  # the one member
  direct = jax.nn.softmax(model.module.apply({"params": params}, ids[None], buckets[None]))
  # Same arithmetic on the same values, the padding rows aside: equal to float rounding.
  np.testing.assert_allclose(model.probabilities(forms), np.asarray(direct)[0], atol=1e-6)


def test_lengths_compile_a_few_times(trained):
  model, _, _ = trained
  punct._probabilities.clear_cache()
  for n in range(1, 1200, 7):
    assert model.probabilities(["salt"] * n).shape == (n, 4)
  # 1 to 37 windows: 8, 16, 32 and 64 rows.
  assert punct._probabilities._cache_size() == 4


def test_model_file_round_trip(trained):
  model, _, path = trained
  loaded = punct.load(path)
  assert loaded.words == model.words and loaded.config == SMALL
  assert loaded.boundary_threshold == model.boundary_threshold
  forms = "heat oil done we cut right".split()
  np.testing.assert_array_equal(loaded.probabilities(forms), model.probabilities(forms))


def test_bad_model_files(trained, tmp_path):
  _, _, path = trained
  junk = tmp_path / "junk.msgpack"
  junk.write_bytes(b"\x00\x01 not msgpack")
  with pytest.raises(ValueError, match="junk.msgpack: not a readable punctuation model"):
    punct.load(junk)
  payload = serialization.msgpack_restore(path.read_bytes())
  other = tmp_path / "other.msgpack"
  other.write_bytes(serialization.msgpack_serialize({"format": "vbert_jax.s3d", "version": 1}))
  with pytest.raises(ValueError, match="other.msgpack: not a vbert_jax punctuation model file"):
    punct.load(other)
  newer = tmp_path / "newer.msgpack"
  newer.write_bytes(serialization.msgpack_serialize(dict(payload, version=punct.FORMAT_VERSION
                                                         + 1)))
  with pytest.raises(ValueError, match=f"newer.msgpack: punctuation model format version "
                                       f"{punct.FORMAT_VERSION + 1} is newer than this code "
                                       "reads"):
    punct.load(newer)
  damaged = tmp_path / "damaged.msgpack"
  damaged.write_bytes(serialization.msgpack_serialize(dict(payload, words=payload["words"][:-1])))
  with pytest.raises(ValueError, match="damaged.msgpack: .*do not match"):
    punct.load(damaged)
  with pytest.raises(ValueError, match="missing.msgpack: not a readable"):
    punct.load(tmp_path / "missing.msgpack")


def test_sentences_of_unpunctuated_captions_keep_word_times(trained):
  _, _, path = trained
  # Abutting cues, as auto-captions come: no pause to cut at.
  cues = [transcripts.Cue(0.0, 2.0, "we stir the pan done we"),
          transcripts.Cue(2.01, 4.0, "add salt right then heat"),
          transcripts.Cue(4.01, 5.0, "oil done")]
  plain = sentences.split_sentences(cues)
  assert len(plain) == 1
  restored = sentences.split_sentences(
      cues, sentences.SplitConfig(punctuation_model=str(path)))
  assert [s.text for s in restored] == ["we stir the pan done.", "we add salt right?",
                                        "then heat oil done."]
  # Word times are spread over each cue by length, as without the model: "done" ends 21 of the
  # first cue's 24 weighted characters in (each word weighs its length plus one).
  assert restored[0].start == 0.0 and restored[0].end == 2.0 * 21 / 24
  assert restored[-1].end == 5.0
  # A punctuated transcript is split by its own marks; the model is not asked.
  written = [transcripts.Cue(0.0, 3.0, "We stir. We add salt right then heat oil done")]
  assert [s.text for s in sentences.split_sentences(
      written, sentences.SplitConfig(punctuation_model=str(path)))] == [
          "We stir.", "We add salt right then heat oil done"]


def test_command(corpus, tmp_path, capsys):
  text = tmp_path / "text.txt"
  text.write_text("\n".join(corpus) + "\n", encoding="utf-8")
  out = tmp_path / "m.msgpack"
  assert train_punctuation.main([f"--text={text}", f"--out={out}", "--steps=4",
                                 "--eval_every=2", "--hidden=24", "--members=2",
                                 "--no_progress"]) == 0
  captured = capsys.readouterr()
  assert "step 2/4: loss" in captured.err and "validation boundary F1" in captured.err
  written = punct.load(out)
  assert f"wrote {out}:" in captured.out and written.words[:2] == ["<pad>", "<unk>"]
  assert (written.config.hidden, written.config.members) == (24, 2)
  flat = tmp_path / "flat.txt"
  flat.write_text("\n".join(d.replace(".", "").replace("?", "") for d in corpus) + "\n")
  assert train_punctuation.main([f"--text={flat}", f"--out={out}", "--steps=2"]) == 2
  assert "no sentence-final marks" in capsys.readouterr().err
  latin = tmp_path / "latin.txt"
  latin.write_bytes("caf\xe9 ol\xe9.\n".encode("latin-1"))
  assert train_punctuation.main([f"--text={latin}", f"--out={out}", "--steps=2"]) == 2
  assert "latin.txt: cannot be read as UTF-8" in capsys.readouterr().err


def test_split_is_by_document_hash(corpus):
  train, val = train_punctuation.split_documents(corpus, 0.2)
  assert sorted(train + val) == sorted(corpus) and 0 < len(val) < len(corpus) / 2
  assert train_punctuation.split_documents(list(reversed(corpus)), 0.2)[1] == list(reversed(val))
  with pytest.raises(ValueError, match="val_fraction=1.5"):
    train_punctuation.split_documents(corpus, 1.5)


def test_members_train_apart_and_average(corpus):
  # Without the language model, which the other tests train with.
  config = train_punctuation.TrainConfig(
      steps=20, eval_every=10, batch_size=8, warmup_steps=2, lm_vocab=0,
      model=punct.ModelConfig(**dict(vars(SMALL), dropout=0.1, members=2)))
  model, _ = train_punctuation.train(corpus, config, progress=False)
  assert not set(punct.LM_HEADS) & set(model.params)
  forms = "we cut the onion done then add salt right".split()
  ids, buckets = model.encode(forms)
  alone = [np.asarray(jax.nn.softmax(model.module.apply(
      {"params": jax.tree.map(lambda x, m=m: x[m], model.params)}, ids[None], buckets[None])))[0]
           for m in range(2)]
  # Different initialisations and masks: the members disagree, and the model averages them.
  assert np.abs(alone[0] - alone[1]).max() > 1e-3
  np.testing.assert_allclose(model.probabilities(forms), (alone[0] + alone[1]) / 2, atol=1e-6)


def test_older_files_load(trained, tmp_path):
  """Version 1 held one tagger, unstacked, and no `members`; versions 1 and 2 had no word
  beginnings."""
  model, _, path = trained
  payload = serialization.msgpack_restore(path.read_bytes())
  params = {k: v for k, v in payload["params"].items() if k != "prefixes"}
  settings = {k: v for k, v in payload["config"].items() if k != "prefix_buckets"}
  without = punct.Punctuator(model.words, dataclasses.replace(SMALL, prefix_buckets=0), params,
                             model.boundary_threshold)
  v2 = tmp_path / "v2.msgpack"
  v2.write_bytes(serialization.msgpack_serialize(dict(payload, version=2, config=settings,
                                                      params=params)))
  v1 = tmp_path / "v1.msgpack"
  v1.write_bytes(serialization.msgpack_serialize(dict(
      payload, version=1, config={k: v for k, v in settings.items() if k != "members"},
      params=jax.tree.map(lambda x: x[0], params))))
  forms = "heat oil done we cut right".split()
  want = without.probabilities(forms)
  assert np.abs(want - model.probabilities(forms)).max() > 1e-4  # the beginnings mattered
  for old in (v1, v2):
    np.testing.assert_array_equal(punct.load(old).probabilities(forms), want)

def test_language_model_sees_one_side_only(trained):
  """The forward head predicts word t+1 from words up to t, the backward head word t-1 from
  words from t on: changing word j changes neither prediction of word j, and changes the rest."""
  model, _, path = trained
  assert set(punct.LM_HEADS) <= set(model.params)
  module = punct.BiLSTMTagger(len(model.words), SMALL, lm_vocab=LM_VOCAB)
  params = jax.tree.map(lambda x: x[0], model.params)
  ids, buckets = model.encode("we cut the onion add salt done then heat oil right".split())
  j = 5
  changed = ids.copy()
  changed[j] = model.words.index("pan")
  _, (ahead, behind) = module.apply({"params": params}, ids[None], buckets[None])
  _, (ahead2, behind2) = module.apply({"params": params}, changed[None], buckets[None])
  np.testing.assert_array_equal(ahead[0, :j], ahead2[0, :j])
  np.testing.assert_array_equal(behind[0, j + 1:], behind2[0, j + 1:])
  assert np.abs(ahead[0, j:] - ahead2[0, j:]).min() > 0
  assert np.abs(behind[0, :j + 1] - behind2[0, :j + 1]).min() > 0
  # The heads are for training only: the file holds the tagger alone, and it loads.
  assert not set(punct.LM_HEADS) & set(punct.load(path).params)


def test_language_model_targets():
  ids = np.array([0, 1, 2, 3, 4, 5, 9])
  np.testing.assert_array_equal(train_punctuation.lm_targets(ids, 3), [3, 3, 0, 1, 2, 3, 3])


@pytest.mark.parametrize("bad, match", [(dict(steps=0), "steps=0"),
                                        (dict(lm_vocab=-1), "lm_vocab=-1"),
                                        (dict(lm_weight=-0.5), "lm_weight=-0.5")])
def test_bad_training_settings(corpus, bad, match):
  with pytest.raises(ValueError, match=match):
    train_punctuation.train(corpus, train_punctuation.TrainConfig(**bad), progress=False)
