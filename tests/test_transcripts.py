"""Transcript readers on files in the real formats: YouTube auto captions, SRT, HowTo100M JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vbert_jax.demo.world import world
from vbert_jax.text import sentences
from vbert_jax.text import transcripts
from vbert_jax.text.transcripts import Cue, TranscriptError

# YouTube's automatic captions as downloaded (`--write-auto-subs`): a header with Kind/Language,
# word timings inside the newest line, the previous line repeated on top, 10 ms hand-over cues.
YOUTUBE_VTT = """WEBVTT
Kind: captions
Language: en

00:00:00.000 --> 00:00:02.350 align:start position:0%
 
hello<00:00:00.480><c> everyone</c><00:00:00.960><c> welcome</c><00:00:01.440><c> back</c>

00:00:02.350 --> 00:00:02.360 align:start position:0%
hello everyone welcome back
 

00:00:02.360 --> 00:00:05.120 align:start position:0%
hello everyone welcome back
today<00:00:02.800><c> we</c><00:00:03.040><c> make</c><00:00:03.520><c> crème</c><00:00:04.000><c> brûlée</c>

00:00:05.120 --> 00:00:05.130 align:start position:0%
today we make crème brûlée
 

00:00:05.130 --> 00:00:08.000 align:start position:0%
today we make crème brûlée
[Music]

00:00:08.000 --> 00:00:08.010 align:start position:0%
[Music]
 

00:00:08.010 --> 00:00:10.500 align:start position:0%
[Music]
first<00:00:08.400><c> crack</c><00:00:08.900><c> the</c><00:00:09.300><c> eggs</c>
"""


def _write(tmp_path, name: str, data: str | bytes):
  path = tmp_path / name
  if isinstance(data, str):
    path.write_text(data, encoding="utf-8", newline="")
  else:
    path.write_bytes(data)
  return path


def test_youtube_rolling_captions_give_each_line_once(tmp_path):
  cues = transcripts.read_transcript(_write(tmp_path, "yt.vtt", YOUTUBE_VTT))
  assert [c[:3] for c in cues] == [
      (0.0, 2.35, "hello everyone welcome back"),
      (2.36, 5.12, "today we make crème brûlée"),
      (5.13, 8.0, "[Music]"),
      (8.01, 10.5, "first crack the eggs"),
  ]
  assert cues[0].words == ((0.0, "hello"), (0.48, "everyone"), (0.96, "welcome"), (1.44, "back"))
  assert cues[2].words == ()  # a line without word timings
  text = " ".join(c.text for c in cues)
  for word in ("hello", "today", "crack", "eggs"):
    assert text.split().count(word) == 1
  # As sentences (no punctuation: split at the 2.9 s of music), each is said once.
  assert sentences.split_sentences(cues) == [
      sentences.Sentence(0.0, 5.12, "hello everyone welcome back today we make crème brûlée"),
      sentences.Sentence(8.01, 10.5, "first crack the eggs")]


def test_plain_vtt_keeps_repeated_lines_and_reads_identifiers(tmp_path):
  # Not a rolling file: a speaker who says "yes" twice keeps both cues.
  vtt = ("WEBVTT\n\nNOTE a comment\nspanning lines\n\nSTYLE\n::cue { color: red }\n\n"
         "intro\n00:01.000 --> 00:02.000 line:0\n<v Chef>Yes.</v>\n\n"
         "00:00:02.500 --> 00:00:03.000\nYes.\n\n"
         "00:00:04.000 --> 00:00:05.000\nSalt &amp; pepper &lt;3\n")
  cues = transcripts.read_vtt(_write(tmp_path, "plain.vtt", vtt))
  assert cues == [Cue(1.0, 2.0, "Yes."), Cue(2.5, 3.0, "Yes."),
                  Cue(4.0, 5.0, "Salt & pepper <3")]


def test_srt_with_bom_crlf_and_non_ascii(tmp_path):
  srt = ("\ufeff1\r\n00:00:01,000 --> 00:00:02,500\r\n<i>Crème brûlée</i>, naïve café\r\n\r\n"
         "2\r\n00:00:03,000 --> 00:00:04,000 X1:10 X2:20\r\n日本語のテキスト\r\nsecond line\r\n\r\n"
         "3\r\n00:00:04,500 --> 00:00:06,000\r\n{\\an8}Ünïcödé — “quoted”\r\n")
  cues = transcripts.read_transcript(_write(tmp_path, "bom.srt", srt.encode("utf-8")))
  assert cues == [Cue(1.0, 2.5, "Crème brûlée, naïve café"),
                  Cue(3.0, 4.0, "日本語のテキスト second line"),
                  Cue(4.5, 6.0, "Ünïcödé — “quoted”")]
  # The same file in UTF-16 with its BOM (as some Windows tools save it) reads the same.
  utf16 = _write(tmp_path, "utf16.srt", srt.lstrip("\ufeff").encode("utf-16"))
  assert transcripts.read_transcript(utf16) == cues


def test_non_utf8_is_detected_and_encoding_overrides(tmp_path, caplog):
  path = _write(tmp_path, "latin1.srt",
                "1\n00:00:01,000 --> 00:00:02,000\nCrème brûlée\n".encode("cp1252"))
  with caplog.at_level("WARNING"):
    assert transcripts.read_transcript(path) == [Cue(1.0, 2.0, "Crème brûlée")]
  assert any(str(path) in r.getMessage() and "read as cp1252" in r.getMessage()
             for r in caplog.records)
  assert transcripts.read_transcript(path, encoding="cp1252") == [Cue(1.0, 2.0, "Crème brûlée")]
  with pytest.raises(TranscriptError, match="cannot decode as utf-8"):
    transcripts.read_transcript(path, encoding="utf-8")


@pytest.mark.parametrize("suffix,body,cue,fragment", [
    (".srt", "1\n00:00:05,000 --> 00:00:02,000\nbackwards\n", "cue 1 (line 1)", "before start"),
    (".srt", "1\n00:00:01,000 --> 00:00:02,000\nok\n\n7\n00:00:03,000 --> 00:0x:04,000\nbad\n",
     "cue 7 (line 5)", "malformed timestamp"),
    (".srt", "1\n00:00:01,000 --> 00:00:02,000\nok\n\n2\n00:01:75,000 --> 00:01:76,000\nbad\n",
     "cue 2 (line 5)", "below 60"),
    (".vtt", "WEBVTT\n\n00:00:01.000 --> 00:00:02.000\nok\n\nNOTE skipped\n\nid-2\n"
     "00:00:09.000 --> 00:00:03.000\nreversed\n", "cue 2 (line 8, 'id-2')", "before start"),
    (".vtt", "WEBVTT\n\n00:00:01.000 -> 00:00:02.000\nno arrow\n", "cue 1 (line 3)",
     "no timing line"),
    (".vtt", "WEBVTT\n\n00:00:01.000 --> 2.0\nshort\n", "cue 1 (line 3)", "malformed timestamp"),
], ids=["srt-reversed", "srt-bad-digit", "srt-seconds-75", "vtt-reversed", "vtt-no-arrow",
        "vtt-short-timestamp"])
def test_bad_timestamps_name_file_and_cue(tmp_path, suffix, body, cue, fragment):
  """The broken cue is skipped and named; a file with no other cue is an error."""
  path = _write(tmp_path, "bad" + suffix, body)
  skipped: list[str] = []
  if "ok" in body:
    assert transcripts.read_transcript(path, skipped=skipped) == [Cue(1.0, 2.0, "ok")]
  else:
    with pytest.raises(TranscriptError, match="no usable cue: all 1 cue"):
      transcripts.read_transcript(path, skipped=skipped)
  assert len(skipped) == 1 and skipped[0].startswith(f"{path}: {cue}: ")
  assert fragment in skipped[0]


def test_not_webvtt_and_unknown_suffix(tmp_path):
  with pytest.raises(TranscriptError, match="expected 'WEBVTT'"):
    transcripts.read_transcript(_write(tmp_path, "x.vtt", "1\n00:00:01,000 --> 00:00:02,000\nx\n"))
  with pytest.raises(TranscriptError, match=r"unknown transcript format '\.txt'"):
    transcripts.read_transcript(_write(tmp_path, "x.txt", "hello"))
  with pytest.raises(TranscriptError, match="cannot read"):
    transcripts.read_transcript(tmp_path / "missing.vtt")


def test_howto100m_json_single_and_keyed(tmp_path):
  # HowTo100M captions come from rolling ASR: consecutive lines overlap in time.
  entry = {"start": [0.0, 2.1, 4.0, 7.5], "end": [2.5, 4.4, 6.0, 9.0],
           "text": ["so today we are", "going to make a", "  pancake  batter", "whisk it well"]}
  one = transcripts.read_transcript(_write(tmp_path, "v1.json", json.dumps(entry)))
  assert one == [Cue(0.0, 2.1, "so today we are"), Cue(2.1, 4.0, "going to make a"),
                 Cue(4.0, 6.0, "pancake batter"), Cue(7.5, 9.0, "whisk it well")]
  keyed = _write(tmp_path, "caption.json", json.dumps({"abc": entry, "xyz": {
      "start": [1], "end": [2], "text": ["other"]}}))
  assert transcripts.read_transcript(keyed, video_id="abc") == one
  assert transcripts.read_transcript(keyed, video_id="xyz") == [Cue(1.0, 2.0, "other")]
  with pytest.raises(TranscriptError, match="holds 2 videos"):
    transcripts.read_transcript(keyed)
  every = transcripts.read_howto100m_all(keyed)
  assert sorted(every) == ["abc", "xyz"] and every["abc"] == one
  assert transcripts.read_howto100m_all(tmp_path / "v1.json") == {"v1": one}
  broken = _write(tmp_path, "all.json", json.dumps({"abc": entry, "bad": dict(entry, end=[
      2.5, 4.4, 3.0, 9.0])}))
  skipped: list[str] = []
  assert len(transcripts.read_howto100m_all(broken, skipped=skipped)["bad"]) == 3
  assert skipped == [f"{broken}: video 'bad', cue 2: end 3.000s is before start 4.000s (times "
                     f"must satisfy 0 <= start <= end)"]
  bad = dict(entry, end=[2.5, 1.0, 6.0, 9.0])
  skipped = []
  assert len(transcripts.read_transcript(_write(tmp_path, "bad.json", json.dumps(bad)),
                                         skipped=skipped)) == 3
  assert len(skipped) == 1 and "cue 1: end 1.000s is before start 2.100s" in skipped[0]
  short = dict(entry, text=["a"])
  with pytest.raises(TranscriptError, match="different lengths"):
    transcripts.read_transcript(_write(tmp_path, "short.json", json.dumps(short)))


def test_overlaps_resolved_and_sorted():
  cues = transcripts.resolve_overlaps([
      Cue(5.0, 7.0, "c"), Cue(0.0, 3.0, "a"), Cue(2.0, 4.0, "b"), Cue(5.0, 6.0, "d"),
      Cue(8.0, 9.0, "  ")])
  assert cues == [Cue(0.0, 2.0, "a"), Cue(2.0, 4.0, "b"), Cue(5.0, 7.0, "c d")]
  assert all(a.end <= b.start for a, b in zip(cues, cues[1:]))


def test_demo_world_narration_reads_back(tmp_path):
  # The demo world's own WebVTT writer, on the narration of two of its videos.
  config = world.WorldConfig(num_videos=2, seed=3)
  for index in range(2):
    rng = world.video_rng(config, index)
    steps = world.plan_steps(config, rng)
    expected = world.narrate(steps, config.narration, rng)
    path = _write(tmp_path, f"{world.video_id(index)}.vtt", world.webvtt(expected))
    cues = transcripts.read_transcript(path)
    assert [c.text for c in cues] == [c.text for c in expected]
    np.testing.assert_allclose([(c.start, c.end) for c in cues],
                               [(c.start, c.end) for c in expected], atol=5e-4)
