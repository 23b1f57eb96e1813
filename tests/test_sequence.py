"""The joint vocabulary and the three layouts."""

import numpy as np
import pytest

from vbert_jax import sequence as seq


def test_joint_vocab_offsets_and_padding():
  v = seq.JointVocab(text_size=30522, visual_size=20736)
  assert v.text_padded == 30592  # next multiple of 128
  assert v.visual_offset == 30592
  assert v.visual_padded == 20736  # 162 * 128 already
  assert v.total_size == 30592 + 20736
  np.testing.assert_array_equal(v.visual_to_joint([0, 20735]), [30592, 30592 + 20735])
  np.testing.assert_array_equal(v.joint_to_visual([30592, 30600]), [0, 8])
  assert v.text_logit_mask().sum() == 30522 and v.text_logit_mask().shape == (30592,)
  odd = seq.JointVocab(text_size=300, visual_size=100)
  assert (odd.text_padded, odd.visual_padded, odd.total_size) == (384, 128, 512)
  assert odd.visual_logit_mask().sum() == 100


def test_kinds_of_ids():
  v = seq.JointVocab(text_size=300, visual_size=100)
  ids = np.array([0, 1, 100, 101, 102, 103, 104, 299, 300, 383, 384, 483, 484])
  np.testing.assert_array_equal(v.is_special(ids), [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(v.is_text(ids), [0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(v.is_visual(ids), [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0])
  with pytest.raises(ValueError, match=r"batch: token ids \[300, 383, 484\] are outside the joint vocabulary"):
    v.check_ids(ids, where="batch")
  with pytest.raises(ValueError, match=r"\[0, 100\)"):
    v.visual_to_joint([100])


def test_specials_from_vocab():
  bert = {"[PAD]": 0, "[unused0]": 1, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
  assert seq.SpecialIds.from_vocab(bert) == seq.SpecialIds.bert()
  sp = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4, "[>]": 5}
  assert seq.SpecialIds.from_vocab(sp).video_sep == 5
  with pytest.raises(ValueError, match=r"my.model: missing special tokens \['\[MASK\]'\]"):
    seq.SpecialIds.from_vocab({k: i for k, i in sp.items() if k != "[MASK]"}, source="my.model")
  with pytest.raises(ValueError, match="outside the text vocabulary"):
    seq.JointVocab(text_size=50, visual_size=10)  # BERT specials need at least 104 ids


def test_pair_layout():
  v = seq.JointVocab(text_size=300, visual_size=100)
  p = seq.Layout(v, max_len=12).pair([200, 201, 202], [5, 6, 7, 8])
  o = v.visual_offset
  np.testing.assert_array_equal(p.input_ids, [101, 200, 201, 202, 1, o + 5, o + 6, o + 7, o + 8,
                                              102, 0, 0])
  np.testing.assert_array_equal(p.segment_ids, [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(p.input_mask, [1] * 10 + [0] * 2)
  np.testing.assert_array_equal(p.position_ids, np.arange(12))
  assert p.regime == seq.REGIME_PAIR


def test_truncation_in_proportion():
  assert seq.split_budget(3, 4, 10) == (3, 4)
  assert seq.split_budget(30, 10, 20) == (15, 5)
  assert seq.split_budget(2, 100, 20) == (1, 19)  # proportion, but each modality keeps one
  assert seq.split_budget(0, 100, 20) == (0, 20)
  v = seq.JointVocab(text_size=300, visual_size=100)
  p = seq.Layout(v, max_len=23).pair(list(range(200, 230)), list(range(10)))
  n_text = int(v.is_text(p.input_ids).sum())
  n_video = int(v.is_visual(p.input_ids).sum())
  assert (n_text, n_video) == (15, 5)
  assert p.input_mask.sum() == 23 and p.input_ids[-1] == 102


def test_text_only_and_video_only():
  v = seq.JointVocab(text_size=300, visual_size=100)
  lay = seq.Layout(v, max_len=6)
  t = lay.text_only([200, 201, 202, 203, 204, 205])
  np.testing.assert_array_equal(t.input_ids, [101, 200, 201, 202, 203, 102])
  assert t.regime == seq.REGIME_TEXT and t.segment_ids.sum() == 0
  vid = lay.video_only([3, 4])
  o = v.visual_offset
  np.testing.assert_array_equal(vid.input_ids, [101, o + 3, o + 4, 102, 0, 0])
  np.testing.assert_array_equal(vid.segment_ids, [0, 1, 1, 1, 0, 0])
  assert vid.regime == seq.REGIME_VIDEO


def test_video_next_marks_the_boundary_and_keeps_the_recent_past():
  v = seq.JointVocab(text_size=300, visual_size=100)
  o = v.visual_offset
  p = seq.Layout(v, max_len=8).video_next([3, 4], [5])
  np.testing.assert_array_equal(p.input_ids, [101, o + 3, o + 4, 1, o + 5, 102, 0, 0])
  np.testing.assert_array_equal(p.segment_ids, [0, 1, 1, 0, 1, 1, 0, 0])
  assert p.regime == seq.REGIME_VIDEO and not p.truncated
  cut = seq.Layout(v, max_len=6).video_next([3, 4, 5, 6], [7])
  np.testing.assert_array_equal(cut.input_ids, [101, o + 5, o + 6, 1, o + 7, 102])
  assert cut.truncated
  with pytest.raises(ValueError, match="3 clips after the boundary leave no room"):
    seq.Layout(v, max_len=6).video_next([3], [4, 5, 6])


def test_video_then_text_and_stack():
  v = seq.JointVocab(text_size=300, visual_size=100)
  lay = seq.Layout(v, max_len=8)
  p = lay.video_then_text([3], [200, 103, 201])
  o = v.visual_offset
  np.testing.assert_array_equal(p.input_ids, [101, o + 3, 1, 200, 103, 201, 102, 0])
  np.testing.assert_array_equal(p.segment_ids, [0, 1, 0, 0, 0, 0, 0, 0])
  batch = seq.stack([p, lay.text_only([200])])
  assert batch["input_ids"].shape == (2, 8) and batch["regime"].tolist() == [2, 0]


def test_special_ids_from_config_values():
  assert seq.SpecialIds.parse("bert") == seq.SpecialIds.bert() == seq.SpecialIds.parse(None)
  sp = seq.SpecialIds.parse("0,1,2,3,4,5")
  assert (sp.pad, sp.cls, sp.mask, sp.video_sep) == (0, 2, 4, 5)
  assert seq.SpecialIds.parse(sp.as_tuple()) == sp
  with pytest.raises(ValueError, match=r"special_ids='0,1,2': expected 'bert' or 6 ids"):
    seq.SpecialIds.parse("0,1,2")
