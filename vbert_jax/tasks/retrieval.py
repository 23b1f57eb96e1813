"""Text-to-video and video-to-text retrieval, with the alignment head (LVA) as a cross-encoder.

Each caption and each segment meet in one sequence, `[CLS] caption [>] segment's visual tokens
[SEP]`, and LVA's logit scores the pair: every caption against every segment, as UniVL and other
cross-encoders rank. Recall at 1, 5 and 10 and the median rank, both ways (`ranking`).

    scores = retrieval.score_matrix(bundle, captions, videos)      # [captions, segments]
    result = retrieval.retrieve(bundle, captions, videos)          # metrics both ways
    # A large set: a cheap score (bag_of_tokens.BagOfTokens) keeps each query's best
    # `shortlist` candidates, and only those go through the model.
    cheap = bag_of_tokens.BagOfTokens(train_ids, train_tokens, V).scores(ids, videos)
    result = retrieval.retrieve(bundle, captions, videos, shortlist=100, shortlist_scores=cheap)

The sequences are built on the device from two tables (every caption's ids, every segment's
tokens) and a batch of (caption, segment) index pairs, inside the jit-compiled step that scores
them: the host sends 8 bytes a pair, not a 2 x max_len row. Pairs are batched by length, each
batch as wide as a few fixed widths allow, so that short pairs do not pay for long ones. Caption
i belongs with segment i.

Command line (YouCook II validation, MSR-VTT 1k-A, or a label file with sentences):

    python -m vbert_jax.tasks.retrieval --workdir=runs/videobert --features=features/youcook2 \\
        --captions=youcookii_annotations_trainval.json --split=validation \\
        --fit=youcookii_annotations_trainval.json --fit_split=training --shortlist=100 \\
        --out=results/retrieval
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import sys
import time
import types
from typing import Sequence

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

from vbert_jax import cli
from vbert_jax import model as model_lib
from vbert_jax import sequence
from vbert_jax.tasks import annotations
from vbert_jax.tasks import bag_of_tokens
from vbert_jax.tasks import bundle as bundle_lib
from vbert_jax.tasks import prompts
from vbert_jax.tasks import ranking
from vbert_jax.tasks import zero_shot as zs

# Pairs per compiled call. On a CPU the rate peaks at a few dozen pairs of YouCook II's lengths
# and falls beyond, as the activations outgrow the caches (bench/retrieval.py); an accelerator
# wants more (--batch_size).
DEFAULT_BATCH = 32


@dataclasses.dataclass
class Retrieval:
  """Metrics both ways, and the scores they were ranked by ([queries, candidates]: shortlisted
  candidates above the rest, in the cross-encoder's order)."""
  text_to_video: dict
  video_to_text: dict
  t2v_scores: np.ndarray
  v2t_scores: np.ndarray
  pairs_scored: int


# ----------------------------------------------------------------------- rows on the device


def _split_budget(n_text: jax.Array, n_video: jax.Array, budget: int
                  ) -> tuple[jax.Array, jax.Array]:
  """`sequence.split_budget` over arrays: the same cut, so that a row built here equals
  `Layout.pair`'s (round half to even in both, and the quotients of small ints are exact
  enough in f32 to round alike)."""
  total = n_text + n_video
  keep = jnp.round(budget * n_text / jnp.maximum(total, 1)).astype(jnp.int32)
  if budget >= 2:
    keep = jnp.where((n_text > 0) & (n_video > 0), jnp.clip(keep, 1, budget - 1), keep)
  keep = jnp.minimum(n_text, jnp.maximum(keep, budget - n_video))
  over = total > budget
  return jnp.where(over, keep, n_text), jnp.where(over, budget - keep, n_video)


def pair_rows(vocab: sequence.JointVocab, max_len: int, width: int, text_table: jax.Array,
              text_len: jax.Array, video_table: jax.Array, video_len: jax.Array,
              pairs: jax.Array) -> dict[str, jax.Array]:
  """`Layout.pair(text[i], video[j])` for each (i, j) of `pairs` [B, 2], `width` columns wide
  (at least the longest of these rows, at most `max_len`). Tables: ids [N, Lt] and visual
  tokens [M, Lv], each with its lengths."""
  sp = vocab.specials
  texts, videos = text_table[pairs[:, 0]], video_table[pairs[:, 1]]
  n_t, n_v = _split_budget(text_len[pairs[:, 0]], video_len[pairs[:, 1]], max_len - 3)
  n_t, n_v = n_t[:, None], n_v[:, None]
  cols = jnp.arange(width, dtype=jnp.int32)[None]
  text = jnp.take_along_axis(texts, jnp.clip(cols - 1, 0, texts.shape[1] - 1), axis=1)
  video = jnp.take_along_axis(videos, jnp.clip(cols - n_t - 2, 0, videos.shape[1] - 1),
                              axis=1) + vocab.visual_offset
  end = n_t + n_v + 2  # the [SEP] column
  ids = jnp.select([cols == 0, cols <= n_t, cols == n_t + 1, cols < end, cols == end],
                   [sp.cls, text, sp.video_sep, video, sp.sep], sp.pad)
  in_video = (cols >= n_t + 2) & (cols <= end)
  return {"input_ids": ids.astype(jnp.int32),
          "segment_ids": jnp.where(in_video, sequence.SEGMENT_VIDEO,
                                   sequence.SEGMENT_TEXT).astype(jnp.int32),
          "position_ids": jnp.broadcast_to(cols, ids.shape),
          "input_mask": (cols <= end).astype(jnp.int32)}


# One compiled step per model and row width: every width of the ladder of a 512-token model fits.
@functools.lru_cache(maxsize=64)
def _compiled(model_config: model_lib.VideoBERTConfig, max_len: int, width: int):
  module = model_lib.VideoBERT(model_config)

  def logits(params, text_table, text_len, video_table, video_len, pairs):
    rows = pair_rows(model_config.vocab, max_len, width, text_table, text_len, video_table,
                     video_len, pairs)
    out = module.apply({"params": params}, rows["input_ids"], rows["segment_ids"],
                       rows["position_ids"], rows["input_mask"], deterministic=True)
    return out["lva_logits"].reshape(-1)
  return jax.jit(logits)


def _table(rows: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  lengths = np.array([len(r) for r in rows], np.int32)
  table = np.zeros((len(rows), max(int(lengths.max(initial=0)), 1)), np.int32)
  for i, r in enumerate(rows):
    table[i, :len(r)] = r
  return table, lengths


class PairScorer:
  """LVA logits of (caption, segment) pairs, batched and jit-compiled.

  `texts`: each caption's text ids (a tokenizer's `encode`); `videos`: each segment's visual
  tokens (at least one). Both go to the devices once; a call sends only index pairs. Every
  batch is split evenly over `devices` (default: this process's), each scoring its share with
  its own copy of the parameters and tables: a host of 8 chips scores 8 times the pairs.
  """

  def __init__(self, bundle, texts: Sequence[Sequence[int]], videos: Sequence[Sequence[int]],
               batch_size: int = DEFAULT_BATCH, devices: Sequence[jax.Device] | None = None):
    if batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    empty = [i for i, v in enumerate(videos) if not len(v)]
    if empty:
      raise ValueError(f"segments {empty[:5]} have no visual tokens (of {len(videos)})")
    texts = [np.asarray(t, np.int32).reshape(-1) for t in texts]
    videos = [np.asarray(v, np.int32).reshape(-1) for v in videos]
    bundle.vocab.visual_to_joint(np.concatenate(videos))  # raises on tokens out of range
    ids = np.concatenate([np.zeros(0, np.int32), *texts])
    if ids.size and (ids.min() < 0 or ids.max() >= bundle.vocab.text_size):
      raise ValueError(f"caption ids must lie in [0, {bundle.vocab.text_size}) (the text "
                       f"vocabulary); got range [{ids.min()}, {ids.max()}]")
    text_table, text_len = _table(texts)
    video_table, video_len = _table(videos)
    self._model_config, self._max_len = bundle.model_config, bundle.layout.max_len
    self.devices = list(devices) if devices is not None else jax.local_devices()
    mesh = jax.sharding.Mesh(np.array(self.devices), ("pairs",))
    self._split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("pairs"))
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    self._params = jax.device_put(bundle.params, whole)
    self._tables = tuple(jax.device_put(a, whole)
                         for a in (text_table, text_len, video_table, video_len))
    self._lengths = (text_len.astype(np.int64), video_len.astype(np.int64))
    self._ladder = np.array(sorted({prompts.prompt_width(n, self._max_len)
                                    for n in range(1, self._max_len + 1)}))
    self.batch_size = -(-batch_size // len(self.devices)) * len(self.devices)

  def widths(self, pairs: np.ndarray) -> np.ndarray:
    """Each pair's row width: its length rounded up to one of a few widths (at most max_len),
    so that short pairs do not pay for the longest one and few shapes compile."""
    lengths = np.minimum(self._lengths[0][pairs[:, 0]] + self._lengths[1][pairs[:, 1]] + 3,
                         self._max_len)
    return self._ladder[np.searchsorted(self._ladder, lengths)]

  def __call__(self, pairs: np.ndarray) -> np.ndarray:
    """LVA logits float32 [P] of `pairs` [P, 2] (caption index, segment index)."""
    pairs = np.asarray(pairs, np.int32).reshape(-1, 2)
    widths = self.widths(pairs)
    # Pairs grouped by width, each group in full batches (the last one padded with pair 0).
    order = np.argsort(widths, kind="stable")
    b, out = self.batch_size, []
    for width in np.unique(widths):
      chosen = order[widths[order] == width]
      fn = _compiled(self._model_config, self._max_len, int(width))
      padded = np.zeros((-(-len(chosen) // b) * b, 2), np.int32)
      padded[:len(chosen)] = pairs[chosen]
      # Every batch is dispatched before any result is read: the device runs ahead of the host.
      out += [(chosen[i:i + b], fn(self._params, *self._tables,
                                   jax.device_put(padded[i:i + b], self._split)))
              for i in range(0, len(padded), b)]
    logits = np.zeros(len(pairs), np.float32)
    for index, result in out:
      logits[index] = np.asarray(result)[:len(index)]
    return logits


def score_matrix(bundle, texts: Sequence[Sequence[int]], videos: Sequence[Sequence[int]],
                 batch_size: int = DEFAULT_BATCH) -> np.ndarray:
  """LVA logits float32 [captions, segments] of every pair."""
  scorer = PairScorer(bundle, texts, videos, batch_size)
  grid = np.stack(np.meshgrid(np.arange(len(texts)), np.arange(len(videos)), indexing="ij"),
                  axis=-1).reshape(-1, 2)
  return scorer(grid).reshape(len(texts), len(videos))


# --------------------------------------------------------------------------------- ranking


def _shortlisted(cheap: np.ndarray, k: int) -> np.ndarray:
  """bool [queries, candidates]: each query's k best candidates by the cheap score."""
  best = np.argpartition(-cheap, k - 1, axis=1)[:, :k]
  chosen = np.zeros(cheap.shape, bool)
  np.put_along_axis(chosen, best, True, axis=1)
  return chosen


def _reranked(cheap: np.ndarray, exact: np.ndarray, chosen: np.ndarray) -> np.ndarray:
  """The shortlisted candidates in the cross-encoder's order, above all the others in the
  cheap score's order (a shift keeps the order within each group)."""
  lift = np.nanmax(cheap) - np.min(exact[chosen]) + 1.0
  return np.where(chosen, exact.astype(np.float64) + lift, cheap)


NORMALIZE = ("none", "dual_softmax")


def dual_softmax(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(text-to-video, video-to-text) scores from LVA logits [captions, segments], each pair's
  logit less the log-sum-exp of its candidate's logits against every query (the inverted
  softmax): a segment that every caption scores high, or a caption high beside every segment,
  no longer ranks high for all of them."""
  scores = np.asarray(scores, np.float64)
  t2v = scores - special.logsumexp(scores, axis=0, keepdims=True)
  v2t = (scores - special.logsumexp(scores, axis=1, keepdims=True)).T
  return t2v, v2t


def retrieve(bundle, texts: Sequence[Sequence[int]], videos: Sequence[Sequence[int]], *,
             shortlist: int | None = None, shortlist_scores: np.ndarray | None = None,
             normalize: str = "none", batch_size: int = DEFAULT_BATCH) -> Retrieval:
  """Caption i belongs with segment i. Without `shortlist`, every pair is scored by the
  model, and ranked by its LVA logit or, with `normalize="dual_softmax"`, by `dual_softmax`;
  with it, each caption's and each segment's best `shortlist` candidates by `shortlist_scores`
  [captions, segments] are, and rank above the rest."""
  if len(texts) != len(videos) or not len(texts):
    raise ValueError(f"{len(texts)} captions and {len(videos)} segments: caption i belongs "
                     f"with segment i, so both must be as many, and not none")
  if normalize not in NORMALIZE:
    raise ValueError(f"normalize={normalize!r}: expected one of {NORMALIZE}")
  n = len(texts)
  truth = np.arange(n)
  if shortlist is None or shortlist >= n:
    exact = score_matrix(bundle, texts, videos, batch_size)
    t2v, v2t = dual_softmax(exact) if normalize == "dual_softmax" else (exact, exact.T)
    return Retrieval(ranking.metrics(t2v, truth), ranking.metrics(v2t, truth), t2v, v2t,
                     n * n)
  if normalize != "none":
    raise ValueError(f"normalize={normalize!r} needs every pair's score; it cannot be used "
                     f"with a shortlist")
  if shortlist < 1:
    raise ValueError(f"shortlist must be at least 1, got {shortlist}")
  cheap = np.asarray(shortlist_scores, np.float64) if shortlist_scores is not None else None
  if cheap is None or cheap.shape != (n, n):
    raise ValueError(f"a shortlist needs shortlist_scores [{n}, {n}] (captions, segments); "
                     f"got {None if cheap is None else cheap.shape}")
  t2v_chosen = _shortlisted(cheap, shortlist)
  v2t_chosen = _shortlisted(cheap.T, shortlist).T
  pairs = np.argwhere(t2v_chosen | v2t_chosen)
  exact = np.full((n, n), np.nan)
  exact[pairs[:, 0], pairs[:, 1]] = PairScorer(bundle, texts, videos, batch_size)(pairs)
  t2v = _reranked(cheap, exact, t2v_chosen)
  v2t = _reranked(cheap.T, exact.T, v2t_chosen.T)
  return Retrieval(ranking.metrics(t2v, truth), ranking.metrics(v2t, truth), t2v, v2t,
                   len(pairs))


# ------------------------------------------------------------------------------ command line


_HELP = (
    "python -m vbert_jax.tasks.retrieval\n\n"
    "Text-to-video and video-to-text retrieval with a trained VideoBERT: each caption beside\n"
    "each segment's visual tokens, scored by the alignment head. Reports R@1, R@5, R@10 and\n"
    "the median rank both ways, beside chance and, with --fit, a naive Bayes bag-of-tokens\n"
    "baseline fitted on those training pairs (which also gives --shortlist its candidates).\n\n"
    "Captions (--captions, --fit): YouCook II's annotation JSON (a --split subset), MSR-VTT's\n"
    "MSRVTT_JSFUSION_test.csv (the 1k-A test split) or MSRVTT_data.json (a --split), or a\n"
    "zero-shot label file with its sentence column. A segment whose video has no feature file,\n"
    "or no clip inside it, is listed as skipped in results.json and left out.\n\n"
    "Writes OUT/results.json and OUT/rankings.jsonl (each caption's 10 best segments).")


def define_flags(fv: flags.FlagValues) -> None:
  bundle_lib.define_run_flags(
      fv, out_help="Folder for results.json and rankings.jsonl.",
      visual_vocab_help="Visual vocabulary (.npz) that turns --features into tokens; default: "
      "the run's config.init.visual_vocab.")
  flags.DEFINE_string("features", None, "Folder of per-video feature files (<video_id>.npz).",
                      flag_values=fv)
  flags.DEFINE_string("captions", None, "The captioned segments to rank (formats above).",
                      flag_values=fv)
  flags.DEFINE_string("split", "validation", "YouCook II subset or MSR-VTT split of "
                      "--captions.", flag_values=fv)
  flags.DEFINE_string("fit", None, "Training captions for the bag-of-tokens baseline and "
                      "shortlist (same formats).", flag_values=fv)
  flags.DEFINE_string("fit_split", "training", "The split of --fit.", flag_values=fv)
  flags.DEFINE_string("fit_features", None, "Feature folder of --fit (default: --features).",
                      flag_values=fv)
  flags.DEFINE_integer("shortlist", 0, "Re-rank only each query's best N candidates by the "
                       "bag-of-tokens score (needs --fit); 0: score every pair.", flag_values=fv)
  flags.DEFINE_enum("normalize", "none", NORMALIZE, "dual_softmax: rank each pair by its logit "
                    "less the log-sum-exp of its candidate's logits against every query (needs "
                    "every pair: no --shortlist).", flag_values=fv)
  flags.DEFINE_integer("batch_size", DEFAULT_BATCH, "Pairs per compiled call.", flag_values=fv)
  flags.mark_flags_as_required(["features", "captions"], flag_values=fv)


def parse_args(argv: Sequence[str] | None = None) -> types.SimpleNamespace:
  return cli.parse(define_flags, argv, _HELP)


def _skipped(entries: list[dict]) -> list[dict]:
  # A whole-video caption ends at infinity, which JSON cannot hold.
  return [{**e, "end": None if math.isinf(e["end"]) else e["end"]} for e in entries]


def _pairs(bundle, features, segments) -> tuple[list, list[np.ndarray], list, list[dict]]:
  """(segments, caption ids, visual tokens, skipped) of the segments that have a caption and
  clips."""
  segments, skipped = annotations.without_captions(segments)
  usable, missing = zs.clips_of_segments(features, segments)
  skipped += missing
  ids = [bundle.tokenizer.encode(s.sentence) for s, _ in usable]
  tokens = [bundle.visual_vocab.assign(c).astype(np.int32) for _, c in usable]
  return [s for s, _ in usable], ids, tokens, skipped


def _baseline(args, bundle, ids, tokens) -> tuple[np.ndarray | None, dict]:
  if not args.fit:
    return None, {}
  fit = annotations.read_captions(args.fit, args.fit_split)
  _, fit_ids, fit_tokens, fit_skipped = _pairs(bundle, args.fit_features or args.features, fit)
  bag = bag_of_tokens.BagOfTokens(fit_ids, fit_tokens, bundle.visual_vocab.size)
  cheap = bag.scores(ids, tokens)
  truth = np.arange(len(ids))
  return cheap, {"fit_pairs": len(fit_ids), "fit_skipped": len(fit_skipped),
                 "text_to_video": ranking.metrics(cheap, truth),
                 "video_to_text": ranking.metrics(cheap.T, truth)}


def run(args: types.SimpleNamespace) -> dict:
  if args.shortlist and not args.fit:
    raise ValueError("--shortlist ranks by the bag-of-tokens score: give --fit (training "
                     "captions) too")
  segments = annotations.read_captions(args.captions, args.split)
  bundle = bundle_lib.bundle_from_args(args)
  if bundle.visual_vocab is None:
    raise ValueError("no visual vocabulary: pass --visual_vocab (the run's config has no "
                     "init.visual_vocab)")
  segs, ids, tokens, skipped = _pairs(bundle, args.features, segments)
  cheap, baseline = _baseline(args, bundle, ids, tokens)
  start = time.perf_counter()
  result = retrieve(bundle, ids, tokens, shortlist=args.shortlist or None,
                    shortlist_scores=cheap, normalize=args.normalize,
                    batch_size=args.batch_size)
  seconds = time.perf_counter() - start
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  top = np.argsort(-result.t2v_scores, axis=1, kind="stable")[:, :10]
  (out / "rankings.jsonl").write_text("".join(
      json.dumps({"video_id": s.video_id, "start": s.start,
                  "end": None if math.isinf(s.end) else s.end, "sentence": s.sentence,
                  "best": [[segs[j].video_id, segs[j].start] for j in row]}) + "\n"
      for s, row in zip(segs, top)))
  results = {"workdir": str(args.workdir), "captions": str(args.captions), "split": args.split,
             "segments": len(segs), "shortlist": args.shortlist or None,
             "normalize": args.normalize,
             "pairs_scored": result.pairs_scored, "seconds": seconds,
             "text_to_video": result.text_to_video, "video_to_text": result.video_to_text,
             "chance": ranking.chance(len(segs)), "bag_of_tokens": baseline,
             "skipped": _skipped(skipped)}
  bundle_lib.write_results(results, out)
  return results


def _report(results: dict) -> None:
  for way in ("text_to_video", "video_to_text"):
    m = results[way]
    print(f"{way}: R@1 {m['r1']:.3f}  R@5 {m['r5']:.3f}  R@10 {m['r10']:.3f}  median rank "
          f"{m['median_rank']:g} of {m['candidates']}")
  print(f"{results['segments']} segments, {results['pairs_scored']} pairs scored in "
        f"{results['seconds']:.1f} s, {len(results['skipped'])} skipped")


def main(argv: Sequence[str] | None = None) -> int:
  return bundle_lib.run_command(run, parse_args(argv), _report)


if __name__ == "__main__":
  sys.exit(main())
