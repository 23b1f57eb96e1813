"""Transcript readers: WebVTT (with YouTube's rolling automatic captions), SRT and HowTo100M JSON.

Every reader returns cues as `Cue(start, end, text)` in seconds, sorted by time, with overlaps
resolved (see `resolve_overlaps`) and empty cues dropped. Markup (`<c>`, `<i>`, `<v Name>`, inline
word timings `<00:00:01.000>`, `{\\an8}`) is removed and HTML entities are decoded; the text keeps
its case, punctuation and Unicode as written (`sentences.normalize_text` does the rest, once).

Encoding: files are read as UTF-8 (a UTF-8 or UTF-16 byte-order mark is honoured and removed). A
file that is not valid UTF-8 is an error naming the file and the byte offset; pass
`encoding="cp1252"` (or whatever the file uses) to read it anyway. Nothing is guessed silently.

YouTube's automatic captions repeat the previous line at the top of every cue (the "rolling"
display) and add 10 ms cues that repeat it once more. `dedupe_rolling` drops a cue's leading lines
that repeat the lines emitted just before, so that each spoken line comes out once. It runs
automatically for files that show the pattern (inline word timings, or most cues starting with
the previous cue's last line).
"""

from __future__ import annotations

import html
import json
import pathlib
import re
from typing import Iterable, NamedTuple, Sequence


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


SUFFIXES = (".vtt", ".srt", ".json")

# hh:mm:ss.mmm or mm:ss.mmm (WebVTT); SRT writes a comma before the milliseconds.
_TIMESTAMP = re.compile(r"^(?:(\d+):)?(\d{2}):(\d{2})[.,](\d{3})$")
_TIMING = re.compile(r"^(\S+)\s+-->\s+(\S+)(?:\s+.*)?$")
_TAG = re.compile(r"<[^>]*>")
_ASS_TAG = re.compile(r"\{\\[^}]*\}")
_INLINE_TIME = re.compile(r"<\d+:\d{2}:\d{2}\.\d{3}>|<\d{2}:\d{2}\.\d{3}>")


# ------------------------------------------------------------------------------------- bytes


def read_text(path, encoding: str | None = None) -> str:
  """The file's text with newlines as "\\n"; a BOM is removed; invalid UTF-8 is an error."""
  path = pathlib.Path(path)
  try:
    data = path.read_bytes()
  except OSError as e:
    raise TranscriptError(path, f"cannot read the file ({e.strerror or e})") from e
  if encoding is None:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
      encoding = "utf-16"
    else:
      encoding = "utf-8-sig"
    try:
      text = data.decode(encoding)
    except UnicodeDecodeError as e:
      raise TranscriptError(
          path, f"not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); expected "
          f"UTF-8 text; pass encoding=... (for example 'cp1252' or 'latin-1') to read it in "
          f"another encoding") from e
  else:
    try:
      text = data.decode(encoding)
    except (UnicodeDecodeError, LookupError) as e:
      raise TranscriptError(path, f"cannot decode as {encoding} ({e})") from e
    text = text.lstrip("\ufeff")
  return text.replace("\r\n", "\n").replace("\r", "\n")


def parse_timestamp(value: str) -> float:
  """Seconds from `hh:mm:ss.mmm`, `mm:ss.mmm` or SRT's `hh:mm:ss,mmm`; ValueError otherwise."""
  m = _TIMESTAMP.match(value.strip())
  if not m:
    raise ValueError(f"malformed timestamp {value!r} (expected hh:mm:ss.mmm)")
  hours, minutes, seconds, millis = (int(g) if g else 0 for g in m.groups())
  if minutes > 59 or seconds > 59:
    raise ValueError(f"malformed timestamp {value!r} (minutes and seconds must be below 60)")
  return hours * 3600 + minutes * 60 + seconds + millis / 1000.0


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


# ------------------------------------------------------------------------------- overlapping


def dedupe_rolling(cues: Sequence[tuple[float, float, list[str]]]) -> list[Cue]:
  """Each cue's leading lines that repeat the most recently emitted lines are dropped."""
  out: list[Cue] = []
  history: list[str] = []
  for start, end, lines in cues:
    k = min(len(lines), len(history))
    while k and lines[:k] != history[-k:]:
      k -= 1
    new = lines[k:]
    if new:
      out.append(Cue(start, end, " ".join(new)))
      history.extend(new)
  return out


def _looks_rolling(blocks: Sequence[tuple[float, float, list[str]]], raw_payload: str) -> bool:
  if _INLINE_TIME.search(raw_payload):
    return True
  repeats = sum(1 for prev, cur in zip(blocks, blocks[1:])
                if prev[2] and cur[2] and cur[2][0] == prev[2][-1])
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
        out[-1] = Cue(prev.start, max(prev.end, cue.end), f"{prev.text} {cue.text}")
        continue
      out[-1] = Cue(prev.start, cue.start, prev.text)
    out.append(cue)
  return out


# ---------------------------------------------------------------------------------- formats


def _blocks(text: str, whitespace_ends_block: bool = True) -> list[list[str]]:
  """Groups lines into blank-line-separated blocks, each a list of (right-stripped) lines.
  In WebVTT only an empty line ends a cue (YouTube puts a lone space in its payloads)."""
  blocks, current = [], []
  for line in text.split("\n"):
    if (line.strip() if whitespace_ends_block else line):
      current.append(line.rstrip())
    elif current:
      blocks.append(current)
      current = []
  if current:
    blocks.append(current)
  return blocks


def read_vtt(path, encoding: str | None = None, dedupe: bool | None = None) -> list[Cue]:
  """WebVTT cues. `dedupe`: remove rolling repeats (None: when the file shows the pattern)."""
  text = read_text(path, encoding)
  if not text.startswith("WEBVTT"):
    raise TranscriptError(path, f"not a WebVTT file (the first line is "
                          f"{text.split(chr(10), 1)[0][:40]!r}; expected 'WEBVTT')")
  parsed: list[tuple[float, float, list[str]]] = []
  payload = []
  number = 0  # cues are counted from 1, comments and style blocks left out
  for block in _blocks(text, False)[1:]:
    head = block[0].split(maxsplit=1)[0] if block[0].split() else ""
    if head in ("NOTE", "STYLE", "REGION"):
      continue
    number += 1
    arrow = next((i for i, line in enumerate(block[:2]) if "-->" in line), None)
    label = f"cue {number}" + (f" ({block[0].strip()!r})" if arrow == 1 else "")
    if arrow is None:
      raise TranscriptError(path, f"block {block[0][:40]!r} has no timing line "
                            f"('start --> end')", f"cue {number}")
    start, end = _timing(path, block[arrow], label)
    lines = [clean_line(line) for line in block[arrow + 1:]]
    payload.extend(block[arrow + 1:])
    parsed.append((start, end, [line for line in lines if line]))
  if dedupe is None:
    dedupe = _looks_rolling(parsed, "\n".join(payload))
  if dedupe:
    cues = dedupe_rolling(parsed)
  else:
    cues = [Cue(s, e, " ".join(lines)) for s, e, lines in parsed]
  return resolve_overlaps(cues)


def read_srt(path, encoding: str | None = None) -> list[Cue]:
  """SubRip cues: `index`, `hh:mm:ss,mmm --> hh:mm:ss,mmm`, text lines. A block without a
  timing line continues the previous cue's text (some files have blank lines inside a cue)."""
  text = read_text(path, encoding)
  cues: list[Cue] = []
  for number, block in enumerate(_blocks(text), start=1):
    arrow = next((i for i, line in enumerate(block[:2]) if "-->" in line), None)
    label = f"cue {block[0].strip()}" if arrow == 1 else f"block {number}"
    if arrow is None:
      if cues and not block[0].strip().isdigit():
        more = " ".join(filter(None, (clean_line(line) for line in block)))
        cues[-1] = cues[-1]._replace(text=f"{cues[-1].text} {more}".strip())
        continue
      raise TranscriptError(path, f"block {block[0][:40]!r} has no timing line "
                            f"('hh:mm:ss,mmm --> hh:mm:ss,mmm')", label)
    start, end = _timing(path, block[arrow], label)
    body = " ".join(filter(None, (clean_line(line) for line in block[arrow + 1:])))
    cues.append(Cue(start, end, body))
  return resolve_overlaps(cues)


def _json_entry(path, data, video_id: str | None) -> dict:
  keys = {"start", "end", "text"}
  if isinstance(data, dict) and keys <= set(data):
    return data
  if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
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
  raise TranscriptError(path, "expected a JSON object with 'start', 'end' and 'text' lists "
                        "(or {video_id: such an object}, as HowTo100M's caption file)")


def _load_json(path, encoding: str | None):
  try:
    return json.loads(read_text(path, encoding))
  except json.JSONDecodeError as e:
    raise TranscriptError(path, f"not valid JSON ({e.msg} at line {e.lineno}, column "
                          f"{e.colno})") from e


def read_howto100m_json(path, video_id: str | None = None,
                        encoding: str | None = None) -> list[Cue]:
  """HowTo100M-style captions: {"start": [...], "end": [...], "text": [...]}, or such objects
  keyed by video id (the corpus-wide caption file; pick one with `video_id`)."""
  return _json_cues(path, _json_entry(path, _load_json(path, encoding), video_id))


def read_howto100m_all(path, encoding: str | None = None) -> dict[str, list[Cue]]:
  """Every video of a HowTo100M caption file, by video id (a single-video file: by its stem)."""
  data = _load_json(path, encoding)
  if isinstance(data, dict) and {"start", "end", "text"} <= set(data):
    return {pathlib.Path(path).stem: _json_cues(path, data)}
  if not isinstance(data, dict) or not data:
    _json_entry(path, data, None)  # raises, describing the expected shape
  return {vid: _json_cues(path, _json_entry(path, data, vid), f"video {vid!r}, ")
          for vid in data}


def _json_cues(path, entry: dict, where: str = "") -> list[Cue]:
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
      start, end = float(s), float(e)
    except (TypeError, ValueError) as err:
      raise TranscriptError(path, f"times must be numbers of seconds, got start={s!r}, "
                            f"end={e!r}", label) from err
    if start != start or end != end:
      raise TranscriptError(path, "times must not be NaN", label)
    _check_order(path, start, end, label)
    cues.append(Cue(start, end, clean_line(str(t))))
  return resolve_overlaps(cues)


def read_transcript(path, encoding: str | None = None, video_id: str | None = None
                    ) -> list[Cue]:
  """Reads a `.vtt`, `.srt` or `.json` transcript, chosen by the file's suffix."""
  suffix = pathlib.Path(path).suffix.lower()
  if suffix == ".vtt":
    return read_vtt(path, encoding)
  if suffix == ".srt":
    return read_srt(path, encoding)
  if suffix == ".json":
    return read_howto100m_json(path, video_id, encoding)
  raise TranscriptError(path, f"unknown transcript format {suffix!r}; expected one of "
                        f"{list(SUFFIXES)}")
