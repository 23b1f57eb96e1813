"""Transcripts as they arrive from the wild, read beside the subtitle libraries people use.

Each case is a file written with one quirk of real files: streaming services' lines of spaces,
YouTube's cues without blank lines and its word timings, hour-less timestamps, UTF-16/32 with and
without a byte-order mark, windows-1252, YouTube's json3 and the lists that transcript tools write.
Where webvtt-py or pysrt reads the quirky file right, our cues must equal theirs; where they do not
(a line of spaces straight after a cue's text, an SRT without blank lines), ours must equal theirs
on the same file written cleanly, which is what its author meant.
"""

from __future__ import annotations

import html
import json
import logging

import pysrt
import pytest
import webvtt

from vbert_jax.text import sentences
from vbert_jax.text import transcripts
from vbert_jax.text.transcripts import Cue, TranscriptError

# A streaming service's WebVTT: cue settings, and a line of spaces after the blank line that
# ends a cue (layout A) or straight after a cue's text (layout B).
NETFLIX_A = (
    "WEBVTT\n\n"
    "1\n00:00:01.000 --> 00:00:02.500 position:50.00%,middle align:middle size:80.00%\n"
    "Now we cut\nthe tomato.\n\n   \n"
    "2\n00:00:03.000 --> 00:00:04.000 position:50.00%,middle align:middle\nThen the onion.\n\n \n"
    "3\n00:00:05.000 --> 00:00:06.000\n&lt;sizzling&gt;\n")
NETFLIX_B = (
    "WEBVTT\n\n"
    "1\n00:00:01.000 --> 00:00:02.500\nNow we cut\nthe tomato.\n   \n"
    "2\n00:00:03.000 --> 00:00:04.000\nThen the onion.\n \n"
    "3\n00:00:05.000 --> 00:00:06.000\nSalt &amp; pepper.\n")

# YouTube's automatic captions with no blank line between cues: each timing line follows the
# previous cue's text. Word timings in the newest line; the previous line rolls on top.
YOUTUBE_NO_BLANK = (
    "WEBVTT\nKind: captions\nLanguage: en\n\n"
    "00:05:03.000 --> 00:05:04.080 align:start position:0%\n \n"
    "what<00:05:03.500><c> will</c>\n"
    "00:05:04.080 --> 00:05:05.069 align:start position:0%\nwhat will\n \n"
    "00:05:05.069 --> 00:05:07.000 align:start position:0%\nwhat will\n"
    "this<00:05:05.500><c> happen</c><00:05:06.100><c> is</c>\n")

# Hour-less, unpadded timestamps and short fractions, as some meeting tools write them.
HOURLESS = ("WEBVTT\n\n0:0:3.540 --> 0:0:5.2\nfirst line\n\n0:1:5.25 --> 0:1:7.000\nsecond\n\n"
            "1:02:03.4 --> 1:02:04.45\nthird\n")

# A longer English file with accents, curly quotes and dashes: the bytes of a windows-1252 file.
_LINES = ["Now we\u2019re going to cut the tomato.",
          "Add the cr\u00e8me fra\u00eeche \u2014 a spoonful.",
          "\u201cThat\u2019s it,\u201d she said.", "Stir until it\u2019s smooth, about 2 minutes.",
          "This is my grandmother\u2019s recipe from Cura\u00e7ao.", "Let it rest."]
WESTERN = "WEBVTT\n\n" + "\n".join(
    f"00:00:{i:02d}.000 --> 00:00:{i:02d}.900\n{_LINES[i % len(_LINES)]}\n" for i in range(40))


def _write(tmp_path, name: str, data: str | bytes):
  path = tmp_path / name
  path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
  return path


def _seconds(stamp: str) -> float:
  h, m, s = stamp.split(":")
  return int(h) * 3600 + int(m) * 60 + float(s)


def _webvtt_cues(captions) -> list[Cue]:
  """webvtt-py's captions (or those of a WebVTT text) as our cues: times from its timestamps,
  text with markup and entities gone."""
  if isinstance(captions, str):
    captions = webvtt.from_string(captions)
  return [Cue(_seconds(c.start), _seconds(c.end), transcripts.clean_line(" ".join(c.text.split())))
          for c in captions]


def _pysrt_cues(path) -> list[Cue]:
  return [Cue(c.start.ordinal / 1000, c.end.ordinal / 1000,
              " ".join(html.unescape(c.text_without_tags).split())) for c in pysrt.open(str(path))]


def _plain(cues) -> list[Cue]:
  return [Cue(c.start, c.end, c.text) for c in cues]


def test_lines_of_spaces_between_cues_layout_a_reads_as_webvtt_py_reads_it(tmp_path):
  ours = transcripts.read_vtt(_write(tmp_path, "a.vtt", NETFLIX_A))
  assert ours == _webvtt_cues(NETFLIX_A)
  assert ours == [Cue(1.0, 2.5, "Now we cut the tomato."), Cue(3.0, 4.0, "Then the onion."),
                  Cue(5.0, 6.0, "<sizzling>")]


def test_a_line_of_spaces_after_the_text_ends_the_cue(tmp_path):
  """webvtt-py, as WebVTT's rules say, keeps the line of spaces and the next cue's number in the
  text ("the tomato.\\n   \\n2"); ours ends the cue there, as the same file with empty lines."""
  ours = transcripts.read_vtt(_write(tmp_path, "b.vtt", NETFLIX_B))
  meant = "\n".join("" if not line.strip() else line for line in NETFLIX_B.split("\n"))
  assert ours == _webvtt_cues(meant)
  assert [c.text for c in ours] == ["Now we cut the tomato.", "Then the onion.", "Salt & pepper."]
  assert "2" in webvtt.from_string(NETFLIX_B).captions[0].text.split()  # what we avoid


def test_youtube_cues_without_blank_lines_stay_apart(tmp_path):
  path = _write(tmp_path, "yt.vtt", YOUTUBE_NO_BLANK)
  # Without de-duplication, one cue per block, exactly as webvtt-py finds them.
  assert _plain(transcripts.read_vtt(path, dedupe=False)) == _webvtt_cues(YOUTUBE_NO_BLANK)
  cues = transcripts.read_vtt(path)
  assert _plain(cues) == [Cue(303.0, 304.08, "what will"), Cue(305.069, 307.0, "this happen is")]
  assert not any("-->" in c.text for c in cues)
  # The inline word timings are kept: each timed piece with the time it was said.
  assert cues[0].words == ((303.0, "what"), (303.5, "will"))
  assert cues[1].words == ((305.069, "this"), (305.5, "happen"), (306.1, "is"))


def test_hourless_unpadded_timestamps_read_as_webvtt_py_reads_them(tmp_path):
  ours = transcripts.read_vtt(_write(tmp_path, "h.vtt", HOURLESS))
  assert ours == _webvtt_cues(HOURLESS)
  assert [(c.start, c.end) for c in ours] == [(3.54, 5.2), (65.25, 67.0), (3723.4, 3724.45)]


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-32", "utf-16-le", "utf-16-be",
                                      "utf-32-le", "utf-32-be"])
def test_utf16_and_utf32_with_or_without_a_byte_order_mark(tmp_path, encoding):
  """"utf-16" and "utf-32" write a byte-order mark; the -le/-be forms write none."""
  path = _write(tmp_path, "enc.vtt", NETFLIX_A.replace("tomato", "tomate crème brûlée")
                .encode(encoding))
  expected = transcripts.read_vtt(_write(tmp_path, "utf8.vtt", NETFLIX_A.replace(
      "tomato", "tomate crème brûlée")))
  assert transcripts.read_vtt(path) == expected
  if encoding in ("utf-8-sig", "utf-16", "utf-32"):  # webvtt-py honours the mark too
    assert _webvtt_cues(webvtt.read(str(path))) == expected


def test_windows_1252_is_detected_and_named_in_a_warning(tmp_path, caplog):
  path = _write(tmp_path, "legacy.vtt", WESTERN.encode("cp1252"))
  with caplog.at_level(logging.WARNING):
    cues = transcripts.read_transcript(path)
  assert cues == transcripts.read_transcript(_write(tmp_path, "utf8.vtt", WESTERN))
  assert cues[1].text == "Add the crème fraîche — a spoonful."
  warning = next(r.getMessage() for r in caplog.records if str(path) in r.getMessage())
  assert "cp1252" in warning and "encoding=" in warning
  # A stated encoding is taken as it is, without detection.
  latin = transcripts.read_transcript(path, encoding="latin-1")
  assert latin[1].text != cues[1].text


def test_srt_without_blank_lines_and_with_lines_of_spaces(tmp_path):
  """pysrt folds a cue that follows without a blank line into the previous one; ours reads the
  file as pysrt reads it written cleanly."""
  quirky = ("1\n00:00:01,000 --> 00:00:02,000\nfirst\n2\n00:00:03,000 --> 00:00:04,000\nsecond\n"
            "line two\n   \n3\n0:0:5,5 --> 0:0:6,000\n<i>third</i>\n")
  clean = quirky.replace("first\n2", "first\n\n2").replace("   \n", "\n").replace(
      "0:0:5,5 --> 0:0:6,000", "00:00:05,500 --> 00:00:06,000")
  ours = transcripts.read_srt(_write(tmp_path, "q.srt", quirky))
  assert ours == _pysrt_cues(_write(tmp_path, "clean.srt", clean))
  assert ours == [Cue(1.0, 2.0, "first"), Cue(3.0, 4.0, "second line two"),
                  Cue(5.5, 6.0, "third")]
  assert len(pysrt.open(str(tmp_path / "q.srt"))) < 3  # what we avoid


def test_a_broken_cue_is_skipped_and_named_and_a_file_of_them_is_an_error(tmp_path, caplog):
  vtt = ("WEBVTT\n\n00:00:01.000 --> 00:00:02.000\nok\n\nid-2\n00:00:09.000 --> 00:00:03.000\n"
         "backwards\n\n00:00:04.000 -> 00:00:05.000\nno arrow\n\n00:00:06.000 --> 00:0x:07.000\n"
         "bad digit\n\n00:00:08.000 --> 00:00:09.000\nalso ok\n")
  path = _write(tmp_path, "broken.vtt", vtt)
  skipped: list[str] = []
  with caplog.at_level(logging.WARNING):
    cues = transcripts.read_transcript(path, skipped=skipped)
  assert cues == [Cue(1.0, 2.0, "ok"), Cue(8.0, 9.0, "also ok")]
  assert [s.split(": ", 2)[1] for s in skipped] == [
      "cue 2 (line 6, 'id-2')", "cue 3 (line 10)", "cue 4 (line 13)"]
  assert all(s.startswith(f"{path}: ") for s in skipped)
  for fragment in ("before start", "no timing line", "malformed timestamp"):
    assert any(fragment in s for s in skipped), fragment
  assert sum(str(path) in r.getMessage() for r in caplog.records) == 3
  srt = _write(tmp_path, "broken.srt", "1\n00:00:05,000 --> 00:00:02,000\nbackwards\n\n"
               "2\n00:00:06,000 --> 00:01:75,000\nbad\n")
  with pytest.raises(TranscriptError, match=r"broken\.srt: no usable cue: all 2 cue\(s\)"):
    transcripts.read_transcript(srt)


def test_youtube_json3_keeps_word_timings(tmp_path):
  events = {"wireMagic": "pb3", "events": [
      {"tStartMs": 0, "dDurationMs": 9000, "id": 1, "wpWinPosId": 1, "wsWinStyleId": 1},
      {"tStartMs": 120, "dDurationMs": 3000, "wWinId": 1, "segs": [
          {"utf8": "first", "acAsrConf": 0}, {"utf8": " crack", "tOffsetMs": 480},
          {"utf8": " the", "tOffsetMs": 900}, {"utf8": " eggs", "tOffsetMs": 1320}]},
      {"tStartMs": 2100, "dDurationMs": 1020, "wWinId": 1, "aAppend": 1, "segs": [{"utf8": "\n"}]},
      {"tStartMs": 3120, "dDurationMs": 2000, "wWinId": 1, "segs": [{"utf8": "[Music]"}]}]}
  cues = transcripts.read_transcript(_write(tmp_path, "v.json", json.dumps(events)))
  assert _plain(cues) == [Cue(0.12, 3.12, "first crack the eggs"), Cue(3.12, 5.12, "[Music]")]
  assert cues[0].words == ((0.12, "first"), (0.6, "crack"), (1.02, "the"), (1.44, "eggs"))


def test_transcript_tool_lists_of_text_start_duration(tmp_path):
  items = [{"text": "so today we make", "start": 0.5, "duration": 2.0},
           {"text": "pancakes &amp; syrup", "start": 2.5, "duration": 1.5},
           {"text": "", "start": 4.0, "duration": 1.0}]
  cues = transcripts.read_transcript(_write(tmp_path, "list.json", json.dumps(items)))
  assert cues == [Cue(0.5, 2.5, "so today we make"), Cue(2.5, 4.0, "pancakes & syrup")]
  skipped: list[str] = []
  with pytest.raises(TranscriptError, match=r"bad\.json: no usable cue"):
    transcripts.read_transcript(_write(tmp_path, "bad.json", json.dumps([["x", 1, 2]])),
                                skipped=skipped)
  assert len(skipped) == 1 and "item 0: expected an object with 'text'" in skipped[0]


def test_sentences_end_where_the_word_timings_say(tmp_path):
  vtt = ("WEBVTT\n\n00:00:01.000 --> 00:00:06.000\n"
         "Crack<00:00:01.400><c> the</c><00:00:01.600><c> eggs.</c><00:00:04.000><c> Now</c>"
         "<00:00:04.500><c> whisk.</c>\n")
  cues = transcripts.read_vtt(_write(tmp_path, "w.vtt", vtt))
  got = sentences.split_sentences(cues)
  # "eggs." is said from 1.6 s until "Now" at 4.0 s; spread over the cue's characters it would
  # end at 3.96 s.
  assert got == [sentences.Sentence(1.0, 4.0, "Crack the eggs."),
                 sentences.Sentence(4.0, 6.0, "Now whisk.")]
