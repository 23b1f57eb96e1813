"""Inputs into VideoRecords: pair a corpus's files by video id and run the pieces on each video.

A corpus is a folder of transcripts (`.vtt`, `.srt`, per-video `.json`) and either a folder of
videos or a folder of precomputed feature files (`vbert_jax.video.features_io`). Files pair by
video id, the file name without its suffix; a transcript may carry a language tag before its
suffix (`abc.en.vtt` pairs with `abc.mp4`), as YouTube's caption downloads do. A caption file of
many videos, keyed by video id (HowTo100M's `caption.json`), pairs with each of them; a video's
own transcript wins over it.

Per video: features -> visual tokens (the visual vocabulary), transcript -> cues -> sentences ->
text ids (the text tokenizer), then `align.align_video`. A video without a transcript, or whose
transcript has no sentences, becomes a video-only record. A transcript without a video is not a
record. The `BuildSummary` counts each of these cases and lists every video that fails, with its
reason.

Before any record is made, `check_inputs` compares the vocabulary and the tokenizer with the
sizes a config expects, and the vocabulary with the feature width, and stops on a mismatch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import re
from typing import Any, Iterable, Mapping, Sequence

from absl import logging
from etils import epath
import numpy as np

from vbert_jax import align
from vbert_jax.text import sentences as sentences_lib
from vbert_jax.text import tokenizers
from vbert_jax.text import transcripts
from vbert_jax.video import features_io
from vbert_jax.vocab import vocabulary as vocab_lib

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")
TRANSCRIPT_SUFFIXES = (".vtt", ".srt", ".json")
TRAIN, VALIDATION = "train", "validation"
# `name.en`, `name.en-US`, `name.pt-BR`: a language tag before the transcript's suffix.
_LANGUAGE_TAG = re.compile(r"^(?P<id>.+)\.[a-z]{2,3}(?:-[A-Za-z0-9]{2,8})*$")


class InputMismatchError(ValueError):
  """A vocabulary, tokenizer or feature file that does not fit the config or each other."""


@dataclasses.dataclass(frozen=True)
class VideoInputs:
  """One video's files; `features` or `video` is set, `transcript` may be None."""
  video_id: str
  transcript: str | None = None
  features: str | None = None
  video: str | None = None


@dataclasses.dataclass
class Pairing:
  items: list[VideoInputs]  # sorted by video id
  transcripts_without_video: list[str]  # paths
  skipped: list[tuple[str, str]]  # (path, reason): duplicates, and files that no reader takes

  @property
  def videos_without_transcript(self) -> list[str]:
    return [item.video_id for item in self.items if item.transcript is None]


@dataclasses.dataclass
class BuildSummary:
  """What a build did: the end-of-build report. The dataset's metadata keeps counts and the
  failed files with their reasons; names of videos that merely lack a transcript or sentences
  (a million on a YouTube corpus) go to the log only."""
  records: dict[str, int] = dataclasses.field(default_factory=dict)  # split -> count
  transcripts_without_video: list[str] = dataclasses.field(default_factory=list)
  videos_without_transcript: list[str] = dataclasses.field(default_factory=list)
  no_sentences: int = 0  # transcripts without sentences: video-only records (each logged)
  skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (name, reason)
  broken_cues: int = 0  # cues skipped inside otherwise good transcripts (each logged)

  def as_dict(self) -> dict:
    return {"records": dict(self.records),
            "transcripts_without_video": len(self.transcripts_without_video),
            "videos_without_transcript": len(self.videos_without_transcript),
            "no_sentences": self.no_sentences, "broken_cues": self.broken_cues,
            "skipped": [list(s) for s in self.skipped]}

  def format(self, examples: int = 5) -> str:
    """Counts, a few names of each kind, and every skipped video with its reason."""
    lines = ["build summary: " + (", ".join(f"{n} {s} records" for s, n in
                                           sorted(self.records.items())) or "no records")]
    for title, names in (
        ("transcripts without a video (not built)", self.transcripts_without_video),
        ("videos without a transcript (video-only records)", self.videos_without_transcript)):
      if names:
        more = f", ... ({len(names) - examples} more in the log)" if len(names) > examples else ""
        lines.append(f"  {len(names)} {title}: {', '.join(names[:examples])}{more}")
    for count, title in (
        (self.no_sentences, "transcripts with no sentences (video-only records; each in the log)"),
        (self.broken_cues, "broken cue(s) skipped inside transcripts (each named in a warning)")):
      if count:
        lines.append(f"  {count} {title}")
    if self.skipped:
      lines.append(f"  {len(self.skipped)} skipped:")
      lines.extend(f"    {name}: {reason}" for name, reason in self.skipped)
    return "\n".join(lines)

  def log_names(self) -> None:
    """Every name the summary only counts, to the log."""
    for title, names in (("transcript without a video", self.transcripts_without_video),
                         ("video without a transcript", self.videos_without_transcript)):
      for name in names:
        logging.info("build: %s: %s", title, name)


# ------------------------------------------------------------------------------------ pairing


def _entries(folder) -> list[epath.Path]:
  """The files of a folder, local or in a bucket, sorted; hidden ones left out. In a bucket
  every entry counts as a file: a stat per file would cost a round trip for each of millions."""
  folder = epath.Path(folder)
  remote = "://" in str(folder)
  return sorted(p for p in folder.iterdir()
                if not p.name.startswith(".") and (remote or p.is_file()))


def _files(folder, suffixes: Sequence[str]) -> list[epath.Path]:
  if folder is None:
    return []
  return [p for p in _entries(folder) if p.suffix.lower() in suffixes]


def _by_id(paths: Iterable[epath.Path], what: str,
           skipped: list[tuple[str, str]]) -> dict[str, epath.Path]:
  out: dict[str, epath.Path] = {}
  for p in paths:
    if p.stem in out:
      skipped.append((str(p), f"duplicate {what} for video id {p.stem!r} (also "
                                 f"{out[p.stem]}); rename or remove one"))
    else:
      out[p.stem] = p
  return out


def _unknown_transcript(path: epath.Path) -> tuple[str, str]:
  """(path, reason) for a file of the transcripts folder that no reader takes."""
  return (str(path), f"unknown transcript format {path.suffix or '(no suffix)'!r}; expected "
                     f"one of {list(TRANSCRIPT_SUFFIXES)}")


def _keyed_ids(path: epath.Path) -> list[str] | None:
  try:
    return transcripts.keyed_video_ids(path)
  except transcripts.TranscriptError:
    return None  # an unreadable file of no video: listed as a transcript without a video


def _pair_keyed(path: epath.Path, ids: list[str], media: Mapping[str, Any],
                by_video: dict[str, epath.Path], orphans: list[str],
                skipped: list[tuple[str, str]]) -> None:
  """The videos `ids` of a caption file of many videos (HowTo100M's caption.json), after the
  per-video transcripts, which win; the ids it has without a video are counted, not listed."""
  for vid in ids:
    if vid not in media:
      continue
    if vid in by_video:
      skipped.append((str(path), f"video {vid!r} also has {by_video[vid]}, which is used"))
    else:
      by_video[vid] = path
  missing = sum(vid not in media for vid in ids)
  if missing:
    orphans.append(f"{path}: {missing} of its {len(ids)} videos")


def pair_inputs(transcripts_dir, *, videos_dir=None, features_dir=None) -> Pairing:
  """Pairs transcripts with videos (or feature files) by video id; a caption file of many
  videos (HowTo100M's) pairs with each of its videos."""
  if (videos_dir is None) == (features_dir is None):
    raise ValueError("pair_inputs: give exactly one of videos_dir and features_dir")
  skipped: list[tuple[str, str]] = []
  if features_dir is not None:
    media = _by_id(features_io.list_features(features_dir), "feature file", skipped)
  else:
    media = _by_id(_files(videos_dir, VIDEO_SUFFIXES), "video", skipped)
  by_video: dict[str, epath.Path] = {}
  orphans: list[str] = []
  keyed: list[tuple[epath.Path, list[str]]] = []
  for path in _entries(transcripts_dir):  # listed once: a bucket may hold millions
    if path.suffix.lower() not in TRANSCRIPT_SUFFIXES:
      skipped.append(_unknown_transcript(path))
      continue
    vid = path.stem
    if vid not in media and (m := _LANGUAGE_TAG.match(vid)) and m["id"] in media:
      vid = m["id"]
    if vid not in media:
      ids = _keyed_ids(path) if path.suffix.lower() == ".json" else None
      if ids is not None:
        keyed.append((path, ids))
      else:
        orphans.append(str(path))
    elif vid in by_video:
      skipped.append((str(path), f"second transcript for video {vid!r} (also "
                                    f"{by_video[vid]}); remove one"))
    else:
      by_video[vid] = path
  for path, ids in keyed:
    _pair_keyed(path, ids, media, by_video, orphans, skipped)
  key = "features" if features_dir is not None else "video"
  items = [VideoInputs(vid, transcript=str(by_video[vid]) if vid in by_video else None,
                       **{key: str(media[vid])}) for vid in sorted(media)]
  return Pairing(items, orphans, skipped)


def split_of(video_id: str, validation_fraction: float, salt: str = "") -> str:
  """TRAIN or VALIDATION, from a hash of the id: stable across runs, machines and corpus
  changes (adding a video never moves another)."""
  digest = hashlib.sha256(f"{salt}\x00{video_id}".encode("utf-8")).digest()
  u = int.from_bytes(digest[:8], "big") / 2.0**64
  return VALIDATION if u < validation_fraction else TRAIN


# ------------------------------------------------------------------------------------- checks


def check_inputs(vocabulary, vocabulary_path: str, tokenizer: tokenizers.TextTokenizer, *,
                 visual_vocab_size: int | None = None, text_vocab_size: int | None = None,
                 feature_file: str | None = None) -> None:
  """Raises InputMismatchError, naming both sides, where the files do not fit the config."""
  if visual_vocab_size and int(visual_vocab_size) != vocabulary.size:
    raise InputMismatchError(
        f"visual vocabulary {vocabulary_path} has {vocabulary.size} tokens "
        f"(branching {vocabulary.branching}, depth {vocabulary.depth}) but the config's "
        f"visual_vocab_size is {visual_vocab_size}; they must be equal")
  if text_vocab_size and int(text_vocab_size) != tokenizer.vocab_size:
    raise InputMismatchError(
        f"text tokenizer {tokenizer.source} has {tokenizer.vocab_size} tokens but the config's "
        f"text_vocab_size is {text_vocab_size}; they must be equal")
  if feature_file is not None:
    width = features_io.load_features(feature_file).features.shape[1]
    if width != vocabulary.dim:
      raise InputMismatchError(
          f"feature file {feature_file} has {width}-d features but visual vocabulary "
          f"{vocabulary_path} was fitted on {vocabulary.dim}-d features; extract with the "
          f"S3D settings the vocabulary was fitted on")


# ------------------------------------------------------------------------------------ records


class RecordMaker:
  """Makes the VideoRecord of one video from its features and transcript."""

  def __init__(self, vocabulary, tokenizer: tokenizers.TextTokenizer,
               split_config: sentences_lib.SplitConfig = sentences_lib.SplitConfig(),
               align_config: align.AlignConfig = align.AlignConfig()):
    self.vocabulary = vocabulary
    self.tokenizer = tokenizer
    self.split_config = split_config
    self.align_config = align_config

  def sentences(self, item: VideoInputs, broken: list[str] | None = None
                ) -> list[sentences_lib.Sentence]:
    """The transcript's sentences; its broken cues go to `broken` (see transcripts)."""
    if item.transcript is None:
      return []
    cues = transcripts.read_transcript(item.transcript, video_id=item.video_id, skipped=broken)
    return sentences_lib.split_sentences(cues, self.split_config)

  def make(self, item: VideoInputs, features: features_io.VideoFeatures | None = None,
           broken: list[str] | None = None) -> align.VideoRecord:
    """Raises ValueError (TranscriptError, AlignError, ...) naming the file on bad input; the
    transcript's broken cues, skipped, go to `broken`."""
    if features is None:
      if item.features is None:
        raise ValueError(f"video {item.video_id}: no feature file given")
      features = features_io.load_features(item.features)
    feats = np.asarray(features.features, np.float32)
    tokens = self.vocabulary.assign(feats) if len(feats) else np.zeros(0, np.int32)
    tokenized = align.tokenize_sentences(self.sentences(item, broken), self.tokenizer)
    record = align.align_video(item.video_id, tokenized, features.starts, features.ends, tokens,
                               self.align_config)
    record.validate(visual_size=self.vocabulary.size, text_size=self.tokenizer.vocab_size)
    return record


@dataclasses.dataclass(frozen=True)
class RecordSettings:
  """Everything a worker needs to rebuild a RecordMaker: paths and plain settings, so that it
  pickles cheaply to Beam workers, which load the files once per process."""
  vocabulary: str
  tokenizer: str  # "sentencepiece" or "wordpiece"
  tokenizer_file: str
  lowercase: str = "auto"
  split_config: sentences_lib.SplitConfig = sentences_lib.SplitConfig()
  align_config: align.AlignConfig = align.AlignConfig()

  def load(self) -> tuple:
    """(vocabulary, tokenizer) read from their files."""
    vocab = vocab_lib.VisualVocabulary.load(self.vocabulary)
    tokenizer = tokenizers.load_tokenizer({"text": {
        "tokenizer": self.tokenizer, "vocab": self.tokenizer_file, "lowercase": self.lowercase}})
    return vocab, tokenizer

  def maker(self) -> RecordMaker:
    """The maker, loaded once per process (again if a file changed since)."""
    key = (self, *(pathlib.Path(p).stat().st_mtime_ns for p in (self.vocabulary,
                                                                 self.tokenizer_file)))
    if key not in _MAKERS:
      vocab, tokenizer = self.load()
      _MAKERS[key] = RecordMaker(vocab, tokenizer, self.split_config, self.align_config)
    return _MAKERS[key]


_MAKERS: dict[tuple, RecordMaker] = {}


def try_make(maker: RecordMaker, item: VideoInputs, broken: list[str] | None = None
             ) -> tuple[align.VideoRecord | None, str | None]:
  """(record, None), or (None, reason) for a video whose files cannot be used; broken cues of
  a usable transcript go to `broken`."""
  try:
    return maker.make(item, broken=broken), None
  except ValueError as e:  # every reader and the aligner raise ValueError subclasses
    return None, str(e)


def log_no_sentences(item: VideoInputs) -> None:
  logging.info("build: video %s: its transcript %s has no sentences; a video-only record",
               item.video_id, item.transcript)


def make_records(items: Sequence[VideoInputs], maker: RecordMaker, summary: BuildSummary,
                 split: str):
  """Yields the records of `items`; failures go to `summary.skipped`, video-only records from
  transcripts without sentences are counted in `summary.no_sentences`, records in
  `summary.records[split]`."""
  for item in items:
    broken: list[str] = []
    record, reason = try_make(maker, item, broken)
    summary.broken_cues += len(broken)
    if record is None:
      summary.skipped.append((item.video_id, reason))
      continue
    if item.transcript is not None and record.num_sentences == 0:
      log_no_sentences(item)
      summary.no_sentences += 1
    summary.records[split] = summary.records.get(split, 0) + 1
    yield record
