"""The evaluations of the demo, on held-out videos only, each beside its chance and baseline.

- zero-shot verb and noun of every held-out step (vbert_jax.tasks.zero_shot), in both prompt
  orders, beside 1-NN on the raw S3D features of the training steps;
- alignment (LVA): held-out narration with its own step's visual tokens or with those of a step
  that shares neither verb nor noun, half and half;
- retrieval (vbert_jax.tasks.retrieval): each correctly narrated held-out step's sentence
  against every such step's clips, both ways, scored by LVA, beside the bag-of-tokens naive
  Bayes (vbert_jax.tasks.bag_of_tokens) fitted on the training steps;
- text-to-video (vbert_jax.tasks.text_to_video): for prompts naming a verb and a noun, the ground
  truth of the training clips nearest the generated tokens, beside how often that verb or noun
  occurs among training clips;
- forecasting: the next clip's token from the tokens so far, beside a bigram baseline fitted on
  the training videos' tokens (vbert_jax.tasks.forecast draws the strip), and at step
  boundaries by token and by meaning (vbert_jax.demo.boundaries).

The ground truth is read here, for scoring, and nowhere upstream of the model.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
from typing import Any, Callable, Sequence

import ml_collections
import numpy as np
from PIL import Image, ImageDraw

from vbert_jax.demo import baselines
from vbert_jax.demo import boundaries
from vbert_jax.demo import prepare
from vbert_jax import sequence
from vbert_jax.demo.world import words
from vbert_jax.demo.world import world
from vbert_jax.tasks import bag_of_tokens
from vbert_jax.tasks import bundle as bundle_lib
from vbert_jax.tasks import forecast as fc
from vbert_jax.tasks import prompts
from vbert_jax.tasks import ranking
from vbert_jax.tasks import retrieval as ret
from vbert_jax.tasks import strips
from vbert_jax.tasks import text_to_video as t2v
from vbert_jax.tasks import zero_shot as zs
from vbert_jax.text import sentences
from vbert_jax.video import features_io
from vbert_jax.vocab import grid

TASKS, CAPTIONING, RESULTS = "tasks", "captioning", "results"
STEP_TEMPLATE = "now let me show you how to {verb} the {noun}"


@dataclasses.dataclass
class Step:
  """One step of a video with the visual tokens and mean S3D feature of its clips."""
  video_id: str
  index: int
  verb: str
  noun: str
  start: float
  end: float
  tokens: np.ndarray  # int32 [clips]
  feature: np.ndarray  # float32 [1024], mean over the clips
  clips: np.ndarray  # clip indices within the video


@dataclasses.dataclass
class Video:
  video_id: str
  split: str
  source: str  # the .mp4
  tokens: np.ndarray
  verbs: np.ndarray  # per clip, index into VERBS
  nouns: np.ndarray
  truth: dict
  steps: list[Step]


def load_videos(world_dir: pathlib.Path, features_dir: pathlib.Path, vocab) -> list[Video]:
  """Every video of the world with its clips' tokens (from the training vocabulary) and truth."""
  out = []
  for entry in world.load_manifest(world_dir)["videos"]:
    vid = entry["video_id"]
    truth = world.load_truth(world_dir / f"{vid}.json")
    vf = features_io.load_features(features_io.feature_path(features_dir, vid))
    feats = np.asarray(vf.features, np.float32)
    tokens = vocab.assign(feats).astype(np.int32)
    verbs, nouns = world.clip_labels(truth["steps"], vf.starts, vf.ends)
    middles = (np.asarray(vf.starts) + np.asarray(vf.ends)) / 2
    steps = []
    for i, s in enumerate(truth["steps"]):
      inside = np.flatnonzero((middles >= s["start"]) & (middles < s["end"]))
      if len(inside):
        steps.append(Step(vid, i, s["verb"], s["noun"], s["start"], s["end"], tokens[inside],
                          feats[inside].mean(0), inside))
    out.append(Video(vid, entry["split"], str(world_dir / truth["video"]), tokens, verbs, nouns,
                     truth, steps))
  return out


def _held_out(videos: Sequence[Video]) -> list[Video]:
  return [v for v in videos if v.split == "val"]


def _training(videos: Sequence[Video]) -> list[Video]:
  return [v for v in videos if v.split == "train"]


# ---------------------------------------------------------------------------------- zero-shot


def zero_shot(config: ml_collections.ConfigDict, bundle, videos: Sequence[Video]
              ) -> tuple[dict, list[Step], dict[str, list]]:
  """Accuracies (both prompt orders, and 1-NN on raw features), the steps, the predictions."""
  verbs, nouns = prepare.label_sets(config)
  # A word the training narration never says is [UNK] to the tokenizer: no model can name it.
  unk = bundle.tokenizer.specials.unk
  unheard = [w for w in verbs + nouns if unk in bundle.tokenizer.encode(w)]
  if unheard:
    print(f"zero-shot: leaving out {unheard}: never said in the training narration")
  verbs = [w for w in verbs if w not in unheard]
  nouns = [w for w in nouns if w not in unheard]
  steps = [s for v in _held_out(videos) for s in v.steps if s.verb in verbs and s.noun in nouns]
  if not steps:
    raise ValueError("no held-out steps carry the configured verbs and nouns (tasks.verbs, "
                     "tasks.nouns)")
  k = config.tasks.top_k
  out: dict[str, Any] = {"steps": len(steps), "unheard_labels": unheard,
                         "verb_chance": 1 / len(verbs),
                         "noun_chance": 1 / len(nouns), "top_k": k, "orders": {},
                         "paper_template": {}}
  # What a guess blind to the video can reach: always the most frequent held-out label.
  for key in ("verb", "noun"):
    counts = collections.Counter(getattr(s, key) for s in steps)
    out[f"{key}_majority"] = max(counts.values()) / len(steps)
  predictions = {}
  for order in config.tasks.orders:
    preds = zs.classify(bundle, [s.tokens for s in steps], verbs=verbs, nouns=nouns, order=order,
                        top_k=k, batch_size=config.tasks.batch_size,
                        template=list(config.tasks.templates))
    predictions[order] = preds
    out["orders"][order] = zs.accuracies(preds, steps, (1, k))
    single = zs.classify(bundle, [s.tokens for s in steps], verbs=verbs, nouns=nouns,
                         order=order, top_k=k, batch_size=config.tasks.batch_size,
                         template=config.tasks.paper_template)
    out["paper_template"][order] = zs.accuracies(single, steps, (1, k))
  # The text's own guess, without the video (the paper's language prior): the same answer for
  # every step, so what a model learns from the video shows as the distance above it.
  prior = zs.classify(bundle, [s.tokens for s in steps], verbs=verbs, nouns=nouns, top_k=k,
                      batch_size=config.tasks.batch_size, template=list(config.tasks.templates),
                      scoring="prior")
  out["language_prior"] = zs.accuracies(prior, steps, (1, k))
  train_steps = [s for v in _training(videos) for s in v.steps]
  feats = np.stack([s.feature for s in train_steps])
  test = np.stack([s.feature for s in steps])
  for key in ("verb", "noun"):
    out[f"nn_{key}_top1"] = baselines.nearest_neighbour_accuracy(
        feats, np.array([getattr(s, key) for s in train_steps]), test,
        np.array([getattr(s, key) for s in steps]))
  return out, steps, predictions


def frames_figure(steps: Sequence[Step], predictions, videos: Sequence[Video], path,
                  num_videos: int, tile: int = 80) -> pathlib.Path:
  """For a few held-out videos: one row each, a frame per step with truth and prediction."""
  sources = {v.video_id: v.source for v in videos}
  chosen = list(dict.fromkeys(s.video_id for s in steps))[:num_videos]
  rows = [[(s, p) for s, p in zip(steps, predictions) if s.video_id == vid] for vid in chosen]
  wanted: dict[str, set[int]] = {}
  for row in rows:
    for s, _ in row:
      wanted.setdefault(sources[s.video_id], set()).add(int(s.clips[len(s.clips) // 2]))
  frames = grid.middle_frames(wanted, fps=20.0, clip_frames=30, tile=tile)
  cell_w, cell_h, label_w = tile + 70, tile + 34, 90
  width = label_w + max(len(r) for r in rows) * cell_w
  image = Image.new("RGB", (width, len(rows) * cell_h), (255, 255, 255))
  draw = ImageDraw.Draw(image)
  for r, row in enumerate(rows):
    y = r * cell_h
    draw.text((4, y + 4), chosen[r], fill=(0, 0, 0))
    draw.text((4, y + tile + 2), "truth:", fill=(0, 0, 0))
    draw.text((4, y + tile + 16), "predicted:", fill=(0, 0, 0))
    for c, (s, p) in enumerate(row):
      x = label_w + c * cell_w
      frame = frames.get((sources[s.video_id], int(s.clips[len(s.clips) // 2])))
      if frame is not None:
        image.paste(Image.fromarray(np.asarray(frame)), (x, y))
      ok = (p.verbs[0] == s.verb, p.nouns[0] == s.noun)
      draw.text((x, y + tile + 2), f"{s.verb} {s.noun}", fill=(0, 0, 0))
      draw.text((x, y + tile + 16), f"{p.verbs[0]} {p.nouns[0]}",
                fill=(0, 130, 0) if all(ok) else (200, 120, 0) if any(ok) else (200, 0, 0))
  return grid.save_png(image, path)


# --------------------------------------------------------------------------------------- LVA


def _narration(video: Video) -> dict[int, str]:
  """Step index -> the sentence said for it, where it was said correctly and on time."""
  out = {}
  for cue in video.truth["cues"]:
    if cue["step"] is not None and cue["fault"] == "none" and cue["step"] not in out:
      out[cue["step"]] = sentences.normalize_text(cue["text"])
  return out


def alignment(config: ml_collections.ConfigDict, bundle, videos: Sequence[Video]) -> dict:
  """LVA accuracy on held-out (sentence, clips) pairs: each correctly narrated step once with
  its own clips and once with those of a step that shares neither verb nor noun (the first
  `tasks.lva_pairs // 2` steps; 0: every one). Beside it, the same pairs decided by
  `_token_ceiling`."""
  rng = np.random.default_rng([config.seed, 5])
  steps = [s for v in _held_out(videos) for s in v.steps]
  said = [(s, text) for v, told in ((v, _narration(v)) for v in _held_out(videos))
          for s in v.steps if (text := told.get(s.index))]
  if config.tasks.lva_pairs:
    said = said[:config.tasks.lva_pairs // 2]
  packed, labels, pairs = [], [], []
  for step, text in said:
    ids = bundle.tokenizer.encode(text)
    others = [o for o in steps if o.verb != step.verb and o.noun != step.noun]
    for label, shown in ((1, step), (0, others[int(rng.integers(len(others)))])):
      packed.append(bundle.layout.pair(ids, shown.tokens))
      labels.append(label)
      pairs.append((step, shown))
  logits = []
  for i in range(0, len(packed), config.tasks.batch_size):
    out = bundle.apply(sequence.stack(packed[i:i + config.tasks.batch_size]))
    logits.append(np.asarray(out["lva_logits"]).reshape(-1))
  logits, labels = np.concatenate(logits), np.array(labels)
  ceiling = _token_ceiling(_training(videos), pairs, bundle.visual_vocab.size)
  pos, neg = logits[labels == 1], logits[labels == 0]
  return {"pairs": len(labels), "positives": int(labels.sum()),
          "accuracy": float(np.mean((logits > 0) == (labels == 1))), "chance": 0.5,
          "token_ceiling": float(np.mean((ceiling > 0) == (labels == 1))),
          # Whether a threshold other than 0 would do better: the errors of each kind, and the
          # area under the ROC curve (the chance that a positive outscores a negative).
          "false_positive": float(np.mean(neg > 0)), "false_negative": float(np.mean(pos <= 0)),
          "auc": roc_auc(pos, neg)}


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
  """P(a positive's score > a negative's), ties counting half (the Mann-Whitney statistic)."""
  diff = np.asarray(positive, np.float64)[:, None] - np.asarray(negative, np.float64)[None, :]
  return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def _token_ceiling(train: Sequence[Video], pairs: Sequence[tuple[Step, Step]],
                   vocab_size: int) -> np.ndarray:
  """Per pair, log P(verb | tokens) P(noun | tokens) / P(verb) P(noun) by naive Bayes fitted
  on the training steps' true labels: how well the visual tokens alone tell a step's words."""
  train_steps = [s for v in train for s in v.steps]
  scores = np.zeros(len(pairs))
  for key in ("verb", "noun"):
    names = sorted({getattr(s, key) for s in train_steps} | {getattr(s, key) for s, _ in pairs})
    nb = baselines.TokenNaiveBayes([s.tokens for s in train_steps],
                                   [names.index(getattr(s, key)) for s in train_steps],
                                   len(names), vocab_size)
    scores += [nb.log_ratio(shown.tokens, names.index(getattr(said, key)))
               for said, shown in pairs]
  return scores


# -------------------------------------------------------------------------------- retrieval


def _said_steps(videos: Sequence[Video], tokenizer
                ) -> tuple[list[list[int]], list[np.ndarray], list[tuple[str, str]]]:
  """(caption ids, visual tokens, (verb, noun)) of every correctly narrated step."""
  narrated = [(v, _narration(v)) for v in videos]
  said = [(text, s) for v, told in narrated for s in v.steps if (text := told.get(s.index))]
  return ([tokenizer.encode(text) for text, _ in said], [s.tokens for _, s in said],
          [(s.verb, s.noun) for _, s in said])


def _both_ways(t2v: np.ndarray, v2t: np.ndarray | None = None) -> dict:
  truth = np.arange(len(t2v))
  return {"text_to_video": ranking.metrics(t2v, truth),
          "video_to_text": ranking.metrics(t2v.T if v2t is None else v2t, truth)}


def retrieval(bundle, videos: Sequence[Video], normalize: str) -> dict:
  """Text-to-video and video-to-text over the correctly narrated held-out steps, every pair
  through LVA, beside the bag-of-tokens naive Bayes fitted on the training steps' pairs (chosen
  by the truth, as the evaluation's are: cleaner than the narration the model learned from),
  and the ceiling of a scorer that knows each step's true verb and noun and nothing else
  (steps that share both tie). The model's rows rank by `normalize` (ret.NORMALIZE); the
  figures of every choice are kept beside them."""
  ids, tokens, labels = _said_steps(_held_out(videos), bundle.tokenizer)
  fit_ids, fit_tokens, _ = _said_steps(_training(videos), bundle.tokenizer)
  cheap = bag_of_tokens.BagOfTokens(fit_ids, fit_tokens, bundle.visual_vocab.size).scores(
      ids, tokens)
  logits = ret.score_matrix(bundle, ids, tokens)
  by_normalize = {"none": _both_ways(logits),
                  "dual_softmax": _both_ways(*ret.dual_softmax(logits))}
  same = np.array([[a == b for b in labels] for a in labels], np.float64)
  return {"pairs": len(ids), "fit_pairs": len(fit_ids), "chance": ranking.chance(len(ids)),
          "normalize": normalize, "model": by_normalize[normalize],
          "by_normalize": by_normalize, "bag_of_tokens": _both_ways(cheap),
          "label_oracle": _both_ways(same)}


# ------------------------------------------------------------------------------ text-to-video


def _clip_truth(videos: Sequence[Video]) -> dict[tuple[str, int], tuple[int, int]]:
  return {(v.video_id, int(c)): (int(v.verbs[c]), int(v.nouns[c]))
          for v in videos for c in range(len(v.tokens))}


def text_to_video(config: ml_collections.ConfigDict, bundle, videos: Sequence[Video],
                  folder: pathlib.Path) -> dict:
  train = _training(videos)
  truth = _clip_truth(train)
  verb_prior = baselines.label_prior(np.concatenate([v.verbs for v in train]), len(words.VERBS))
  noun_prior = baselines.label_prior(np.concatenate([v.nouns for v in train]), len(words.NOUNS))
  # The most frequent (verb, noun) steps of the training videos, as a user would ask for them.
  counts: dict[tuple[str, str], int] = {}
  for v in train:
    for s in v.steps:
      counts[(s.verb, s.noun)] = counts.get((s.verb, s.noun), 0) + 1
  pairs = sorted(counts, key=lambda p: (-counts[p], p))[:config.tasks.t2v_prompts]
  hits_v, hits_n, chance_v, chance_n, rows, labels = [], [], [], [], [], []
  for verb, noun in pairs:
    text = STEP_TEMPLATE.format(verb=verb, noun=noun)
    tokens = t2v.generate(bundle, text, config.tasks.t2v_slots, mode="argmax")[0]
    rows.append(tokens.tolist())
    labels.append(f"{verb} {noun}")
    for token in tokens:
      for ref in bundle.visual_vocab.nearest_clips(int(token), config.vocab.nearest):
        v, n = truth[(ref.video_id, ref.clip)]
        hits_v.append(v == words.VERBS.index(verb))
        hits_n.append(n == words.NOUNS.index(noun))
        chance_v.append(verb_prior[words.VERBS.index(verb)])
        chance_n.append(noun_prior[words.NOUNS.index(noun)])
  strips.token_strip(bundle.visual_vocab, rows[:6], folder / "text_to_video.png",
                     labels=labels[:6], tile=64)
  return {"prompts": len(pairs), "clips": len(hits_v), "verb_match": float(np.mean(hits_v)),
          "noun_match": float(np.mean(hits_n)), "verb_chance": float(np.mean(chance_v)),
          "noun_chance": float(np.mean(chance_n)),
          "examples": [{"prompt": lab, "tokens": row} for lab, row in zip(labels, rows)]}


# -------------------------------------------------------------------------------- forecasting


def forecasting(config: ml_collections.ConfigDict, bundle, videos: Sequence[Video],
                folder: pathlib.Path) -> dict:
  """Top-1 accuracy of the next clip's token given every earlier clip of a held-out video."""
  bigram = baselines.Bigram([v.tokens for v in _training(videos)])
  held = _held_out(videos)
  base_acc, n = bigram.accuracy([v.tokens for v in held])
  predicted = _next_tokens(config, bundle, held)
  accuracy = float(np.mean([token == int(v.tokens[t]) for v in held
                            for t, token in predicted[v.video_id].items()]))
  layout = config.tasks.boundary_layout
  if layout != "video_only":  # asked after [>]: told that a step ends here
    predicted = _next_tokens(config, bundle, held, layout, boundaries.positions)
  at_boundaries = boundaries.evaluate(held, _training(videos),
                                      lambda v, t: predicted[v.video_id][t],
                                      bundle.visual_vocab, config.vocab.nearest)
  # The strip: a held-out video's last clips and the top futures after them.
  video = max(held, key=lambda v: len(v.tokens))
  cut = len(video.tokens) - config.tasks.forecast_horizon
  futures = fc.forecast(bundle, video.tokens[:cut], config.tasks.forecast_horizon, top=3,
                        beam_size=config.tasks.forecast_beam,
                        context=config.tasks.forecast_context)
  shown = video.tokens[max(0, cut - 4):cut].tolist()
  rows = [shown + video.tokens[cut:].tolist()] + [shown + f.tolist() for f, _ in futures]
  strips.token_strip(bundle.visual_vocab, rows, folder / "forecast.png",
                     labels=["truth"] + [f"future {i + 1}" for i in range(len(futures))], tile=64)
  return {"predictions": sum(map(len, predicted.values())), "accuracy": accuracy,
          "bigram_accuracy": base_acc, "bigram_predictions": n, "video": video.video_id,
          "boundaries": at_boundaries}


def _next_tokens(config: ml_collections.ConfigDict, bundle, held: Sequence[Video],
                 layout: str = "video_only",
                 where: Callable[[Video], Sequence[int]] = lambda v: range(1, len(v.tokens))
                 ) -> dict[str, dict[int, int]]:
  """The model's most likely next token after the first t clips of each held-out video, for
  every t of `where(video)` (default: every t from 1), asked in the forecasting prompt's
  `layout`: {video_id: {t: token}}."""
  keys, packed, slots = [], [], []
  for v in held:
    for t in where(v):
      p, pos = prompts.forecast(bundle.layout, v.tokens[:t], 1, layout,
                                config.tasks.forecast_context)
      keys.append((v.video_id, t))
      packed.append(p)
      slots.append(pos)
  preds = []
  size = config.tasks.batch_size
  for i in range(0, len(packed), size):
    lp = t2v.visual_log_probs(bundle, packed[i:i + size], np.stack(slots[i:i + size]))
    preds.append(np.asarray(lp)[:, 0].argmax(-1))
  out: dict[str, dict[int, int]] = {v.video_id: {} for v in held}
  for (vid, t), token in zip(keys, np.concatenate(preds) if preds else []):
    out[vid][t] = int(token)
  return out


# ------------------------------------------------------------------------------------- stages


def load_model(workdir: pathlib.Path):
  return bundle_lib.load_bundle(workdir / prepare.PRETRAIN)


def run_tasks(config: ml_collections.ConfigDict, workdir: pathlib.Path,
              folder: pathlib.Path) -> dict:
  bundle = load_model(workdir)
  videos = load_videos(workdir / prepare.WORLD, workdir / prepare.FEATURES,
                       bundle.visual_vocab)
  zs, steps, preds = zero_shot(config, bundle, videos)
  print(f"zero-shot on {zs['steps']} held-out steps: " + ", ".join(
      f"{o}: verb {r['verb_top1']:.3f} noun {r['noun_top1']:.3f}"
      for o, r in zs["orders"].items()), flush=True)
  first = config.tasks.orders[0]
  frames_figure(steps, preds[first], videos, folder / "zero_shot_frames.png",
                config.tasks.frames_videos)
  lva = alignment(config, bundle, videos)
  print(f"alignment on {lva['pairs']} held-out pairs: {lva['accuracy']:.3f}", flush=True)
  rt = retrieval(bundle, videos, config.tasks.retrieval_normalize)
  print(f"retrieval over {rt['pairs']} held-out steps: R@1 text-to-video "
        f"{rt['model']['text_to_video']['r1']:.3f}, video-to-text "
        f"{rt['model']['video_to_text']['r1']:.3f} (bag of tokens "
        f"{rt['bag_of_tokens']['text_to_video']['r1']:.3f}, "
        f"{rt['bag_of_tokens']['video_to_text']['r1']:.3f})", flush=True)
  t2v = text_to_video(config, bundle, videos, folder)
  print(f"text-to-video: verb match {t2v['verb_match']:.3f}, noun match {t2v['noun_match']:.3f}",
        flush=True)
  fc = forecasting(config, bundle, videos, folder)
  print(f"forecasting: {fc['accuracy']:.3f} (bigram {fc['bigram_accuracy']:.3f})", flush=True)
  at = fc["boundaries"]
  print(f"forecasting at {at['boundaries']} step boundaries: token {at['model_token']:.3f} "
        f"(bigram {at['bigram_token']:.3f}), next verb {at['model_verb']:.3f} (bigram "
        f"{at['bigram_verb']:.3f}, step n-gram {at['step_ngram_verb']:.3f})", flush=True)
  result = {"zero_shot": zs, "alignment": lva, "retrieval": rt, "text_to_video": t2v,
            "forecast": fc}
  (folder / "tasks.json").write_text(json.dumps(result, indent=1))
  return result
