"""Zero-shot action classification: the video, then "now let me show you how to [MASK] the
[MASK] ." (or the reverse order); the first mask's distribution names the verb, the second the
noun.

    python -m vbert_jax.tasks.zero_shot --workdir=RUN --features=FEATURES --labels=labels.tsv \\
        --out=results/zero_shot

Label sets. Without one, the answer is the model's top text tokens (special symbols excluded).
With one (a list of verbs, a list of nouns), every label is scored and the best are returned. A
label may tokenize into several pieces ("pineapple" -> "pine", "##apple"): its slot is expanded
to as many [MASK]s as it has pieces (the other slot keeps one), and its score is the
log-probability of the whole word by the chain rule, P(pine) P(##apple | pine), each piece
predicted with the pieces before it written into their masks. So a label of one piece and one
of several are both scored by the probability of the word. One batched forward pass runs per
distinct piece count, and one more per later piece of each multi-piece label, so a label set of
one-piece words costs a single pass per batch of videos.

The widened slot still tells the model how many pieces to expect. `scoring="calibrated"`
removes what the prompt alone says of a label, its length included: each score less the same
score without the video (`scoring="prior"`, the text's own guess: the paper's language prior).
A list of words given as both label sets ranks over any vocabulary, words of several pieces
included (the command's --vocabulary).

Prompt ensembles. With label sets, several templates may be given: each label's score is the
mean of its scores under every template (one pass per template). A small model is sensitive to
the words around the masks (on the demo world, noun top-1 of a single template ranged from 0.06
to 0.31 for the same model); averaging over phrasings the corpus uses removes most of that.

Data. `read_youcook2` reads YouCook II's annotation JSON ({"database": {video_id: {"subset",
"annotations": [{"segment": [start, end], "sentence"}]}}}); `read_labels` reads the verb/noun
labels the user supplies (see its docstring for the format); `segment_tokens` turns a feature
folder and a visual vocabulary into the visual tokens of the clips whose middle lies inside each
segment. `topk_accuracy` scores predictions as the paper did (top-1 and top-5).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
import sys
import types
from typing import Iterator, Sequence

from absl import flags
import numpy as np

from vbert_jax import cli
from vbert_jax.tasks import bundle as bundle_lib
from vbert_jax.tasks import prompts
from vbert_jax.video import features_io

DEFAULT_TEMPLATE = "now let me show you how to [MASK] the [MASK] ."
YOUCOOK2_SUBSETS = ("training", "validation", "testing")
SCORINGS = ("chain", "calibrated", "prior")


@dataclasses.dataclass
class ZeroShotPrediction:
  """The top_k verbs and nouns, best first, with their scores (log-probabilities of the label,
  or of its token for an open vocabulary; less the language prior's when calibrated)."""
  verbs: list[str]
  verb_scores: list[float]
  nouns: list[str]
  noun_scores: list[float]


@dataclasses.dataclass
class Segment:
  """A stretch of one video, in seconds, with its labels (empty when unknown)."""
  video_id: str
  start: float
  end: float
  verb: str = ""
  noun: str = ""
  sentence: str = ""


# ------------------------------------------------------------------------------ labels


@dataclasses.dataclass
class _LabelSet:
  """Labels of one slot with their token pieces, grouped by piece count."""
  names: list[str]
  pieces: list[list[int]]

  @classmethod
  def parse(cls, labels: Sequence[str], tokenizer, what: str) -> "_LabelSet":
    names = [str(x) for x in labels]
    if not names:
      raise ValueError(f"the {what} label set is empty; expected at least one {what}, or None "
                       f"for the whole text vocabulary")
    dupes = sorted(n for n, c in collections.Counter(names).items() if c > 1)
    if dupes:
      raise ValueError(f"the {what} label set repeats {dupes}")
    pieces = []
    specials = set(tokenizer.specials.as_tuple())
    for name in names:
      ids = [int(i) for i in tokenizer.encode(name)]
      if not ids:
        raise ValueError(f"{what} label {name!r} tokenizes to nothing; expected a word")
      if tokenizer.specials.unk in ids:
        raise ValueError(f"{what} label {name!r} is unknown to the text tokenizer (it becomes "
                         f"[UNK]); expected words of its vocabulary")
      if any(i in specials for i in ids):
        raise ValueError(f"{what} label {name!r} holds a special symbol "
                         f"({tokenizer.tokenize(name)}); expected plain words")
      pieces.append(ids)
    return cls(names, pieces)

  def counts(self) -> list[int]:
    return sorted({len(p) for p in self.pieces})

  def with_count(self, n: int) -> list[int]:
    return [i for i, p in enumerate(self.pieces) if len(p) == n]


def _bucket(n: int, batch_size: int) -> int:
  """Rows per forward pass: one compiled shape for every batch (a power of two up to
  batch_size), so that short inputs do not pay for a full batch."""
  size = 1
  while size < min(n, batch_size):
    size *= 2
  return min(size, batch_size)


def _batches(bundle, videos: Sequence[np.ndarray], template: prompts.Template, order: str,
             batch_size: int, ids: np.ndarray | None
             ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(row indices, log-probabilities [rows, masks, K]) over all videos, in batches.

  Videos of similar length share a batch, which is cut to its longest prompt (rounded up to one
  of a few widths, `prompts.prompt_width`), so that short segments do not pay for max_len. `ids`: the text
  ids whose log-probabilities come back (None: all of them).
  """
  size = _bucket(len(videos), batch_size)
  by_length = np.argsort([len(v) for v in videos], kind="stable")
  pending = None
  for start in range(0, len(videos), size):
    rows = by_length[start:start + size]
    batch, positions = prompts.build_batch(bundle.layout, [videos[i] for i in rows], template,
                                           order, size, ids=rows)
    # Dispatched before the previous batch is read: its prompts are built while the device
    # computes, rather than in turn.
    out = bundle.log_probs_async(batch, mlm_positions=positions, mlm_ids=ids)
    if pending is not None:
      yield _fetch(*pending)
    pending = rows, out
  if pending is not None:
    yield _fetch(*pending)


def _fetch(rows: np.ndarray, out: dict) -> tuple[np.ndarray, np.ndarray]:
  return rows, np.asarray(out["mlm_log_probs"])[:len(rows)]


def _text_only(bundle, template: prompts.Template, ids: np.ndarray | None
               ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """As `_batches`, for the one prompt without a video (the language prior)."""
  batch, positions = prompts.build_text_only(bundle.layout, template)
  yield _fetch(np.zeros(1, np.int64), bundle.log_probs_async(batch, mlm_positions=positions,
                                                             mlm_ids=ids))


def _label_scores(bundle, videos, template, order, batch_size, verbs: _LabelSet | None,
                  nouns: _LabelSet | None, top_k: int) -> dict[str, tuple[np.ndarray, ...]]:
  """Per slot: (scores [N, labels]) for label sets, or (ids [N, k], scores [N, k]) open.

  A label's score is the log-probability of its pieces by the chain rule: its slot widened to
  as many masks as it has pieces, piece k scored with pieces 0..k-1 written into the masks
  before it. `videos` None scores the prompt alone, without a video (N = 1).
  """
  n = 1 if videos is None else len(videos)
  sides = {"verb": verbs, "noun": nouns}
  scores = {name: np.full((n, len(s.names)), -np.inf) for name, s in sides.items() if s}
  open_sides = [name for name, s in sides.items() if s is None]
  ids = _returned_ids(sides)
  column = (lambda piece: np.searchsorted(ids, piece)) if ids is not None else np.asarray
  run = ((lambda tpl: _text_only(bundle, tpl, ids)) if videos is None else
         (lambda tpl: _batches(bundle, videos, tpl, order, batch_size, ids)))
  text_size = bundle.vocab.text_size
  banned = np.unique(bundle.vocab.specials.as_tuple())
  open_k = min(top_k, text_size - len(banned))
  open_out = {name: np.zeros((n, open_k), np.int64) for name in open_sides}
  open_scores = {name: np.zeros((n, open_k)) for name in open_sides}
  for counts in _plans(verbs, nouns):
    expanded = template.expand(counts)
    groups = expanded.slot_groups(counts)
    for rows, lp in run(expanded):
      for j, (name, side) in enumerate(sides.items()):
        if side is None:
          if counts == (1, 1):
            open_out[name][rows], open_scores[name][rows] = _open_top(
                lp[:, groups[j][0]], text_size, banned, open_k)
          continue
        if counts[1 - j] != 1:
          continue  # the other slot's expansion serves the other side's labels only
        for label in side.with_count(counts[j]):
          scores[name][rows, label] = lp[:, groups[j][0], column(side.pieces[label][0])]
    for j, (name, side) in enumerate(sides.items()):
      if side is None or counts[j] == 1 or counts[1 - j] != 1:
        continue
      for label in side.with_count(counts[j]):
        pieces = side.pieces[label]
        for k in range(1, len(pieces)):
          given = expanded.fill({groups[j][i]: pieces[i] for i in range(k)})
          for rows, lp in run(given):
            scores[name][rows, label] += lp[:, groups[j][k], column(pieces[k])]
  out = {name: (s,) for name, s in scores.items()}
  out.update({name: (open_out[name], open_scores[name]) for name in open_sides})
  return out


def _scored(bundle, videos, template, order, batch_size, verbs: _LabelSet | None,
            nouns: _LabelSet | None, top_k: int, scoring: str
            ) -> dict[str, tuple[np.ndarray, ...]]:
  """`_label_scores` with the video ("chain"), without it ("prior", the same for every video),
  or the first less the second ("calibrated": what the video adds to the text's own guess)."""
  args = (template, order, batch_size, verbs, nouns, top_k)
  if scoring == "chain":
    return _label_scores(bundle, videos, *args)
  prior = _label_scores(bundle, None, *args)
  if scoring == "prior":
    return {name: (np.repeat(s, len(videos), axis=0),) for name, (s,) in prior.items()}
  with_video = _label_scores(bundle, videos, *args)
  return {name: (with_video[name][0] - prior[name][0],) for name in with_video}


def _returned_ids(sides: dict[str, _LabelSet | None]) -> np.ndarray | None:
  """The text ids whose log-probabilities the device sends back: the label pieces only, or
  all of them (None) when a side ranks the whole vocabulary."""
  if any(s is None for s in sides.values()):
    return None
  return np.unique(np.concatenate([np.concatenate([np.asarray(p) for p in s.pieces])
                                   for s in sides.values()]))


def _plans(verbs: _LabelSet | None, nouns: _LabelSet | None) -> list[tuple[int, int]]:
  """The prompt expansions to run, as (verb masks, noun masks): a multi-piece label widens its
  own slot and leaves the other at one mask."""
  plans = {(1, 1)}
  plans |= {(c, 1) for c in (verbs.counts() if verbs else [])}
  plans |= {(1, c) for c in (nouns.counts() if nouns else [])}
  return sorted(plans)


def _open_top(lp: np.ndarray, text_size: int, banned: np.ndarray,
              top_k: int) -> tuple[np.ndarray, np.ndarray]:
  lp = lp[:, :text_size].copy()
  lp[:, banned] = -np.inf
  ids = np.argsort(-lp, axis=1, kind="stable")[:, :top_k]
  return ids, np.take_along_axis(lp, ids, axis=1)


def classify(bundle, videos: Sequence[Sequence[int]], *, verbs: Sequence[str] | None = None,
             nouns: Sequence[str] | None = None,
             template: str | Sequence[str] = DEFAULT_TEMPLATE,
             order: str = "video_first", top_k: int = 5,
             batch_size: int = 64, scoring: str = "chain") -> list[ZeroShotPrediction]:
  """The top_k verbs and nouns of each video (visual tokens of one clip or segment).

  `verbs` / `nouns` restrict the answers to a label set (None: any text token of the
  vocabulary). `template` must hold exactly two [MASK]s: verb, then noun; several templates
  (label sets only) average each label's score over them. `order` is
  "video_first" ([CLS] video [>] template [SEP]) or "text_first" ([CLS] template [>] video
  [SEP]). Batches of `batch_size` prompts run in one jitted forward pass each.

  `scoring` (label sets only, except "chain"): "chain" ranks labels by the log-probability of
  their pieces given the video; "prior" by the same without the video (the text's own guess,
  the paper's language prior); "calibrated" by the first less the second, so that a label is
  not favoured for what the prompt alone, its length included, says of it.
  """
  if top_k < 1 or batch_size < 1:
    raise ValueError(f"top_k={top_k} and batch_size={batch_size}: expected at least 1")
  if order not in prompts.ORDERS:
    raise ValueError(f"order={order!r}: expected one of {prompts.ORDERS}")
  if scoring not in SCORINGS:
    raise ValueError(f"scoring={scoring!r}: expected one of {SCORINGS}")
  labelled = verbs is not None and nouns is not None
  if scoring != "chain" and not labelled:
    raise ValueError(f"scoring={scoring!r} compares each label with and without the video: it "
                     f"needs both label sets (verbs and nouns)")
  tpls = _templates(template, bundle.tokenizer, labelled=labelled)
  arrays = []
  for i, v in enumerate(videos):
    v = np.asarray(v, np.int64).reshape(-1)
    if v.size == 0:
      raise ValueError(f"video {i} is empty (no clips, so no visual tokens); expected at least "
                       f"one visual token per video")
    arrays.append(v)
  if not arrays:
    return []
  verb_set = _LabelSet.parse(verbs, bundle.tokenizer, "verb") if verbs is not None else None
  noun_set = _LabelSet.parse(nouns, bundle.tokenizer, "noun") if nouns is not None else None
  per_template = [_scored(bundle, arrays, tpl, order, batch_size, verb_set, noun_set, top_k,
                          scoring) for tpl in tpls]
  scored = per_template[0] if len(tpls) == 1 else {
      name: (np.mean([p[name][0] for p in per_template], axis=0),) for name in per_template[0]}
  verb_names, verb_scores = _ranked(scored["verb"], verb_set, bundle.tokenizer, top_k)
  noun_names, noun_scores = _ranked(scored["noun"], noun_set, bundle.tokenizer, top_k)
  return [ZeroShotPrediction(vn, vs, nn, ns) for vn, vs, nn, ns in
          zip(verb_names, verb_scores, noun_names, noun_scores)]


def _templates(template: str | Sequence[str], tokenizer, labelled: bool
               ) -> list[prompts.Template]:
  texts = [template] if isinstance(template, str) else list(template)
  if not texts:
    raise ValueError("no template given; expected at least one with two [MASK]s")
  if len(texts) > 1 and not labelled:
    raise ValueError(f"{len(texts)} templates: an ensemble averages the scores of labels, so it "
                     f"needs both label sets (verbs and nouns); give one template for an open "
                     f"vocabulary")
  return [prompts.Template.parse(t, tokenizer, expected_masks=2) for t in texts]


def _ranked(scored: tuple[np.ndarray, ...], labels: _LabelSet | None, tokenizer,
            top_k: int) -> tuple[list[list[str]], list[list[float]]]:
  if labels is None:
    ids, scores = scored
    names = [[tokenizer.id_to_token(int(i)) for i in row] for row in ids]
    return names, scores.astype(float).tolist()
  (scores,) = scored
  order = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
  names = [[labels.names[j] for j in row] for row in order]
  return names, np.take_along_axis(scores, order, axis=1).astype(float).tolist()


def topk_accuracy(predicted: Sequence[Sequence[str]], truth: Sequence[str], k: int) -> float:
  """Share of examples whose true label is among the first k predictions."""
  if len(predicted) != len(truth):
    raise ValueError(f"{len(predicted)} predictions for {len(truth)} true labels; expected one "
                     f"ranked list per label")
  if not truth:
    raise ValueError("no examples to score")
  if k < 1:
    raise ValueError(f"k={k}: expected at least 1")
  return float(np.mean([t in list(p)[:k] for p, t in zip(predicted, truth)]))


def accuracies(preds: Sequence[ZeroShotPrediction], labelled: Sequence,
               ks: Sequence[int]) -> dict[str, float]:
  """`verb_top{k}` and `noun_top{k}` for each k, against items with `verb` and `noun`
  attributes (labelled segments, the demo's steps)."""
  out = {}
  for k in ks:
    out[f"verb_top{k}"] = topk_accuracy([p.verbs for p in preds], [s.verb for s in labelled], k)
    out[f"noun_top{k}"] = topk_accuracy([p.nouns for p in preds], [s.noun for s in labelled], k)
  return out


# ------------------------------------------------------------------------------ data


def read_youcook2(path, split: str | None = None) -> list[Segment]:
  """Segments of YouCook II's annotation JSON (verb and noun empty), in file order.

  `split`: "training", "validation" or "testing" (None: all).
  """
  path = pathlib.Path(path)
  try:
    data = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: not a readable JSON file ({e})") from e
  if not isinstance(data, dict) or not isinstance(data.get("database"), dict):
    raise ValueError(f"{path}: expected YouCook II annotations, an object with a 'database' "
                     f"object of videos")
  if split is not None and split not in YOUCOOK2_SUBSETS:
    raise ValueError(f"split={split!r}: expected one of {YOUCOOK2_SUBSETS}")
  out = []
  for video_id, video in data["database"].items():
    if split is not None and video.get("subset") != split:
      continue
    for i, ann in enumerate(video.get("annotations", [])):
      try:
        start, end = (float(x) for x in ann["segment"])
        sentence = str(ann.get("sentence", ""))
      except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: database.{video_id}.annotations[{i}]: expected "
                         f"{{'segment': [start, end], 'sentence': ...}} ({e})") from e
      out.append(Segment(str(video_id), start, end, sentence=sentence))
  return out


LABEL_FIELDS = ("video_id", "start", "end", "verb", "noun")
LABELS_HELP = """\
The label file: one labelled segment a line, either JSON lines
  {"video_id": "GLd3aX16zBg", "start": 90, "end": 102, "verb": "spread", "noun": "butter"}
(an optional "sentence" key is kept), or tab-separated values
  video_id <TAB> start <TAB> end <TAB> verb <TAB> noun [<TAB> sentence]
with start and end in seconds. Blank lines, lines starting with '#', and a TSV header line that
begins with 'video_id' are skipped. (The paper took the verb and noun of each YouCook II
segment from its caption with a part-of-speech tagger.)"""


def read_labels(path) -> list[Segment]:
  path = pathlib.Path(path)
  try:
    lines = path.read_text(encoding="utf-8").splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: cannot read the label file ({e})") from e
  out = []
  for number, line in enumerate(lines, 1):
    text = line.strip()
    if not text or text.startswith("#"):
      continue
    where = f"{path}:{number}"
    if text.startswith("{"):
      out.append(_json_label(text, where))
    elif not text.startswith("video_id\t"):
      out.append(_tsv_label(line, where))
  if not out:
    raise ValueError(f"{path}: no labelled segments.\n{LABELS_HELP}")
  return out


def _json_label(text: str, where: str) -> Segment:
  try:
    row = json.loads(text)
    missing = [k for k in LABEL_FIELDS if k not in row]
    if missing:
      raise ValueError(f"missing keys {missing}")
    return _segment(row["video_id"], row["start"], row["end"], row["verb"], row["noun"],
                    row.get("sentence", ""), where)
  except (json.JSONDecodeError, ValueError, TypeError) as e:
    raise ValueError(f"{where}: expected a JSON object with {list(LABEL_FIELDS)} ({e})") from e


def _tsv_label(line: str, where: str) -> Segment:
  fields = line.rstrip("\r\n").split("\t")
  if len(fields) not in (5, 6):
    raise ValueError(f"{where}: expected 5 or 6 tab-separated fields (video_id, start, end, "
                     f"verb, noun[, sentence]); got {len(fields)}")
  return _segment(*fields[:5], fields[5] if len(fields) == 6 else "", where)


def _segment(video_id, start, end, verb, noun, sentence, where: str) -> Segment:
  try:
    s, e = float(start), float(end)
  except (TypeError, ValueError) as err:
    raise ValueError(f"{where}: start {start!r} and end {end!r} must be numbers of "
                     f"seconds") from err
  if not e > s:
    raise ValueError(f"{where}: end {e} must be after start {s}")
  if not str(verb).strip() or not str(noun).strip():
    raise ValueError(f"{where}: empty verb or noun")
  return Segment(str(video_id), s, e, str(verb).strip(), str(noun).strip(), str(sentence))


def segment_clips(features_dir, segments: Sequence[Segment]) -> list[np.ndarray]:
  """Feature rows float32 [clips, dim] of the clips whose middle lies in [start, end) of each
  segment (none: [0, dim]). Each video's file (`features_dir/<video_id>.npz`) is read once."""
  cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
  out = []
  for seg in segments:
    if seg.video_id not in cache:
      path = features_io.feature_path(features_dir, seg.video_id)
      if not path.is_file():
        raise FileNotFoundError(f"{path}: no feature file for video {seg.video_id!r} (segment "
                                f"{seg.start:g}-{seg.end:g} s)")
      vf = features_io.load_features(path)
      cache[seg.video_id] = (np.asarray(vf.features, np.float32),
                             (np.asarray(vf.starts) + np.asarray(vf.ends)) / 2)
    features, middles = cache[seg.video_id]
    out.append(features[(middles >= seg.start) & (middles < seg.end)])
  return out


def segment_tokens(features_dir, vocab, segments: Sequence[Segment]) -> list[np.ndarray]:
  """Visual tokens (int32) of each segment's clips (`segment_clips`), assigned by `vocab`. A
  segment without clips gets an empty array (`classify` refuses it; the command line skips
  it, naming it)."""
  return [vocab.assign(rows).astype(np.int32) if len(rows) else np.zeros(0, np.int32)
          for rows in segment_clips(features_dir, segments)]


def clips_of_segments(features_dir, segments: Sequence[Segment]
                      ) -> tuple[list[tuple[Segment, np.ndarray]], list[dict]]:
  """(segment, clip features) of the segments that have clips, and the others as skipped
  entries with their reason (no feature file, or no clip inside)."""
  has_file = [features_io.feature_path(features_dir, s.video_id).is_file() for s in segments]
  present = [s for s, ok in zip(segments, has_file) if ok]
  skipped = [skip_entry(s, f"no feature file in {features_dir}")
             for s, ok in zip(segments, has_file) if not ok]
  clips = segment_clips(features_dir, present)
  usable = [(s, c) for s, c in zip(present, clips) if len(c)]
  skipped += [skip_entry(s, "no clip has its middle inside the segment")
              for s, c in zip(present, clips) if not len(c)]
  if not usable:
    raise ValueError(f"none of the {len(segments)} segments has clips in {features_dir}")
  return usable, skipped


def skip_entry(seg: Segment, reason: str) -> dict:
  """A segment left out of a command's results, with the reason (for results.json)."""
  return {"video_id": seg.video_id, "start": seg.start, "end": seg.end, "reason": reason}


# ------------------------------------------------------------------------------ command line


def _label_list(value: str | None) -> list[str] | None:
  if value is None:
    return None
  if value.startswith("@"):
    lines = pathlib.Path(value[1:]).read_text(encoding="utf-8").splitlines()
    return [x.strip() for x in lines if x.strip()]
  return [x.strip() for x in value.split(",") if x.strip()]


# What --help prints above the flags: the command's purpose, the label format and an example.
_HELP = (
    "python -m vbert_jax.tasks.zero_shot\n\n"
    "Zero-shot verb and noun classification with a trained VideoBERT, as in the paper:\n"
    "each labelled segment's visual tokens are shown to the model with the template\n"
    f"'{DEFAULT_TEMPLATE}'; the first [MASK] gives the verb, the second the noun.\n"
    "Each label is scored by the log-probability of its word pieces by the chain rule (a\n"
    "label of several pieces widens its slot to as many [MASK]s); --scoring=calibrated\n"
    "subtracts the same score without the video. Reports top-1 and top-5 accuracy for each\n"
    "prompt order.\n\n" + LABELS_HELP + "\n\n"
    "Example (YouCook II validation, labels in labels.tsv):\n"
    "  python -m vbert_jax.tasks.zero_shot --workdir=runs/videobert \\\n"
    "      --features=features/youcook2 --labels=labels.tsv \\\n"
    "      --youcook2=youcookii_annotations.json --split=validation \\\n"
    "      --out=results/zero_shot\n\n"
    "Writes OUT/results.json (accuracies, settings, skipped segments) and\n"
    "OUT/predictions.jsonl (one line per segment and order).")


def define_flags(fv: flags.FlagValues) -> None:
  bundle_lib.define_run_flags(
      fv, out_help="Folder for results.json and predictions.jsonl.",
      visual_vocab_help="Visual vocabulary (.npz) that turns --features into tokens; default: "
      "the run's config.init.visual_vocab.")
  flags.DEFINE_string("features", None, "Folder of per-video feature files (<video_id>.npz from "
                      "the feature extractor).", flag_values=fv)
  flags.DEFINE_string("labels", None, "The verb/noun label file (format above).", flag_values=fv)
  flags.DEFINE_string("youcook2", None, "Optional YouCook II annotation JSON: keeps only the "
                      "labelled segments of --split that it lists, and takes their sentences.",
                      flag_values=fv)
  flags.DEFINE_enum("split", "validation", YOUCOOK2_SUBSETS, "The YouCook II subset used with "
                    "--youcook2 (default: validation).", flag_values=fv)
  flags.DEFINE_string("verbs", None, "Verb label set: comma-separated, or @FILE with one per "
                      "line. Default: the verbs of the label file.", flag_values=fv)
  flags.DEFINE_string("nouns", None, "Noun label set, as --verbs. Default: the nouns of the "
                      "label file.", flag_values=fv)
  flags.DEFINE_bool("open_vocabulary", False, "Rank every text token instead of a label set.",
                    flag_values=fv)
  flags.DEFINE_string("vocabulary", None, "Rank these words (comma-separated, or @FILE with "
                      "one per line; words of several pieces too) for both the verb and the "
                      "noun, instead of the label sets.", flag_values=fv)
  flags.DEFINE_enum("scoring", "chain", SCORINGS, "chain: a label's log-probability given the "
                    "video; calibrated: less the same without the video; prior: without the "
                    "video only (the language prior).", flag_values=fv)
  flags.DEFINE_multi_string("template", None, "Prompt with two [MASK]s, verb then noun "
                            f"(default: '{DEFAULT_TEMPLATE}'). Give it several times for an "
                            "ensemble: each label's score is averaged over the templates.",
                            flag_values=fv)
  flags.DEFINE_enum("order", "both", ("video_first", "text_first", "both"), "Prompt order: "
                    "video then text (the paper's figure), text then video (the pretraining "
                    "layout), or both (default).", flag_values=fv)
  flags.DEFINE_integer("top_k", 5, "Predictions kept per segment.", flag_values=fv)
  flags.DEFINE_integer("batch_size", 64, "Prompts per forward pass.", flag_values=fv)
  flags.mark_flags_as_required(["features", "labels"], flag_values=fv)


def parse_args(argv: Sequence[str] | None = None) -> types.SimpleNamespace:
  return cli.parse(define_flags, argv, _HELP)


def _restrict_to_youcook2(labelled: list[Segment], annotations: list[Segment]
                          ) -> tuple[list[Segment], list[dict]]:
  sentences = {(s.video_id, round(s.start, 2), round(s.end, 2)): s.sentence for s in annotations}
  videos = {s.video_id for s in annotations}
  kept, skipped = [], []
  for s in labelled:
    key = (s.video_id, round(s.start, 2), round(s.end, 2))
    if key in sentences:
      kept.append(dataclasses.replace(s, sentence=s.sentence or sentences[key]))
    elif s.video_id in videos:
      skipped.append(skip_entry(s, "not a segment of the YouCook II annotations"))
  return kept, skipped


def _answer_sets(args: types.SimpleNamespace, segs: Sequence[Segment]
                 ) -> tuple[list[str] | None, list[str] | None]:
  """The verb and noun label sets: the label file's, --verbs/--nouns, one --vocabulary for
  both, or None for every text token (--open_vocabulary)."""
  if args.open_vocabulary:
    return None, None
  if args.vocabulary:
    words = _label_list(args.vocabulary)
    return words, list(words)
  return (_label_list(args.verbs) or sorted({s.verb for s in segs}),
          _label_list(args.nouns) or sorted({s.noun for s in segs}))


def _check_answer_flags(args: types.SimpleNamespace) -> None:
  chosen = [f for f in ("open_vocabulary", "vocabulary") if getattr(args, f)]
  if chosen and (len(chosen) > 1 or args.verbs or args.nouns):
    raise ValueError(f"--{chosen[0]} replaces the label sets: give it without --verbs, "
                     f"--nouns{'' if len(chosen) == 1 else ' and --' + chosen[1]}")


def run(args: types.SimpleNamespace) -> dict:
  _check_answer_flags(args)
  segments = read_labels(args.labels)
  skipped = []
  if args.youcook2:
    segments, skipped = _restrict_to_youcook2(segments, read_youcook2(args.youcook2, args.split))
  bundle = bundle_lib.bundle_from_args(args)
  if bundle.visual_vocab is None:
    raise ValueError("no visual vocabulary: pass --visual_vocab (the run's config has no "
                     "init.visual_vocab)")
  usable, missing = clips_of_segments(args.features, segments)
  skipped += missing
  segs = [s for s, _ in usable]
  tokens = [bundle.visual_vocab.assign(clips).astype(np.int32) for _, clips in usable]
  verbs, nouns = _answer_sets(args, segs)
  orders = ("video_first", "text_first") if args.order == "both" else (args.order,)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  templates = args.template or [DEFAULT_TEMPLATE]
  results = {"workdir": str(args.workdir), "templates": templates, "scoring": args.scoring,
             "segments": len(segs),
             "verbs": verbs, "nouns": nouns, "orders": {}, "skipped": skipped}
  lines = []
  for order in orders:
    preds = classify(bundle, tokens, verbs=verbs, nouns=nouns,
                     template=templates, order=order, top_k=args.top_k,
                     batch_size=args.batch_size, scoring=args.scoring)
    results["orders"][order] = accuracies(preds, segs, sorted({1, min(5, args.top_k)}))
    lines += [json.dumps({"order": order, **dataclasses.asdict(s), **dataclasses.asdict(p)})
              for s, p in zip(segs, preds)]
  (out / "predictions.jsonl").write_text("\n".join(lines) + "\n")
  bundle_lib.write_results(results, out)
  return results


def _report(results: dict) -> None:
  for order, acc in results["orders"].items():
    print(f"{order}: " + ", ".join(f"{k}={v:.3f}" for k, v in acc.items()))
  print(f"{results['segments']} segments, {len(results['skipped'])} skipped")


def main(argv: Sequence[str] | None = None) -> int:
  return bundle_lib.run_command(run, parse_args(argv), _report)


if __name__ == "__main__":
  sys.exit(main())
