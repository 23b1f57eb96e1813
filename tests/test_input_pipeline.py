"""The input pipeline: the paper's example recipe, well-formed batches, determinism and resume.

Structured records make every choice readable from the batch: clip i of record r has visual
token r * 200 + i, and sentence s of record r is the five text ids 1000 + 100 r + 5 s + (0..4),
covering clips 3s, 3s + 1, 3s + 2. With masking off, an example's text tells which sentences
were joined, and its visual tokens which clips (and which record) they came from.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import records_dataset
from vbert_jax import align
from vbert_jax import input_pipeline as ip
from vbert_jax import sequence
from vbert_jax import masking as masking_lib
from vbert_jax import packing
from vbert_jax import synthetic

VOCAB = sequence.JointVocab(30522, 4096)
SENTENCES, SILENT_CLIPS = 12, 20
TEXT0, CLIPS_PER_RECORD = 1000, 200


def structured_record(r: int, sentences: int = SENTENCES) -> dict:
  """`sentences` sentences of 3 clips each, then a silent stretch of SILENT_CLIPS clips."""
  n = 3 * sentences + SILENT_CLIPS
  starts = np.arange(n) * 1.5
  sents = [align.TokenizedSentence([TEXT0 + 100 * r + 5 * s + j for j in range(5)],
                                   4.5 * s + 0.1, 4.5 * s + 4.4) for s in range(sentences)]
  tokens = CLIPS_PER_RECORD * r + np.arange(n)
  return align.align_video(f"video{r}", sents, starts, starts + 1.5, tokens).to_features()


def pipeline_config(**changes) -> ip.PipelineConfig:
  fields = dict(vocab=VOCAB, max_len=96, batch_size=16, regime_weights=(1.0, 1.0, 2.0),
                lva_negative_rate=0.4, negative_other_video=0.5, max_concat=3,
                max_subsample_rate=5, examples_per_video=4, seed=3, debug=True,
                masking=masking_lib.MaskingConfig(max_predictions_text=12,
                                                 max_predictions_video=12))
  fields.update(changes)
  return ip.PipelineConfig(**fields)


def take(pipeline, n: int) -> list[dict]:
  return [next(pipeline) for _ in range(n)]


def rows(batches: list[dict]) -> list[dict]:
  return [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["regime"]))]


@pytest.fixture(scope="module")
def records() -> list[dict]:
  return [structured_record(r) for r in range(12)]


@pytest.fixture(scope="module")
def unmasked_rows(records) -> list[dict]:
  cfg = pipeline_config(masking=masking_lib.MaskingConfig(rate=0.0), batch_size=50)
  return rows(take(ip.make_pipeline(cfg, records), 60))


def _parts(row: dict) -> tuple[np.ndarray, np.ndarray]:
  """(text ids, visual tokens) of an unmasked row, read back from its layout."""
  ids = row["input_ids"][row["input_mask"] == 1][1:-1]  # without [CLS] and [SEP]
  visual = VOCAB.is_visual(ids)
  text = ids[~visual & (ids != VOCAB.specials.video_sep)]
  return text, VOCAB.joint_to_visual(ids[visual])


def test_regime_negative_rate_and_concat_proportions(unmasked_rows):
  n = len(unmasked_rows)
  regime = np.array([r["regime"] for r in unmasked_rows])
  tol = lambda p, m: 4 * np.sqrt(p * (1 - p) / m) + 1e-9
  for code, p in zip((sequence.REGIME_TEXT, sequence.REGIME_VIDEO, sequence.REGIME_PAIR),
                     (0.25, 0.25, 0.5)):
    assert abs((regime == code).mean() - p) < tol(p, n), code
  pair = [r for r in unmasked_rows if r["regime"] == sequence.REGIME_PAIR]
  negative = np.array([r["lva_label"] == 0 for r in pair])
  assert abs(negative.mean() - 0.4) < tol(0.4, len(pair))
  assert all(r["lva_weight"] == 1.0 for r in pair)
  assert all(r["lva_weight"] == 0.0 for r in unmasked_rows if r["regime"] != 2)
  # Where the label is 0, a negative was found, and only there.
  source = np.array([r["debug_negative_source"] for r in pair])
  assert ((source != ip.NEGATIVE_NONE) == negative).all()
  other = (source[negative] == ip.NEGATIVE_OTHER_VIDEO).mean()
  assert abs(other - 0.5) < tol(0.5, negative.sum())
  concat = np.array([r["debug_concat"] for r in unmasked_rows])
  assert (concat == np.array([r["debug_concat_requested"] for r in unmasked_rows])).all()
  for k in (1, 2, 3):
    assert abs((concat == k).mean() - 1 / 3) < tol(1 / 3, n), k
  rates = np.array([r["debug_rate"] for r in unmasked_rows if r["regime"] != 0])
  for rate in range(1, 6):
    assert abs((rates == rate).mean() - 0.2) < tol(0.2, len(rates)), rate


def test_unmasked_pairs_alone_train_alignment(records):
  """With unmasked_pair_rate, LVA sees whole sentences and clips only, and draws its negatives
  there; the masked video-text examples are positives for MLM/MVM. At 0, streams are as before."""
  cfg = pipeline_config(unmasked_pair_rate=0.3, batch_size=50)
  pair = [r for r in rows(take(ip.make_pipeline(cfg, records), 40))
          if r["regime"] == sequence.REGIME_PAIR]
  tol = lambda p, m: 4 * np.sqrt(p * (1 - p) / m)
  lva = np.array([r["lva_weight"] for r in pair])
  assert set(np.unique(lva)) == {0.0, 1.0}
  assert abs(lva.mean() - 0.3) < tol(0.3, len(pair))
  for r in pair:
    masked = r["mlm_weights"].sum() + r["mvm_weights"].sum()
    if r["lva_weight"]:
      assert masked == 0 and VOCAB.specials.mask not in r["input_ids"]
    else:
      assert masked > 0 and r["lva_label"] == 1
      assert r["debug_negative_source"] == ip.NEGATIVE_NONE
  negative = np.array([r["lva_label"] == 0 for r in pair if r["lva_weight"]])
  assert abs(negative.mean() - 0.4) < tol(0.4, len(negative))
  off = [take(ip.make_pipeline(pipeline_config(**extra), records), 3) for extra in ({}, {"unmasked_pair_rate": 0})]
  for a, b in zip(*off):
    assert all(np.array_equal(a[k], b[k]) for k in a)
  with pytest.raises(ValueError, match="unmasked_pair_rate=2"):
    pipeline_config(unmasked_pair_rate=2)


def test_unmasked_pairs_drop_words_as_noise_only(records):
  """unmasked_word_dropout hides each text token of an unmasked pair with its probability, and
  nothing else: the same examples without it differ only there, and nothing is predicted."""
  runs = [rows(take(ip.make_pipeline(pipeline_config(
      unmasked_pair_rate=1.0, unmasked_word_dropout=p, regime_weights=(0.0, 0.0, 1.0),
      batch_size=50), records), 20)) for p in (0.3, 0.0)]
  dropped = total = 0
  for a, b in zip(*runs):
    assert a["lva_weight"] == 1.0 and a["mlm_weights"].sum() == 0 and a["mvm_weights"].sum() == 0
    diff = a["input_ids"] != b["input_ids"]
    assert (a["input_ids"][diff] == VOCAB.specials.mask).all()
    assert VOCAB.is_text(b["input_ids"][diff]).all()
    dropped += diff.sum()
    total += VOCAB.is_text(b["input_ids"]).sum()
  # Binomial: four standard errors of the share over `total` independent draws.
  assert abs(dropped / total - 0.3) < 4 * np.sqrt(0.3 * 0.7 / total), (dropped, total)
  with pytest.raises(ValueError, match="unmasked_word_dropout=1.5"):
    pipeline_config(unmasked_word_dropout=1.5)


# Word 1 of every sentence in one group ("verbs"), word 3 in another ("nouns").
SWAP_GROUPS = tuple(tuple(TEXT0 + 100 * r + 5 * s + j for r in range(12) for s in range(SENTENCES))
                    for j in (1, 3))


def test_word_swap_negatives_keep_the_clips_and_change_one_word_of_its_group(records):
  """word_swap_rate=1: every negative is the sentence's own clips with one grouped word changed
  for another of its group; positives and everything drawn before the choice stay as without."""
  plain = dict(unmasked_pair_rate=1.0, regime_weights=(0.0, 0.0, 1.0), max_concat=1,
               max_subsample_rate=1, lva_negative_rate=0.5, batch_size=50)
  swap, base = (rows(take(ip.make_pipeline(pipeline_config(
      **plain, word_swap_rate=rate, swap_groups=SWAP_GROUPS if rate else ()), records), 8))
      for rate in (1.0, 0.0))
  group_of = {i: g for g, ids in enumerate(SWAP_GROUPS) for i in ids}
  swapped = 0
  for a, b in zip(swap, base):
    assert a["lva_label"] == b["lva_label"]
    text_a, clips_a = _parts(a)
    text_b, clips_b = _parts(b)
    if a["lva_label"] == 1:
      np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
      continue
    assert a["debug_negative_source"] == ip.NEGATIVE_WORD_SWAP
    rec, s = divmod(int(text_b[0]) - TEXT0, 100)
    np.testing.assert_array_equal(clips_a, CLIPS_PER_RECORD * rec + 3 * (s // 5) + np.arange(3))
    changed = np.flatnonzero(text_a != text_b)
    assert len(changed) == 1 and changed[0] in (1, 3), (text_a, text_b)
    assert group_of[int(text_a[changed[0]])] == group_of[int(text_b[changed[0]])]
    swapped += 1
  assert swapped > 100, swapped
  with pytest.raises(ValueError, match="expected one or more groups, each of two or more"):
    pipeline_config(word_swap_rate=0.5, swap_groups=((TEXT0,),))
  with pytest.raises(ValueError, match=r"hold ids \[101, 40000\]: expected text ids that are"):
    pipeline_config(word_swap_rate=0.5, swap_groups=((VOCAB.specials.cls, 40000, TEXT0),))
  with pytest.raises(ValueError, match="a word may be in one group only"):
    pipeline_config(word_swap_rate=0.5, swap_groups=((TEXT0, TEXT0 + 1), (TEXT0 + 1, TEXT0 + 2)))


def test_swap_words_are_read_with_the_configs_tokenizer(tmp_path):
  """input.swap_words becomes text ids of one piece each; the rest are left out, not guessed."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[>]", "cut", "stir",
                              "egg", "tomato", "fish", "##y", "pour"]) + "\n")
  config = ml_collections.ConfigDict(dict(
      text=dict(tokenizer="wordpiece", vocab=str(vocab), lowercase="auto"),
      input=dict(swap_words="cut, stir, fishy; egg tomato, kiwi; pour")))
  assert ip.swap_groups(config) == ((6, 7), (8, 9))


def test_video_only_examples_join_their_own_number_of_segments(records):
  cfg = pipeline_config(masking=masking_lib.MaskingConfig(rate=0.0), batch_size=50, max_concat=1,
                        max_concat_video=5, max_subsample_rate=1)
  got = rows(take(ip.make_pipeline(cfg, records), 20))
  video = [r for r in got if r["regime"] == sequence.REGIME_VIDEO]
  concat = np.array([r["debug_concat"] for r in video])
  tol = 4 * np.sqrt(0.2 * 0.8 / len(video))
  for k in range(1, 6):
    assert abs((concat == k).mean() - 0.2) < tol, k
  for r in video:  # consecutive clips of one record, over that many segments
    _, clips = _parts(r)
    np.testing.assert_array_equal(np.diff(clips), 1)
    assert len(clips) >= r["debug_concat"]
  assert all(r["debug_concat"] == 1 for r in got if r["regime"] != sequence.REGIME_VIDEO)
  with pytest.raises(ValueError, match=r"max_concat_video=-1: expected >= 0"):
    pipeline_config(max_concat_video=-1)


def test_boundary_forecasts_end_at_a_segment_start_and_mask_it_alone(records):
  # Rate 1: a window masks all of its (3 or more) clips, a forecast one clip.
  cfg = pipeline_config(batch_size=50, max_concat=1, max_concat_video=3, max_subsample_rate=1,
                        video_boundary_rate=0.5, masking=masking_lib.MaskingConfig(
                            rate=1.0, max_predictions_text=12, max_predictions_video=12))
  got = [r for r in rows(take(ip.make_pipeline(cfg, records), 12))
         if r["regime"] == sequence.REGIME_VIDEO]
  forecasts = 0
  for r in got:
    ids = r["input_ids"][r["input_mask"] == 1]
    visual = np.flatnonzero(VOCAB.is_visual(ids) | (ids == VOCAB.specials.mask))
    slots = r["mvm_positions"][r["mvm_weights"] > 0]
    # A forecast ends at the first clip of a segment, after whole segments, and asks for that
    # clip alone, hidden by [MASK].
    if len(slots) == 1:
      forecasts += 1
      last = int(r["mvm_ids"][0]) % CLIPS_PER_RECORD
      assert r["debug_concat"] > 1 and slots[0] == visual[-1] and len(visual) >= 4
      assert ids[visual[-1]] == VOCAB.specials.mask
      assert last in records[r["debug_record"]]["segment_clip_begin"]
      assert (ids[visual[:-1]] != VOCAB.specials.mask).all()
      context = VOCAB.joint_to_visual(ids[visual[:-1]]) % CLIPS_PER_RECORD
      np.testing.assert_array_equal(context, np.arange(last - len(context), last))
  multi = sum(r["debug_concat"] > 1 for r in got)
  assert abs(forecasts / multi - 0.5) < 4 * np.sqrt(0.25 / multi), (forecasts, multi)
  # Rate 0 draws exactly what the pipeline without the option draws.
  plain = dict(batch_size=8, max_concat_video=3)
  a = take(ip.make_pipeline(pipeline_config(**plain), records), 3)
  b = take(ip.make_pipeline(pipeline_config(video_boundary_rate=0.0, **plain), records), 3)
  for x, y in zip(a, b):
    assert all(np.array_equal(x[k], y[k]) for k in x)
  with pytest.raises(ValueError, match="video_boundary_rate=1.5"):
    pipeline_config(video_boundary_rate=1.5)


def test_video_only_examples_default_to_max_concat(unmasked_rows):
  concat = {int(r["debug_concat"]) for r in unmasked_rows if r["regime"] == sequence.REGIME_VIDEO}
  assert concat == {1, 2, 3}


def test_examples_follow_the_recipe(unmasked_rows):
  """Text is k neighbouring sentences; video every r-th clip of their clips, or a negative's."""
  seen = {"text": 0, "video": 0, "pos": 0, "same": 0, "other": 0}
  for row in unmasked_rows:
    text, visual = _parts(row)
    regime, k, rate = int(row["regime"]), int(row["debug_concat"]), int(row["debug_rate"])
    if regime != sequence.REGIME_VIDEO:
      heads = text[::5]
      rec, first = divmod(int(heads[0]) - TEXT0, 100)
      expected = np.concatenate([TEXT0 + 100 * rec + np.arange(first, first + 5 * k)])
      np.testing.assert_array_equal(text, expected)
      assert rec == row["debug_record"] and first % 5 == 0
    if regime == sequence.REGIME_TEXT:
      assert not len(visual)
      seen["text"] += 1
      continue
    assert len(visual) and (np.diff(visual) == rate).all()
    vrec, clip = np.divmod(visual, CLIPS_PER_RECORD)
    assert (vrec == vrec[0]).all()
    if regime == sequence.REGIME_VIDEO:
      assert not len(text) and vrec[0] == row["debug_record"]
      seen["video"] += 1
      continue
    s = first // 5
    window = (3 * s, 3 * (s + k))
    if row["lva_label"] == 1:
      assert vrec[0] == rec and (clip >= window[0]).all() and (clip < window[1]).all()
      assert clip[0] - window[0] < rate  # the phase lies within the first `rate` clips
      seen["pos"] += 1
    elif row["debug_negative_source"] == ip.NEGATIVE_SAME_VIDEO:
      assert vrec[0] == rec and ((clip < window[0]) | (clip >= window[1])).all()
      seen["same"] += 1
    else:
      assert vrec[0] != rec and vrec[0] == row["debug_negative_record"]
      seen["other"] += 1
  assert min(seen.values()) > 20, seen


def test_batches_are_well_formed_and_fit_the_training_contract(records):
  from helpers.configs import pretrain  # pylint: disable=g-import-not-at-top
  from vbert_jax import pretrain as pretrain_lib  # pylint: disable=g-import-not-at-top
  config = pretrain.get_config("variant=mu,runlocal")
  with config.unlocked():
    config.max_len, config.input.max_example_len = 160, 40
    config.model.text_vocab_size, config.model.visual_vocab_size = VOCAB.text_size, 4096
  examples = []
  for places in (1, 8):  # one example per row (max_len 40), and rows of up to 8 examples
    with config.unlocked():
      config.input.pack_examples = places
      config.max_len = 40 if places == 1 else 160
    batches = take(ip.make_pipeline(config, records), 6)
    spec = pretrain_lib.pretrain_batch_spec(config, config.batch_size)
    for batch in batches:
      assert set(batch) == set(spec)  # no debug fields unless asked for
      for name, s in spec.items():
        assert batch[name].shape == s.shape and batch[name].dtype == s.dtype, name
      pretrain_lib.check_pretrain_batch(config, VOCAB, batch, "test batch")
    if places == 1:
      examples += rows(batches)
    else:
      examples += [ex for row in rows(batches) for ex in packing.unpack_row(row)]
      assert all(((row["input_mask"] > 0).sum() == sum(
          len(ex["input_ids"]) for ex in packing.unpack_row(row))) for row in rows(batches))
  sp = VOCAB.specials
  for row in examples:
    ids, seg, mask = row["input_ids"].copy(), row["segment_ids"], row["input_mask"]
    n = int(mask.sum())
    assert (mask[:n] == 1).all() and (mask[n:] == 0).all() and (ids[n:] == sp.pad).all()
    assert ids[0] == sp.cls and (ids == sp.cls).sum() == 1
    assert ids[n - 1] == sp.sep and (ids == sp.sep).sum() == 1
    np.testing.assert_array_equal(row["position_ids"], np.arange(len(ids)))
    # Undo the masking: every slot holds the original token of its modality.
    ids[row["mlm_positions"][row["mlm_weights"] > 0]] = row["mlm_ids"][row["mlm_weights"] > 0]
    w = row["mvm_weights"] > 0
    ids[row["mvm_positions"][w]] = row["mvm_ids"][w] + VOCAB.visual_offset
    body, body_seg = ids[1:n - 1], seg[1:n - 1]
    regime = int(row["regime"])
    n_vsep = int((body == sp.video_sep).sum())
    assert n_vsep == (1 if regime == sequence.REGIME_PAIR else 0)
    if regime == sequence.REGIME_PAIR:
      cut = int(np.flatnonzero(body == sp.video_sep)[0])
      text, video = body[:cut], body[cut + 1:]
      assert (seg[:cut + 2] == 0).all() and (seg[cut + 2:n] == 1).all()
    elif regime == sequence.REGIME_TEXT:
      text, video = body, body[:0]
      assert (seg[:n] == 0).all()
    else:
      text, video = body[:0], body
      assert seg[0] == 0 and (seg[1:n] == 1).all()
    assert (seg[n:] == 0).all() and len(body_seg) == n - 2
    assert VOCAB.is_text(text).all() and VOCAB.is_visual(video).all()
    m = config.masking
    assert row["mlm_weights"].sum() == masking_lib.num_to_predict(len(text),
                                                                 m.max_predictions_text)
    assert row["mvm_weights"].sum() == masking_lib.num_to_predict(len(video),
                                                                 m.max_predictions_video)


def test_same_seed_same_batches_other_seed_other_batches(records):
  cfg = pipeline_config(read_threads=2)
  a, b = (take(ip.make_pipeline(cfg, records), 4)
          for _ in range(2))
  c = take(ip.make_pipeline(pipeline_config(seed=4), records), 4)
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)
  assert any(not np.array_equal(x["input_ids"], z["input_ids"]) for x, z in zip(a, c))


@pytest.mark.slow
def test_resume_after_k_batches_with_workers_and_prefetch(records):
  """Across an epoch boundary; worker processes give the batches of the in-process pipeline."""
  small = records[:5]  # 5 records x 4 examples = 20 per epoch; 8 batches of 8 = 3.2 epochs
  cfg = pipeline_config(batch_size=8, worker_count=2, worker_buffer_size=2, read_threads=2,
                        prefetch_buffer_size=4)
  reference = take(ip.make_pipeline(pipeline_config(batch_size=8), small), 8)
  first = ip.make_pipeline(cfg, small)
  try:
    head = take(first, 3)
    state = json.loads(json.dumps(first.get_state()))  # as the checkpoint stores it
    take(first, 2)  # the saved state must not follow the iterator on
  finally:
    first.close()
  resumed = ip.make_pipeline(cfg, small)
  try:
    resumed.set_state(state)
    tail = take(resumed, 5)
  finally:
    resumed.close()
  assert set(np.concatenate([b["debug_epoch"] for b in reference]).tolist()) == {0, 1, 2, 3}
  for got, want in zip(head + tail, reference):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


class _Reads(list):
  """A record list that remembers which records were read."""

  def __init__(self, items):
    super().__init__(items)
    self.read = set()

  def __getitem__(self, key):
    self.read.add(key)
    return super().__getitem__(key)


def test_processes_make_their_rows_of_one_global_stream(records):
  """Rows spread over the batch as a topology-ordered mesh spreads a host's devices: each
  process makes exactly those rows of the global batches, reading only the records they need."""
  cfg = pipeline_config(batch_size=8)
  whole = take(ip.make_pipeline(cfg, records), 3)
  parts = {0: [0, 1, 6, 7], 1: [2, 3, 4, 5]}
  for rows_of_process in parts.values():
    source = _Reads(records)
    got = take(ip.make_pipeline(cfg, source, rows=rows_of_process), 3)
    needed = set()
    for g, w in zip(got, whole):
      for key in w:
        np.testing.assert_array_equal(g[key], w[key][rows_of_process], err_msg=key)
      needed |= set(g["debug_record"].tolist()) | set(g["debug_negative_record"].tolist())
    assert source.read == needed - {-1}
    assert len(source.read) < len(records)


def test_a_stream_saved_by_two_processes_resumes_on_one(records):
  """The saved state is a position in the global stream: the same for every process, and a run
  on another number of hosts continues from it."""
  cfg = pipeline_config(batch_size=8)
  whole = take(ip.make_pipeline(cfg, records), 5)
  halves = [ip.make_pipeline(cfg, records, rows=r) for r in ([0, 1, 6, 7], [2, 3, 4, 5])]
  for half in halves:
    take(half, 2)
  states = [json.loads(json.dumps(h.get_state())) for h in halves]
  assert states[0] == states[1] and states[0]["position"] == 16
  resumed = ip.make_pipeline(cfg, records)
  resumed.set_state(states[0])
  for got, want in zip(take(resumed, 3), whole[2:]):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  # A global batch of 4 divides the position: the same stream, in smaller batches.
  smaller = ip.make_pipeline(pipeline_config(batch_size=4), records)
  smaller.set_state(states[0])
  np.testing.assert_array_equal(next(smaller)["debug_index"], whole[2]["debug_index"][:4])
  with pytest.raises(ValueError, match="saved position 16 does not start a global batch of 12"):
    ip.make_pipeline(pipeline_config(batch_size=12), records).set_state(states[0])


def test_records_without_asr_give_their_regimes_to_other_records():
  recs = [structured_record(r, sentences=0 if r % 2 else SENTENCES) for r in range(8)]
  cfg = pipeline_config(batch_size=64)
  batch = next(ip.make_pipeline(cfg, recs))
  np.testing.assert_array_equal(batch["regime"], batch["debug_regime_requested"])
  text_or_pair = batch["regime"] != sequence.REGIME_VIDEO
  assert (batch["debug_record"][text_or_pair] % 2 == 0).all()


def test_bad_input_is_named(records):
  bad = dict(records[1], clip_tokens=records[1]["clip_tokens"] + 5000)
  pipeline = ip.make_pipeline(pipeline_config(regime_weights=(0, 1, 0), examples_per_video=1,
                                              shuffle=False, batch_size=2),
                              [records[0], bad])
  with pytest.raises(ValueError, match=r"input record 1 \(video 'video1'\): clip_tokens"):
    next(pipeline)
  good = ip.make_pipeline(pipeline_config(), records)
  with pytest.raises(ValueError, match="another stream"):
    good.set_state(dict(good.get_state(), seed=99))
  with pytest.raises(ValueError, match=r"rows \[0, 16\]\.\.\. of a global batch of 16"):
    ip.make_pipeline(pipeline_config(), records, rows=[0, 16])
  with pytest.raises(ValueError, match="the source holds no records"):
    ip.make_pipeline(pipeline_config(), [])
  with pytest.raises(ValueError, match="lva_negative_rate=1.5"):
    pipeline_config(lva_negative_rate=1.5)


@pytest.mark.slow
def test_reads_a_tfds_array_record_dataset_by_name(records, tmp_path):
  """The production path: `create_iterator` opens the built dataset from config.input."""
  from helpers.configs import pretrain  # pylint: disable=g-import-not-at-top

  records_dataset.write(tmp_path, {"train": records[:8], "validation": records[8:]})
  config = pretrain.get_config("variant=mu,runlocal")
  with config.unlocked():
    config.input.source, config.input.tfds_name = "tfds", records_dataset.NAME
    config.input.data_dir = str(tmp_path)
    config.model.text_vocab_size, config.model.visual_vocab_size = VOCAB.text_size, 4096
  got = ip.create_iterator(config, "eval", batch_size=4)
  assert len(got.maker.source) == 4
  # The same records from a list, in the order the data source holds them.
  source = got.maker.source
  listed = [{k: v.decode() if isinstance(v, bytes) else v for k, v in source[i].items()}
            for i in range(len(source))]
  assert sorted(r["video_id"] for r in listed) == sorted(f"video{r}" for r in range(8, 12))
  want = ip.make_pipeline(config, listed, split="eval", batch_size=4)
  for _ in range(3):
    a, b = next(got), next(want)
    for key in b:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  with config.unlocked():
    config.input.tfds_name = "no_such_dataset"
  with pytest.raises(ValueError, match="tfds_name='no_such_dataset'"):
    ip.create_iterator(config, "train", batch_size=4)


def test_every_example_with_tokens_of_a_modality_predicts_some_of_them():
  """The default recipe on the pipeline's own record generator: clip runs are short, and 15% of
  a few visual tokens rounds to none; BERT's floor of one masked token per modality keeps MVM
  training on every example that has visual tokens (and MLM on every one with text)."""
  from helpers.configs import pretrain  # pylint: disable=g-import-not-at-top
  config = pretrain.get_config("variant=base")
  vocab = sequence.JointVocab(config.model.text_vocab_size, config.model.visual_vocab_size)
  recs = synthetic.random_records(16, vocab, seed=2)
  batch = next(ip.make_pipeline(config, recs, batch_size=256))
  for name, is_kind in (("mvm", vocab.is_visual), ("mlm", vocab.is_text)):
    # An example whose masked tokens were all of that kind still has its weights.
    has = np.array([is_kind(row[mask == 1]).any() or weights.sum() > 0 for row, mask, weights
                    in zip(batch["input_ids"], batch["input_mask"], batch[f"{name}_weights"])])
    predicted = batch[f"{name}_weights"].sum(axis=1)
    assert has.sum() > 50, name
    assert (predicted[has] >= 1).all(), (name, np.flatnonzero(has & (predicted < 1)))
    # The 15% rate still sets the count on long runs.
    tokens = np.array([is_kind(r[m == 1]).sum() for r, m in zip(batch["input_ids"],
                                                                 batch["input_mask"])])
    long = has & (tokens >= 20)
    assert (predicted[long] >= 2).all(), name
