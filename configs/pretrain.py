"""VideoBERT pretraining: the paper's recipe as defaults, shrinkable for a laptop.

Commands:

    python -m vbert_jax.main --config=configs/pretrain.py:variant=large --workdir=gs://b/run \
        --config.input.tfds_name=videobert/bert --config.input.data_dir=gs://b/tfds
    python -m vbert_jax.main --config=configs/pretrain.py:variant=tiny,runlocal --workdir=/tmp/r

Expected results. The first is the paper's run (BERT-large sizes, 0.5M steps of 128 rows, each
packing up to 32 examples, on the dataset that data/videobert builds); no full run of it is
recorded. `python -m vbert_jax.aot`
says where it fits (docs/tpus.md): in bfloat16 on a v5p:2x2x2, at 6.93 GiB a chip, with a
roofline of at least 10.3 ms a step (memory bound; a lower bound, as XLA counts the scanned layer
body once); in float32, not on a v5e:2x2.
The second learns the generated task in 300 steps. On this project's 2-core Intel Xeon (Emerald
Rapids), 2026-12-07: 35 s with an empty compilation cache; the training loss fell from 9.28 at
step 25 to 0.0150 at step 300 (rows 15% padding), and the summary line ended `eval at step 300:
loss=0.01274, ..., lva_accuracy=1, mlm_accuracy=1, mvm_accuracy=1`. tests/test_train.py
asserts held-out accuracy >= 0.9 for each objective and a final loss under a third of the first.

Arguments (comma-separated): `variant=` mu|tiny|small|base|large (model sizes), `runlocal` (a
short run with small sequences and vocabularies on a laptop CPU, on generated tokens). Without
runlocal a run reads the dataset that data/videobert builds (config.input.tfds_name). Any field
can be overridden with `--config.a.b=value`; the config is locked, so a mistyped key is an error
that names it.

Paper (Sun et al. 2019) and its secondary sources give: batch 128, 0.5M steps, Adam at 1e-5 with
linear decay, BERT-large initialisation, 15% masking, 20736 visual tokens, text from BERT's
30522-token WordPiece vocabulary, loss = alpha*MLM + beta*MVM + gamma*LVA with all weights 1.
What the paper leaves open (warmup length, regime mix, max_len, prediction slots) follows BERT.
"""

from __future__ import annotations

import ml_collections

from vbert_jax import config_lib
from vbert_jax import model as model_lib

# Data parallel over `data`, FSDP over `fsdp`, tensor parallel over `tensor`. Order matters:
# `batch` claims (data, fsdp) first, so activations shard by example and parameters by `embed`.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("kv", None),
    ("length", None),
    ("layers", None),
)


def _model(variant: str) -> ml_collections.ConfigDict:
  sizes = model_lib.decode_variant(variant)
  if not sizes:  # "custom": start from the smallest sizes, overridden field by field
    sizes = model_lib.decode_variant("mu")
  return ml_collections.ConfigDict(dict(
      **sizes,
      text_vocab_size=30522,  # BERT's WordPiece vocabulary
      visual_vocab_size=20736,  # 12^4 leaves of the hierarchical k-means
      # BERT's values, so that a BERT checkpoint (init.bert_dir) loads and trains as it was made.
      max_position_embeddings=512,
      type_vocab_size=2,
      dropout_rate=0.1,
      attention_dropout_rate=0.1,
      layer_norm_eps=1e-12,
      initializer_range=0.02,
      dtype="float32",  # compute dtype; "bfloat16" on TPU
      # Parameters and optimiser state stay float32 under bf16 compute.
      param_dtype="float32",
      # No recomputation and one compiled block per layer: the simplest step, while it fits;
      # remat and scan_layers trade compute or compile time for memory on large models.
      remat="none",  # "none", "full", or a jax.checkpoint_policies name
      scan_layers=False,
      # "auto": Pallas splash attention on TPU, cuDNN on GPU where it applies, XLA on CPU (see
      # vbert_jax.attention); the fused kernels run when attention dropout is 0 or in eval.
      attention_impl="auto",
      attention_interpret=False,
      # The text tokenizer's [PAD],[UNK],[CLS],[SEP],[MASK],[>] ids: "bert", or six comma-separated
      # ids ("0,1,2,3,4,5" for a model from vbert_jax.text.train_sentencepiece).
      special_ids="bert",
  ))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = config_lib.parse_arg(arg, variant="large", runlocal=False)
  c = ml_collections.ConfigDict()
  c.variant = arg.variant
  c.seed = 0
  # The dropout keys' PRNG: threefry2x32 gives the same results on any mesh; "rbg" or
  # "unsafe_rbg" draw faster on accelerators, but their masks depend on the sharding.
  c.prng_impl = "threefry2x32"
  c.model = _model(arg.variant)

  # Sequences and masking.
  # Tokens of a row: BERT's longest sequence, and the size of its position table.
  c.max_len = 512
  # BERT's 15% with 80% [MASK] / 10% random / 10% kept; 40 + 40 slots are BERT's 80 at length 512.
  # video_suffix_rate: how often the masked visual tokens are the video's last ones (a
  # forecast) rather than BERT's random choice; 0 is the paper's recipe.
  c.masking = ml_collections.ConfigDict(dict(
      rate=0.15, mask_prob=0.8, random_prob=0.1,
      max_predictions_text=40, max_predictions_video=40, video_suffix_rate=0.0))
  # Share of each training regime (normalised): text-only MLM, video-only MVM, video-text.
  # Equal shares: the paper trains all three and gives no mix.
  c.regimes = ml_collections.ConfigDict(dict(text=1.0, video=1.0, pair=1.0))
  # Balanced, as BERT's next-sentence prediction is.
  c.lva_negative_rate = 0.5  # video-text examples whose video comes from another segment
  # The paper's weights, all 1. masked_on_negatives: whether MLM/MVM also train on LVA negatives
  # (as BERT's MLM does on its next-sentence negatives); False keeps them to text and video that
  # belong together.
  c.loss = ml_collections.ConfigDict(dict(alpha=1.0, beta=1.0, gamma=1.0,
                                          masked_on_negatives=True))

  # Optimisation.
  # The paper's batch and 0.5M steps.
  c.batch_size = 128  # global, over all hosts
  c.total_steps = 500_000
  c.grad_accum_steps = 1  # micro-batches per step (scanned), for batches that do not fit
  # The paper's 1e-5 decaying linearly to 0; warmup, Adam's betas and eps, weight decay and
  # clipping are BERT's.
  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=1e-5, end_learning_rate=0.0, warmup_steps=10_000,
      b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.01, grad_clip_norm=1.0))

  # Devices.
  # Pure data parallelism (-1: every device), the simplest mesh; fsdp or tensor when a chip
  # cannot hold the model and its optimiser state.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.sharding_rules = DEFAULT_RULES

  # Input.
  c.input = ml_collections.ConfigDict(dict(
      # "tfds": the dataset data/videobert builds (tfds_name, data_dir); "synthetic": generated
      # tokens, which `runlocal` and tests use; a run without a dataset stops and says how to
      # build one rather than train on made-up tokens.
      source="tfds",
      # Empty: a run must name its dataset; the splits are the builder's.
      tfds_name="", data_dir="", train_split="train", eval_split="validation",
      # The paper's tricks: 1..max_concat neighbouring sentences, video subsampled 1..rate.
      # Half the LVA negatives from another video; a video holds many sentences: 8 windows each
      # per epoch.
      max_concat=3, max_subsample_rate=5, negative_other_video=0.5, examples_per_video=8,
      # Share of video-text examples shown unmasked, for LVA alone (0: the paper's recipe).
      unmasked_pair_rate=0.0,
      unmasked_word_dropout=0.0,  # chance that each word of such a pair is hidden, as noise
      # LVA negatives that keep the clips and change one word for another of its group
      # (input_pipeline.PipelineConfig.word_swap_rate); swap_words: "verb, verb; noun, noun".
      word_swap_rate=0.0, swap_words="",
      max_concat_video=0,  # segments per video-only example: 1..n (0: as max_concat)
      # Video-only examples that forecast the first clip of their last segment (input_pipeline).
      video_boundary_rate=0.0,
      # Two grain worker processes read and mask beside the step; a deep prefetch absorbs I/O.
      worker_count=2, worker_buffer_size=2, read_threads=0, prefetch_buffer_size=64,
      # Packing: a row holds up to pack_examples examples, each attending only to itself
      # (1: one example per row). VideoBERT's examples are a sentence or a few with their clips,
      # tens of tokens: 32 places let a 512-token row fill with examples as short as 16 tokens,
      # where one per row would leave nine tenths of it padding. batch_size counts rows.
      # max_example_len cuts an example (0: max_len); cuts are counted in the metrics
      # (examples_truncated). length_percentile > 0 sets it at start from that percentile of
      # the train split's lengths; `python -m vbert_jax.lengths` prints them.
      pack_examples=32, max_example_len=0, length_percentile=0.0,
      # Only for source="synthetic": topics and sentence lengths of the generated task.
      synthetic_topics=16, synthetic_min_words=4, synthetic_max_words=12))

  # Evaluation, logging, checkpoints.
  # Evaluations and checkpoints every 1% of the 0.5M steps; 8 batches of 128 per evaluation.
  c.eval = ml_collections.ConfigDict(dict(every_steps=5_000, num_batches=8, batch_size=128))
  c.log_every_steps = 100
  # A read that fails for a reason a retry may clear (I/O, timeouts) is tried restore_retries
  # more times, waiting restore_backoff_s * 2**k before retry k.
  # Three kept: an unreadable newest one still leaves two to fall back on.
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=5_000, keep=3, restore_retries=3,
                                                restore_backoff_s=2.0))
  # Saving overlaps the next steps.
  c.checkpoint["async"] = True
  # Where a fresh run starts: an exported checkpoint or a BERT directory; and optionally the
  # visual embedding rows from a visual vocabulary's centroids, projected to the hidden size.
  c.init = ml_collections.ConfigDict(dict(checkpoint="", bert_dir="", visual_vocab=""))
  # The text tokenizer the data was built with (vbert_jax.text.tokenizers.load_tokenizer): kept in
  # the run's config so that the tasks read text the way the model saw it. With init.bert_dir,
  # "wordpiece" and an empty vocab mean the checkpoint's vocab.txt.
  c.text = ml_collections.ConfigDict(dict(tokenizer="wordpiece", vocab="", lowercase="auto"))
  # A rerun skips compiling the step; no profiler trace unless asked for.
  c.compilation_cache_dir = "~/.cache/vbert_jax/xla"
  c.profile = ml_collections.ConfigDict(dict(start_step=0, num_steps=0))
  c.peak_flops_per_device = 0.0  # 0: from the device-kind table; set it for unknown devices
  # Batches a thread draws, checks and puts on the devices ahead of the step (vbert_jax.prefetch).
  c.prefetch_batches = 2

  if arg.runlocal:
    _shrink(c)
  c.lock()
  return c


def _shrink(c: ml_collections.ConfigDict) -> None:
  """A run that learns the generated task in well under a minute on two CPU cores."""
  # Generated tokens: no dataset to build.
  c.input.source = "synthetic"
  # Small vocabularies and position table: steps of tens of milliseconds on a CPU.
  c.model.text_vocab_size = 512
  c.model.visual_vocab_size = 256
  c.model.max_position_embeddings = 64
  # No dropout: the generated task is noiseless, and dropout would only slow its learning.
  c.model.dropout_rate = 0.0
  c.model.attention_dropout_rate = 0.0
  # Short examples for the generated sentences of 3-6 words (8 tokens on average, at most 15),
  # with 2 prediction slots each, packed up to 4 to a row of 32 tokens.
  c.max_len = 32
  c.input.max_example_len = 16
  c.input.pack_examples = 4
  c.masking.max_predictions_text = 2
  c.masking.max_predictions_video = 2
  # More video-text examples: LVA is the slowest of the three objectives to pick up.
  c.regimes.pair = 2.0
  # To learn in 300 steps: a high learning rate, a 20-step warmup and no weight decay.
  c.batch_size = 8  # rows: about 27 examples
  c.total_steps = 300
  c.optimizer.learning_rate = 2e-3
  c.optimizer.warmup_steps = 20
  c.optimizer.weight_decay = 0.0
  # Three evaluations and checkpoints and twelve log lines: enough to see it learn and resume.
  c.eval.every_steps = 100
  c.eval.num_batches = 4
  c.eval.batch_size = 16
  c.log_every_steps = 25
  c.checkpoint.every_steps = 100
  # A generated task small enough to learn in 300 steps: 4 topics of 3-6 words.
  c.input.synthetic_topics = 4
  c.input.synthetic_min_words = 3
  c.input.synthetic_max_words = 6
