"""`make demo`: every stage of the pipeline on the generated world, with held-out videos.

Commands:

    make demo
    python -m vbert_jax.demo.main --config=configs/demo.py --workdir=demo_work
    python -m vbert_jax.demo.main --config=configs/demo.py:size=small --workdir=/tmp/demo_small

Expected results. `make demo` (the first two lines are the same run) prints the results table of
held-out figures on the first test world (seed 10), also written to demo_work/results/; on this
project's 2-core AMD EPYC, 2026-12-08, in about 12 minutes: zero-shot verb top-1 0.606 / 0.702
and noun top-1 0.394 / 0.436 (video first / text first; chance 0.1), alignment 0.748 (chance
0.5), captioning BLEU-4 / CIDEr 0.578 / 5.366 (most frequent caption 0.129 / 0.982). `make
worlds` runs all three test worlds; the README has each figure's mean and range over them, and
docs/demo.md how each figure is scored and the measurements behind each setting below.
`size=small` is the end-to-end test's run (tests/test_demo.py, without captioning), on its own
test seed, with the bars docs/demo.md calibrates on the small world's validation seeds.

Arguments (comma-separated): `size=` full (about 2,000 clips at 112 px, the `make demo` run) or
small (a shorter world at 64 px and fewer steps, the end-to-end test). Every other choice is a
key below, overridable with `--config.a.b=value`; the config is locked, so a mistyped key is an
error that names it.

Stages and the keys they read: `world` (the generated corpus and its held-out split), `extract`
(S3D), `vocab` (the hierarchical k-means tree: branching**depth visual tokens), `text`
(SentencePiece), `dataset` (the TFDS records: only training videos go in), `pretrain` (a
configs/pretrain.py config; its input, text and vocabulary keys are filled in by the demo), and
`tasks` / `captioning` (the evaluations on held-out videos). To scale up: more `world.num_videos`,
a deeper `vocab` tree, a larger `pretrain.model` and more `pretrain.total_steps`.
"""

from __future__ import annotations

import pathlib

import ml_collections

from vbert_jax import config_lib

# The pretraining config that this one builds on, read by path beside this file.
pretrain = config_lib.sibling(__file__, "pretrain.py")


def _pretrain(size: str) -> ml_collections.ConfigDict:
  """The pretraining run: the `tiny` model (four layers on the full world) for a few minutes of a
  laptop CPU."""
  c = pretrain.get_config("variant=tiny,runlocal")
  c.unlock()
  # A position table longer than the longest example (40).
  c.model.max_position_embeddings = 64
  # Against memorising the ~230 training sentences word for word, which would make the video
  # unnecessary for the masked words.
  c.model.dropout_rate = 0.2
  c.model.attention_dropout_rate = 0.0
  # Ample for one sentence with its 1-3 clips (max_concat=1), or a 2-6-clip video-only example:
  # about 9 tokens, at most 16. Rows of 64 tokens hold about six and a half of them.
  c.input.max_example_len = 40
  c.max_len = 64
  c.input.pack_examples = 10
  # The narration is a few hundred short sentences: with BERT's 15% a model learns them by
  # heart and never needs the video. Masking 60% often hides both the verb and the noun, which
  # then only the video can tell, as in the zero-shot prompt.
  c.masking.rate = 0.6
  # Slots for 60% of a sentence's words and of a video-only example's 2-6 clips.
  c.masking.max_predictions_text = 8
  c.masking.max_predictions_video = 4
  # BERT's random masking of visual tokens (masking.video_suffix_rate = 0), here: on masked pairs
  # (48 videos), masking the last clips cost zero-shot far more than it gave forecasting.
  # No text-only examples: they teach only the sentences.
  c.regimes.text = 0.0
  # Mostly video-text examples: every task reads text beside video, and LVA is slowest to learn.
  c.regimes.video = 0.5
  c.regimes.pair = 3.0
  # Alignment negatives train LVA only: MLM/MVM on text beside the wrong video would teach the
  # model that the video says nothing about the words (held-out verbs fell to chance).
  # Fewer negatives than BERT's half, as the masked losses skip each one.
  c.lva_negative_rate = 0.3
  c.loss.masked_on_negatives = False
  if size == "full":
    # Four layers, chosen on the validation worlds: they met more targets there than two
    # (docs/demo.md), for about a minute and a half more of pretraining.
    c.model.num_layers = 4
    # Alignment from whole sentences and clips: half the video-text examples are shown
    # unmasked, half of those with another video's clips, and train LVA alone (the rest train
    # MLM/MVM). On masked pairs (the paper's recipe) held-out LVA stayed at chance.
    c.input.unmasked_pair_rate = 0.5
    c.lva_negative_rate = 0.5
    # Negatives from other videos only: another step of the same video often shows its object.
    c.input.negative_other_video = 1.0
    # Unmasked, LVA sits at chance for a long while before it takes off: its loss weighs 3.
    c.loss.gamma = 3.0
    # Forecasting and text-to-video ask for the next clip or every clip given what came
    # before: the last visual token is masked in 30% of examples, with twice the video-only
    # examples, and one visual token per example is predicted (with four, a masked suffix asked
    # for clips far ahead).
    c.masking.video_suffix_rate = 0.3
    c.masking.max_predictions_video = 1
    c.regimes.video = 1.0
  c.input.source = "tfds"
  # One sentence with all its clips: the clearest pairs for a small corpus.
  c.input.max_concat = 1
  # Video-only examples join 1-2 neighbouring segments (2-6 clips): one sentence's 1-3 clips
  # often leave nothing to mask, while whole videos are few enough to be learned by heart.
  c.input.max_concat_video = 2
  # No subsampling: a sentence has only 1-3 clips to lose.
  c.input.max_subsample_rate = 1
  # Many windows of each of the few short videos per epoch.
  c.input.examples_per_video = 32
  # No grain worker processes: a small corpus, read beside the step on a two-core CPU.
  c.input.worker_count = 0
  # About 64 examples a step (10 packed rows) at runlocal's learning rate, with a longer warmup
  # and BERT's weight decay; 3000 steps as unmasked LVA takes off late, 800 to keep the
  # end-to-end test short.
  c.batch_size = 10
  c.total_steps = 3000 if size == "full" else 800
  c.optimizer.learning_rate = 2e-3
  c.optimizer.warmup_steps = 100
  c.optimizer.weight_decay = 0.01
  # No evaluation during training: the tasks stage scores the held-out videos afterwards.
  c.eval.every_steps = 0
  c.eval.num_batches = 0
  c.log_every_steps = 50
  # Every 200 steps, for an interrupted run to resume; only the last is kept: the tasks load it.
  c.checkpoint.every_steps = 200
  c.checkpoint.keep = 1
  c.checkpoint["async"] = False
  # Shared with other runs: a second demo skips compiling.
  c.compilation_cache_dir = "~/.cache/vbert_jax/xla"
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = config_lib.parse_arg(arg, size="full")
  if arg.size not in ("full", "small"):
    raise ValueError(f"configs/demo.py: size={arg.size!r}; expected 'full' or 'small'")
  full = arg.size == "full"
  c = ml_collections.ConfigDict()
  c.size = arg.size
  c.seed = 0

  # World seeds. Every setting below was chosen on worlds of the validation seeds (the full
  # world's 0, and since the world has recipes 0-2; the small world's 0-2); the test seeds
  # never chose anything, and the figures are reported on them: `make demo` runs the first,
  # `python -m vbert_jax.demo.worlds` all three. The end-to-end test (size=small) runs its test
  # seed.
  c.world_seeds = ml_collections.ConfigDict(dict(
      validation=(0, 1, 2), test=(10, 11, 12) if full else (3,)))

  # The generated world (vbert_jax/demo/world): every round(1 / val_fraction)-th video is held out.
  # 176 videos (132 for training, 44 held out): on fewer than 108 training videos alignment
  # learned the training pairs by heart; 44 held out give about 170 step boundaries a world,
  # 500 over the three test worlds, where forecasting at boundaries is judged.
  # 112 px: 64 px did no better on the full world; the small world's 64 px keeps the test short.
  c.world = ml_collections.ConfigDict(dict(
      num_videos=176 if full else 36, seed=c.world_seeds.test[0], size=112 if full else 64,
      val_fraction=0.25 if full else 0.34, min_steps=4, max_steps=7,
      workers=2,
      # Narration faults, as probabilities per step (vbert_jax/demo/world/world.py NarrationConfig).
      # Filler, early, late, wrong and missing words, as real narration has them.
      filler_rate=0.3, early_rate=0.1, late_rate=0.1, wrong_word_rate=0.1, missing_rate=0.1,
      # Honesty check: True pairs every training video with another video's narration.
      shuffle_narration=False))

  # S3D features: random weights unless a converted file is given (vbert_jax.video.convert_s3d).
  # 8 clips a step: on two CPU cores larger batches run slower per clip (their activations
  # outgrow the caches).
  c.extract = ml_collections.ConfigDict(dict(
      s3d_weights="", seed=0, batch_size=8, dtype="float32"))

  # Visual vocabulary: branching**depth tokens. 12^4 (the paper's) would leave most of the
  # 20736 tokens without a single clip of ~1000 training clips; with 6^2 = 36 each token has
  # dozens of clips, narrated in different sentences, so that a model learns what a token
  # shows rather than which sentence went with which clip. normalize="l2" clusters unit-length
  # features: with random S3D weights a feature's length follows the clip's brightness, and
  # raw-feature leaves split on that. nearest: the clips per token that text-to-video scores.
  c.vocab = ml_collections.ConfigDict(dict(
      depth=2, branching=6, iterations=20, tol=1e-4, seed=0, nearest=8, normalize="l2",
      # k-means++ over every training clip (the default samples 128 rows per node, for speed
      # on large corpora): on the small world, a 128-clip sample gave a worse vocabulary.
      seed_sample=100_000))

  # SentencePiece on the training videos' narration: "word" pieces, as many as the narration
  # has (vocab_size=0); the world's words are few, so each verb and noun is one piece.
  c.text = ml_collections.ConfigDict(dict(vocab_size=0, model_type="word", lowercase=True))

  # TFDS records: only training videos are written, by the dataset folder's builder (read by
  # path, as `tfds build data/videobert` reads it; not part of the dataset stage's settings).
  c.tfds_builder = str(pathlib.Path(__file__).resolve().parents[1] / "data" / "videobert")
  # The captioner's config file (beside this one) and its argument; `captioning` tunes it.
  c.captioner_config = str(pathlib.Path(__file__).resolve().parent / "captioner.py") + \
      ":variant=tiny,runlocal"
  # No validation split: the held-out videos never reach the dataset, and the tasks score them.
  c.dataset = ml_collections.ConfigDict(dict(
      validation_fraction=0.0,
      # The narration has one cue per phrase: split at every cue (cues are >= 0.05 s apart)
      # rather than at ASR-like pauses, which would join a step's sentence to the next one's.
      max_gap=0.04, max_words=32, video_segment_tokens=16))

  c.pretrain = _pretrain(arg.size)

  # Evaluations on held-out videos.
  # Both prompt orders, reported side by side; top-5 beside top-1, as the paper reports.
  c.tasks = ml_collections.ConfigDict(dict(
      orders=("video_first", "text_first"), top_k=5, batch_size=64,
      # Zero-shot prompts: an ensemble of phrasings the narration uses (each label's score is
      # the mean over them), and the paper's template, reported beside it. The narration has
      # no punctuation, so the paper's final " ." would be an unknown piece: it is left out.
      # A small model's answer swings with the words around the masks; the mean evens that out.
      templates=("now let me show you how to [MASK] the [MASK]", "now we [MASK] the [MASK]",
                 "let's [MASK] the [MASK]", "then you [MASK] the [MASK]",
                 "time to [MASK] the [MASK]", "we need to [MASK] the [MASK]",
                 "go ahead and [MASK] the [MASK]"),
      paper_template="now let me show you how to [MASK] the [MASK]",
      verbs="", nouns="",  # comma-separated label sets; empty: all of the world's
      frames_videos=4,  # held-out videos drawn beside their predicted verb and noun
      # Text-to-video: 4 clips for each of the 12 commonest steps; forecasting: the next clip.
      t2v_slots=4, t2v_prompts=12, forecast_horizon=1, forecast_beam=8,
      # Forecasting prompts keep the last 3 clips: pretraining's video-only examples are 2-6
      # clips long (pretrain.input.max_concat_video); shorter or longer did no better.
      forecast_context=3,
      # The prompt at step boundaries: "video_only" (the next clip, as everywhere else) or
      # "pair" (the clip after [>]: told that a step ends there).
      boundary_layout="video_only",
      # Every correctly narrated held-out step (0; N: the first N / 2), each with its own and
      # with another step's clips: fewer would leave the figure a sampling error as large as the
      # margin its target is judged by.
      lva_pairs=0,
      # Retrieval ranks by LVA's logits less each candidate's log-sum-exp over the queries
      # (tasks/retrieval.py dual_softmax): on the validation world it raised R@1, R@5 and R@10
      # both ways (docs/demo.md).
      retrieval_normalize="dual_softmax"))

  # Captioning: a small encoder-decoder on (VideoBERT features, caption) of training steps.
  # captions: "annotations" (each step's annotator sentence, for training and as the held-out
  # reference: the paper's YouCook II protocol) or "narration" (what was said; see
  # vbert_jax/demo/captioning.py).
  # Sized for the tiny captioner and short annotations: a minute or so of the CPU; greedy decoding.
  c.captioning = ml_collections.ConfigDict(dict(
      enabled=True, captions="annotations", total_steps=400 if full else 200, batch_size=32,
      learning_rate=1e-3, max_caption_len=16, beam_size=1))

  c.lock()
  return c
