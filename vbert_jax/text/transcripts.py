"""Transcript readers: WebVTT (with YouTube's rolling automatic captions), SRT, and JSON (YouTube's
json3, `[{text, start, duration}]` lists, HowTo100M's captions).

Every reader returns cues as `Cue(start, end, text, words)` in seconds, sorted by time, with
overlaps resolved (see `resolve_overlaps`) and empty cues dropped. Markup (`<c>`, `<i>`,
`<v Name>`, `{\\an8}`) is removed and HTML entities are decoded; the text keeps its case,
punctuation and Unicode as written (`sentences.normalize_text` does the rest, once). Where the
file times words (YouTube's inline `<00:05:04.199><c> will</c>`, json3's `tOffsetMs`), `words`
holds `(start, text)` for each timed piece of the cue's text, so that sentences can end where a
word was said.

Files as they come:
- Cues are found the way WebVTT's parsing rules find them: a timing line that cannot belong to the
  current block starts a new cue, so cues with no blank line between them (YouTube) stay apart.
  A line of spaces ends a cue, as an empty one does (streaming services write them), except
  straight after a timing line, where YouTube puts one as an empty first row.
- Timestamps may omit the hours and the zero padding (`0:0:3.54`, as some meeting tools write
  them); a fraction of a second is decimal (`.54` is 540 ms).
- Encoding: a UTF-8, UTF-16 or UTF-32 byte-order mark is honoured; without one, UTF-8 is tried,
  and anything else is detected (charset-normalizer; where its best candidates tie, windows-1252
  wins, as legacy subtitle tools write it), with a warning naming the file and the encoding
  chosen. `encoding=` overrides the detection.
- A broken cue (no timing line, a malformed or backwards timestamp) in an otherwise good file is
  skipped with a warning that names the file and the cue, and is reported to `skipped` when the
  caller passes a list. A file with cues of which none is usable is an error.
- Paths go through `etils.epath`: transcripts may sit in a bucket (`gs://...`).

YouTube's automatic captions repeat the previous line at the top of every cue (the "rolling"
display) and add 10 ms cues that repeat it once more. `dedupe_rolling` drops a cue's leading lines
that repeat the lines emitted just before, so that each spoken line comes out once. It runs
automatically for files that show the pattern (inline word timings, or most cues starting with
the previous cue's last line).
"""

from __future__ import annotations

import codecs
import html
import json
import pathlib
import re
from typing import Any, Iterable, NamedTuple, Sequence

from absl import logging
import charset_normalizer
from etils import epath


class TranscriptError(ValueError):
  """A transcript that cannot be read; the message names the file and, where known, the cue."""

  def __init__(self, path, reason: str, cue: str | None = None):
    self.path = str(path)
    self.reason = reason
    self.cue = cue
    where = f"{path}: {cue}: " if cue else f"{path}: "
    super().__init__(where + reason)


class Cue(NamedTuple):
  start: float
  end: float
  text: str
  # (start, text) of each timed piece of `text`, in order, where the file times words; else ().
  words: tuple[tuple[float, str], ...] = ()


class _Line(NamedTuple):
  """One payload line: its clean text and its pieces, each (start or None: the cue's start)."""
  text: str
  pieces: tuple[tuple[float | None, str], ...]


class _Skips:
  """Broken cues of one file: each is logged and, when the caller passes a list, reported."""

  def __init__(self, path, out: list[str] | None):
    self.path, self.out, self.count, self.first = path, out, 0, None

  def add(self, error: TranscriptError) -> None:
    self.count += 1
    self.first = self.first or error
    logging.warning("transcript: skipped %s", error)  # the error names the file and the cue
    if self.out is not None:
      self.out.append(str(error))

  def check(self, cues: list) -> None:
    if not cues and self.first is not None:
      where = f"{self.first.cue}: " if self.first.cue else ""
      raise TranscriptError(self.path, f"no usable cue: all {self.count} cue(s) are broken; "
                            f"the first, {where}{self.first.reason}")


SUFFIXES = (".vtt", ".srt", ".json")

# [h...:]m:s.f with one or two digits for minutes and seconds and one to three for the fraction;
# SRT writes a comma before the fraction.
_TIMESTAMP_TEXT = r"(?:\d+:)?\d{1,2}:\d{1,2}[.,]\d{1,3}"
_TIMESTAMP = re.compile(r"^(?:(\d+):)?(\d{1,2}):(\d{1,2})[.,](\d{1,3})$")
_TIMING = re.compile(r"^(\S+)\s+-->\s+(\S+)(?:\s+.*)?$")
_TAG = re.compile(r"<[^>]*>")
_ASS_TAG = re.compile(r"\{\\[^}]*\}")
_INLINE_TIME = re.compile(rf"<({_TIMESTAMP_TEXT})>")
# Where charset-normalizer's best candidates tie (windows-1250 and -1252 do on Western text): the
# encoding that legacy subtitle tools write.
_TIE_BREAK = "cp1252"


# ------------------------------------------------------------------------------------- bytes

_BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"),
         (codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"),
         (codecs.BOM_UTF16_BE, "utf-16-be"))  # UTF-32-LE's mark begins with UTF-16-LE's


def read_text(path, encoding: str | None = None) -> str:
  """The file's text with newlines as "\\n" and no byte-order mark (see the module docstring)."""
  path = epath.Path(path)
  try:
    data = path.read_bytes()
  except Exception as e:  # pylint: disable=broad-except; a bucket's client has its own errors
    raise TranscriptError(path, f"cannot read the file "
                          f"({getattr(e, 'strerror', None) or e})") from e
  if encoding is not None:
    try:
      text = data.decode(encoding)
    except (UnicodeDecodeError, LookupError) as e:
      raise TranscriptError(path, f"cannot decode as {encoding} ({e})") from e
  else:
    text = _decode(path, data)
  return text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def _decode(path: epath.Path, data: bytes) -> str:
  for bom, name in _BOMS:
    if data.startswith(bom):
      try:
        return data[len(bom):].decode(name)
      except UnicodeDecodeError as e:
        raise TranscriptError(path, f"starts with a {name} byte-order mark but is not valid "
                              f"{name} (at byte {e.start + len(bom)})") from e
  if b"\x00" not in data:  # UTF-16 and UTF-32 text is full of zero bytes; UTF-8 text has none
    try:
      return data.decode("utf-8")
    except UnicodeDecodeError:
      pass
  name, text = _detect(path, data)
  logging.warning("transcript %s: not UTF-8 and no byte-order mark; read as %s (detected; pass "
                  "encoding=... to choose another)", path, name)
  return text


def _detect(path: epath.Path, data: bytes) -> tuple[str, str]:
  matches = list(charset_normalizer.from_bytes(data))
  if not matches:
    raise TranscriptError(path, "not UTF-8, and no other encoding decodes it; expected a text "
                          "file (pass encoding=... if you know its encoding)")
  best = matches[0]
  tied = [m for m in matches if (m.chaos, m.coherence) == (best.chaos, best.coherence)]
  if any(_TIE_BREAK in m.could_be_from_charset for m in tied):
    try:
      return _TIE_BREAK, data.decode(_TIE_BREAK)
    except UnicodeDecodeError:  # one of the five bytes that windows-1252 leaves undefined
      pass
  return best.encoding, str(best)


# ------------------------------------------------------------------------------------ timing


def parse_timestamp(value: str) -> float:
  """Seconds from `[h:]m:s.f` (WebVTT), or SRT's `h:m:s,f`; ValueError otherwise."""
  m = _TIMESTAMP.match(value.strip())
  if not m:
    raise ValueError(f"malformed timestamp {value!r} (expected hh:mm:ss.mmm)")
  hours, minutes, seconds = (int(g) if g else 0 for g in m.groups()[:3])
  if minutes > 59 or seconds > 59:
    raise ValueError(f"malformed timestamp {value!r} (minutes and seconds must be below 60)")
  return hours * 3600 + minutes * 60 + seconds + int(m.group(4).ljust(3, "0")) / 1000.0


def _timing(path, line: str, cue: str) -> tuple[float, float]:
  m = _TIMING.match(line.strip())
  if not m:
    raise TranscriptError(path, f"malformed timing line {line.strip()!r} (expected "
                          f"'start --> end')", cue)
  try:
    start, end = parse_timestamp(m.group(1)), parse_timestamp(m.group(2))
  except ValueError as e:
    raise TranscriptError(path, str(e), cue) from e
  _check_order(path, start, end, cue)
  return start, end


def _check_order(path, start: float, end: float, cue: str) -> None:
  if start < 0 or end < start:
    raise TranscriptError(path, f"end {end:.3f}s is before start {start:.3f}s (times must "
                          f"satisfy 0 <= start <= end)", cue)


def clean_line(line: str) -> str:
  """Removes markup, decodes entities and collapses whitespace within one caption line."""
  line = _ASS_TAG.sub("", _TAG.sub("", line))
  return " ".join(html.unescape(line).split())


def _payload_line(line: str) -> _Line:
  """A caption line with its inline word timings: `a<00:00:01.000><c> b</c>` gives the pieces
  (None, "a") and (1.0, "b")."""
  parts = _INLINE_TIME.split(line)
  pieces = [(None, clean_line(parts[0]))]
  for stamp, text in zip(parts[1::2], parts[2::2]):
    pieces.append((parse_timestamp(stamp), clean_line(text)))
  pieces = tuple((t, text) for t, text in pieces if text)
  return _Line(clean_line(line), pieces if len(parts) > 1 else ())


def _cue_of(start: float, end: float, lines: Sequence[_Line]) -> Cue:
  text = " ".join(line.text for line in lines if line.text)
  if not any(line.pieces for line in lines):
    return Cue(start, end, text)
  words = []
  for line in lines:
    for t, piece in (line.pieces or ((None, line.text),)):
      if piece:
        words.append((min(max(start if t is None else t, start), end), piece))
  return Cue(start, end, text, tuple(words))


# ------------------------------------------------------------------------------- overlapping


def dedupe_rolling(cues: Sequence[tuple[float, float, Sequence[_Line]]]) -> list[Cue]:
  """Each cue's leading lines that repeat the most recently emitted lines are dropped."""
  out: list[Cue] = []
  history: list[str] = []
  for start, end, lines in cues:
    texts = [line.text for line in lines]
    k = min(len(texts), len(history))
    while k and texts[:k] != history[-k:]:
      k -= 1
    if texts[k:]:
      out.append(_cue_of(start, end, lines[k:]))
      history.extend(texts[k:])
  return out


def _looks_rolling(blocks: Sequence[tuple[float, float, Sequence[_Line]]]) -> bool:
  if any(line.pieces for _, _, lines in blocks for line in lines):
    return True
  repeats = sum(1 for prev, cur in zip(blocks, blocks[1:])
                if prev[2] and cur[2] and cur[2][0].text == prev[2][-1].text)
  return repeats >= 3 and repeats >= 0.5 * (len(blocks) - 1)


def resolve_overlaps(cues: Iterable[Cue]) -> list[Cue]:
  """Sorted, non-overlapping cues: an earlier cue ends where the next one starts; cues that
  start together are merged (their texts joined in file order); empty texts are dropped."""
  ordered = sorted((c for c in cues if c.text.strip()), key=lambda c: c.start)
  out: list[Cue] = []
  for cue in ordered:
    if out and cue.start < out[-1].end:
      prev = out[-1]
      if cue.start <= prev.start:
        out[-1] = Cue(prev.start, max(prev.end, cue.end), f"{prev.text} {cue.text}",
                      _merged_words(prev, cue))
        continue
      out[-1] = prev._replace(end=cue.start,
                              words=tuple((min(t, cue.start), w) for t, w in prev.words))
    out.append(cue)
  return out


def _merged_words(a: Cue, b: Cue) -> tuple[tuple[float, str], ...]:
  if not (a.words or b.words):
    return ()
  return (a.words or ((a.start, a.text),)) + (b.words or ((b.start, b.text),))


# ---------------------------------------------------------------------------------- WebVTT

_VTT_NOT_CUES = ("NOTE", "STYLE", "REGION")


def _first_word(line: str) -> str:
  return line.split(maxsplit=1)[0] if line.split() else ""


def vtt_blocks(lines: Sequence[str]) -> list[list[tuple[int, str]]]:
  """The blocks after the header, each a list of (line number, line), found as WebVTT's parsing
  rules find them, with the lines of spaces of the module docstring."""
  blocks: list[list[tuple[int, str]]] = []
  current: list[tuple[int, str]] = []
  in_header, after_timing = True, False

  def close():
    nonlocal current, in_header
    if current and not in_header:
      blocks.append(current)
    current, in_header = [], False

  for number, line in enumerate(lines, start=1):
    if not line.strip() and not (line and after_timing):
      close()
      after_timing = False
      continue
    after_timing = "-->" in line
    if after_timing and current and (in_header or len(current) > 1 or "-->" in current[0][1]
                                     or _first_word(current[0][1]) in _VTT_NOT_CUES):
      close()
    current.append((number, line))
  close()
  return blocks


def _vtt_cue(path, block: list[tuple[int, str]], number: int
             ) -> tuple[float, float, list[_Line]]:
  lines = [line for _, line in block]
  arrow = next((i for i, line in enumerate(lines[:2]) if "-->" in line), None)
  label = f"cue {number} (line {block[0][0]}" + (f", {lines[0].strip()!r})" if arrow == 1 else ")")
  if arrow is None:
    raise TranscriptError(path, f"block {lines[0].strip()[:40]!r} has no timing line "
                          f"('start --> end')", label)
  start, end = _timing(path, lines[arrow], label)
  try:
    payload = [_payload_line(line) for line in lines[arrow + 1:]]
  except ValueError as e:
    raise TranscriptError(path, str(e), label) from e
  return start, end, [line for line in payload if line.text]


def read_vtt(path, encoding: str | None = None, dedupe: bool | None = None,
             skipped: list[str] | None = None) -> list[Cue]:
  """WebVTT cues. `dedupe`: remove rolling repeats (None: when the file shows the pattern)."""
  text = read_text(path, encoding)
  if not text.startswith("WEBVTT"):
    raise TranscriptError(path, f"not a WebVTT file (the first line is "
                          f"{text.split(chr(10), 1)[0][:40]!r}; expected 'WEBVTT')")
  skips = _Skips(path, skipped)
  parsed: list[tuple[float, float, list[_Line]]] = []
  number = 0  # cues are counted from 1, comments and style blocks left out
  for block in vtt_blocks(text.split("\n")):
    if _first_word(block[0][1]) in _VTT_NOT_CUES:
      continue
    number += 1
    try:
      parsed.append(_vtt_cue(path, block, number))
    except TranscriptError as e:
      skips.add(e)
  if dedupe is None:
    dedupe = _looks_rolling(parsed)
  cues = dedupe_rolling(parsed) if dedupe else [_cue_of(s, e, ls) for s, e, ls in parsed]
  skips.check(cues)
  return resolve_overlaps(cues)


# ------------------------------------------------------------------------------------- SRT


def srt_blocks(lines: Sequence[str]) -> list[list[tuple[int, str]]]:
  """Blocks of (line number, line): a blank or space-only line ends one, and so does a timing
  line after a block's first two lines, which takes the index line before it along when the
  file numbers its cues (no blank line between cues, as some tools write)."""
  blocks: list[list[tuple[int, str]]] = []
  current: list[tuple[int, str]] = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      if current:
        blocks.append(current)
      current = []
      continue
    if "-->" in line and len(current) > 1 and any("-->" in l for _, l in current):
      carried = [current.pop()] if current[-1][1].strip().isdigit() else []
      blocks.append(current)
      current = carried
    current.append((number, line))
  if current:
    blocks.append(current)
  return blocks


def read_srt(path, encoding: str | None = None, skipped: list[str] | None = None) -> list[Cue]:
  """SubRip cues: `index`, `hh:mm:ss,mmm --> hh:mm:ss,mmm`, text lines. A block without a
  timing line continues the previous cue's text (some files have blank lines inside a cue)."""
  skips = _Skips(path, skipped)
  cues: list[Cue] = []
  for block in srt_blocks(read_text(path, encoding).split("\n")):
    lines = [line for _, line in block]
    arrow = next((i for i, line in enumerate(lines[:2]) if "-->" in line), None)
    label = (f"cue {lines[0].strip()} (line {block[0][0]})" if arrow == 1
             else f"block at line {block[0][0]}")
    if arrow is None and cues and not lines[0].strip().isdigit():
      more = " ".join(filter(None, (clean_line(line) for line in lines)))
      cues[-1] = cues[-1]._replace(text=f"{cues[-1].text} {more}".strip())
      continue
    try:
      if arrow is None:
        raise TranscriptError(path, f"block {lines[0].strip()[:40]!r} has no timing line "
                              f"('hh:mm:ss,mmm --> hh:mm:ss,mmm')", label)
      start, end = _timing(path, lines[arrow], label)
    except TranscriptError as e:
      skips.add(e)
      continue
    body = " ".join(filter(None, (clean_line(line) for line in lines[arrow + 1:])))
    cues.append(Cue(start, end, body))
  skips.check(cues)
  return resolve_overlaps(cues)


# ------------------------------------------------------------------------------------ JSON


# The last caption file of many videos that was parsed, by (path, mtime, size, encoding): a build
# reads HowTo100M's corpus-wide file (over a gigabyte) once per process, not once per video.
_KEYED: dict[tuple, dict] = {}


def _load_json(path, encoding: str | None):
  key = _file_key(path, encoding)
  if key in _KEYED:
    return _KEYED[key]
  try:
    data = json.loads(read_text(path, encoding))
  except json.JSONDecodeError as e:
    raise TranscriptError(path, f"not valid JSON ({e.msg} at line {e.lineno}, column "
                          f"{e.colno})") from e
  if key is not None and _is_keyed(data):
    _KEYED.clear()
    _KEYED[key] = data
  return data


def _file_key(path, encoding: str | None) -> tuple | None:
  """(path, modification time, size, encoding), local or in a bucket; None if it cannot be
  read (read_text then names the problem)."""
  try:
    if "://" in str(path):
      stat = epath.Path(path).stat()
      return str(path), stat.mtime, stat.length, encoding
    stat = pathlib.Path(path).stat()
    return str(pathlib.Path(path).resolve()), stat.st_mtime_ns, stat.st_size, encoding
  except Exception:  # pylint: disable=broad-except; a bucket's client has its own errors
    return None


def _is_keyed(data: Any) -> bool:
  """HowTo100M's corpus-wide layout: {video id: {"start", "end", "text"}}."""
  return (isinstance(data, dict) and bool(data) and not {"start", "end", "text"} <= set(data)
          and all(isinstance(v, dict) for v in data.values()))


def keyed_video_ids(path, encoding: str | None = None) -> list[str] | None:
  """The video ids of a caption file of many videos (HowTo100M's), or None for any other
  JSON transcript."""
  data = _load_json(path, encoding)
  return sorted(data) if _is_keyed(data) else None


_JSON_SHAPES = ("YouTube's json3 ({'events': [{'tStartMs', 'dDurationMs', 'segs'}]}), a list of "
                "{'text', 'start', 'duration'}, or HowTo100M's {'start', 'end', 'text'} lists "
                "(alone, or keyed by video id)")


def _json_entry(path, data, video_id: str | None) -> dict:
  keys = {"start", "end", "text"}
  if isinstance(data, dict) and keys <= set(data):
    return data
  if _is_keyed(data):
    if video_id is None:
      if len(data) != 1:
        raise TranscriptError(path, f"holds {len(data)} videos; name one with video_id= "
                              f"(for example {next(iter(data))!r})")
      video_id = next(iter(data))
    if video_id not in data:
      raise TranscriptError(path, f"no video {video_id!r} in this file")
    entry = data[video_id]
    if isinstance(entry, dict) and keys <= set(entry):
      return entry
  raise TranscriptError(path, f"expected {_JSON_SHAPES}")


def read_json(path, video_id: str | None = None, encoding: str | None = None,
              skipped: list[str] | None = None) -> list[Cue]:
  """Any of the JSON layouts of `_JSON_SHAPES`, told apart by their keys."""
  data = _load_json(path, encoding)
  skips = _Skips(path, skipped)
  if isinstance(data, dict) and "events" in data:
    cues = _json3_cues(path, data["events"], skips)
  elif isinstance(data, list):
    cues = _list_cues(path, data, skips)
  else:
    cues = _json_cues(path, _json_entry(path, data, video_id), skips)
  skips.check(cues)
  return resolve_overlaps(cues)


def read_howto100m_json(path, video_id: str | None = None,
                        encoding: str | None = None) -> list[Cue]:
  """HowTo100M-style captions: {"start": [...], "end": [...], "text": [...]}, or such objects
  keyed by video id (the corpus-wide caption file; pick one with `video_id`)."""
  return read_json(path, video_id, encoding)


def read_howto100m_all(path, encoding: str | None = None,
                       skipped: list[str] | None = None) -> dict[str, list[Cue]]:
  """Every video of a HowTo100M caption file, by video id (a single-video file: by its stem)."""
  data = _load_json(path, encoding)
  if isinstance(data, dict) and {"start", "end", "text"} <= set(data):
    data = {pathlib.Path(path).stem: data}
  if not isinstance(data, dict) or not data:
    _json_entry(path, data, None)  # raises, describing the expected shape
  out = {}
  for vid in data:
    skips = _Skips(path, skipped)
    cues = _json_cues(path, _json_entry(path, data, vid), skips, f"video {vid!r}, ")
    skips.check(cues)
    out[vid] = resolve_overlaps(cues)
  return out


def _seconds(path, value: Any, label: str, scale: float = 1.0) -> float:
  try:
    seconds = float(value) * scale
  except (TypeError, ValueError) as e:
    raise TranscriptError(path, f"times must be numbers, got {value!r}", label) from e
  if seconds != seconds:
    raise TranscriptError(path, "times must not be NaN", label)
  return seconds


def _json_cues(path, entry: dict, skips: _Skips, where: str = "") -> list[Cue]:
  starts, ends, texts = entry["start"], entry["end"], entry["text"]
  if not all(isinstance(x, list) for x in (starts, ends, texts)):
    raise TranscriptError(path, f"{where}'start', 'end' and 'text' must be lists")
  if not len(starts) == len(ends) == len(texts):
    raise TranscriptError(path, f"{where}'start', 'end' and 'text' have different lengths "
                          f"({len(starts)}, {len(ends)}, {len(texts)})")
  cues = []
  for i, (s, e, t) in enumerate(zip(starts, ends, texts)):
    label = f"{where}cue {i}"
    try:
      start, end = _seconds(path, s, label), _seconds(path, e, label)
      _check_order(path, start, end, label)
    except TranscriptError as err:
      skips.add(err)
      continue
    cues.append(Cue(start, end, clean_line(str(t))))
  return cues


def _list_cues(path, items: list, skips: _Skips) -> list[Cue]:
  """[{"text", "start", "duration"}, ...], as common transcript tools write YouTube's captions."""
  cues = []
  for i, item in enumerate(items):
    label = f"item {i}"
    try:
      if not isinstance(item, dict) or not {"text", "start", "duration"} <= set(item):
        raise TranscriptError(path, f"expected an object with 'text', 'start' and 'duration', "
                              f"got {str(item)[:60]!r}", label)
      start = _seconds(path, item["start"], label)
      end = start + _seconds(path, item["duration"], label)
      _check_order(path, start, end, label)
    except TranscriptError as err:
      skips.add(err)
      continue
    cues.append(Cue(start, end, clean_line(str(item["text"]))))
  return cues


def _json3_cues(path, events: Any, skips: _Skips) -> list[Cue]:
  """YouTube's json3: events with a start and duration in ms, and text segments each offset from
  the event's start (word timings in automatic captions); events without segments set windows."""
  if not isinstance(events, list):
    raise TranscriptError(path, f"'events' must be a list; expected {_JSON_SHAPES}")
  cues = []
  for i, event in enumerate(events):
    if not isinstance(event, dict) or not event.get("segs"):
      continue
    label = f"event {i}"
    try:
      start = _seconds(path, event.get("tStartMs"), label, 1e-3)
      end = start + _seconds(path, event.get("dDurationMs", 0), label, 1e-3)
      _check_order(path, start, end, label)
      pieces = tuple((start + _seconds(path, seg.get("tOffsetMs", 0), label, 1e-3),
                      clean_line(str(seg.get("utf8", "")))) for seg in event["segs"])
    except (TranscriptError, AttributeError) as err:
      skips.add(err if isinstance(err, TranscriptError) else TranscriptError(
          path, f"segments must be objects with 'utf8' text", label))
      continue
    pieces = tuple(p for p in pieces if p[1])
    if pieces:
      line = _Line(" ".join(text for _, text in pieces), pieces if len(pieces) > 1 else ())
      cues.append(_cue_of(start, end, [line]))
  return cues


def read_transcript(path, encoding: str | None = None, video_id: str | None = None,
                    skipped: list[str] | None = None) -> list[Cue]:
  """Reads a `.vtt`, `.srt` or `.json` transcript, chosen by the file's suffix; broken cues are
  skipped with a warning and, when `skipped` is a list, appended to it."""
  suffix = pathlib.Path(path).suffix.lower()
  if suffix == ".vtt":
    return read_vtt(path, encoding, skipped=skipped)
  if suffix == ".srt":
    return read_srt(path, encoding, skipped=skipped)
  if suffix == ".json":
    return read_json(path, video_id, encoding, skipped=skipped)
  raise TranscriptError(path, f"unknown transcript format {suffix!r}; expected one of "
                        f"{list(SUFFIXES)}")
