"""Loading a trained run for the tasks (config, checkpoint, tokenizer, visual vocabulary), the
checks that stop a mismatched one, and the prompt layouts built through sequence.py."""

import json
import shutil

import jax
import numpy as np
import pytest

from helpers import trained_model as tm
from vbert_jax import checkpoints
from vbert_jax import model as model_lib
from vbert_jax import sequence
from vbert_jax import pretrain as pretrain_lib
from vbert_jax.tasks import bundle as bundle_lib
from vbert_jax.tasks import forecast
from vbert_jax.tasks import prompts
from vbert_jax.tasks import zero_shot
from vbert_jax.text import tokenizers


@pytest.fixture(scope="session")
def world(tmp_path_factory):
  return tm.trained_bundle(tmp_path_factory)


def _batch(bundle, n=3):
  rng = np.random.default_rng(1)
  tpl = prompts.Template.parse("now let me show you how to [MASK] the [MASK] .", bundle.tokenizer)
  built = [prompts.build(bundle.layout, rng.integers(0, 64, 7), tpl, "video_first")
           for _ in range(n)]
  return sequence.stack([p for p, _ in built]), np.stack([pos for _, pos in built])


def test_load_bundle_reads_the_run_and_matches_the_checkpoint(world):
  b = world.bundle
  assert b.config.max_len == tm.MAX_LEN and b.layout.max_len == tm.MAX_LEN
  assert b.model_config.text_vocab_size == len(tm.WORDS)
  assert b.tokenizer.specials == b.vocab.specials
  assert b.visual_vocab is None  # the run's config names none
  batch, positions = _batch(b)
  out = b.apply(batch, mlm_positions=positions, mvm_positions=positions)
  # Reference: the model applied to the checkpoint's parameters as Orbax stored them.
  step, state = checkpoints.read_checkpoint(world.workdir)
  assert step == tm.STEPS
  # The tasks read the parameters alone, and get the same values.
  params_step, params = bundle_lib.read_run_params(world.workdir)
  assert params_step == tm.STEPS and "opt_state" not in params
  jax.tree.map(np.testing.assert_array_equal, params, state["params"])
  ref = model_lib.VideoBERT(b.model_config).apply(
      {"params": state["params"]}, *(batch[k] for k in ("input_ids", "segment_ids",
                                                        "position_ids", "input_mask")),
      positions, positions, deterministic=True)
  for key in ("hidden", "mlm_logits", "mvm_logits", "lva_logits"):
    np.testing.assert_allclose(out[key], np.asarray(ref[key]), rtol=1e-5, atol=1e-5)
  lp = b.log_probs(batch, mlm_positions=positions)["mlm_log_probs"]
  np.testing.assert_allclose(lp, jax.nn.log_softmax(out["mlm_logits"], -1), atol=1e-5)
  assert out["mlm_logits"].shape == (3, 2, b.vocab.text_padded)


def test_scanned_config_gets_scanned_params_with_the_same_outputs(world):
  b = world.bundle
  config = b.config.copy_and_resolve_references()
  with config.unlocked():
    config.model.scan_layers = True
  scanned = bundle_lib.Bundle.from_parts(config, jax.device_get(b.params), b.tokenizer)
  assert "layers" in scanned.params["encoder"]
  batch, positions = _batch(b)
  np.testing.assert_allclose(scanned.apply(batch, mlm_positions=positions)["mlm_logits"],
                             b.apply(batch, mlm_positions=positions)["mlm_logits"],
                             rtol=1e-5, atol=1e-5)


def _copy_run(world, tmp_path):
  run = tmp_path / "run"
  shutil.copytree(world.workdir, run)
  return run


def test_text_vocabulary_of_another_size_is_named_with_the_config(world, tmp_path):
  bigger = tmp_path / "bigger.txt"
  bigger.write_text("\n".join(tm.WORDS + ("extra",)) + "\n")
  with pytest.raises(ValueError, match=rf"{bigger}.* has {len(tm.WORDS) + 1} tokens but .*"
                                       rf"config.json has model.text_vocab_size={len(tm.WORDS)}"):
    bundle_lib.load_bundle(world.workdir, text_vocab=str(bigger))


def test_text_vocabulary_with_other_special_ids_is_named(world, tmp_path):
  swapped = list(tm.WORDS)
  swapped[4], swapped[5] = swapped[5], swapped[4]  # [SEP] and [MASK] change places
  path = tmp_path / "swapped.txt"
  path.write_text("\n".join(swapped) + "\n")
  with pytest.raises(ValueError, match=r"special ids .*\[SEP\]=5.* but .*config.json has "
                                       r"model.special_ids .*\[SEP\]=4"):
    bundle_lib.load_bundle(world.workdir, text_vocab=str(path))


def test_visual_vocabulary_of_another_size_is_named(world, tmp_path):
  from vbert_jax.vocab import kmeans, vocabulary  # pylint: disable=g-import-not-at-top
  x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
  small = vocabulary.VisualVocabulary.fit(x, kmeans.KMeansConfig(depth=2, branching=4))
  path = small.save(tmp_path / "v16.npz")
  with pytest.raises(ValueError, match=rf"visual vocabulary {path} has 16 visual tokens but "
                                       rf".*config.json has model.visual_vocab_size=64"):
    bundle_lib.load_bundle(world.workdir, visual_vocab=str(path))
  # The config's own init.visual_vocab is checked the same way.
  run = _copy_run(world, tmp_path)
  config = json.loads((run / "config.json").read_text())
  config["init"]["visual_vocab"] = str(path)
  (run / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"has 16 visual tokens but .*visual_vocab_size=64"):
    bundle_lib.load_bundle(run)


def test_checkpoint_of_another_model_is_named(world, tmp_path):
  run = _copy_run(world, tmp_path)
  config = json.loads((run / "config.json").read_text())
  config["model"]["hidden_size"] = 64
  config["model"]["num_heads"] = 2
  (run / "config.json").write_text(json.dumps(config))
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match=r"config.json .*written with another config.*shape"):
    bundle_lib.load_bundle(run)


def test_missing_config_and_checkpoint_are_named(world, tmp_path):
  with pytest.raises(FileNotFoundError, match=rf"{tmp_path}/config.json: no run config"):
    bundle_lib.load_bundle(tmp_path)
  (tmp_path / "config.json").write_text((world.workdir / "config.json").read_text())
  with pytest.raises(FileNotFoundError, match=r"no checkpoints"):
    bundle_lib.load_bundle(tmp_path)
  with pytest.raises(FileNotFoundError, match=r"no checkpoint at step 7"):
    bundle_lib.load_bundle(world.workdir, step=7)


# Command lines.


def test_task_flags_start_from_their_defaults_at_each_parse(capsys):
  run = ["--workdir=runs/a", "--out", "results/a"]
  args = zero_shot.parse_args([*run, "--features=f", "--labels=l.tsv", "--order=text_first",
                               "--template=a [MASK] b [MASK]", "--template", "c [MASK] [MASK]",
                               "--open_vocabulary", "--step=3"])
  assert (args.order, args.open_vocabulary, args.step) == ("text_first", True, 3)
  assert args.template == ["a [MASK] b [MASK]", "c [MASK] [MASK]"] and args.out == "results/a"
  # A second command, then the first again: nothing of an earlier parse is left over.
  args = forecast.parse_args([*run, "--tokens=4,5, 6", "--beam_size=2"])
  assert args.tokens == [4, 5, 6] and args.horizons == [1, 2, 3] and args.beam_size == 2
  args = zero_shot.parse_args([*run, "--features=f", "--labels=l.tsv"])
  assert (args.order, args.open_vocabulary, args.step, args.template) == (
      "both", False, None, None)
  assert (args.split, args.top_k, args.batch_size) == ("validation", 5, 64)
  capsys.readouterr()
  for argv in ([*run, "--features=f", "--labels=l.tsv", "--top_k=five"],
               [*run, "--features=f", "--labels=l.tsv", "--order=sideways"],
               [*run, "--labels=l.tsv"]):
    with pytest.raises(SystemExit) as exit_info:
      zero_shot.parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
  with pytest.raises(SystemExit) as exit_info:
    forecast.parse_args([*run, "--horizons=1,two"])
  assert exit_info.value.code == 2
  assert "expected comma-separated integers" in capsys.readouterr().err


# Prompts.


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  """A tokenizer and layout of the trained world (no model needed)."""
  vocab = tm.write_vocab(tmp_path_factory.mktemp("prompts") / "vocab.txt")
  tok = tokenizers.WordPieceTokenizer(vocab, lowercase=True)
  config = tm.make_config(vocab)
  return tok, sequence.Layout(pretrain_lib.model_config(config).vocab, config.max_len)


def test_template_parses_masks_and_expands_them(small):
  tok, _ = small
  tpl = prompts.Template.parse("now let me show you how to [MASK] the [MASK] .", tok, 2)
  mask = tok.specials.mask
  assert tpl.slots == (7, 9) and tpl.ids[7] == tpl.ids[9] == mask
  wide = tpl.expand([1, 2])
  assert wide.slots == (7, 9, 10) and len(wide.ids) == len(tpl.ids) + 1
  assert [wide.ids[i] for i in wide.slots] == [mask] * 3
  assert wide.slot_groups([1, 2]) == [[0], [1, 2]]
  with pytest.raises(ValueError, match=r"has 1 \[MASK\] markers; expected 2"):
    prompts.Template.parse("now let me show you how to [MASK] the egg .", tok, 2)
  with pytest.raises(ValueError, match=r"has no \[MASK\] marker"):
    prompts.Template.parse("cut the egg", tok)


def test_build_in_both_orders_through_the_layouts(small):
  tok, layout = small
  tpl = prompts.Template.parse("how to [MASK] the [MASK] .", tok, 2)
  video = [3, 9, 60]
  packed, pos = prompts.build(layout, video, tpl, "video_first")
  ref = layout.video_then_text(video, tpl.ids)
  np.testing.assert_array_equal(packed.input_ids, ref.input_ids)
  np.testing.assert_array_equal(packed.segment_ids, ref.segment_ids)
  np.testing.assert_array_equal(pos, [1 + 3 + 1 + 2, 1 + 3 + 1 + 4])
  packed, pos = prompts.build(layout, video, tpl, "text_first")
  np.testing.assert_array_equal(packed.input_ids, layout.pair(tpl.ids, video).input_ids)
  np.testing.assert_array_equal(pos, [3, 5])
  with pytest.raises(ValueError, match=r"order='sideways'"):
    prompts.build(layout, video, tpl, "sideways")


@pytest.mark.parametrize("order", prompts.ORDERS)
def test_build_batch_equals_the_rows_built_one_by_one(small, order):
  tok, layout = small
  tpl = prompts.Template.parse("now let me show you how to [MASK] the [MASK] .", tok, 2)
  rng = np.random.default_rng(3)
  videos = [rng.integers(0, 64, n) for n in (5, 1, 17, 40, 9)]  # 40 is subsampled
  batch, positions = prompts.build_batch(layout, videos, tpl, order, rows=8)
  built = [prompts.build(layout, v, tpl, order) for v in videos]
  built += [built[0]] * 3
  ref = sequence.stack([p for p, _ in built])
  width = batch["input_ids"].shape[1]
  longest = int(ref["input_mask"].sum(axis=1).max())
  assert width == min(layout.max_len, next(w for w in (16, 20, 24, 28, 32, 40, 48, 56, 64)
                                          if w >= longest))
  assert ref["input_mask"][:, width:].sum() == 0  # only padding columns were cut
  for key in ("input_ids", "segment_ids", "position_ids", "input_mask"):
    np.testing.assert_array_equal(batch[key], ref[key][:, :width], err_msg=key)
  np.testing.assert_array_equal(batch["regime"], ref["regime"])
  np.testing.assert_array_equal(positions, np.stack([p for _, p in built]))
  with pytest.raises(ValueError, match=r"video 7: visual tokens must lie in \[0, 64\)"):
    prompts.build_batch(layout, [[1], [64]], tpl, order, rows=2, ids=[6, 7])


def test_prompt_widths_are_few():
  widths = [prompts.prompt_width(n, 512) for n in range(1, 513)]
  assert sorted(set(widths)) == [16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192,
                                 224, 256, 320, 384, 448, 512]
  assert all(w >= n and (w <= 16 or w <= 1.25 * n) for n, w in enumerate(widths, 1))
  assert prompts.prompt_width(100, 28) == 28 and prompts.prompt_width(3, 8) == 8


def test_long_video_is_subsampled_evenly_and_the_text_kept_whole(small):
  tok, layout = small
  tpl = prompts.Template.parse("now let me show you how to [MASK] the [MASK] .", tok, 2)
  video = np.arange(40) % 64
  packed, pos = prompts.build(layout, video, tpl, "video_first")
  room = layout.max_len - 3 - len(tpl.ids)
  kept = layout.vocab.joint_to_visual(packed.input_ids[1:1 + room])
  assert kept[0] == 0 and kept[-1] == 39 and np.all(np.diff(kept) > 0)
  assert packed.input_mask.sum() == layout.max_len
  assert (packed.input_ids[pos] == tok.specials.mask).all() and len(pos) == 2


def test_empty_or_invalid_video_is_refused(small):
  tok, layout = small
  tpl = prompts.Template.parse("how to [MASK] the [MASK] .", tok, 2)
  with pytest.raises(ValueError, match=r"empty video: no visual tokens"):
    prompts.build(layout, [], tpl)
  with pytest.raises(ValueError, match=r"visual tokens must lie in \[0, 64\)"):
    prompts.build(layout, [64], tpl)


def test_generation_prompts_mask_video_slots(small):
  tok, layout = small
  sp = layout.specials
  packed, pos = prompts.text_to_video(layout, tok.encode("cut the egg"), 4)
  assert packed.input_ids[:5].tolist() == [sp.cls] + tok.encode("cut the egg") + [sp.video_sep]
  np.testing.assert_array_equal(pos, [5, 6, 7, 8])
  assert (packed.input_ids[pos] == sp.mask).all() and packed.input_ids[9] == sp.sep
  assert (packed.segment_ids[pos] == sequence.SEGMENT_VIDEO).all()
  packed, pos = prompts.forecast(layout, [1, 2, 3], 2, "video_only")
  np.testing.assert_array_equal(pos, [4, 5])
  assert packed.input_ids[6] == sp.sep and packed.input_mask.sum() == 7
  assert (packed.segment_ids[1:6] == sequence.SEGMENT_VIDEO).all()
  packed, pos = prompts.forecast(layout, [1, 2, 3], 2, "pair")
  assert packed.input_ids[4] == sp.video_sep
  np.testing.assert_array_equal(pos, [5, 6])
  # Past and future are video; only [CLS] and [>] carry the text segment.
  assert packed.segment_ids[:8].tolist() == [sequence.SEGMENT_TEXT] + [
      sequence.SEGMENT_VIDEO] * 3 + [sequence.SEGMENT_TEXT] + [sequence.SEGMENT_VIDEO] * 3
  # The most recent clips are kept when the past does not fit.
  packed, pos = prompts.forecast(layout, np.arange(60), 3, "video_only")
  past = layout.vocab.joint_to_visual(packed.input_ids[1:pos[0]])
  assert past[-1] == 59 and len(past) == layout.max_len - 5
  # ... and only the last `context` clips when asked.
  packed, pos = prompts.forecast(layout, np.arange(60), 1, "video_only", context=4)
  np.testing.assert_array_equal(layout.vocab.joint_to_visual(packed.input_ids[1:pos[0]]),
                                [56, 57, 58, 59])
  assert pos.tolist() == [5] and packed.input_mask.sum() == 7
  with pytest.raises(ValueError, match=r"context=0: expected at least 1"):
    prompts.forecast(layout, [1, 2], 1, context=0)
  with pytest.raises(ValueError, match=r"num_slots=0"):
    prompts.text_to_video(layout, [7], 0)
  with pytest.raises(ValueError, match=r"exceed max_len"):
    prompts.text_to_video(layout, [7] * 10, 20)
