"""Sharding is real and exact: 8 fake devices under data, FSDP and tensor meshes against one device.

Three steps at a non-zero learning rate with dropout on give the single-device losses and
gradients, within the bound of a float32 sum taken in another order (tests/helpers/tolerance.py),
and parameters (atol 1e-2 x lr); every large parameter is checked to be split the way the rules
say on the arrays that actually come out.
"""

import math
import re

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from helpers.configs import pretrain
from helpers import tolerance
from vbert_jax import sharding
from vbert_jax import pretrain as pretrain_lib
from vbert_jax import train

LR = 1e-3
STEPS = 3
MESHES = {
    "data8": dict(data=8, fsdp=1, tensor=1),
    "fsdp8": dict(data=1, fsdp=8, tensor=1),
    "data2_tensor4": dict(data=2, fsdp=1, tensor=4),
    "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2),
}
# Which mesh axis each logical name lands on under the default rules (batch excluded).
LOGICAL_TO_MESH = {"embed": "fsdp", "heads": "tensor", "mlp": "tensor", "vocab": "tensor"}


def _config(mesh: dict):
  c = pretrain.get_config("variant=custom,runlocal")
  with c.unlocked():
    c.model.update(hidden_size=64, num_layers=2, num_heads=4, mlp_dim=128, text_vocab_size=200,
                   visual_vocab_size=100, dropout_rate=0.1, attention_dropout_rate=0.1)
    c.batch_size = 16
    c.optimizer.learning_rate = LR
    c.optimizer.warmup_steps = 0
    c.optimizer.weight_decay = 0.01
    c.mesh.update(mesh)
  return c


def _run(config, devices, magnitudes=False):
  """Initial params, then per step (loss, grads) and the final params, all on the host; with
  `magnitudes`, also each step's per-example gradient magnitudes (for the tolerances)."""
  trainable = pretrain_lib.make_trainable(config)
  trainer = train.Trainer(trainable, config, sharding.make_mesh(config.mesh, devices),
                          return_grads=True)
  state = trainer.init_state()
  initial = jax.device_get(state.params)
  source = pretrain_lib.make_source(config, "train", config.batch_size, trainer.mesh)
  losses, grads, atols = [], [], []
  for _ in range(STEPS):
    batch = next(source)
    if magnitudes:
      over = trainable.denominators(batch)
      abs_sum = tolerance.per_example_abs_grads(trainable.loss, jax.device_get(state.params), batch,
                                                over)
      atols.append(tolerance.reordered_sum_atol(abs_sum, batch["input_ids"].size))
    state, sums, g = trainer.train_step(state, trainer.put_batch(batch))
    losses.append(float(sums["loss"]))
    grads.append(jax.device_get(g))
  return {"trainer": trainer, "state": state, "initial": initial, "losses": losses,
          "grads": grads, "params": jax.device_get(state.params), "atols": atols}


@pytest.fixture(scope="module")
def reference():
  config = _config(dict(data=1, fsdp=1, tensor=1))
  return _run(config, jax.devices()[:1], magnitudes=True)


@pytest.fixture(scope="module", params=sorted(MESHES))
def sharded(request):
  return request.param, _run(_config(MESHES[request.param]), jax.devices())


def _assert_trees_close(got, want, rtol, atol, what):
  flat_got = jax.tree_util.tree_flatten_with_path(got)[0]
  flat_want = jax.tree.leaves(want)
  assert len(flat_got) == len(flat_want)
  for (path, g), w in zip(flat_got, flat_want):
    np.testing.assert_allclose(g, w, rtol=rtol, atol=atol,
                               err_msg=f"{what} {jax.tree_util.keystr(path)}")


def test_losses_and_gradients_match_one_device(reference, sharded):
  name, run = sharded
  _assert_trees_close(run["initial"], reference["initial"], 0, 0, f"{name} initial param")
  # Each term of the loss is a mean of non-negative cross-entropies over at most batch x slots
  # predictions: another summation order moves it by at most (n - 1) * eps of itself.
  config = run["trainer"].config
  n = config.batch_size * max(config.masking.max_predictions_text,
                              config.masking.max_predictions_video)
  np.testing.assert_allclose(run["losses"], reference["losses"],
                             rtol=(n - 1) * tolerance.EPS32, atol=0, err_msg=f"{name} losses")
  # The losses move: the steps really update with dropout and a non-zero learning rate.
  assert len(set(np.round(reference["losses"], 6))) == STEPS
  for step in range(STEPS):
    tolerance.assert_trees_within(run["grads"][step], reference["grads"][step],
                                  reference["atols"][step], f"{name} step {step} gradient")


def test_parameters_match_one_device(reference, sharded):
  name, run = sharded
  _assert_trees_close(run["params"], reference["params"], 0, 1e-2 * LR, f"{name} param")
  moved = max(float(np.abs(a - b).max()) for a, b in
              zip(jax.tree.leaves(reference["params"]), jax.tree.leaves(reference["initial"])))
  assert moved > LR  # three Adam steps of size ~lr


def _logical_names(trainer):
  """The logical axis names the model declares for each parameter, by path."""
  import flax.linen as nn
  boxed = jax.eval_shape(trainer.trainable.init, jax.random.key(0))
  specs = nn.get_partition_spec(boxed)
  flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]
  return {jax.tree_util.keystr(path): tuple(spec) for path, spec in flat}


def test_large_parameters_are_split_as_the_rules_say(sharded):
  name, run = sharded
  trainer, state = run["trainer"], run["state"]
  mesh = MESHES[name]
  names = _logical_names(trainer)
  checked = 0
  for path, param in jax.tree_util.tree_flatten_with_path(state.params)[0]:
    if param.ndim < 2:
      continue
    key = jax.tree_util.keystr(path)
    axes = {LOGICAL_TO_MESH[n] for n in names[key] if n in LOGICAL_TO_MESH}
    split = math.prod(mesh[a] for a in axes)
    shard = param.sharding.shard_shape(param.shape)
    assert math.prod(shard) * split == param.size, (name, key, param.sharding.spec, shard)
    # The optimizer moments follow their parameter.
    mu = state.opt_state[1][0].mu
    for p, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(mu)):
      assert m.sharding.is_equivalent_to(p.sharding, p.ndim)
    checked += 1
  assert checked >= 10
  if name == "fsdp8":
    # Nothing large stays whole under FSDP: every table and matrix is cut in 8.
    for p in jax.tree.leaves(state.params):
      if p.size >= 1024:
        assert math.prod(p.sharding.shard_shape(p.shape)) * 8 == p.size
  table = state.params["embeddings"]["word_embeddings"]["embedding"]
  query = state.params["encoder"]["layer_0"]["attention"]["query"]["kernel"]
  expected = {"data8": (P(), P()),
              "fsdp8": (P(None, "fsdp"), P("fsdp")),
              "data2_tensor4": (P("tensor"), P(None, "tensor")),
              "data2_fsdp2_tensor2": (P("tensor", "fsdp"), P("fsdp", "tensor"))}[name]
  for array, spec in zip((table, query), expected):
    want = jax.sharding.NamedSharding(trainer.mesh, spec)
    assert array.sharding.is_equivalent_to(want, array.ndim), (name, array.sharding.spec)


def test_batch_is_split_over_data_and_fsdp(sharded):
  name, run = sharded
  trainer = run["trainer"]
  source = pretrain_lib.make_source(trainer.config, "train", trainer.config.batch_size, trainer.mesh)
  np.testing.assert_array_equal(sharding.process_rows(16, trainer.mesh, trainer.rules),
                                np.arange(16))
  batch = trainer.put_batch(next(source))
  mesh = MESHES[name]
  rows = batch["input_ids"].sharding.shard_shape(batch["input_ids"].shape)[0]
  assert rows * mesh["data"] * mesh["fsdp"] == trainer.config.batch_size


def test_mesh_that_does_not_divide_the_devices_is_named():
  with pytest.raises(ValueError, match=r"config.mesh \(data=3, fsdp=1, tensor=1\) on 8 cpu "
                                       r"devices in 1 process needs 3 devices but 8"):
    sharding.make_mesh(dict(data=3, fsdp=1, tensor=1))
  with pytest.raises(ValueError, match=r"config.mesh \(data=-1, fsdp=3, tensor=1\) on 8 cpu "
                                       r"devices in 1 process: axis fsdp=3 does not divide the 8 "
                                       r"devices"):
    sharding.make_mesh(dict(data=-1, fsdp=3, tensor=1))
  with pytest.raises(ValueError, match=r"config.mesh: unknown axes \['model'\]"):
    sharding.make_mesh(dict(data=-1, model=2))
  assert sharding.make_mesh(dict(data=-1, fsdp=2, tensor=2)).shape == {
      "data": 2, "fsdp": 2, "tensor": 2}


def test_mesh_that_does_not_divide_the_batch_is_named():
  config = _config(dict(data=-1, fsdp=1, tensor=1))
  with config.unlocked():
    config.batch_size = 12
  with pytest.raises(ValueError, match=r"config.batch_size=12 is not divisible by the 8 "
                                       r"batch shards of config.mesh \(data=8 x fsdp=1\); "
                                       r"expected a multiple of 8. On 8 cpu devices in 1 "
                                       r"process, process 0 would feed 12 rows to its 8 "
                                       r"devices"):
    train.Trainer(pretrain_lib.make_trainable(config), config)
  with config.unlocked():
    config.batch_size, config.grad_accum_steps = 16, 4
  with pytest.raises(ValueError, match=r"times config.grad_accum_steps=4; expected a "
                                       r"multiple of 32"):
    train.Trainer(pretrain_lib.make_trainable(config), config)


def test_rules_naming_an_unknown_mesh_axis_are_rejected():
  with pytest.raises(ValueError, match=r"sharding_rules\[1\] \('embed'\): unknown mesh axes "
                                       r"\['model'\]"):
    sharding.make_rules((("batch", "data"), ("embed", "model")))


_COLLECTIVE = re.compile(r"= (\(.*?\)|\S+) (all-gather|all-reduce|reduce-scatter|"
                         r"collective-permute|all-to-all)(?:-start)?\(")


def _collectives(hlo: str) -> list[tuple[str, list[tuple[int, ...]]]]:
  """(kind, result shapes) of every collective of a compiled module."""
  out = []
  for match in _COLLECTIVE.finditer(hlo):
    shapes = [tuple(int(d) for d in dims.split(",") if d)
              for dims in re.findall(r"[a-z0-9]+\[([0-9,]*)\]", match.group(1))]
    out.append((match.group(2), shapes))
  return out


def test_tied_heads_never_move_the_word_tables_between_tensor_shards():
  """With `vocab` over tensor=4, each head reads its own table on the shards it lives on: the
  compiled step re-lays no table rows (no permute, gather or all-to-all of them), and the only
  collectives on table shards are their gradients' reduction over `data`, as with any weight.
  One joint table sliced in two, as the model once had it, permuted and gathered its rows."""
  config = _config(dict(data=2, fsdp=1, tensor=4))
  with config.unlocked():
    config.model.update(num_layers=1, text_vocab_size=1000, visual_vocab_size=500)
  trainer = train.Trainer(pretrain_lib.make_trainable(config), config)
  hlo = trainer.lower_train_step().compile().as_text()
  vocab = pretrain_lib.model_config(config).vocab
  rows = {vocab.text_padded, vocab.visual_padded, vocab.total_size}
  rows |= {n // 4 for n in rows}
  hidden = config.model.hidden_size
  collectives = _collectives(hlo)
  assert collectives, "no collective at all: the step is not sharded"
  assert not [c for c in collectives if c[0] == "collective-permute"], collectives
  moved = [(kind, shape) for kind, shapes in collectives for shape in shapes
           if len(shape) == 2 and shape[1] == hidden and shape[0] in rows]
  assert {kind for kind, _ in moved} == {"all-reduce"}, moved
  assert {shape for _, shape in moved} == {(vocab.text_padded // 4, hidden),
                                           (vocab.visual_padded // 4, hidden)}, moved
