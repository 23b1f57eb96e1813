"""The videobert TFDS builder: demo-world corpus through the real pieces, Beam, bad inputs."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from vbert_jax.demo.world import world
from data.videobert import make_dummy_data
from data.videobert import videobert_dataset_builder as vb
import fixtures_world as fw
from vbert_jax import align
from vbert_jax import records
from vbert_jax.text import sentences
from vbert_jax.text import tokenizers
from vbert_jax.text import train_sentencepiece
from vbert_jax.text import transcripts
from vbert_jax.video import features_io
from vbert_jax.vocab import kmeans
from vbert_jax.vocab import vocabulary

REPO = pathlib.Path(__file__).resolve().parents[1]
VALIDATION_FRACTION = 0.34
NO_TRANSCRIPT = 1  # index of the demo video whose transcript is left out
SPM_SIZE = 80


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  """The shared demo corpus as a manual directory: transcripts/, features/ (and videos/ for
  three videos), a fitted visual vocabulary and a SentencePiece model trained on the corpus.
  One transcript is left out and one transcript without a video is added."""
  corpus = fw.small_corpus(tmp_path_factory)
  root = tmp_path_factory.mktemp("videobert_demo")
  manual = root / "manual"
  ids = [v["video_id"] for v in world.load_manifest(corpus.world_dir)["videos"]]
  (manual / "transcripts").mkdir(parents=True)
  for i, vid in enumerate(ids):
    if i != NO_TRANSCRIPT:
      os.symlink(corpus.world_dir / f"{vid}.vtt", manual / "transcripts" / f"{vid}.vtt")
  (manual / "transcripts" / "ghost.vtt").write_text(
      "WEBVTT\n\n00:00:01.000 --> 00:00:02.000\nnobody filmed this\n")
  os.symlink(corpus.features_dir, manual / "features")
  vocab = vocabulary.VisualVocabulary.fit(
      corpus.features_dir, kmeans.KMeansConfig(depth=2, branching=3, iterations=10, seed=0),
      nearest_per_leaf=1)
  vocab.save(manual / "visual_vocab.npz")
  texts, skipped = train_sentencepiece.corpus_sentences(
      sorted(corpus.world_dir.glob("*.vtt")), sentences.SplitConfig())
  assert not skipped
  train_sentencepiece.train(texts, str(manual / "text"), SPM_SIZE)
  return {"corpus": corpus, "manual": manual, "ids": ids, "root": root,
          "vocab": vocabulary.VisualVocabulary.load(manual / "visual_vocab.npz"),
          "tokenizer": tokenizers.SentencePieceTokenizer(manual / "text.model")}


def _config(name: str = "demo", **overrides) -> vb.VideoBertConfig:
  kwargs = dict(name=name, validation_fraction=VALIDATION_FRACTION, visual_vocab_size=9,
                text_vocab_size=SPM_SIZE)
  kwargs.update(overrides)
  return vb.VideoBertConfig(**kwargs)


def _build(manual, data_dir, config) -> tfds.core.DatasetBuilder:
  builder = vb.Builder(config=config, data_dir=str(data_dir))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  return builder


def _read_all(builder) -> dict[str, dict[str, align.VideoRecord]]:
  out = {}
  for split in builder.info.splits:
    source = builder.as_data_source(split)
    out[split] = {r.video_id: r for r in
                  (align.VideoRecord.from_features(source[i]) for i in range(len(source)))}
  return out


def _expected(demo, vid: str, with_transcript: bool) -> align.VideoRecord:
  """The record of one demo video, made from the pieces directly (not through records.py)."""
  vf = features_io.load_features(demo["corpus"].features_dir / f"{vid}.npz")
  tokens = demo["vocab"].assign(vf.features.astype(np.float32))
  sents = []
  if with_transcript:
    cues = transcripts.read_vtt(demo["corpus"].world_dir / f"{vid}.vtt")
    sents = [align.TokenizedSentence(demo["tokenizer"].encode(s.text), s.start, s.end)
             for s in sentences.split_sentences(cues)]
  return align.align_video(vid, sents, vf.starts, vf.ends, tokens)


def _assert_same(a: align.VideoRecord, b: align.VideoRecord) -> None:
  assert a.video_id == b.video_id
  for key in align.VideoRecord.ARRAY_FIELDS:
    np.testing.assert_array_equal(getattr(a, key), getattr(b, key), err_msg=f"{a.video_id} {key}")


@pytest.fixture(scope="module")
def built(demo):
  builder = _build(demo["manual"], demo["root"] / "tfds", _config())
  return builder, _read_all(builder)


def test_demo_corpus_records(demo, built):
  builder, by_split = built
  ids = demo["ids"]
  assert set(by_split) == {"train", "validation"}
  assert sorted(v for recs in by_split.values() for v in recs) == sorted(ids)
  for split, recs in by_split.items():
    assert all(records.split_of(v, VALIDATION_FRACTION) == split for v in recs)
  got = {v: r for recs in by_split.values() for v, r in recs.items()}
  for i, vid in enumerate(ids):
    _assert_same(got[vid], _expected(demo, vid, with_transcript=i != NO_TRANSCRIPT))
  # The narration made it through: sentences decode to the transcript's words, in order, and
  # each video's clips cover its ground-truth steps.
  for i, vid in enumerate(ids):
    rec = got[vid]
    truth = world.load_truth(demo["corpus"].world_dir / f"{vid}.json")
    assert rec.num_clips == len(features_io.load_features(
        demo["corpus"].features_dir / f"{vid}.npz").starts) > 0
    assert rec.clip_ends[-1] >= truth["steps"][-1]["end"] - 1.5
    if i == NO_TRANSCRIPT:
      assert rec.num_sentences == 0 and (rec.segment_sentence == -1).all()
      continue
    spoken = " ".join(demo["tokenizer"].decode(rec.sentence_ids(s))
                      for s in range(rec.num_sentences))
    cues = transcripts.read_vtt(demo["corpus"].world_dir / f"{vid}.vtt")
    said = sentences.normalize_text(" ".join(c.text for c in cues),
                                    lowercase=demo["tokenizer"].lowercase)
    assert spoken.replace(" ", "") == said.replace(" ", ""), vid
  meta = builder.info.metadata
  assert meta["visual_vocab_size"] == 9 and meta["text_vocab_size"] == SPM_SIZE
  summary = meta["build_summary"]
  assert (summary["transcripts_without_video"], summary["videos_without_transcript"]) == (1, 1)
  assert summary["records"] == {s: len(r) for s, r in by_split.items()}
  # array_record on disk; the data source reads any index in any order.
  assert builder.info.file_format.value == "array_record"
  source = builder.as_data_source("train")
  order = list(range(len(source)))[::-1]
  assert [source[i]["video_id"] for i in order] == [source[i]["video_id"] for i in
                                                     range(len(source))][::-1]


def test_from_videos_through_extraction(demo, built, tmp_path):
  """Videos in, through S3D (the demo corpus's settings) and the vocabulary: the same records
  as from the corpus's precomputed features."""
  ids = [vid for i, vid in enumerate(demo["ids"][:4]) if i != NO_TRANSCRIPT]
  manual = tmp_path / "manual"
  (manual / "videos").mkdir(parents=True)
  (manual / "transcripts").mkdir()
  for vid in ids:
    os.symlink(demo["corpus"].world_dir / f"{vid}.mp4", manual / "videos" / f"{vid}.mp4")
    os.symlink(demo["corpus"].world_dir / f"{vid}.vtt", manual / "transcripts" / f"{vid}.vtt")
  config = _config("videos", source="videos", image_size=demo["corpus"].image_size,
                   extract_batch_size=fw.EXTRACT_BATCH, feature_dtype="float32",
                   vocabulary=str(demo["manual"] / "visual_vocab.npz"),
                   tokenizer_file=str(demo["manual"] / "text.model"))
  builder = _build(manual, tmp_path / "tfds", config)
  got = {v: r for recs in _read_all(builder).values() for v, r in recs.items()}
  assert sorted(got) == sorted(ids)
  from_features = {v: r for recs in built[1].values() for v, r in recs.items()}
  for vid in ids:
    _assert_same(got[vid], from_features[vid])
  cached = list((tmp_path / "tfds" / "downloads" / "videobert_features").glob("*/*.npz"))
  assert sorted(p.stem for p in cached) == sorted(ids)


def test_tfds_build_on_direct_runner_gives_same_records(demo, built, tmp_path):
  config = {"name": "demo", "validation_fraction": VALIDATION_FRACTION, "visual_vocab_size": 9,
            "text_vocab_size": SPM_SIZE}
  env = dict(os.environ, PYTHONPATH=str(REPO))
  tfds_cli = pathlib.Path(sys.executable).with_name("tfds")
  cmd = [str(tfds_cli), "build", "data/videobert",
         f"--manual_dir={demo['manual']}", f"--data_dir={tmp_path}",
         f"--config={json.dumps(config)}",
         "--beam_pipeline_options=runner=DirectRunner"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "ghost.vtt" in proc.stderr and "build summary" in proc.stderr
  beam_builder = tfds.builder_from_directory(str(tmp_path / "videobert" / "demo" / "1.0.0"))
  beam_records = _read_all(beam_builder)
  local_builder, local_records = built
  assert {s: sorted(r) for s, r in beam_records.items()} == \
      {s: sorted(r) for s, r in local_records.items()}
  for split, recs in local_records.items():
    for vid, rec in recs.items():
      _assert_same(beam_records[split][vid], rec)
  assert beam_builder.info.metadata["build_summary"] == \
      local_builder.info.metadata["build_summary"]


# ------------------------------------------------------------------------------ bad input


def test_dummy_data_bad_inputs(tmp_path, capfd):
  """The TFDS-layout dummy data: an empty transcript, a video without a transcript and a
  transcript without a video; here also a broken cue (a backwards timing) after vid_a's two."""
  manual = tmp_path / "dummy"
  shutil.copytree(REPO / "data" / "videobert" / "dummy_data", manual)
  with open(manual / "transcripts" / "vid_a.vtt", "a") as f:
    f.write("\n00:00:09.000 --> 00:00:08.000\nBackwards.\n")
  builder = _build(manual, tmp_path / "tfds", vb.VideoBertConfig(
      name="dummy", tokenizer="wordpiece", tokenizer_file="vocab.txt", validation_fraction=0.4,
      visual_vocab_size=3, text_vocab_size=19))
  printed = capfd.readouterr().err
  got = {v: r for recs in _read_all(builder).values() for v, r in recs.items()}
  assert sorted(got) == ["vid_a", "vid_b", "vid_c", "vid_d", "vid_e"]
  summary = builder.info.metadata["build_summary"]
  # Counts in the metadata; a few names of each kind where the summary is printed.
  assert {k: summary[k] for k in ("transcripts_without_video", "videos_without_transcript",
                                  "no_sentences", "broken_cues")} == {
      "transcripts_without_video": 1, "videos_without_transcript": 1, "no_sentences": 1,
      "broken_cues": 1}
  for line in ("1 transcripts without a video (not built): " + str(manual / "transcripts" /
                                                                 "orphan.vtt"),
               "1 videos without a transcript (video-only records): vid_e",
               "1 transcripts with no sentences", "1 broken cue(s) skipped"):
    assert line in printed, printed
  # A transcript with only a sound tag: a video-only record of its 4 clips.
  d = got["vid_d"]
  assert d.num_sentences == 0 and d.segment_sentence.tolist() == [-1]
  assert (d.segment_clip_begin.tolist(), d.segment_clip_end.tolist()) == ([0], [4])
  # No transcript at all: the 16-token rule over 20 clips.
  e = got["vid_e"]
  assert e.segment_clip_begin.tolist() == [0, 16] and e.segment_clip_end.tolist() == [16, 20]
  tok = tokenizers.WordPieceTokenizer(manual / "vocab.txt")
  a = got["vid_a"]
  assert [tok.decode(a.sentence_ids(i)) for i in range(2)] == ["now we cut the tomato .",
                                                               "and we flip the egg ."]
  np.testing.assert_allclose(a.sentence_starts, [0.2, 4.6])
  # Sentence 0 (0.2-2.9 s) takes clips 0-1, sentence 1 (4.6-7.4 s) clips 3-4; 2 and 5 are
  # video-only.
  assert a.segment_sentence.tolist() == [0, -1, 1, -1]
  assert a.segment_clip_begin.tolist() == [0, 2, 3, 5]
  vocab = vocabulary.VisualVocabulary.load(manual / "visual_vocab.npz")
  feats = features_io.load_features(manual / "features" / "vid_a.npz").features
  np.testing.assert_array_equal(a.clip_tokens, vocab.assign(feats.astype(np.float32)))
  assert got["vid_c"].sentence_ids(1).tolist() == [  # "Cut the bread.": no "bread" in vocab.txt
      tok.token_to_id("cut"), tok.token_to_id("the"), tok.specials.unk, tok.token_to_id(".")]


def test_one_caption_file_for_many_videos_pairs_with_each(tmp_path):
  """HowTo100M's layout: one caption.json keyed by video id beside per-video features. Its videos
  get the records their own transcripts give; ids without a video are counted, not listed."""
  dummy = REPO / "data" / "videobert" / "dummy_data"
  config = vb.VideoBertConfig(name="dummy", tokenizer="wordpiece", tokenizer_file="vocab.txt",
                              validation_fraction=0.4, visual_vocab_size=3, text_vocab_size=19)
  reference = _read_all(_build(dummy, tmp_path / "reference", config))
  manual = tmp_path / "keyed"
  shutil.copytree(dummy, manual)
  captions = {}
  for vid in ("vid_a", "vid_b"):
    cues = transcripts.read_vtt(manual / "transcripts" / f"{vid}.vtt")
    captions[vid] = {"start": [c.start for c in cues], "end": [c.end for c in cues],
                     "text": [c.text for c in cues]}
    (manual / "transcripts" / f"{vid}.vtt").unlink()
  captions.update({f"elsewhere_{i}": {"start": [0], "end": [1], "text": ["hi"]} for i in range(3)})
  (manual / "transcripts" / "caption.json").write_text(json.dumps(captions))
  builder = _build(manual, tmp_path / "tfds", config)
  got = {v: r for recs in _read_all(builder).values() for v, r in recs.items()}
  want = {v: r for recs in reference.values() for v, r in recs.items()}
  assert sorted(got) == sorted(want)
  for vid in want:
    _assert_same(got[vid], want[vid])
  assert got["vid_a"].num_sentences == 2
  summary = builder.info.metadata["build_summary"]
  assert summary["transcripts_without_video"] == 2
  pairing = records.pair_inputs(manual / "transcripts", features_dir=manual / "features")
  assert pairing.transcripts_without_video == [
      str(manual / "transcripts" / "orphan.vtt"),
      f"{manual / 'transcripts' / 'caption.json'}: 3 of its 5 videos"]


@pytest.mark.parametrize("override,names", [
    ({"visual_vocab_size": 4}, ["visual_vocab.npz", "visual_vocab_size is 4", "3 tokens"]),
    ({"text_vocab_size": 30522}, ["vocab.txt", "text_vocab_size is 30522", "19 tokens"]),
])
def test_mismatched_vocabulary_or_tokenizer_stops_before_writing(tmp_path, override, names):
  config = dict(name="bad", tokenizer="wordpiece", tokenizer_file="vocab.txt",
                visual_vocab_size=3, text_vocab_size=19)
  config.update(override)
  manual = REPO / "data" / "videobert" / "dummy_data"
  with pytest.raises(records.InputMismatchError) as err:
    _build(manual, tmp_path, vb.VideoBertConfig(**config))
  for name in names:
    assert name in str(err.value)
  assert not list(tmp_path.rglob("*.array_record*"))
  assert not (tmp_path / "videobert" / "bad" / "1.0.0").exists()


def test_feature_width_mismatch_names_both(tmp_path):
  manual = tmp_path / "manual"
  shutil.copytree(REPO / "data" / "videobert" / "dummy_data", manual)
  rng = np.random.default_rng(0)
  vocabulary.VisualVocabulary.fit(rng.normal(size=(30, 5)).astype(np.float32),
                                  kmeans.KMeansConfig(depth=1, branching=3)).save(
                                      manual / "visual_vocab.npz")
  with pytest.raises(records.InputMismatchError, match=r"vid_a\.npz has 8-d features but "
                     r"visual vocabulary .*visual_vocab\.npz was fitted on 5-d"):
    _build(manual, tmp_path / "tfds", vb.VideoBertConfig(
        name="bad", tokenizer="wordpiece", tokenizer_file="vocab.txt"))


def test_missing_manual_dir_shows_instructions(tmp_path):
  with pytest.raises(AssertionError, match=r"(?s)does not exist or is empty.*transcripts/"):
    _build(tmp_path / "nowhere", tmp_path / "tfds", vb.VideoBertConfig(name="x"))
  (tmp_path / "partial" / "videos").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match=r"(?s)partial/transcripts is missing.*"
                     r"visual_vocab\.npz"):
    _build(tmp_path / "partial", tmp_path / "tfds", vb.VideoBertConfig(name="x"))


# ------------------------------------------------------------------------------ pieces


def test_split_of_is_a_stable_fraction():
  ids = [f"video_{i}" for i in range(4000)]
  assert {records.split_of(v, 0.0) for v in ids} == {"train"}
  assert {records.split_of(v, 1.0) for v in ids} == {"validation"}
  val = [v for v in ids if records.split_of(v, 0.25) == "validation"]
  assert abs(len(val) / len(ids) - 0.25) < 0.03
  # A larger fraction only moves videos into validation; a salt reshuffles.
  assert set(val) <= {v for v in ids if records.split_of(v, 0.4) == "validation"}
  salted = [v for v in ids if records.split_of(v, 0.25, salt="b") == "validation"]
  assert len(set(val) & set(salted)) < len(val) * 0.4


def test_pair_inputs_by_id(tmp_path):
  for name in ("a.mp4", "b.mkv", "c.mp4", "b.mp4", "notes.txt"):
    (tmp_path / "v").mkdir(exist_ok=True)
    (tmp_path / "v" / name).write_bytes(b"")
  (tmp_path / "t").mkdir()
  for name in ("a.en.vtt", "c.srt", "c.vtt", "zz.vtt", "a.b.c.json", "c.txt", ".hidden"):
    (tmp_path / "t" / name).write_text("")
  pairing = records.pair_inputs(tmp_path / "t", videos_dir=tmp_path / "v")
  assert [(i.video_id, pathlib.Path(i.transcript).name if i.transcript else None,
           pathlib.Path(i.video).name) for i in pairing.items] == [
               ("a", "a.en.vtt", "a.mp4"), ("b", None, "b.mkv"), ("c", "c.srt", "c.mp4")]
  assert [pathlib.Path(p).name for p in pairing.transcripts_without_video] == ["a.b.c.json",
                                                                              "zz.vtt"]
  assert pairing.videos_without_transcript == ["b"]
  reasons = dict((pathlib.Path(p).name, r) for p, r in pairing.skipped)
  assert sorted(reasons) == ["b.mp4", "c.txt", "c.vtt"]
  assert "duplicate video for video id 'b'" in reasons["b.mp4"]
  assert "second transcript for video 'c'" in reasons["c.vtt"]
  assert reasons["c.txt"] == ("unknown transcript format '.txt'; expected one of ['.vtt', "
                              "'.srt', '.json']")


def test_dummy_data_is_reproducible(tmp_path):
  """dummy_data/ is what make_dummy_data writes (features, transcripts, vocabularies)."""
  out = make_dummy_data.write(tmp_path / "dummy")
  shipped = REPO / "data" / "videobert" / "dummy_data"
  names = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
  assert names == sorted(str(p.relative_to(shipped)) for p in shipped.rglob("*") if p.is_file())
  for name in names:
    if name.endswith(".npz"):
      with np.load(out / name) as a, np.load(shipped / name) as b:
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
          if a[key].dtype.kind == "f":  # k-means sums in device order: equal to rounding
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5, err_msg=name + key)
          else:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}:{key}")
    else:
      assert (out / name).read_text() == (shipped / name).read_text()



def test_punctuation_model_is_read_from_the_manual_dir(tmp_path):
  settings = vb.VideoBertConfig(name="p", punctuation_model="punct.msgpack").settings(tmp_path)
  assert settings.split_config.punctuation_model == str(tmp_path / "punct.msgpack")
  settings = vb.VideoBertConfig(name="p", punctuation_model="/models/p.msgpack").settings(tmp_path)
  assert settings.split_config.punctuation_model == "/models/p.msgpack"
  assert vb.VideoBertConfig(name="p").settings(tmp_path).split_config.punctuation_model == ""
