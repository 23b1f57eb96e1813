"""Captioned segments for retrieval, from the files that video-text benchmarks ship.

- YouCook II: `youcookii_annotations_trainval.json` ({"database": {video_id: {"subset",
  "annotations": [{"segment": [start, end], "sentence"}]}}}), one subset (`--split`);
- MSR-VTT's 1k-A test split: `MSRVTT_JSFUSION_test.csv` (columns `key, vid_key, video_id,
  sentence`, often after an unnamed index column), one caption per whole video;
- MSR-VTT's `MSRVTT_data.json` ({"videos": [{"video_id", "split"}], "sentences": [{"video_id",
  "caption"}]}), every caption of the videos of one split (train, validate or test): the
  training pairs that fit a shortlist;
- the label files of `vbert_jax.tasks.zero_shot` (TSV or JSON lines) with their sentence column.

A whole-video caption is a segment from 0 to infinity: every clip of the video is in it.
"""

from __future__ import annotations

import csv
import json
import math
import pathlib
from typing import Any

from vbert_jax.tasks import zero_shot as zs

MSRVTT_SPLITS = {"train": "train", "training": "train", "validate": "validate",
                 "validation": "validate", "test": "test", "testing": "test"}
_CSV_COLUMNS = ("video_id", "sentence")


def read_msrvtt_csv(path) -> list[zs.Segment]:
  """The captions of a JSFusion-style CSV (MSR-VTT 1k-A test), in file order."""
  path = pathlib.Path(path)
  try:
    with open(path, newline="", encoding="utf-8-sig") as f:
      reader = csv.DictReader(f)
      missing = [c for c in _CSV_COLUMNS if c not in (reader.fieldnames or [])]
      if missing:
        raise ValueError(f"{path}: lacks the columns {missing}; expected a header with "
                         f"video_id and sentence (as MSRVTT_JSFUSION_test.csv), found "
                         f"{reader.fieldnames}")
      rows = [(reader.line_num, row) for row in reader]
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise ValueError(f"{path}: not a readable CSV file ({e})") from e
  out = []
  for line, row in rows:
    video_id = (row.get("video_id") or "").strip()
    sentence = (row.get("sentence") or "").strip()
    if not video_id or not sentence:
      raise ValueError(f"{path}:{line}: empty video_id or sentence")
    out.append(zs.Segment(video_id, 0.0, math.inf, sentence=sentence))
  if not out:
    raise ValueError(f"{path}: no captions")
  return out


def read_msrvtt_json(path, split: str, data: Any = None) -> list[zs.Segment]:
  """Every caption of the videos of `split` in MSR-VTT's MSRVTT_data.json."""
  path = pathlib.Path(path)
  data = _json(path) if data is None else data
  if split not in MSRVTT_SPLITS:
    raise ValueError(f"split={split!r}: expected one of {sorted(MSRVTT_SPLITS)}")
  try:
    chosen = {str(v["video_id"]) for v in data["videos"]
              if v.get("split") == MSRVTT_SPLITS[split]}
    out = [zs.Segment(str(s["video_id"]), 0.0, math.inf, sentence=str(s["caption"]).strip())
           for s in data["sentences"] if str(s["video_id"]) in chosen]
  except (KeyError, TypeError) as e:
    raise ValueError(f"{path}: expected MSR-VTT's videos [{{video_id, split}}] and sentences "
                     f"[{{video_id, caption}}] ({e!r} missing or malformed)") from e
  if not out:
    raise ValueError(f"{path}: no captions of split {MSRVTT_SPLITS[split]!r}")
  return out


def _json(path: pathlib.Path) -> Any:
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: not a readable JSON file ({e})") from e


def read_captions(path, split: str = "validation") -> list[zs.Segment]:
  """Captioned segments from any of the formats above, told apart by suffix and content;
  `split` chooses a YouCook II subset or an MSR-VTT split (ignored by the other formats)."""
  path = pathlib.Path(path)
  if path.suffix.lower() == ".csv":
    return read_msrvtt_csv(path)
  if path.suffix.lower() == ".json":
    data = _json(path)
    if isinstance(data, dict) and "database" in data:
      return zs.read_youcook2(path, split)
    if isinstance(data, dict) and "sentences" in data and "videos" in data:
      return read_msrvtt_json(path, split, data)
    raise ValueError(f"{path}: neither YouCook II annotations ('database') nor MSR-VTT's "
                     f"MSRVTT_data.json ('videos' and 'sentences')")
  segments = zs.read_labels(path)
  if not any(s.sentence.strip() for s in segments):
    raise ValueError(f"{path}: no segment has a sentence (the sixth column); retrieval needs "
                     f"the segments' captions")
  return segments


def without_captions(segments: list[zs.Segment]) -> tuple[list[zs.Segment], list[dict]]:
  """The segments that have a caption, and the others as skipped entries."""
  kept = [s for s in segments if s.sentence.strip()]
  return kept, [zs.skip_entry(s, "no sentence") for s in segments if not s.sentence.strip()]
