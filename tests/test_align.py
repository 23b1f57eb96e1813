"""Alignment of sentences and clips into a video record, and the 16-token rule without ASR."""

from __future__ import annotations

import numpy as np
import pytest

from vbert_jax.demo.world import world
from vbert_jax import align
from vbert_jax import sequence
from vbert_jax.align import NO_SENTENCE, AlignConfig, AlignError, TokenizedSentence
from vbert_jax.text import sentences
from vbert_jax.text import tokenizers
from vbert_jax.text import transcripts

CLIP = 1.5
NUM_CLIPS = 40  # 60 s of video


def _clips(n: int = NUM_CLIPS):
  starts = np.arange(n) * CLIP
  return starts, starts + CLIP, (7 * np.arange(n) + 3) % 97


def test_hand_made_video_gives_the_expected_spans():
  starts, ends, tokens = _clips()
  sents = [
      TokenizedSentence([5, 6, 7], 0.2, 2.9),  # clips 0 and 1
      TokenizedSentence([8], 3.0, 4.5),  # exactly clip 2: touching clips 1 and 3 do not count
      TokenizedSentence([9, 10], 4.4, 4.4),  # zero length: the clip it falls in, 2 again
      TokenizedSentence([], 10.0, 12.0),  # no tokens: dropped, its clips stay uncovered
      TokenizedSentence([11], 30.0, 31.0),  # clip 20
      TokenizedSentence([12], 70.0, 72.0),  # after the video ends: no clips
  ]
  rec = align.align_video("vid", sents, starts, ends, tokens)
  assert rec.video_id == "vid" and rec.num_sentences == 5
  assert rec.text_tokens.tolist() == [5, 6, 7, 8, 9, 10, 11, 12]
  assert rec.text_lengths.tolist() == [3, 1, 2, 1, 1]
  np.testing.assert_allclose(rec.sentence_starts, [0.2, 3.0, 4.4, 30.0, 70.0])
  np.testing.assert_allclose(rec.sentence_ends, [2.9, 4.5, 4.4, 31.0, 72.0])
  segments = list(zip(rec.segment_clip_begin.tolist(), rec.segment_clip_end.tolist(),
                      rec.segment_sentence.tolist()))
  assert segments == [(0, 2, 0), (2, 3, 1), (2, 3, 2),
                      (3, 19, NO_SENTENCE), (19, 20, NO_SENTENCE),  # clips 3..19: 16 + 1
                      (20, 21, 3),
                      (21, 37, NO_SENTENCE), (37, 40, NO_SENTENCE),  # clips 21..39: 16 + 3
                      (40, 40, 4)]
  text, video = rec.segment(0)
  assert text.tolist() == [5, 6, 7] and video.tolist() == tokens[0:2].tolist()
  text, video = rec.segment(3)
  assert text.size == 0 and video.tolist() == tokens[3:19].tolist()
  assert rec.sentence_ids(2).tolist() == [9, 10]
  assert rec.video_segments().tolist() == [3, 4, 6, 7]
  assert rec.sentence_segments().tolist() == [0, 1, 2, 5, 8]


def test_no_asr_gives_16_token_segments():
  starts, ends, tokens = _clips()
  rec = align.align_video("silent", [], starts, ends, tokens)
  assert rec.num_sentences == 0 and rec.text_tokens.size == 0
  assert list(zip(rec.segment_clip_begin.tolist(), rec.segment_clip_end.tolist())) == [
      (0, 16), (16, 32), (32, 40)]
  assert (rec.segment_sentence == NO_SENTENCE).all()
  for g in range(rec.num_segments):
    assert rec.segment(g)[1].tolist() == tokens[16 * g:16 * (g + 1)].tolist()
  # Leftovers shorter than min_video_segment are dropped.
  strict = align.align_video("silent", [], starts, ends, tokens,
                             AlignConfig(min_video_segment=16))
  assert strict.segment_clip_end.tolist() == [16, 32]
  # A video of 16 clips or fewer is one segment.
  short = align.align_video("short", [], *_clips(9))
  assert short.segment_clip_begin.tolist() == [0] and short.segment_clip_end.tolist() == [9]


def test_min_overlap():
  starts, ends, tokens = _clips(6)
  sent = [TokenizedSentence([1], 2.9, 5.0)]  # 0.1 s of clip 1, all of clip 2, 0.5 s of clip 3
  def spans(rec):
    return list(zip(rec.segment_clip_begin.tolist(), rec.segment_clip_end.tolist(),
                    rec.segment_sentence.tolist()))
  loose = align.align_video("v", sent, starts, ends, tokens)
  assert spans(loose) == [(0, 1, NO_SENTENCE), (1, 4, 0), (4, 6, NO_SENTENCE)]
  tight = align.align_video("v", sent, starts, ends, tokens, AlignConfig(min_overlap=0.2))
  assert spans(tight) == [(0, 2, NO_SENTENCE), (2, 4, 0), (4, 6, NO_SENTENCE)]


def test_record_features_round_trip_and_validation():
  starts, ends, tokens = _clips(20)
  rec = align.align_video("v", [TokenizedSentence([4, 5], 1.0, 4.0)], starts, ends, tokens)
  features = rec.to_features()
  assert all(np.asarray(v).ndim == 1 for k, v in features.items() if k != "video_id")
  back = align.VideoRecord.from_features({**features, "video_id": b"v"})
  for key in align.VideoRecord.ARRAY_FIELDS:
    np.testing.assert_array_equal(getattr(back, key), getattr(rec, key))
    assert getattr(back, key).dtype == align.VideoRecord.ARRAY_FIELDS[key]
  rec.validate(visual_size=97, text_size=6)
  with pytest.raises(AlignError, match=r"record v: clip tokens outside \[0, 50\)"):
    rec.validate(visual_size=50)
  with pytest.raises(AlignError, match=r"record v: text tokens outside \[0, 5\)"):
    rec.validate(text_size=5)
  with pytest.raises(AlignError, match="text_lengths sum to 2, text_tokens has 1"):
    align.VideoRecord.from_features({**features, "text_tokens": np.array([4], np.int32)})
  with pytest.raises(AlignError, match="video w: 20 clip tokens, 19 starts"):
    align.align_video("w", [], starts[:-1], ends, tokens)
  with pytest.raises(AlignError, match="video w: clip times must be sorted"):
    align.align_video("w", [], starts[::-1], ends[::-1], tokens)


def test_demo_world_narration_end_to_end(tmp_path):
  """VTT file -> cues -> sentences -> WordPiece ids -> record; each sentence's clips are the
  clips its cue overlaps, and every clip outside the narration is in a video-only segment."""
  config = world.WorldConfig(num_videos=1, seed=2)
  rng = world.video_rng(config, 0)
  steps = world.plan_steps(config, rng)
  cues = world.narrate(steps, config.narration, rng)
  path = tmp_path / "demo.vtt"
  path.write_text(world.webvtt(cues))
  sents = sentences.split_sentences(transcripts.read_transcript(path),
                                    sentences.SplitConfig(max_gap=0.01))
  assert [s.text for s in sents] == [c.text for c in cues]  # one sentence a cue here
  words = sorted({w for s in sents for w in tokenizers.WordPieceTokenizer(
      {t: i for i, t in enumerate(sequence.SPECIAL_TOKENS)}, lowercase=True).basic_tokenize(
          s.text)})
  vocab = {t: i for i, t in enumerate(list(sequence.SPECIAL_TOKENS) + words)}
  tok = tokenizers.WordPieceTokenizer(vocab, lowercase=True)
  n = int(round(steps[-1].end / config.clip_seconds))
  starts = np.arange(n) * config.clip_seconds
  rec = align.align_video("demo", align.tokenize_sentences(sents, tok), starts,
                          starts + config.clip_seconds, np.arange(n))
  covered = np.zeros(n, bool)
  for g in rec.sentence_segments():
    s = rec.segment_sentence[g]
    cue = cues[s]
    assert tok.decode(rec.sentence_ids(s)) == " ".join(tok.basic_tokenize(cue.text))
    clips = rec.segment(g)[1]
    expected = [i for i in range(n) if starts[i] < cue.end and starts[i] + 1.5 > cue.start]
    assert clips.tolist() == expected
    covered[clips] = True
  for g in rec.video_segments():
    clips = rec.segment(g)[1]
    assert 1 <= len(clips) <= 16 and not covered[clips].any()
    covered[clips] = True
  assert covered.all()
