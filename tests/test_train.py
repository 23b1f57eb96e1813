"""The generic trainer and the loop: learning on the generated source, resume, accumulation,
non-finite stops, bad input, metrics and the files a run leaves in its workdir."""

import json
import os
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers.configs import pretrain
from vbert_jax import metrics
from vbert_jax import synthetic
from vbert_jax import pretrain as pretrain_lib
from vbert_jax import train

DIM = 16


# A toy trainable and input source: the trainer takes any (init, loss, iterator) triple.


def toy_trainable(dropout: float = 0.0) -> train.Trainable:
  def init(rng):
    w = nn.with_logical_partitioning(nn.initializers.normal(0.5), ("embed", "mlp"))
    b = nn.with_logical_partitioning(nn.initializers.zeros_init(), ("mlp",))
    k1, k2 = jax.random.split(rng)
    return {"w": w(k1, (DIM, DIM)), "b": b(k2, (DIM,))}

  def loss(params, batch, rng, over=None):
    x = batch["x"]
    if rng is not None and dropout > 0:
      x = x * jax.random.bernoulli(rng, 1 - dropout, x.shape) / (1 - dropout)
    err = x @ params["w"] + params["b"] - batch["y"]
    mse = jnp.sum(err ** 2) / (err.size if over is None else over["mse"])
    # poison 1: the loss itself goes NaN; poison 2: a finite loss whose gradient norm overflows.
    mse = mse + jnp.log(jnp.where(batch["poison"].max() == 1, -1.0, 1.0))
    mse = mse + (batch["poison"].max() == 2) * 3e38 * params["b"][0]
    hits = (jnp.abs(err) < 0.5).mean(axis=1)
    return mse, {"mse": mse, "close_accuracy": hits.mean(),
                 "close_count": jnp.float32(x.shape[0])}

  return train.Trainable(init=init, loss=loss, tokens_per_example=DIM,
                    denominators=lambda batch: {"mse": jnp.float32(batch["x"].size)})


class ToySource:
  """Regression batches, each a pure function of its index; optional poison at one step."""

  def __init__(self, batch_size: int, poison_step: int = 0, poison_kind: int = 1,
               crash_at: int = 0):
    self.batch_size, self.index = batch_size, 0
    self.poison_step, self.poison_kind, self.crash_at = poison_step, poison_kind, crash_at
    self.w = np.random.default_rng(99).normal(size=(DIM, DIM)).astype(np.float32)

  def __next__(self):
    if self.index + 1 == self.crash_at:
      raise RuntimeError(f"input went away before batch {self.crash_at}")
    rng = np.random.default_rng([5, self.index])
    self.index += 1
    x = rng.normal(size=(self.batch_size, DIM)).astype(np.float32)
    poison = np.full(self.batch_size, self.poison_kind if self.index == self.poison_step else 0,
                     np.int32)
    return {"x": x, "y": x @ self.w, "poison": poison}

  def get_state(self):
    return {"index": self.index}

  def set_state(self, state):
    self.index = int(state["index"])


def toy_config(total_steps=6, **changes):
  c = pretrain.get_config("variant=mu,runlocal")
  with c.unlocked():
    c.batch_size = 8
    c.total_steps = total_steps
    c.log_every_steps = 1
    c.eval.every_steps = 3
    c.eval.num_batches = 2
    c.checkpoint.every_steps = 2
    c.optimizer.learning_rate = 0.05
    c.optimizer.warmup_steps = 1
    c.compilation_cache_dir = ""
    for key, value in changes.items():
      node = c
      *path, last = key.split(".")
      for p in path:
        node = node[p]
      node[last] = value
  return c


def _toy_run(workdir, config, source=None, trainable=None):
  return train.train_loop(trainable or toy_trainable(dropout=0.2), config, workdir,
                          source or ToySource(config.batch_size),
                          lambda: ToySource(config.batch_size, poison_step=-1))


# The runlocal pretraining run, through the command line.


@pytest.fixture(scope="module")
def runlocal_run(tmp_path_factory, repo_root):
  workdir = tmp_path_factory.mktemp("runlocal")
  env = dict(os.environ)
  # One CPU device: on two cores the tiny model runs fastest unsplit.
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(
      "--xla_force_host_platform_device_count=8", "").strip()
  # As a user runs it: the command itself must keep JAX and libtpu from probing for a TPU.
  for name in ("JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL"):
    env.pop(name, None)
  cmd = [sys.executable, "-m", "vbert_jax.main",
         "--config=configs/pretrain.py:variant=tiny,runlocal", f"--workdir={workdir}",
         f"--config.compilation_cache_dir={repo_root / '.cache' / 'jax'}"]
  start = time.perf_counter()
  proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True,
                        timeout=600)
  seconds = time.perf_counter() - start
  assert proc.returncode == 0, proc.stderr[-4000:]
  return workdir, seconds, proc.stderr


def test_runlocal_learns_the_generated_task(runlocal_run):
  workdir, seconds, _ = runlocal_run
  evals = metrics.read_jsonl(workdir, "eval")
  assert [r["step"] for r in evals] == [100, 200, 300]
  final = evals[-1]
  print(f"runlocal: {seconds:.1f} s; held-out at step 300: mlm {final['mlm_accuracy']:.3f}, "
        f"mvm {final['mvm_accuracy']:.3f}, lva {final['lva_accuracy']:.3f}")
  assert final["mlm_accuracy"] >= 0.9
  assert final["mvm_accuracy"] >= 0.9
  assert final["lva_accuracy"] >= 0.9
  # Evaluated over real slots and examples of every kind.
  assert final["mlm_count"] > 50 and final["mvm_count"] > 50 and final["lva_count"] > 50
  # Before training the toy problem is not solved: the accuracies were learned.
  first_train = metrics.read_jsonl(workdir, "train")[0]
  assert first_train["lva_accuracy"] < 0.75 and first_train["mvm_accuracy"] < 0.5


def test_runlocal_leaves_config_versions_metrics_and_checkpoints(runlocal_run):
  workdir, _, log = runlocal_run
  config = json.loads((workdir / "config.json").read_text())
  assert config["variant"] == "tiny" and config["max_len"] == 32
  assert config["input"]["pack_examples"] == 4 and config["input"]["max_example_len"] == 16
  versions = json.loads((workdir / "versions.json").read_text())
  assert versions["packages"]["jax"] == jax.__version__
  assert versions["device_count"] == 1
  rows = metrics.read_jsonl(workdir, "train")
  assert [r["step"] for r in rows] == list(range(25, 301, 25))
  for key in ("loss", "grad_norm", "learning_rate", "steps_per_sec", "tokens_per_sec",
              "tflops_per_sec", "mlm_loss", "mvm_loss", "lva_loss", "real_tokens_per_sec"):
    assert all(np.isfinite(r[key]) for r in rows[1:]), key
  # Packed rows of examples of 8 tokens on average: little padding, 3 to 4 examples a row.
  for r in rows[1:]:
    assert 0 < r["pad_fraction"] < 0.25 and 3 <= r["packed_examples_per_row"] <= 4
    assert r["real_tokens_per_sec"] == pytest.approx(r["tokens_per_sec"] * (1 - r["pad_fraction"]))
    assert 0 < r["flops_real_fraction"] < 1 and r["examples_truncated"] == 0
  assert rows[-1]["loss"] < rows[0]["loss"] / 3
  assert rows[-1]["learning_rate"] < rows[1]["learning_rate"]  # decays after warmup
  assert list((workdir).glob("events.out.tfevents*")), "no TensorBoard events"
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                if p.name.isdigit()) == [100, 200, 300]
  assert "ETA" in log and "step 300/300" in log
  # The console holds the run's own lines; the libraries' INFO chatter is in log.txt only.
  lines = log.splitlines()
  assert len(lines) < 60, len(lines)
  for chatter in ("checkpoint_manager.py", "async_checkpointer", "oneDNN", "TPU accelerator type",
                  "jellyfish", "TPU worker hostnames"):
    assert chatter not in log, chatter
  whole = (workdir / "log.txt").read_text()
  assert "checkpoint_manager.py" in whole and "train.py" in whole
  assert f"writing checkpoints to {workdir / 'checkpoints'}" in log
  assert lines[-2].split("] ", 1)[1].startswith("finished at step 300 of 300; train at step 300: "
                                                 "loss=")
  assert "; eval at step 300: loss=" in lines[-2]
  # A run on generated tokens says so before it trains; the placement of its input is logged.
  assert -1 < log.find("input: GENERATED tokens") < log.find("training from step 1")
  assert "input placement: 1 host(s) feed 8 rows each of the global batch of 8" in log
  # The masked predictions per example that trains each loss: at least BERT's floor of one.
  for key in ("predictions_per_example_mlm", "predictions_per_example_mvm"):
    assert all(1.0 <= r[key] <= 2.0 for r in rows), key


# Resume, profiling, accumulation.


def test_resume_repeats_the_uninterrupted_run(tmp_path):
  whole = _toy_run(tmp_path / "whole", toy_config(6))
  with pytest.raises(RuntimeError, match="input went away"):
    _toy_run(tmp_path / "split", toy_config(6), ToySource(8, crash_at=5))
  resumed = _toy_run(tmp_path / "split", toy_config(6))
  assert whole.step == resumed.step == 6
  assert [s for s, _ in resumed.train_history] == [5, 6]
  for a, b in zip(jax.tree.leaves(whole.state.params), jax.tree.leaves(resumed.state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  losses = {s: m["loss"] for s, m in whole.train_history}
  assert [losses[s] for s in (5, 6)] == [m["loss"] for _, m in resumed.train_history]
  assert len(set(losses.values())) == 6
  # The eval metrics: means weighted by their counts.
  assert [s for s, _ in whole.eval_history] == [3, 6]
  assert whole.eval_history[-1][1]["close_count"] == 16.0


@pytest.mark.slow
def test_profile_window_writes_a_trace(tmp_path):
  """In a process of its own: the profiler's native session has crashed a test worker that
  earlier tests had loaded other native libraries into."""
  import subprocess  # pylint: disable=g-import-not-at-top
  from helpers import pretrain_runs  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "run"
  cmd = pretrain_runs.argv(workdir, **{"total_steps": 4, "profile.start_step": 2,
                                       "profile.num_steps": 2})
  proc = subprocess.run(cmd, env=pretrain_runs.env(), cwd=pretrain_runs.REPO,
                        capture_output=True, text=True, timeout=pretrain_runs.RUN_TIMEOUT_S)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert list((workdir / "profile").rglob("*.xplane.pb"))
  assert "profiler trace of steps 2-3" in proc.stderr


def test_gradient_accumulation_matches_the_full_batch():
  grads, params = [], []
  for micro in (1, 4):
    # 32 rows over 8 devices: each of the 4 micro-batches still covers every device.
    config = toy_config(grad_accum_steps=micro, batch_size=32)
    trainer = train.Trainer(toy_trainable(), config, return_grads=True)
    state = trainer.init_state()
    batch = trainer.put_batch(next(ToySource(config.batch_size)))
    state, sums, g = trainer.train_step(state, batch)
    grads.append(jax.device_get(g))
    params.append(jax.device_get(state.params))
    assert float(sums["close_count"]) == 32.0
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_accumulated_micro_batches_weigh_by_their_predictions():
  """k micro-batches with different numbers of masked tokens give the whole batch's gradient
  (f32), where a plain mean of the micro-batches' own means would not."""
  from helpers import tolerance  # pylint: disable=g-import-not-at-top
  config = toy_config(batch_size=32)
  with config.unlocked():
    config.masking.max_predictions_text = config.masking.max_predictions_video = 4
    config.max_len = 24
  trainable = pretrain_lib.make_trainable(config)
  batch = next(synthetic.from_config(config, "train", batch_size=32))
  grads = {}
  for micro in (1, 4):
    with config.unlocked():
      config.grad_accum_steps = micro
    trainer = train.Trainer(trainable, config, return_grads=True)
    state = trainer.init_state()
    params = jax.device_get(state.params)
    _, sums, grads[micro] = trainer.train_step(state, trainer.put_batch(batch))
    grads[micro] = jax.device_get(grads[micro])
  # Micro-batch j holds rows j, j + 4, ...: their prediction counts differ.
  counts = [batch["mlm_weights"][j::4].sum() for j in range(4)]
  assert len(set(counts)) > 1, counts
  over = jax.tree.map(jnp.asarray, trainable.denominators(batch))
  magnitude = tolerance.per_example_abs_grads(trainable.loss, params, batch, over)
  atol = tolerance.reordered_sum_atol(magnitude, 32 * config.max_len)
  tolerance.assert_trees_within(grads[4], grads[1], atol, "accumulated gradient")
  # Equal weights for the micro-batches (each divided by its own count) miss by far more.
  own_mean = jax.jit(jax.grad(lambda p, mb: trainable.loss(p, mb, None)[0]))
  equal = jax.tree.map(lambda *g: sum(g) / 4, *[
      own_mean(params, jax.tree.map(lambda x, j=j: x[j::4], batch)) for j in range(4)])
  table = ("embeddings", "word_embeddings", "embedding")
  pick = lambda t: np.asarray(t[table[0]][table[1]][table[2]])  # noqa: E731
  assert np.abs(pick(equal) - pick(grads[1])).max() > 100 * np.abs(
      pick(grads[4]) - pick(grads[1])).max()


def test_weight_decay_skips_biases_and_layer_norms_in_both_layouts():
  """Chosen by path: the same parameters come out of one AdamW step whether the encoder is
  scanned or not, and only kernels and embedding tables decay."""
  from vbert_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  config = toy_config()
  with config.unlocked():
    config.optimizer.weight_decay = 0.5
  unscanned = model_lib.init_params(pretrain_lib.model_config(config), jax.random.key(0))
  decayed = sorted(jax.tree_util.keystr(p) for p, d in
                   jax.tree_util.tree_flatten_with_path(train.decay_mask(unscanned))[0] if d)
  layer = ["['attention']['key']['kernel']", "['attention']['out']['kernel']",
           "['attention']['query']['kernel']", "['attention']['value']['kernel']",
           "['intermediate']['kernel']", "['output']['kernel']"]
  assert decayed == sorted(
      [f"['encoder']['layer_{i}']{k}" for i in range(2) for k in layer]
      + ["['embeddings']['position_embeddings']['embedding']",
         "['embeddings']['token_type_embeddings']['embedding']",
         "['embeddings']['visual_embeddings']['embedding']",
         "['embeddings']['word_embeddings']['embedding']",
         "['lva_head']['classifier']['kernel']", "['lva_head']['pooler']['kernel']",
         "['mlm_head']['transform']['kernel']", "['mvm_head']['transform']['kernel']"])
  tx, _ = train.make_optimizer(config.optimizer, config.total_steps)
  # A zero gradient leaves weight decay alone to move the parameters (after warmup).
  @jax.jit
  def step(params):
    state = tx.init(params)
    state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)[1]
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
    return optax.apply_updates(params, updates)
  from_unscanned = model_lib.scan_params(step(unscanned))
  from_scanned = step(model_lib.scan_params(unscanned))
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(from_scanned)[0],
                          jax.tree.leaves(from_unscanned)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  moved = step(unscanned)
  assert not np.array_equal(moved["mlm_head"]["transform"]["kernel"],
                            unscanned["mlm_head"]["transform"]["kernel"])
  for path in (("encoder", "layer_0", "attention", "query", "bias"),
               ("encoder", "layer_1", "attention_norm", "scale"), ("mlm_head", "bias")):
    a, b = moved, unscanned
    for key in path:
      a, b = a[key], b[key]
    np.testing.assert_array_equal(a, b, err_msg="/".join(path))


def test_schedule_warms_up_then_decays_linearly():
  schedule = train.make_schedule(dict(learning_rate=1e-3, end_learning_rate=0.0,
                                      warmup_steps=10), 110)
  np.testing.assert_allclose([schedule(s) for s in (0, 5, 10, 60, 110)],
                             [0.0, 5e-4, 1e-3, 5e-4, 0.0], atol=1e-9)
  with pytest.raises(ValueError, match="config.optimizer.warmup_steps=20 with "
                                       "config.total_steps=10"):
    train.make_schedule(dict(learning_rate=1e-3, end_learning_rate=0.0, warmup_steps=20), 10)


# Stops and bad input.


@pytest.mark.parametrize("kind,quantity,value", [(1, "loss", "nan"), (2, "grad_norm", "inf")])
def test_non_finite_stops_naming_step_and_quantity_without_saving(tmp_path, kind, quantity,
                                                                  value):
  config = toy_config(8, log_every_steps=10)
  with pytest.raises(metrics.NonFiniteError,
                     match=rf"non-finite {quantity} \({value}\) at step 5"):
    _toy_run(tmp_path, config, ToySource(8, poison_step=5, poison_kind=kind))
  saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert saved == [2, 4]


def test_empty_or_unwritable_workdir_is_named(tmp_path):
  with pytest.raises(ValueError, match="workdir is empty"):
    _toy_run("", toy_config())
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  with pytest.raises(PermissionError, match=rf"workdir {blocker}/run is not writable"):
    _toy_run(blocker / "run", toy_config())
  with pytest.raises(NotADirectoryError, match=rf"workdir {blocker} exists and is not a dir"):
    _toy_run(blocker, toy_config())


class _Corrupting:
  """Wraps a source and puts one out-of-vocabulary id into its first batch."""

  def __init__(self, source):
    self.source = source

  def __next__(self):
    batch = next(self.source)
    batch["input_ids"][1, 3] = 10 ** 6
    return batch

  def get_state(self):
    return self.source.get_state()

  def set_state(self, state):
    self.source.set_state(state)


def test_ids_outside_the_vocabulary_are_named(tmp_path):
  config = toy_config(2)
  source = _Corrupting(synthetic.from_config(config, "train", batch_size=config.batch_size))
  with pytest.raises(ValueError, match=r"train batch of step 1: input_ids: token ids \[1000000\] "
                                       r"are outside the joint vocabulary \(text \[0, 512\)"):
    train.train_loop(pretrain_lib.make_trainable(config), config, tmp_path, source)
  bad = next(synthetic.from_config(config, "train", batch_size=4))
  bad["mvm_ids"][0, 0] = 256
  with pytest.raises(ValueError, match=r"eval: mvm_ids in \[\d+, 256\] fall outside \[0, 256\)"):
    pretrain_lib.make_trainable(config).check_batch(bad, "eval")
  bad = next(synthetic.from_config(config, "train", batch_size=4))
  bad["input_ids"] = bad["input_ids"][:, :8]
  with pytest.raises(ValueError, match=r"x: input_ids has shape \(4, 8\); expected \(4, 32\)"):
    pretrain_lib.make_trainable(config).check_batch(bad, "x")


def test_max_len_beyond_positions_is_named():
  config = toy_config()
  with config.unlocked():
    config.max_len = 100
    config.input.max_example_len = 80
  with pytest.raises(ValueError, match=r"examples of up to 80 tokens \(config.input.max_example_len"
                                       r".*exceed config.model.max_position_embeddings=64"):
    pretrain_lib.make_trainable(config)
  with config.unlocked():  # one example per row: the row is the longest example
    config.input.max_example_len, config.input.pack_examples = 0, 1
  with pytest.raises(ValueError, match=r"examples of up to 100 tokens .*config.max_len=100 when "
                                       r"it is 0\) exceed"):
    pretrain_lib.make_trainable(config)


# The generated source.


def test_synthetic_source_is_exact_resumable_and_split_by_process():
  config = toy_config()
  whole = synthetic.from_config(config, "train", batch_size=8)
  batches = [next(whole) for _ in range(3)]
  again = synthetic.from_config(config, "train", batch_size=8)
  again.set_state(json.loads(json.dumps(whole.get_state())))
  again.set_state({"step": 1, "seed": config.seed, "split": "train"})
  for key, value in next(again).items():
    np.testing.assert_array_equal(value, batches[1][key])
  # Two processes whose devices hold interleaved rows make exactly those rows of the batches.
  rows = ([0, 3, 4, 7], [1, 2, 5, 6])
  halves = [synthetic.from_config(config, "train", batch_size=8, rows=r) for r in rows]
  joined = [next(h) for h in halves]
  for key in batches[0]:
    for part, r in zip(joined, rows):
      np.testing.assert_array_equal(part[key], batches[0][key][list(r)], err_msg=key)
  held_out = next(synthetic.from_config(config, "eval", batch_size=8))
  assert not np.array_equal(held_out["input_ids"], batches[0]["input_ids"])
  with pytest.raises(ValueError, match="saved state .* is for another stream"):
    again.set_state({"step": 1, "seed": config.seed, "split": "eval"})


def test_synthetic_video_is_a_function_of_the_text():
  config = toy_config()
  source = synthetic.from_config(config, "train", batch_size=64)
  world, vocab = source.world, source.vocab
  mapping = {}
  for text, video in zip(world.texts, world.videos):
    assert len(text) == len(video)
    for word, token in zip(text, video):
      assert mapping.setdefault(word, token) == token
  batch = next(source)
  pair = batch["regime"] == 2
  assert set(batch["lva_label"][pair].tolist()) == {0, 1}
  assert (batch["lva_weight"][~pair] == 0).all()
  vocab.check_ids(batch["input_ids"])
  video_only = set(zip(*np.nonzero(batch["regime"] == 1)))
  assert video_only and not any(  # video-only examples have no MLM slot
      (r, e) in video_only for r, e in zip(*np.nonzero(batch["mlm_weights"] > 0)) for e in
      [batch["mlm_example"][r, e]])


# Metrics.


def test_metric_sums_weight_by_counts():
  a = metrics.to_sums({"loss": 2.0, "mlm_accuracy": 1.0, "mlm_count": 3.0})
  b = metrics.to_sums({"loss": 4.0, "mlm_accuracy": 0.0, "mlm_count": 1.0})
  means = metrics.from_sums(metrics.add_sums(a, b))
  assert means == {"loss": 3.0, "mlm_accuracy": 0.75, "mlm_count": 4.0}
  empty = metrics.from_sums(metrics.to_sums({"lva_accuracy": 0.0, "lva_count": 0.0}))
  assert empty["lva_accuracy"] == 0.0


def test_throughput_and_mfu():
  assert metrics.peak_flops_per_device("TPU v5 lite") == 197e12
  assert metrics.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
  assert metrics.peak_flops_per_device("cpu") == 0.0
  assert metrics.peak_flops_per_device("cpu", override=1e11) == 1e11
  meter = metrics.Throughput(tokens_per_step=1000, flops_per_step=2e9, num_devices=2,
                             peak_per_device=1e10)
  meter.start(0)
  time.sleep(0.2)
  out = meter.report(4)
  seconds = 4 / out["steps_per_sec"]
  assert 0.19 < seconds < 2.0
  np.testing.assert_allclose(out["tokens_per_sec"], 4000 / seconds, rtol=1e-9)
  np.testing.assert_allclose(out["mfu"], 4 * 2e9 / seconds / 2e10, rtol=1e-9)
  line = metrics.Progress(total_steps=100, first_step=0).line(50)
  assert line.startswith("step 50/100 (50.0%)") and "ETA" in line


def test_visual_rows_start_from_the_vocabulary_centroids(tmp_path):
  from helpers.configs import pretrain  # pylint: disable=g-import-not-at-top
  from vbert_jax.vocab import kmeans  # pylint: disable=g-import-not-at-top
  from vbert_jax.vocab import vocabulary  # pylint: disable=g-import-not-at-top
  features = np.random.default_rng(0).normal(size=(200, 24)).astype(np.float32)
  vocab = vocabulary.VisualVocabulary.fit(features, kmeans.KMeansConfig(depth=2, branching=4))
  path = vocab.save(tmp_path / "vocab.npz")
  config = pretrain.get_config("variant=mu,runlocal")
  with config.unlocked():
    config.model.visual_vocab_size = 16
    config.init.visual_vocab = str(path)
  trainer = train.Trainer(pretrain_lib.make_trainable(config), config)
  fresh = trainer.init_state().params
  params = pretrain_lib.init_visual_rows(fresh, config)
  table = np.asarray(params["embeddings"]["visual_embeddings"]["embedding"])
  before = np.asarray(fresh["embeddings"]["visual_embeddings"]["embedding"])
  expected = vocabulary.visual_embedding_init(path, 32, std=0.02, seed=config.seed)
  np.testing.assert_allclose(table[:16], expected, rtol=1e-6)
  np.testing.assert_array_equal(table[16:], before[16:])  # padding rows untouched
  np.testing.assert_array_equal(params["embeddings"]["word_embeddings"]["embedding"],
                                fresh["embeddings"]["word_embeddings"]["embedding"])
  # Tokens whose centroids are near each other start near each other.
  leaves = vocab.leaves
  d_feat = np.linalg.norm(leaves[:, None] - leaves[None], axis=-1)
  d_emb = np.linalg.norm(expected[:, None] - expected[None], axis=-1)
  assert np.corrcoef(d_feat.ravel(), d_emb.ravel())[0, 1] > 0.9
  with config.unlocked():
    config.model.visual_vocab_size = 20
  with pytest.raises(ValueError, match=r"has 16 tokens but config.model.visual_vocab_size=20"):
    pretrain_lib.init_visual_rows(fresh, config)


def test_each_evaluation_closes_its_input_workers(tmp_path):
  """An evaluation makes a pipeline with a worker process; the loop closes it, so no worker is
  left running even while something still holds the pipeline."""
  import psutil  # pylint: disable=g-import-not-at-top
  from vbert_jax import input_pipeline as ip  # pylint: disable=g-import-not-at-top
  from vbert_jax import sequence  # pylint: disable=g-import-not-at-top
  config = toy_config(total_steps=2, **{"eval.every_steps": 2, "eval.num_batches": 1,
                                        "eval.batch_size": 8})
  vocab = sequence.JointVocab(config.model.text_vocab_size, config.model.visual_vocab_size)
  records = synthetic.random_records(6, vocab, seed=1, min_clips=10, max_clips=20)
  made = []

  def eval_input():
    made.append(ip.make_pipeline(config, records, split="eval", batch_size=8, worker_count=1))
    return made[-1]

  before = {p.pid for p in psutil.Process().children(recursive=True)}
  result = train.train_loop(pretrain_lib.make_trainable(config), config, tmp_path,
                            synthetic.from_config(config, "train", batch_size=8), eval_input)
  assert len(made) == 1 and len(result.eval_history) == 1
  # multiprocessing's resource tracker outlives the workers by design: one per process.
  alive = [p for p in psutil.Process().children(recursive=True)
           if p.pid not in before and p.is_running() and p.status() != psutil.STATUS_ZOMBIE
           and "resource_tracker" not in " ".join(p.cmdline())]
  assert not alive, [p.cmdline() for p in alive]


def test_without_a_dataset_the_run_says_how_to_build_one():
  config = pretrain.get_config("variant=tiny")
  with pytest.raises(ValueError, match=r"config.input.tfds_name is empty: .*"
                                       r"tfds build data/videobert"):
    pretrain_lib.train_and_evaluate(config, "/nonexistent/never/written")


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_dropout_keys_resume_exactly_under_each_prng(impl):
  """The key of step N is fold_in(key(seed, impl), N): a trainer restarted from the state after
  step 1 repeats steps 2 and 3 bit for bit, whichever PRNG draws the dropout masks."""
  config = toy_config(3, prng_impl=impl, **{"model.dropout_rate": 0.1,
                                            "model.attention_dropout_rate": 0.1})
  source = synthetic.from_config(config, "train", batch_size=config.batch_size)
  batches = [next(source) for _ in range(3)]
  trainable = pretrain_lib.make_trainable(config)
  first = train.Trainer(trainable, config)
  state = first.init_state()
  saved = None
  for i, batch in enumerate(batches):
    state, _ = first.train_step(state, first.put_batch(batch))
    if i == 0:
      saved = jax.device_get(state)
  resumed = train.Trainer(trainable, config)
  again = jax.device_put(saved, resumed.state_shardings)
  for batch in batches[1:]:
    again, _ = resumed.train_step(again, resumed.put_batch(batch))
  for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(jax.device_get(again))):
    np.testing.assert_array_equal(a, b)
  # Dropout is on: the masks of another PRNG give another update.
  other = toy_config(3, prng_impl="rbg" if impl == "threefry2x32" else "threefry2x32",
                     **{"model.dropout_rate": 0.1, "model.attention_dropout_rate": 0.1})
  third = train.Trainer(pretrain_lib.make_trainable(other), other)
  moved, _ = third.train_step(jax.device_put(saved, third.state_shardings),
                              third.put_batch(batches[1]))
  step2, _ = resumed.train_step(jax.device_put(saved, resumed.state_shardings),
                                resumed.put_batch(batches[1]))
  assert not np.array_equal(*(np.asarray(jax.device_get(s.params["embeddings"]["layer_norm"]
                                                        ["scale"])) for s in (moved, step2)))


def test_an_unknown_prng_is_named():
  with pytest.raises(ValueError, match=r"config.prng_impl='philox': expected one of"):
    train.Trainer(pretrain_lib.make_trainable(toy_config()), toy_config(prng_impl="philox"))
