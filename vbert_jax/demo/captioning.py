"""The demo's captioning: VideoBERT features of each step -> a small captioner -> caption metrics.

Captions (`captioning.captions`): "annotations", as the paper trained and scored on YouCook
II's human captions: every step of the training videos with its annotator's sentence
(vbert_jax/demo/world/words.py ANNOTATIONS), and that sentence as a held-out step's reference.
Or "narration": training steps with what the narration says during them (the cue that overlaps
the step longest, read from the transcript by time, fillers and faults included), and as
references the sentences that narrate a held-out step correctly; its 24 phrasings, drawn at
random, leave almost no 4-gram that video could predict, so BLEU-4 is near 0 for every system.

Two baselines are scored the same way: every held-out step captioned with the most frequent
training caption, and the same captioner trained on features shuffled across the training pairs
(so that it can learn only the language).
"""

from __future__ import annotations

import json
import pathlib
from typing import Sequence

import ml_collections
import numpy as np

from vbert_jax.demo import baselines
from vbert_jax.demo import evaluate
from vbert_jax import config_lib
from vbert_jax.captioning import evaluate as cap_eval
from vbert_jax.captioning import features
from vbert_jax.captioning import metrics
from vbert_jax.captioning import training
from vbert_jax.demo import prepare
from vbert_jax.demo.world import words
from vbert_jax.text import sentences
from vbert_jax.text import transcripts

METRIC_KEYS = ("Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
CAPTION_SOURCES = ("annotations", "narration")


def step_id(step: evaluate.Step) -> str:
  return f"{step.video_id}/{step.index}"


def narration_captions(video: evaluate.Video, transcript: pathlib.Path) -> dict[int, str]:
  """Step index -> the cue of `transcript` said during it the longest (by times only)."""
  cues = transcripts.read_vtt(transcript)
  out = {}
  for step in video.steps:
    overlap = [(min(c.end, step.end) - max(c.start, step.start), c.text) for c in cues]
    best = max(overlap, default=(0.0, ""))
    if best[0] > 0:
      out[step.index] = sentences.normalize_text(best[1], lowercase=True)
  return out


def references(video: evaluate.Video) -> dict[int, list[str]]:
  """Step index -> the sentences that narrate it without a fault (scoring only)."""
  out: dict[int, list[str]] = {}
  for cue in video.truth["cues"]:
    if cue["step"] is not None and cue["fault"] == "none":
      out.setdefault(cue["step"], []).append(sentences.normalize_text(cue["text"],
                                                                      lowercase=True))
  return out


def narrated_steps(videos: Sequence[evaluate.Video], transcripts: pathlib.Path) -> tuple:
  """(train tokens, train captions, test tokens, test references) by step id, from narration:
  training steps with what was said during them, held-out steps with their correct sentences."""
  train_tokens, train_caps, test_tokens, test_refs = {}, {}, {}, {}
  for v in videos:
    if v.split == "train":
      # The narration pretraining read (another video's, with world.shuffle_narration).
      said = narration_captions(v, transcripts / f"{v.video_id}.vtt")
      for s in v.steps:
        if s.index in said:
          train_tokens[step_id(s)], train_caps[step_id(s)] = s.tokens, [said[s.index]]
    else:
      refs = references(v)
      for s in v.steps:
        if refs.get(s.index):
          test_tokens[step_id(s)], test_refs[step_id(s)] = s.tokens, refs[s.index]
  return train_tokens, train_caps, test_tokens, test_refs


def annotated_steps(videos: Sequence[evaluate.Video]) -> tuple:
  """As `narrated_steps`, with every step captioned as an annotator would (the world's
  ANNOTATIONS), for training and as the one reference: YouCook II's protocol."""
  out = ({}, {}, {}, {})
  for v in videos:
    tokens, caps = out[:2] if v.split == "train" else out[2:]
    for s in v.steps:
      tokens[step_id(s)], caps[step_id(s)] = s.tokens, [words.annotation(s.verb, s.noun)]
  return out


def caption_text(config: ml_collections.ConfigDict, bundle, captions: Sequence[str],
                 folder: pathlib.Path) -> dict:
  """The captioner's `text` config: VideoBERT's tokenizer for narration; for annotations, a
  word-level SentencePiece model of the training captions, whose words ("jar", "board", ...)
  the narration-trained one never met."""
  if config.captioning.captions != "annotations":
    return {k: bundle.config.text[k] for k in ("tokenizer", "vocab", "lowercase")}
  model = prepare.train_pieces(sorted(set(captions)), str(folder / "captions"), 0, "word",
                                config.seed)
  return {"tokenizer": "sentencepiece", "vocab": str(pathlib.Path(model).resolve()),
          "lowercase": "auto"}


def captioner_config(config: ml_collections.ConfigDict, text: dict, pairs_path: pathlib.Path
                     ) -> ml_collections.ConfigDict:
  k = config.captioning
  c = config_lib.load_config(config.captioner_config)
  c.seed = config.seed
  c.text.tokenizer, c.text.vocab, c.text.lowercase = (text["tokenizer"], text["vocab"],
                                                      text["lowercase"])
  c.input.pairs = str(pairs_path)
  c.max_caption_len = k.max_caption_len
  c.batch_size = k.batch_size
  c.total_steps = k.total_steps
  c.optimizer.learning_rate = k.learning_rate
  c.eval.every_steps = 0
  c.eval.num_batches = 0
  c.log_every_steps = 50
  c.checkpoint.every_steps = k.total_steps
  c.checkpoint.keep = 1
  c.checkpoint["async"] = False
  c.decode.beam_size = k.beam_size
  c.compilation_cache_dir = config.pretrain.compilation_cache_dir
  return c


def _train_and_score(config, text: dict, pairs, pairs_path: pathlib.Path,
                     test_path: pathlib.Path, workdir: pathlib.Path) -> dict:
  pairs.write(pairs_path)
  training.train_captioner(captioner_config(config, text, pairs_path), workdir)
  return cap_eval.evaluate(workdir, test_path, beam_size=config.captioning.beam_size)


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path, folder: pathlib.Path) -> dict:
  if config.captioning.captions not in CAPTION_SOURCES:
    raise ValueError(f"config captioning.captions={config.captioning.captions!r}: expected one "
                     f"of {CAPTION_SOURCES}")
  bundle = evaluate.load_model(workdir)
  videos = evaluate.load_videos(workdir / prepare.WORLD, workdir / prepare.FEATURES,
                                bundle.visual_vocab)
  if config.captioning.captions == "annotations":
    train_tokens, train_caps, test_tokens, test_refs = annotated_steps(videos)
  else:
    train_tokens, train_caps, test_tokens, test_refs = narrated_steps(
        videos, workdir / prepare.CORPUS / "transcripts")
  pairs = features.make_pairs(bundle, train_tokens, train_caps, folder / "train_pairs.npz",
                              batch_size=config.tasks.batch_size)
  features.make_pairs(bundle, test_tokens, test_refs, folder / "test_pairs.npz",
                      batch_size=config.tasks.batch_size)
  text = caption_text(config, bundle, [c for cs in train_caps.values() for c in cs], folder)
  model = _train_and_score(config, text, pairs, folder / "train_pairs.npz",
                           folder / "test_pairs.npz", folder / "captioner")
  perm = np.random.default_rng([config.seed, 11]).permutation(len(pairs))
  shuffled = training.Pairs(pairs.features[perm], pairs.feature_mask[perm], pairs.captions,
                        pairs.video_ids, source="shuffled training pairs")
  control = _train_and_score(config, text, shuffled, folder / "shuffled_pairs.npz",
                             folder / "test_pairs.npz", folder / "shuffled_captioner")
  frequent = baselines.most_frequent([c for cs in train_caps.values() for c in cs])
  frequent_scores = metrics.score_captions({k: frequent for k in test_refs}, test_refs)
  result = {
      "train_pairs": len(pairs), "test_steps": len(test_refs),
      "tokenization": model["tokenization"], "decoding": model["decoding"],
      "model": {k: model["metrics"].get(k) for k in METRIC_KEYS},
      "shuffled_features": {k: control["metrics"].get(k) for k in METRIC_KEYS},
      "most_frequent": {k: frequent_scores.get(k) for k in METRIC_KEYS},
      "most_frequent_caption": frequent,
      "examples": model["captions"][:8]}
  (folder / "captioning.json").write_text(json.dumps(result, indent=1))
  print(f"captioning on {len(test_refs)} held-out steps: BLEU-4 "
        f"{result['model']['Bleu_4']:.4f} CIDEr {result['model']['CIDEr']:.3f} (shuffled "
        f"features {result['shuffled_features']['CIDEr']:.3f}, most frequent caption "
        f"{result['most_frequent']['CIDEr']:.3f})", flush=True)
  return {k: result[k] for k in ("train_pairs", "test_steps", "model", "shuffled_features",
                                 "most_frequent")}
