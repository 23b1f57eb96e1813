"""The demo's stages, from generated videos to a pretrained model, each through the library.

world -> features -> corpus (the training videos only) -> vocab -> text -> dataset -> pretrain,
then `evaluate` (vbert_jax.demo.evaluate) on the held-out videos. The ground truth of the world
enters only the narration (written by the generator) and the evaluation: features come from the
pixels, the vocabulary from the training features, the tokenizer and the dataset from the
training narration. Pretraining's swap words (`input.swap_words`) are the world's word lists:
which words are verbs and which nouns, as a tagger would tell them, never which clip shows them.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys
from typing import Any
import re

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from vbert_jax.demo import stages as stages_lib
from vbert_jax import pretrain as pretrain_lib
from vbert_jax.demo.world import recipes
from vbert_jax.demo.world import words
from vbert_jax.demo.world import world
from vbert_jax.tasks import retrieval
from vbert_jax.text import sentences
from vbert_jax.text import tokenizers
from vbert_jax.text import train_sentencepiece
from vbert_jax.video import extract
from vbert_jax.vocab import grid
from vbert_jax.vocab import kmeans
from vbert_jax.vocab import vocabulary

WORLD, FEATURES, CORPUS, VOCAB, TEXT, DATASET, PRETRAIN = (
    "world", "features", "corpus", "vocab", "text", "dataset", "pretrain")
VOCAB_FILE = "visual_vocab.npz"
TEXT_PREFIX = "text"
TFDS_NAME = "videobert/demo"


def _plain(node: Any) -> Any:
  return node.to_dict() if isinstance(node, ml_collections.ConfigDict) else node


def world_config(config: ml_collections.ConfigDict):
  w = config.world
  narration = world.NarrationConfig(
      filler_rate=w.filler_rate, early_rate=w.early_rate, late_rate=w.late_rate,
      wrong_word_rate=w.wrong_word_rate, missing_rate=w.missing_rate)
  return world.WorldConfig(num_videos=w.num_videos, seed=w.seed, width=w.size, height=w.size,
                           steps_per_video=(w.min_steps, w.max_steps),
                           val_fraction=w.val_fraction, narration=narration)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the key when the config asks for what the world cannot give."""
  w = config.world
  problems = []
  seeds = config.get("world_seeds")
  shared = sorted(set(seeds.validation) & set(seeds.test)) if seeds else []
  if shared:
    problems.append(f"world_seeds: {shared} are both validation and test seeds; a test world "
                    f"must be one that no choice looked at")
  if not 1 <= w.min_steps <= w.max_steps:
    problems.append(f"world.min_steps={w.min_steps}, world.max_steps={w.max_steps}: expected "
                    f"1 <= min_steps <= max_steps")
  try:
    wc = world_config(config)
  except ValueError as e:
    problems.append(f"world: {e}")
    wc = None
  if wc is not None:
    splits = [world.split_of(wc, i) for i in range(w.num_videos)]
    if "val" not in splits or "train" not in splits:
      problems.append(f"world.num_videos={w.num_videos} with world.val_fraction="
                      f"{w.val_fraction} gives {splits.count('train')} training and "
                      f"{splits.count('val')} held-out videos; expected at least one of each")
    else:
      # A step lasts at least clips_per_step[0] clips; the tree needs clips to fill its leaves.
      fewest = splits.count("train") * w.min_steps * wc.clips_per_step[0]
      leaves = config.vocab.branching ** config.vocab.depth
      if leaves > fewest:
        problems.append(f"vocab.branching={config.vocab.branching}, vocab.depth="
                        f"{config.vocab.depth}: {leaves} visual tokens but the training videos "
                        f"may have as few as {fewest} clips; expected at most one token per clip")
    shortest = w.min_steps * wc.clips_per_step[0]  # clips of the shortest possible video
    if not 1 <= config.tasks.forecast_horizon < shortest:
      problems.append(f"tasks.forecast_horizon={config.tasks.forecast_horizon}: a video may "
                      f"have as few as {shortest} clips; expected 1 to {shortest - 1}, so that "
                      f"one clip at least comes before the forecast")
    pairs = len(recipes.steps_of_dishes(recipes.usable(*wc.steps_per_video)))
  if wc is not None and config.tasks.t2v_prompts > pairs:
    problems.append(f"tasks.t2v_prompts={config.tasks.t2v_prompts}: the world has only {pairs} "
                    f"(verb, noun) pairs that recipes use")
  if config.tasks.retrieval_normalize not in retrieval.NORMALIZE:
    problems.append(f"tasks.retrieval_normalize={config.tasks.retrieval_normalize!r}: expected "
                    f"one of {retrieval.NORMALIZE}")
  for key, known in (("verbs", words.VERBS), ("nouns", words.NOUNS)):
    asked = [s.strip() for s in config.tasks[key].split(",") if s.strip()]
    unknown = [a for a in asked if a not in known]
    if unknown or len(asked) > len(known):
      problems.append(f"tasks.{key}={config.tasks[key]!r}: {unknown or asked} not among the "
                      f"world's {len(known)} {key} {list(known)}")
  if problems:
    raise ValueError("configs/demo.py: " + "; ".join(problems))


def label_sets(config: ml_collections.ConfigDict) -> tuple[list[str], list[str]]:
  """The verbs and nouns zero-shot chooses among: the config's, else all of the world's."""
  out = []
  for key, known in (("verbs", words.VERBS), ("nouns", words.NOUNS)):
    asked = [s.strip() for s in config.tasks[key].split(",") if s.strip()]
    out.append(asked or list(known))
  return out[0], out[1]


# ---------------------------------------------------------------------------------- stages


def run_world(config: ml_collections.ConfigDict, folder: pathlib.Path) -> dict:
  wc = world_config(config)
  manifest = world.generate_world(wc, folder, progress=True, workers=config.world.workers)
  videos = manifest["videos"]
  val = [v for v in videos if v["split"] == "val"]
  return {"videos": len(videos), "held_out_videos": len(val),
          "steps": sum(v["steps"] for v in videos),
          "held_out_steps": sum(v["steps"] for v in val),
          "clips": int(sum(round(v["duration"] / wc.clip_seconds) for v in videos)),
          "next_step": manifest["next_step"]}


def run_features(config: ml_collections.ConfigDict, world_dir: pathlib.Path,
                 folder: pathlib.Path) -> dict:
  manifest = world.load_manifest(world_dir)
  paths = [world_dir / f"{v['video_id']}.mp4" for v in manifest["videos"]]
  e = config.extract
  summary = extract.extract_features(
      paths, folder, weights=e.s3d_weights or None, image_size=config.world.size,
      batch_size=e.batch_size, dtype=e.dtype, shard_index=0, num_shards=1, seed=e.seed,
      progress=True)
  print(summary.format(), flush=True)
  if summary.skipped:
    raise RuntimeError(f"feature extraction into {folder} skipped videos: {summary.skipped}")
  return {"clips": summary.num_clips, "random_weights": summary.random_weights,
          "videos": len(summary.written) + len(summary.already_done)}


def _derangement(n: int, seed: int) -> np.ndarray:
  """A permutation with no fixed point (n >= 2): every video gets another video's narration."""
  rng = np.random.default_rng([seed, 77])
  while True:
    perm = rng.permutation(n)
    if n < 2 or not (perm == np.arange(n)).any():
      return perm


def run_corpus(config: ml_collections.ConfigDict, world_dir: pathlib.Path,
               features_dir: pathlib.Path, folder: pathlib.Path) -> dict:
  """The manual directory of the dataset builder: the training videos' features and narration.

  Held-out videos are left out here, so nothing downstream (vocabulary, tokenizer, dataset,
  pretraining) can see them. With world.shuffle_narration, narration is dealt to other videos.
  """
  manifest = world.load_manifest(world_dir)
  train = [v["video_id"] for v in manifest["videos"] if v["split"] == "train"]
  (folder / "features").mkdir(parents=True, exist_ok=True)
  (folder / "transcripts").mkdir(parents=True, exist_ok=True)
  narration = list(train)
  if config.world.shuffle_narration:
    narration = [train[i] for i in _derangement(len(train), config.seed)]
  for vid, told in zip(train, narration):
    shutil.copyfile(features_dir / f"{vid}.npz", folder / "features" / f"{vid}.npz")
    shutil.copyfile(world_dir / f"{told}.vtt", folder / "transcripts" / f"{vid}.vtt")
  (folder / "narration.json").write_text(json.dumps(dict(zip(train, narration)), indent=1))
  return {"training_videos": len(train), "shuffled_narration": bool(
      config.world.shuffle_narration)}


def run_vocab(config: ml_collections.ConfigDict, corpus_dir: pathlib.Path,
              folder: pathlib.Path) -> dict:
  v = config.vocab
  km = kmeans.KMeansConfig(depth=v.depth, branching=v.branching, iterations=v.iterations,
                           tol=v.tol, seed=v.seed, seed_sample=v.seed_sample)
  km.validate()
  vocab = vocabulary.VisualVocabulary.fit(corpus_dir / "features", km, nearest_per_leaf=v.nearest,
                                          normalize=v.normalize,
                                          log=lambda s: print(s, flush=True))
  vocab.save(folder / VOCAB_FILE)
  used = int(np.count_nonzero(vocab.leaf_counts))
  tokens = [int(t) for t in vocab.most_frequent(12) if vocab.leaf_counts[t] > 0]
  image = grid.draw_grid(vocab, tokens, clips=6, tile=64, fps=20.0, clip_frames=30)
  grid.save_png(image, folder / "vocabulary_grid.png")
  print(f"visual vocabulary: {vocab.size} tokens, {used} used by {vocab.count} training clips",
        flush=True)
  return {"tokens": vocab.size, "used": used, "clips": int(vocab.count)}


def run_text(config: ml_collections.ConfigDict, corpus_dir: pathlib.Path,
             folder: pathlib.Path) -> dict:
  t = config.text
  split = sentences.SplitConfig(max_gap=config.dataset.max_gap,
                                max_words=config.dataset.max_words, lowercase=t.lowercase)
  texts, skipped = train_sentencepiece.corpus_sentences(
      sorted((corpus_dir / "transcripts").glob("*.vtt")), split)
  if skipped:
    raise ValueError(f"training narration in {corpus_dir / 'transcripts'}: unreadable {skipped}")
  model = train_pieces(texts, str(folder / TEXT_PREFIX), t.vocab_size, t.model_type,
                       config.seed)
  tok = tokenizers.SentencePieceTokenizer(model)
  print(f"SentencePiece: {tok.vocab_size} pieces from {len(texts)} training sentences",
        flush=True)
  return {"pieces": tok.vocab_size, "sentences": len(texts)}


def train_pieces(texts, prefix: str, vocab_size: int, model_type: str, seed: int):
  """SentencePiece with `vocab_size` pieces; 0 asks for as many as the narration allows (every
  word, with model_type "word"), the largest size SentencePiece accepts on this corpus."""
  size = vocab_size or 1_000_000
  try:
    return train_sentencepiece.train(texts, prefix, size, model_type=model_type, seed=seed)
  except tokenizers.TokenizerError as e:
    limit = re.search(r"value <= (\d+)", str(e))
    if vocab_size or limit is None:
      raise ValueError(f"config text.vocab_size={vocab_size}: {e}") from e
    return train_sentencepiece.train(texts, prefix, int(limit.group(1)), model_type=model_type,
                                     seed=seed)


def load_builder(folder: str | pathlib.Path) -> Any:
  """The builder module of a TFDS dataset folder (`data/videobert`), read by path as `tfds build`
  reads it."""
  folder = pathlib.Path(folder).resolve()
  if not (folder / f"{folder.name}_dataset_builder.py").is_file():
    raise FileNotFoundError(f"config tfds_builder={str(folder)!r}: no "
                            f"{folder.name}_dataset_builder.py there; expected a TFDS dataset "
                            f"folder such as the repository's data/videobert")
  with tfds.core.utils.add_sys_path(folder.parent):
    builder_cls = tfds.core.community.builder_cls_from_module(
        f"{folder.name}.{folder.name}_dataset_builder")
  return sys.modules[builder_cls.__module__]


def run_dataset(config: ml_collections.ConfigDict, corpus_dir: pathlib.Path,
                vocab_file: pathlib.Path, text_model: pathlib.Path,
                folder: pathlib.Path) -> dict:
  vb = load_builder(config.tfds_builder)
  d = config.dataset
  vocab = vocabulary.VisualVocabulary.load(vocab_file)
  tok = tokenizers.SentencePieceTokenizer(text_model)
  builder_config = vb.VideoBertConfig(
      name=TFDS_NAME.split("/")[1], source="features", vocabulary=str(vocab_file.resolve()),
      tokenizer="sentencepiece", tokenizer_file=str(text_model.resolve()),
      visual_vocab_size=vocab.size, text_vocab_size=tok.vocab_size,
      validation_fraction=d.validation_fraction, max_gap=d.max_gap, max_words=d.max_words,
      video_segment_tokens=d.video_segment_tokens)
  builder = vb.Builder(config=builder_config, data_dir=str(folder))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(corpus_dir)))
  counts = {name: int(split.num_examples) for name, split in builder.info.splits.items()}
  return {"records": counts}


def pretrain_config(config: ml_collections.ConfigDict, workdir: pathlib.Path
                    ) -> ml_collections.ConfigDict:
  """configs/pretrain.py's run as the demo sets it, pointed at this work folder's files."""
  c = ml_collections.ConfigDict(config.pretrain.to_dict())
  vocab_file = (workdir / VOCAB / VOCAB_FILE).resolve()
  text_model = (workdir / TEXT / f"{TEXT_PREFIX}.model").resolve()
  tok = tokenizers.SentencePieceTokenizer(text_model)
  c.seed = config.seed
  c.model.text_vocab_size = tok.vocab_size
  c.model.visual_vocab_size = vocabulary.VisualVocabulary.load(vocab_file).size
  c.model.special_ids = ",".join(str(i) for i in tok.specials.as_tuple())
  c.text.tokenizer, c.text.vocab, c.text.lowercase = "sentencepiece", str(text_model), "auto"
  c.init.visual_vocab = str(vocab_file)
  c.input.source, c.input.tfds_name = "tfds", TFDS_NAME
  c.input.data_dir = str((workdir / DATASET).resolve())
  if not c.input.swap_words:  # the narration's verbs and nouns, as a tagger would find them
    c.input.swap_words = "; ".join(", ".join(g) for g in (
        words.VERBS, [words.VERB_ING[v] for v in words.VERBS], words.NOUNS))
  c.compilation_cache_dir = config.pretrain.compilation_cache_dir
  c.lock()
  return c


def run_pretrain(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                 folder: pathlib.Path) -> dict:
  c = pretrain_config(config, workdir)
  result = pretrain_lib.train_and_evaluate(c, folder)
  last = result.train_history[-1][1] if result.train_history else {}
  keys = ("loss", "mlm_accuracy", "mvm_accuracy", "lva_accuracy")
  return {"step": int(result.step), **{k: float(last[k]) for k in keys if k in last}}


def build_stages(config: ml_collections.ConfigDict, workdir: pathlib.Path
                 ) -> list[stages_lib.Stage]:
  """The stages before the evaluations, in order."""
  w = lambda name: workdir / name  # noqa: E731
  return [
      stages_lib.Stage(WORLD, lambda f: run_world(config, f),
                       config={**{k: v for k, v in _plain(config.world).items()
                                  if k not in ("workers", "shuffle_narration")},
                               "format": world.FORMAT},
                       resumable=True, description="generating the demo world"),
      stages_lib.Stage(FEATURES, lambda f: run_features(config, w(WORLD), f),
                       config=_plain(config.extract), inputs=(WORLD,), resumable=True,
                       description="S3D features of every clip"),
      stages_lib.Stage(CORPUS, lambda f: run_corpus(config, w(WORLD), w(FEATURES), f),
                       config={"shuffle_narration": config.world.shuffle_narration,
                               "seed": config.seed},
                       inputs=(WORLD, FEATURES), description="training videos only"),
      stages_lib.Stage(VOCAB, lambda f: run_vocab(config, w(CORPUS), f),
                       config=_plain(config.vocab), inputs=(CORPUS,),
                       description="hierarchical k-means on the training clips"),
      stages_lib.Stage(TEXT, lambda f: run_text(config, w(CORPUS), f),
                       config={**_plain(config.text), "seed": config.seed,
                               "max_gap": config.dataset.max_gap,
                               "max_words": config.dataset.max_words},
                       inputs=(CORPUS,), description="SentencePiece on the training narration"),
      stages_lib.Stage(DATASET, lambda f: run_dataset(
          config, w(CORPUS), w(VOCAB) / VOCAB_FILE, w(TEXT) / f"{TEXT_PREFIX}.model", f),
                       config=_plain(config.dataset), inputs=(CORPUS, VOCAB, TEXT),
                       description="TFDS records of the training videos"),
      stages_lib.Stage(PRETRAIN, lambda f: run_pretrain(config, workdir, f),
                       config={**_plain(config.pretrain), "seed": config.seed},
                       inputs=(DATASET,), resumable=True, description="pretraining VideoBERT"),
  ]
