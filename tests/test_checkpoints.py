"""Checkpoint manager: save/restore of a sharded pytree with its iterator state, keep-last-K,
fall-back past a corrupt step, restore onto another mesh or device count, preemption, parameter
export and the scanned <-> unscanned layouts."""

import logging
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import pytest

from vbert_jax import checkpoints
from vbert_jax import model as model_lib
from vbert_jax import pretrain as pretrain_lib


class CountingIterator:
  """The data iterator contract: next() gives a host-local batch; state is where it stands."""

  def __init__(self, seed: int = 0, as_bytes: bool = False):
    self.seed, self.index, self.as_bytes = seed, 0, as_bytes

  def __next__(self):
    rng = np.random.default_rng([self.seed, self.index])
    self.index += 1
    return {"x": rng.integers(0, 100, size=(4,), dtype=np.int32)}

  def get_state(self):
    state = {"seed": self.seed, "index": self.index}
    return repr(state).encode() if self.as_bytes else state

  def set_state(self, state):
    if isinstance(state, bytes):
      state = eval(state.decode())  # noqa: S307 (written by get_state above)
    self.seed, self.index = state["seed"], state["index"]


def _config(every=2, keep=3, use_async=True, **init):
  return ml_collections.ConfigDict({
      "checkpoint": {"every_steps": every, "keep": keep, "async": use_async},
      "init": {"checkpoint": init.get("checkpoint", ""), "bert_dir": init.get("bert_dir", "")},
  })


def _state(seed: float):
  rng = np.random.default_rng(int(seed))
  return {
      "params": {"embed": rng.normal(size=(16, 8)).astype(np.float32),
                 "dense": {"kernel": rng.normal(size=(8, 32)).astype(np.float32),
                           "bias": rng.normal(size=(32,)).astype(np.float32)}},
      "opt": {"count": np.int32(seed), "mu": rng.normal(size=(16, 8)).astype(np.float32)},
  }


def _shardings(mesh, state):
  specs = {"params": {"embed": P("a", "b"), "dense": {"kernel": P(None, "a"), "bias": P("b")}},
           "opt": {"count": P(), "mu": P("a")}}
  return jax.tree.map(lambda s, _: NamedSharding(mesh, s), specs, state,
                      is_leaf=lambda x: isinstance(x, P))


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), state)


def _assert_tree_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def _mesh(shape):
  return jax.make_mesh(shape, ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


@pytest.fixture
def mesh_8():
  return _mesh((2, 4))


def _save_steps(workdir, steps, mesh, config=None, as_bytes=False):
  manager = checkpoints.CheckpointManager(workdir, config or _config(every=1))
  it = CountingIterator(seed=7, as_bytes=as_bytes)
  for step in steps:
    next(it)
    state = jax.device_put(_state(step), _shardings(mesh, _state(step)))
    assert manager.save(step, state, it)
  manager.close()


def test_roundtrip_onto_other_mesh_and_iterator_state(tmp_path, mesh_8):
  config = _config(every=2)
  manager = checkpoints.CheckpointManager(tmp_path, config)
  it = CountingIterator(seed=3)
  state = jax.device_put(_state(4), _shardings(mesh_8, _state(4)))
  for _ in range(5):
    next(it)
  assert manager.save(4, state, it)
  expected_batch = next(it)  # moves on while the async save runs: the saved state must not
  manager.close()

  other = _mesh((8, 1))
  target = _shardings(other, _state(4))
  resumed = CountingIterator(seed=0)
  manager = checkpoints.CheckpointManager(tmp_path, config)
  restored = manager.restore_latest(_abstract(_state(4)), target, resumed)
  manager.close()
  _assert_tree_equal(restored, _state(4))
  assert restored["params"]["dense"]["kernel"].sharding == target["params"]["dense"]["kernel"]
  assert restored["params"]["embed"].sharding.spec == P("a", "b")
  assert (resumed.seed, resumed.index) == (3, 5)
  np.testing.assert_array_equal(next(resumed)["x"], expected_batch["x"])


def test_bytes_iterator_state_and_single_device_target(tmp_path, mesh_8):
  _save_steps(tmp_path, [0, 1], mesh_8, as_bytes=True)
  single = jax.sharding.SingleDeviceSharding(jax.devices()[3])
  resumed = CountingIterator(as_bytes=True)
  manager = checkpoints.CheckpointManager(tmp_path, _config())
  restored = manager.restore_latest(_abstract(_state(1)), jax.tree.map(lambda _: single, _state(1)),
                                    resumed)
  manager.close()
  _assert_tree_equal(restored, _state(1))
  assert restored["opt"]["mu"].sharding == single
  assert (resumed.seed, resumed.index) == (7, 2)


def test_interval_keep_last_and_force(tmp_path, mesh_8):
  manager = checkpoints.CheckpointManager(tmp_path, _config(every=3, keep=2))
  it = CountingIterator()
  state = jax.device_put(_state(0), _shardings(mesh_8, _state(0)))
  saved = [step for step in range(10) if manager.save(step, state, it)]
  assert saved == [0, 3, 6, 9]
  assert manager.save(10, state, it, force=True)
  assert not manager.save(10, state, it, force=True)  # never overwrites a step
  manager.wait()
  assert list(manager.all_steps()) == [9, 10]
  manager.close()
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["10", "9"]


def test_empty_workdir_restores_nothing(tmp_path):
  manager = checkpoints.CheckpointManager(tmp_path / "fresh", _config())
  it = CountingIterator(seed=5)
  assert manager.restore_latest(_abstract(_state(0)), None, it) is None
  assert (it.seed, it.index) == (5, 0)
  manager.close()


def _truncate_array_data(step_dir):
  """Cuts every array data file of a step in half, as an interrupted copy would."""
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  assert files
  for path in files:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_truncated_newest_falls_back_with_warning(tmp_path, mesh_8, caplog):
  _save_steps(tmp_path, [1, 2, 3], mesh_8)
  newest = tmp_path / "checkpoints" / "3"
  _truncate_array_data(newest)

  manager = checkpoints.CheckpointManager(tmp_path, _config(every=1))
  it = CountingIterator()
  with caplog.at_level(logging.WARNING):
    restored = manager.restore_latest(_abstract(_state(2)), _shardings(mesh_8, _state(2)), it)
  _assert_tree_equal(restored, _state(2))
  assert it.index == 2
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any(str(newest) in w and "cannot be read (process 0: " in w and "the one before" in w
             for w in warnings), warnings
  # The bad step is kept aside, not lost, and the run can write step 3 again.
  aside = list((tmp_path / "checkpoints").glob("3.unreadable-*"))
  assert len(aside) == 1 and (aside[0] / "state").is_dir()
  assert list(manager.all_steps()) == [1, 2]
  assert manager.save(3, restored, it)
  manager.close()


def test_partial_save_is_ignored(tmp_path, mesh_8):
  _save_steps(tmp_path, [1], mesh_8)
  # What an interrupted async save leaves behind: an uncommitted temporary directory.
  partial = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-1234"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "junk").write_bytes(b"\x00" * 10)
  manager = checkpoints.CheckpointManager(tmp_path, _config(every=1))
  it = CountingIterator()
  restored = manager.restore_latest(_abstract(_state(1)), _shardings(mesh_8, _state(1)), it)
  manager.close()
  _assert_tree_equal(restored, _state(1))


def test_checkpoint_of_another_process_count_restores_its_input_position(tmp_path, mesh_8,
                                                                          caplog):
  """The input state is a position in the global stream, the same on every host: a pod's
  checkpoint resumes its input on a laptop."""
  _save_steps(tmp_path, [1], mesh_8)
  data = tmp_path / "checkpoints" / "1" / "data"
  saved = (data / "process_0-of-1.json").read_text()
  (data / "process_0-of-1.json").unlink()
  for i in range(2):  # as two hosts of a pod would have left it
    (data / f"process_{i}-of-2.json").write_text(saved)
  manager = checkpoints.CheckpointManager(tmp_path, _config())
  it = CountingIterator(seed=9)
  with caplog.at_level(logging.INFO):
    restored = manager.restore_latest(_abstract(_state(1)), None, it)
  manager.close()
  _assert_tree_equal(restored, _state(1))
  assert (it.seed, it.index) == (7, 1)
  assert any("written by another number of processes" in r.getMessage() for r in caplog.records)
  assert not list((tmp_path / "checkpoints").glob("*.unreadable-*"))
  # Hosts that disagree on the position make the step unreadable: it is set aside, not used.
  (data / "process_1-of-2.json").write_text(saved.replace('"index": 1', '"index": 2'))
  manager = checkpoints.CheckpointManager(tmp_path, _config())
  assert manager.restore_latest(_abstract(_state(1)), None, CountingIterator()) is None
  manager.close()
  assert len(list((tmp_path / "checkpoints").glob("1.unreadable-*"))) == 1


@pytest.mark.parametrize("error, kind", [
    (TimeoutError("read timed out"), checkpoints.TRANSIENT),
    (OSError(5, "Input/output error"), checkpoints.TRANSIENT),
    (RuntimeError("UNAVAILABLE: GCS returned 503"), checkpoints.TRANSIENT),
    (FileNotFoundError(2, "No such file", "ckpt/3/state/_METADATA"), checkpoints.UNREADABLE),
    (ValueError("Error reading chunk: unexpected end of data"), checkpoints.UNREADABLE),
    (MemoryError(), checkpoints.OUT_OF_MEMORY),
    (RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 4.0G"),
     checkpoints.OUT_OF_MEMORY),
    (checkpoints.CheckpointMismatchError("other config"), checkpoints.MISMATCH),
])
def test_restore_errors_are_classified(error, kind):
  assert checkpoints.classify_restore_error(error)[0] == kind


def _flaky_reads(monkeypatch, errors):
  """Makes the next reads of a checkpoint raise `errors` in turn, then read for real."""
  real = checkpoints.CheckpointManager._read_step
  pending = list(errors)
  calls = []

  def read(self, step, target):
    calls.append(step)
    if pending:
      raise pending.pop(0)
    return real(self, step, target)
  monkeypatch.setattr(checkpoints.CheckpointManager, "_read_step", read)
  return calls


def _retry_config(retries=2):
  config = _config()
  config.checkpoint.restore_retries = retries
  config.checkpoint.restore_backoff_s = 0.0
  return config


def test_a_read_that_times_out_is_retried(tmp_path, mesh_8, monkeypatch, caplog):
  _save_steps(tmp_path, [1, 2], mesh_8)
  calls = _flaky_reads(monkeypatch, [TimeoutError("read timed out")] * 2)
  manager = checkpoints.CheckpointManager(tmp_path, _retry_config(retries=2))
  with caplog.at_level(logging.WARNING):
    restored = manager.restore_latest(_abstract(_state(2)), None, CountingIterator())
  manager.close()
  _assert_tree_equal(restored, _state(2))
  assert calls == [2, 2, 2]
  assert sum("retry" in r.getMessage() for r in caplog.records) == 2


@pytest.mark.parametrize("error, message", [
    (TimeoutError("read timed out"), r"storage seems unavailable, so nothing was set aside"),
    (RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 40G"),
     r"ran out of memory on process 0 .*it was left in place"),
])
def test_storage_down_or_out_of_memory_stops_without_setting_aside(tmp_path, mesh_8,
                                                                   monkeypatch, error, message):
  _save_steps(tmp_path, [1, 2], mesh_8)
  _flaky_reads(monkeypatch, [error] * 3)
  manager = checkpoints.CheckpointManager(tmp_path, _retry_config(retries=2))
  with pytest.raises(checkpoints.CheckpointRestoreError, match=message):
    manager.restore_latest(_abstract(_state(2)), None, CountingIterator())
  manager.close()
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]


def test_other_config_names_path_and_shapes(tmp_path, mesh_8):
  _save_steps(tmp_path, [1], mesh_8)
  wrong = _state(1)
  wrong["params"]["dense"]["kernel"] = np.zeros((8, 48), np.float32)
  manager = checkpoints.CheckpointManager(tmp_path, _config())
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match=r"'params/dense/kernel' has shape \(8, 32\) in the checkpoint but "
                           r"\(8, 48\) in the config"):
    manager.restore_latest(_abstract(wrong), None, CountingIterator())
  # A config error is not corruption: the checkpoint stays where it is.
  assert list(manager.all_steps()) == [1]
  manager.close()


def test_read_checkpoint_for_inspection(tmp_path, mesh_8):
  _save_steps(tmp_path, [1, 2], mesh_8)
  step, state = checkpoints.read_checkpoint(tmp_path)
  assert step == 2 and isinstance(state["params"]["embed"], np.ndarray)
  _assert_tree_equal(state, _state(2))
  _assert_tree_equal(checkpoints.read_checkpoint(tmp_path, 1)[1], _state(1))
  with pytest.raises(FileNotFoundError, match=r"no checkpoint at step 3; found \[1, 2\]"):
    checkpoints.read_checkpoint(tmp_path, 3)


def test_bad_workdir_and_options(tmp_path):
  with pytest.raises(ValueError, match="workdir is empty"):
    checkpoints.CheckpointManager("", _config())
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(OSError, match=f"cannot create the checkpoint directory {blocker}"):
    checkpoints.CheckpointManager(blocker / "run", _config())
  with pytest.raises(ValueError, match="config.checkpoint.every_steps=0"):
    checkpoints.CheckpointManager(tmp_path, _config(every=0))


def test_sigterm_requests_a_preemption_save(tmp_path):
  before = signal.getsignal(signal.SIGTERM)
  manager = checkpoints.CheckpointManager(tmp_path, _config())
  assert not manager.reached_preemption(5)
  os.kill(os.getpid(), signal.SIGTERM)  # would end pytest if the handler were missing
  assert manager.reached_preemption(5)
  manager.close()
  assert signal.getsignal(signal.SIGTERM) == before


_RESTORE_ON_ONE_DEVICE = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from vbert_jax import checkpoints
    import ml_collections
    assert jax.device_count() == 1, jax.devices()
    abstract = json.loads(sys.argv[2])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(tuple(s[0]), np.dtype(s[1])), abstract,
                            is_leaf=lambda x: isinstance(x, list) and isinstance(x[1], str))
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    config = ml_collections.ConfigDict({"checkpoint": {"every_steps": 1, "keep": 2, "async": True}})
    manager = checkpoints.CheckpointManager(sys.argv[1], config)
    state = manager.restore_latest(abstract, jax.tree.map(lambda _: one, abstract), None)
    manager.close()
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    print(json.dumps({jax.tree_util.keystr(p): np.asarray(x).tolist() for p, x in leaves}))
""")


def test_saved_on_8_devices_restores_on_1(tmp_path, mesh_8, repo_root):
  assert jax.device_count() == 8
  _save_steps(tmp_path, [5], mesh_8)
  shapes = jax.tree.map(lambda x: [list(np.shape(x)), str(np.asarray(x).dtype)], _state(5))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(repo_root))
  import json
  out = subprocess.run([sys.executable, "-c", _RESTORE_ON_ONE_DEVICE, str(tmp_path),
                        json.dumps(shapes)], env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  values = json.loads(out.stdout.strip().splitlines()[-1])
  expected = jax.tree_util.tree_flatten_with_path(_state(5))[0]
  assert len(values) == len(expected)
  for path, leaf in expected:
    np.testing.assert_array_equal(np.asarray(values[jax.tree_util.keystr(path)], leaf.dtype), leaf)


# Parameters alone -----------------------------------------------------------------------------


_MODEL_CONFIG = dict(text_vocab_size=200, visual_vocab_size=60, max_position_embeddings=16,
                     dropout_rate=0.0, attention_dropout_rate=0.0)


@pytest.fixture(scope="module")
def mu_models():
  """The `mu` model in both layer layouts, its unscanned parameters and a batch."""
  from flax import linen as nn
  configs = {scan: model_lib.VideoBERTConfig.from_variant("mu", scan_layers=scan, **_MODEL_CONFIG)
             for scan in (False, True)}
  rng = np.random.default_rng(0)
  batch = dict(input_ids=rng.integers(0, 150, size=(2, 8)).astype(np.int32),
               segment_ids=np.repeat([[0] * 4 + [1] * 4], 2, 0).astype(np.int32),
               position_ids=np.tile(np.arange(8, dtype=np.int32), (2, 1)),
               input_mask=np.ones((2, 8), np.int32))
  modules = {scan: model_lib.VideoBERT(c) for scan, c in configs.items()}
  params = nn.meta.unbox(modules[False].init(jax.random.key(1), **batch)["params"])
  return modules, params, batch


def _hidden(module, params, batch):
  return np.asarray(module.apply({"params": params}, **batch)["hidden"])


@pytest.mark.parametrize("save_scanned, load_scanned",
                         [(False, False), (False, True), (True, False), (True, True)])
def test_export_and_load_params_across_layouts(tmp_path, mesh_8, mu_models, save_scanned,
                                               load_scanned):
  modules, unscanned, batch = mu_models
  layout = lambda scanned: model_lib.scan_params(unscanned) if scanned else unscanned
  saved = layout(save_scanned)
  state = {"params": saved, "opt_state": {"mu": saved}, "step": np.int32(3)}
  path = checkpoints.export_params(state, tmp_path / "params")
  sharding = NamedSharding(mesh_8, P())
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          layout(load_scanned))
  loaded = model_lib.load(path, abstract)
  _assert_tree_equal(loaded, layout(load_scanned))
  assert all(x.sharding == sharding for x in jax.tree.leaves(loaded))
  assert ("layers" in loaded["encoder"]) == load_scanned
  np.testing.assert_allclose(_hidden(modules[load_scanned], loaded, batch),
                             _hidden(modules[False], unscanned, batch), rtol=1e-5, atol=1e-6)
  # Without a target: host arrays in the stored layout; the optimizer state was not exported.
  _assert_tree_equal(model_lib.load(path), saved)


def test_load_params_from_another_config(tmp_path, mu_models):
  _, params, _ = mu_models
  path = checkpoints.export_params(params, tmp_path / "p")
  wider = model_lib.scan_params(params)
  wider["embeddings"] = dict(wider["embeddings"])
  wider["embeddings"]["word_embeddings"] = {"embedding": np.zeros((512, 32), np.float32)}
  shape = params["embeddings"]["word_embeddings"]["embedding"].shape
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match=(r"'embeddings/word_embeddings/embedding' has shape "
                            rf"\({shape[0]}, 32\) in the checkpoint but \(512, 32\) in the "
                            r"config")):
    model_lib.load(path, _abstract(wider))
  with pytest.raises(FileNotFoundError, match="no exported parameters"):
    checkpoints.load_params(tmp_path / "missing")
  with pytest.raises(FileExistsError, match="already exists"):
    checkpoints.export_params(params, path)


def test_load_initial_from_exported_params(tmp_path, mesh_8, mu_models):
  _, params, _ = mu_models
  path = checkpoints.export_params(params, tmp_path / "init")
  sharding = NamedSharding(mesh_8, P())
  abstract_state = {"params": jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), params),
                    "step": jax.ShapeDtypeStruct((), jnp.int32)}
  loaded = pretrain_lib.load_initial(_config(checkpoint=str(path)), abstract_state)
  _assert_tree_equal(loaded, params)
  assert pretrain_lib.load_initial(_config(), abstract_state) is None
  with pytest.raises(ValueError, match="both set"):
    pretrain_lib.load_initial(_config(checkpoint=str(path), bert_dir="/bert"), abstract_state)


def test_load_initial_from_a_bert_directory(tmp_path):
  from helpers.configs import pretrain
  from helpers import bert_dir
  from vbert_jax import train
  config = pretrain.get_config("variant=mu,runlocal")
  m = config.model
  bert = bert_dir.write_bert_dir(
      tmp_path / "bert", vocab_size=m.text_vocab_size, hidden_size=m.hidden_size,
      num_layers=m.num_layers, num_heads=m.num_heads, mlp_dim=m.mlp_dim,
      max_positions=m.max_position_embeddings)

  config.unlock()
  config.init.bert_dir = str(tmp_path / "bert")
  trainer = train.Trainer(pretrain_lib.make_trainable(config), config)
  fresh = trainer.init_state().params
  fresh_table = np.asarray(fresh["embeddings"]["word_embeddings"]["embedding"])
  params = pretrain_lib.load_initial(config, trainer.abstract_with_shardings(), lambda: fresh)
  table = np.asarray(params["embeddings"]["word_embeddings"]["embedding"])
  reference = bert.bert.embeddings.word_embeddings.weight.detach().numpy()
  np.testing.assert_array_equal(table[:m.text_vocab_size], reference)
  vocab = pretrain_lib.model_config(config).vocab
  visual = slice(vocab.visual_offset, vocab.visual_offset + vocab.visual_size)
  np.testing.assert_array_equal(table[visual], fresh_table[visual])  # visual rows stay random
  np.testing.assert_array_equal(
      np.asarray(params["encoder"]["layer_1"]["intermediate"]["kernel"]),
      bert.bert.encoder.layer[1].intermediate.dense.weight.detach().numpy().T)
  with pytest.raises(ValueError, match="pass them as `params`"):
    pretrain_lib.load_initial(config, trainer.abstract_with_shardings())
