"""A TFDS array_record dataset of given records, stored as the videobert builder stores them."""

from __future__ import annotations

import pathlib
from typing import Sequence

import tensorflow_datasets as tfds

from vbert_jax import align

NAME = "records_probe"


def write(data_dir, splits: dict[str, Sequence[dict]]) -> pathlib.Path:
  """Builds `NAME` in `data_dir` with one split per entry; returns the data_dir."""

  class RecordsProbe(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """The record features as flat 1-D tensors plus the video id."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      features = {"video_id": tfds.features.Text()}
      features.update({k: tfds.features.Tensor(shape=(None,), dtype=dtype)
                       for k, dtype in align.VideoRecord.ARRAY_FIELDS.items()})
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {name: self._generate_examples(recs) for name, recs in splits.items()}

    def _generate_examples(self, recs):
      for r in recs:
        yield r["video_id"], r

  RecordsProbe(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return pathlib.Path(data_dir)
