"""videobert: one record per video (sentences, clip tokens, clip times, id) from a user's corpus.

Inputs come through the manual directory (see MANUAL_DOWNLOAD_INSTRUCTIONS) and the builder
config (`VideoBertConfig`): the vocabulary and tokenizer files, the sizes the model expects, the
validation fraction, and the sentence and alignment settings. Files pair by video id
(`vbert_jax.records`); each video becomes a `vbert_jax.align.VideoRecord`, stored as flat 1-D
tensors. Videos go to train or validation by a hash of their id. The default file format is
array_record, so that `builder.as_data_source(split)` gives random access.

Without a Beam runner the records are made in this process; with one (`tfds build ...
--beam_pipeline_options=runner=DirectRunner`, or a distributed runner) `_generate_examples`
returns a Beam transform and the workers make the records. Feature extraction from videos runs
first, in the launching process, into a resumable cache under the download directory; for a
corpus too large for one machine, extract with `python -m vbert_jax.video.extract` on every host
and build from the features folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pathlib
import sys

from etils import epath
import tensorflow_datasets as tfds

from vbert_jax import align
from vbert_jax import records
from vbert_jax.text import sentences as sentences_lib
from vbert_jax.video import features_io

_SOURCES = ("auto", "videos", "features")
_SUMMARY_KEY = "build_summary"
_BEAM_NAMESPACE = "videobert"
# Beam counters beside records_<split>, named as the BuildSummary fields they add to.
_BROKEN_CUES, _NO_SENTENCES = "broken_cues", "no_sentences"


@dataclasses.dataclass(eq=False)
class VideoBertConfig(tfds.core.BuilderConfig):
  """Where the vocabulary and tokenizer are, what the model expects, and how to split.

  Relative paths are read from the manual directory. Sizes of 0 are not checked.
  """
  source: str = "auto"  # "videos", "features", or "auto": features/ when present
  vocabulary: str = "visual_vocab.npz"
  tokenizer: str = "sentencepiece"  # or "wordpiece"
  tokenizer_file: str = "text.model"  # SentencePiece .model or BERT vocab.txt
  lowercase: str = "auto"
  visual_vocab_size: int = 0  # the model's visual_vocab_size; must equal the vocabulary's
  text_vocab_size: int = 0  # the model's text_vocab_size; must equal the tokenizer's
  validation_fraction: float = 0.1
  split_salt: str = ""
  # Sentence splitting and alignment (vbert_jax.text.sentences, vbert_jax.align).
  max_gap: float = 1.0
  max_words: int = 32
  # A model from vbert_jax.text.train_punctuation for unpunctuated transcripts; empty: they are
  # cut at pauses of max_gap seconds.
  punctuation_model: str = ""
  video_segment_tokens: int = align.VIDEO_SEGMENT_TOKENS
  # Feature extraction, used when the source is videos.
  s3d_weights: str = ""  # from vbert_jax.video.convert_s3d; empty: random init (a warning)
  s3d_seed: int = 0
  image_size: int = 224
  extract_batch_size: int = 32
  feature_dtype: str = "float16"

  def check(self) -> None:
    if self.source not in _SOURCES:
      raise ValueError(f"videobert config {self.name}: source={self.source!r}; expected one of "
                       f"{list(_SOURCES)}")
    if not 0.0 <= self.validation_fraction <= 1.0:
      raise ValueError(f"videobert config {self.name}: validation_fraction="
                       f"{self.validation_fraction}; expected a fraction in [0, 1]")

  def resolve(self, manual_dir: epath.Path, path: str) -> str:
    p = pathlib.Path(path).expanduser()
    return str(p if p.is_absolute() else manual_dir / p)

  def settings(self, manual_dir: epath.Path) -> records.RecordSettings:
    return records.RecordSettings(
        vocabulary=self.resolve(manual_dir, self.vocabulary), tokenizer=self.tokenizer,
        tokenizer_file=self.resolve(manual_dir, self.tokenizer_file), lowercase=self.lowercase,
        split_config=sentences_lib.SplitConfig(
            max_gap=self.max_gap, max_words=self.max_words,
            punctuation_model=(self.resolve(manual_dir, self.punctuation_model)
                               if self.punctuation_model else "")),
        align_config=align.AlignConfig(video_segment_tokens=self.video_segment_tokens))


def _feature_spec() -> tfds.features.FeaturesDict:
  spec = {"video_id": tfds.features.Text()}
  spec.update({k: tfds.features.Tensor(shape=(None,), dtype=dtype)
               for k, dtype in align.VideoRecord.ARRAY_FIELDS.items()})
  return tfds.features.FeaturesDict(spec)


def _uses_features(config: VideoBertConfig, manual_dir: epath.Path) -> bool:
  return config.source == "features" or (config.source == "auto" and
                                         (manual_dir / "features").is_dir())


def _example(record: align.VideoRecord) -> dict:
  return record.to_features()


class Builder(tfds.core.GeneratorBasedBuilder):
  """VideoBERT records from the user's videos (or features) and transcripts."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "One record per video: sentences, clip tokens and times, id."}
  BUILDER_CONFIGS = [
      VideoBertConfig(name="default", description="SentencePiece text, features or videos."),
      VideoBertConfig(name="bert", tokenizer="wordpiece", tokenizer_file="vocab.txt",
                      description="WordPiece text from a BERT vocab.txt."),
  ]
  DEFAULT_CONFIG_NAME = "default"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Put the corpus in the manual directory (--manual_dir) as:

    transcripts/   <video id>.vtt | .srt | .json   (ASR or captions; `<id>.en.vtt` also pairs)
    videos/        <video id>.mp4 | .webm | .mkv | .avi | .mov   -- or, instead --
    features/      <video id>.npz   (python -m vbert_jax.video.extract --out=features/ ...)
    visual_vocab.npz   the visual vocabulary (python -m vbert_jax.vocab.fit)
    text.model         a SentencePiece model (python -m vbert_jax.text.train_sentencepiece),
                       or vocab.txt with the `bert` config

  Other file names or absolute paths go in the config, e.g.
  --config='{"name": "mine", "vocabulary": "/data/vocab.npz", "tokenizer_file": "/data/sp.model",
             "visual_vocab_size": 20736, "text_vocab_size": 32000}'
  A video without a transcript becomes a video-only record; a transcript without a video is
  listed in the build summary (stored in the dataset's metadata as "build_summary").
  """

  def __init__(self, *args, file_format=None, **kwargs):
    # array_record gives readers random access (builder.as_data_source); a caller may override.
    super().__init__(*args, file_format=file_format or "array_record", **kwargs)
    self._use_beam = False
    self._summary = records.BuildSummary()
    self._vocab_size = self._text_size = 0

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=_feature_spec(), supervised_keys=None,
        metadata=tfds.core.MetadataDict(),
        homepage="https://arxiv.org/abs/1904.01766")

  def _download_and_prepare(self, dl_manager, download_config):
    # Whether the user asked for Beam decides how _generate_examples makes records.
    self._use_beam = bool(download_config.beam_runner or download_config.beam_options)
    self._summary = records.BuildSummary()
    super()._download_and_prepare(dl_manager, download_config)
    self._finish_summary()

  # --------------------------------------------------------------------------- splits

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    config: VideoBertConfig = self.builder_config
    config.check()
    manual_dir = epath.Path(dl_manager.manual_dir)  # a local folder or a bucket
    settings = config.settings(manual_dir)
    pairing = self._pair(config, manual_dir)
    self._check(config, settings, pairing)  # before any record is written
    if not _uses_features(config, manual_dir):
      pairing = self._extract(config, pairing, pathlib.Path(dl_manager.download_dir))
      self._check(config, settings, pairing)  # now also the extracted features' width
    self._summary.transcripts_without_video = list(pairing.transcripts_without_video)
    self._summary.videos_without_transcript = pairing.videos_without_transcript
    self._summary.skipped.extend(pairing.skipped)
    by_split: dict[str, list[records.VideoInputs]] = {records.TRAIN: [], records.VALIDATION: []}
    for item in pairing.items:
      by_split[records.split_of(item.video_id, config.validation_fraction,
                                config.split_salt)].append(item)
    self.info.metadata["visual_vocab_size"] = self._vocab_size
    self.info.metadata["text_vocab_size"] = self._text_size
    # TFDS cannot write a split without examples: such a split is left out of the dataset.
    return {name: self._generate_examples(items, settings, name)
            for name, items in by_split.items() if items}

  def _pair(self, config: VideoBertConfig, manual_dir: epath.Path) -> records.Pairing:
    transcripts = manual_dir / "transcripts"
    features, videos = manual_dir / "features", manual_dir / "videos"
    use_features = _uses_features(config, manual_dir)
    media = features if use_features else videos
    for folder in (transcripts, media):
      if not folder.is_dir():
        raise FileNotFoundError(
            f"videobert: {folder} is missing (source={config.source!r}); expected this layout:\n"
            f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    if use_features:
      return records.pair_inputs(transcripts, features_dir=media)
    return records.pair_inputs(transcripts, videos_dir=media)

  def _check(self, config: VideoBertConfig, settings: records.RecordSettings,
             pairing: records.Pairing) -> None:
    for what, path in (("vocabulary", settings.vocabulary),
                       ("tokenizer_file", settings.tokenizer_file)):
      if not pathlib.Path(path).is_file():
        raise FileNotFoundError(f"videobert config {config.name}: {what} {path} does not exist")
    maker = settings.maker()
    vocab, tokenizer = maker.vocabulary, maker.tokenizer
    first = next((item.features for item in pairing.items if item.features), None)
    records.check_inputs(vocab, settings.vocabulary, tokenizer,
                         visual_vocab_size=config.visual_vocab_size,
                         text_vocab_size=config.text_vocab_size, feature_file=first)
    self._vocab_size, self._text_size = vocab.size, tokenizer.vocab_size

  def _extract(self, config: VideoBertConfig, pairing: records.Pairing,
               download_dir: pathlib.Path) -> records.Pairing:
    """S3D features of every video into a cache keyed by the extraction settings."""
    from vbert_jax.video import extract  # pylint: disable=g-import-not-at-top
    key = json.dumps([config.s3d_weights, config.s3d_seed, config.image_size,
                      config.feature_dtype])
    cache = download_dir / "videobert_features" / hashlib.sha256(key.encode()).hexdigest()[:16]
    result = extract.extract_features(
        [item.video for item in pairing.items], cache, weights=config.s3d_weights or None,
        image_size=config.image_size, batch_size=config.extract_batch_size,
        dtype=config.feature_dtype, shard_index=0, num_shards=1, seed=config.s3d_seed,
        progress=True)
    self._summary.skipped.extend(result.skipped)
    items = [dataclasses.replace(item, features=str(features_io.feature_path(cache,
                                                                             item.video_id)))
             for item in pairing.items]
    items = [item for item in items if pathlib.Path(item.features).is_file()]
    return dataclasses.replace(pairing, items=items)

  # --------------------------------------------------------------------------- examples

  def _generate_examples(self, items, settings: records.RecordSettings, split: str):
    if self._use_beam:
      return _beam_transform(items, settings, split)
    return self._local_examples(items, settings, split)

  def _local_examples(self, items, settings: records.RecordSettings, split: str):
    for record in records.make_records(items, settings.maker(), self._summary, split):
      yield record.video_id, _example(record)

  def _process_pipeline_result(self, pipeline_result) -> None:
    # Workers report what the launching process cannot see through Beam metrics: counts per
    # split, of empty transcripts and broken cues, and the names of skipped videos with reasons.
    beam = tfds.core.lazy_imports.apache_beam
    query = pipeline_result.metrics().query(
        beam.metrics.MetricsFilter().with_namespace(_BEAM_NAMESPACE))
    for counter in query["counters"]:
      name, value = counter.key.metric.name, int(counter.committed or counter.attempted or 0)
      if name in (_BROKEN_CUES, _NO_SENTENCES):
        setattr(self._summary, name, getattr(self._summary, name) + value)
        continue
      split = name[len("records_"):]
      self._summary.records[split] = self._summary.records.get(split, 0) + value
    for names in query["string_sets"]:
      values = sorted(names.committed or names.attempted or ())
      self._summary.skipped.extend(tuple(v.split("\t", 1)) for v in values)

  def _finish_summary(self) -> None:
    self.info.metadata[_SUMMARY_KEY] = self._summary.as_dict()
    print(self._summary.format(), file=sys.stderr, flush=True)
    self._summary.log_names()
    logging.info("%s", self._summary.format())


def _beam_transform(items, settings: records.RecordSettings, split: str):
  beam = tfds.core.lazy_imports.apache_beam
  made = beam.metrics.Metrics.counter(_BEAM_NAMESPACE, f"records_{split}")
  skipped = beam.metrics.Metrics.string_set(_BEAM_NAMESPACE, "skipped")
  no_sentences = beam.metrics.Metrics.counter(_BEAM_NAMESPACE, _NO_SENTENCES)
  broken_cues = beam.metrics.Metrics.counter(_BEAM_NAMESPACE, _BROKEN_CUES)

  def make(item: records.VideoInputs):
    broken: list[str] = []
    record, reason = records.try_make(settings.maker(), item, broken)
    broken_cues.inc(len(broken))
    if record is None:
      skipped.add(f"{item.video_id}\t{reason}")
      logging.warning("videobert: skipped %s: %s", item.video_id, reason)
      return
    if item.transcript is not None and record.num_sentences == 0:
      records.log_no_sentences(item)
      no_sentences.inc()
    made.inc()
    yield record.video_id, _example(record)

  return (f"Create_{split}" >> beam.Create(list(items), reshuffle=False)
          | f"Records_{split}" >> beam.FlatMap(make))
