"""The generic trainer: sharded state, one jitted step, evaluation, and the loop with resume.

Any model trains through it as a `Trainable`: an `init(rng) -> params` (boxed with logical axis
names, as `flax.linen.with_logical_partitioning` makes them), a `loss(params, batch, rng) -> (loss,
metrics)` (`rng` None means evaluation: no dropout), and optional batch checks, a batch spec and a
FLOP count, and the parameters a fresh run starts from. VideoBERT pretraining
(`vbert_jax.pretrain`) is one instance; the captioner (`vbert_jax.captioning`) is another.

The config keys the trainer reads: seed, prng_impl, batch_size, total_steps, grad_accum_steps,
optimizer.{learning_rate, end_learning_rate, warmup_steps, b1, b2, eps, weight_decay,
grad_clip_norm}, mesh.{data, fsdp, tensor}, sharding_rules, log_every_steps,
eval.{every_steps, num_batches}, checkpoint.*, profile.{start_step, num_steps},
compilation_cache_dir, peak_flops_per_device, prefetch_batches (default 2).

A step is numbered by the updates done before it: the state saved as checkpoint N has had N
updates and its input iterator stands before batch N. The dropout key of step N is
fold_in(key(seed), N) (folded again with the micro-batch index under gradient accumulation), so
a run resumed from a checkpoint repeats the uninterrupted run bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import os
import pathlib
import platform
import sys
import tempfile
from typing import Any, Callable, Iterator, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from etils import epath

from vbert_jax import checkpoints
from vbert_jax import console
from vbert_jax import metrics as metrics_lib
from vbert_jax import prefetch
from vbert_jax import processes
from vbert_jax import sharding

Batch = Mapping[str, Any]
Params = Any

VERSIONED_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "ml-collections",
                      "clu", "numpy", "tensorflow-cpu", "tensorflow", "tensorflow-datasets",
                      "grain", "libtpu", "etils", "absl-py")


class TrainState(flax.struct.PyTreeNode):
  """Everything a checkpoint holds besides the input position."""
  step: jax.Array
  params: Params
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class Trainable:
  """What the trainer needs to know about a model and its objective."""
  init: Callable[[jax.Array], Params]
  loss: Callable[..., tuple[jax.Array, Mapping[str, jax.Array]]]
  # For gradient accumulation: what each term of the loss averages over in a whole batch
  # ({term: count}); `loss(..., over=counts)` then divides a micro-batch's sums by them, so that
  # the micro-batches' gradients add up to the whole batch's.
  denominators: Callable[[Batch], Mapping[str, jax.Array]] | None = None
  # Raises a ValueError naming `where` when a host batch is not what the model accepts.
  check_batch: Callable[[Batch, str], None] | None = None
  # {field: ShapeDtypeStruct} of a global batch of a given size (for ahead-of-time lowering).
  batch_spec: Callable[[int], dict[str, jax.ShapeDtypeStruct]] | None = None
  # Model FLOPs of one training step (forward + backward) over a global batch of a given size.
  train_flops: Callable[[int], float] | None = None
  tokens_per_example: int = 0
  # A fresh run's parameters when they do not start from `init` (an exported checkpoint, a
  # pretrained model): given the abstract train state (with shardings) and a function that makes
  # the freshly initialised parameters; None from it means `init`.
  initial_params: Callable[[Any, Callable[[], Params]], Params | None] | None = None
  # Whether the model's logical constraints on activations apply (the mesh is set while
  # tracing). Parameters and batches are sharded either way; without it XLA propagates the
  # activation shardings from them.
  shard_activations: bool = True


# ---------------------------------------------------------------------------------------------
# Optimiser.


def make_schedule(opt: Mapping[str, Any], total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then linear decay to `end_learning_rate` at the end."""
  warmup = int(opt["warmup_steps"])
  if total_steps <= 0 or not 0 <= warmup <= total_steps:
    raise ValueError(f"config.optimizer.warmup_steps={warmup} with config.total_steps="
                     f"{total_steps}: expected 0 <= warmup_steps <= total_steps, total_steps > 0")
  peak, end = float(opt["learning_rate"]), float(opt["end_learning_rate"])
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, max(warmup, 1)),
       optax.linear_schedule(peak, end, max(total_steps - warmup, 1))], [warmup])


# Leaves that take no weight decay (BERT's recipe), by name: biases, LayerNorm scales.
NO_DECAY_LEAVES = ("bias", "scale")


def decay_mask(params: Params) -> Params:
  """True for the leaves that weight decay applies to: kernels and embedding tables.

  Chosen by path, not by rank: attention biases are [heads, head_dim], and a scanned encoder
  stacks every bias and LayerNorm parameter along a leading layer axis. Nothing under a
  LayerNorm module (named `*norm*`) decays either.
  """
  def decays(path: Any, _) -> bool:
    names = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
    return bool(names) and names[-1] not in NO_DECAY_LEAVES and not any(
        "norm" in n for n in names)
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(opt: Mapping[str, Any], total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = make_schedule(opt, total_steps)
  parts = []
  if float(opt["grad_clip_norm"]) > 0:
    parts.append(optax.clip_by_global_norm(float(opt["grad_clip_norm"])))
  parts.append(optax.adamw(schedule, b1=float(opt["b1"]), b2=float(opt["b2"]),
                           eps=float(opt["eps"]), weight_decay=float(opt["weight_decay"]),
                           mask=decay_mask))
  return optax.chain(*parts), schedule


# ---------------------------------------------------------------------------------------------
# The step.


def _loss_and_grads(trainable: Trainable, params: Params, batch: Batch, rng: jax.Array
                    ) -> tuple[dict[str, jax.Array], Params]:
  (loss, metrics), grads = jax.value_and_grad(trainable.loss, has_aux=True)(params, batch, rng)
  return metrics_lib.to_sums({"loss": loss, **metrics}), grads


def _accumulate(trainable: Trainable, params: Params, batch: Batch, rng: jax.Array,
                micro_steps: int, batch_sharding: jax.sharding.NamedSharding
                ) -> tuple[dict, Params]:
  """The whole batch's gradient from micro-batches, scanned so only one is live at a time.

  Each micro-batch's loss divides by the whole batch's counts (`Trainable.denominators`), so a
  micro-batch weighs by its real predictions and the gradients simply add up.
  """
  over = trainable.denominators(batch)
  # Micro-batch j takes rows j, j + k, j + 2k, ...: every device holds a slice of each.
  def split(x):
    x = x.reshape((x.shape[0] // micro_steps, micro_steps) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  micro = jax.tree.map(split, batch)
  loss_fn = functools.partial(trainable.loss, over=over)

  def one(mb: Batch, key: jax.Array) -> tuple[dict, Params]:
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, mb, key)
    return metrics_lib.to_sums({**metrics, "loss": loss}), grads

  def body(carry, inputs):
    index, mb = inputs
    mb = jax.lax.with_sharding_constraint(mb, jax.tree.map(lambda _: batch_sharding, mb))
    sums, grads = one(mb, jax.random.fold_in(rng, index))
    acc_sums, acc_grads = carry
    return (metrics_lib.add_sums(acc_sums, sums), jax.tree.map(jnp.add, acc_grads, grads)), None

  first = jax.tree.map(lambda x: x[0], micro)
  sums_shape = jax.eval_shape(lambda: one(first, rng)[0])
  zeros = (jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape),
           jax.tree.map(jnp.zeros_like, params))
  (sums, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(micro_steps), micro))
  # The micro-batches' losses add up to the batch's: count the step once, not k times.
  sums["loss/_n"] = jnp.ones_like(sums["loss/_n"])
  return sums, grads


# The dropout keys' PRNG. threefry2x32 (partitionable) draws the same bits on any mesh, so a run
# gives the same results on 1 device or 8; rbg and unsafe_rbg draw faster on accelerators but
# their bits depend on how the batch is sharded. Every one resumes exactly: the key of step N is
# fold_in(key(seed), N).
PRNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")


def prng_impl(config: Mapping[str, Any]) -> str:
  impl = str(config.get("prng_impl", "threefry2x32") or "threefry2x32")
  if impl not in PRNG_IMPLS:
    raise ValueError(f"config.prng_impl={impl!r}: expected one of {PRNG_IMPLS}")
  return impl


def train_step(trainable: Trainable, tx: optax.GradientTransformation, schedule: optax.Schedule,
               seed: int, impl: str, micro_steps: int, batch_sharding: jax.sharding.NamedSharding,
               return_grads: bool, state: TrainState, batch: Batch):
  """One update: (new state, metric sums[, gradients])."""
  rng = jax.random.fold_in(jax.random.key(seed, impl=impl), state.step)
  if micro_steps == 1:
    sums, grads = _loss_and_grads(trainable, state.params, batch, rng)
  else:
    sums, grads = _accumulate(trainable, state.params, batch, rng, micro_steps, batch_sharding)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  sums.update(metrics_lib.to_sums({"grad_norm": optax.tree.norm(grads),
                                   "learning_rate": schedule(state.step)}))
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return (new_state, sums, grads) if return_grads else (new_state, sums)


def eval_step(trainable: Trainable, params: Params, batch: Batch) -> dict[str, jax.Array]:
  loss, metrics = trainable.loss(params, batch, None)
  return metrics_lib.to_sums({"loss": loss, **metrics})


def _unbox_abstract(tree: Any) -> Any:
  # Outside jit there is nothing to constrain: take the values out of the boxes.
  return jax.tree.map(lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x, tree,
                      is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


class Trainer:
  """The sharded train state, and the jitted step and eval functions, of a trainable and a config."""

  def __init__(self, trainable: Trainable, config: ml_collections.ConfigDict,
               mesh: jax.sharding.Mesh | None = None, return_grads: bool = False):
    jax.config.update("jax_threefry_partitionable", True)
    self.trainable, self.config = trainable, config
    self.mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
    self.rules = sharding.make_rules(config.sharding_rules)
    self.micro_steps = int(config.grad_accum_steps)
    if self.micro_steps < 1:
      raise ValueError(f"config.grad_accum_steps={self.micro_steps}: expected at least 1")
    if self.micro_steps > 1 and trainable.denominators is None:
      raise ValueError(f"config.grad_accum_steps={self.micro_steps}: this trainable does not say "
                       f"what its loss averages over (Trainable.denominators), so micro-batches "
                       f"cannot be weighed to give the whole batch's gradient; use 1")
    self.placement = sharding.input_placement(
        config.batch_size, self.mesh, self.rules, micro_steps=self.micro_steps,
        where=sharding.describe_devices(self.mesh))
    self.tx, self.schedule = make_optimizer(config.optimizer, config.total_steps)
    self.batch_sharding = sharding.batch_sharding(self.mesh, self.rules)
    # Initialisation runs without the mesh in context, so that a model's initialisers need not
    # be mesh-aware (nn.DenseGeneral, for one, constrains its flattened kernel with the names of
    # the full rank). The out_shardings below place every value on its shards all the same.
    boxed = jax.eval_shape(self._boxed_state, jax.random.key(0))
    self.state_shardings = sharding.logical_to_sharding(boxed, self.mesh, self.rules)
    self.abstract_state = _unbox_abstract(boxed)
    self.param_shardings = self.state_shardings.params
    replicated = sharding.replicated(self.mesh)
    step_fn = functools.partial(train_step, trainable, self.tx, self.schedule, int(config.seed),
                                prng_impl(config), self.micro_steps, self.batch_sharding,
                                return_grads)
    outs = (self.state_shardings, replicated)
    if return_grads:
      outs += (self.param_shardings,)
    self._compiled_step = None
    self._train_step = jax.jit(step_fn, in_shardings=(self.state_shardings, self.batch_sharding),
                               out_shardings=outs, donate_argnums=(0,))
    self._eval_step = jax.jit(functools.partial(eval_step, trainable),
                              in_shardings=(self.param_shardings, self.batch_sharding),
                              out_shardings=replicated)
    self._init = jax.jit(lambda rng: _unbox_abstract(self._boxed_state(rng)),
                         out_shardings=self.state_shardings)
    self._from_params = jax.jit(self._state_from_params, in_shardings=(self.param_shardings,),
                                out_shardings=self.state_shardings)

  def activate(self):
    return sharding.activate(self.mesh if self.trainable.shard_activations else None, self.rules)

  def _boxed_state(self, rng: jax.Array) -> TrainState:
    params = self.trainable.init(rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.tx.init(params))

  def _state_from_params(self, params: Params) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.tx.init(params))

  # State ---------------------------------------------------------------------------------------

  def init_state(self, seed: int | None = None) -> TrainState:
    """Fresh parameters and optimizer state, created directly on their shards."""
    seed = self.config.seed if seed is None else seed
    return self._init(jax.random.key(seed))

  def state_from_params(self, params: Params) -> TrainState:
    """Step 0 around given parameters (an initial checkpoint), with a fresh optimizer state."""
    with self.activate():
      return self._from_params(params)

  def abstract_with_shardings(self) -> TrainState:
    return sharding.with_shardings(self.abstract_state, self.state_shardings)

  # Steps ---------------------------------------------------------------------------------------

  def put_batch(self, local: Batch) -> dict[str, jax.Array]:
    return sharding.global_batch(local, self.mesh, self.rules)

  def train_step(self, state: TrainState, batch: Batch):
    with self.activate():
      return (self._compiled_step or self._train_step)(state, batch)

  def compile_train_step(self) -> None:
    """Compiles the step now rather than at its first call.

    With several processes, the first step's collectives time out (gloo waits 30 s) when one
    process is still compiling; compiling first and then meeting at a barrier avoids that.
    """
    self._compiled_step = self.lower_train_step().compile()

  def eval_step(self, params: Params, batch: Batch) -> dict[str, jax.Array]:
    with self.activate():
      return self._eval_step(params, batch)

  def lower_train_step(self, batch_size: int | None = None):
    """The step lowered for abstract inputs (no data, no devices needed: AOT compilation)."""
    if self.trainable.batch_spec is None:
      raise ValueError("ahead-of-time lowering needs the trainable's batch_spec")
    spec = self.trainable.batch_spec(batch_size or self.config.batch_size)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_sharding)
             for k, v in spec.items()}
    with self.activate():
      return self._train_step.lower(self.abstract_with_shardings(), batch)


# ---------------------------------------------------------------------------------------------
# The loop.


@dataclasses.dataclass
class LoopResult:
  state: TrainState
  step: int
  train_history: list[tuple[int, dict[str, float]]]
  eval_history: list[tuple[int, dict[str, float]]]
  preempted: bool = False


def prepare_workdir(workdir: Any) -> epath.Path:
  """The workdir, created and checked for writing; errors name the path and the problem."""
  if workdir is None or not str(workdir).strip():
    raise ValueError("workdir is empty: pass --workdir=DIR, a local or gs:// directory for "
                     "checkpoints, metrics and the resolved config")
  path = epath.Path(workdir)
  if path.exists() and not path.is_dir():
    raise NotADirectoryError(f"workdir {path} exists and is not a directory")
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write_test_{jax.process_index()}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise PermissionError(f"workdir {path} is not writable ({type(e).__name__}: {e}); expected "
                          f"a directory this process can create files in") from e
  return path


def setup_compilation_cache(config: ml_collections.ConfigDict) -> None:
  """Persistent XLA cache: restarts and reruns skip compilation. An explicit setting wins."""
  if jax.config.jax_compilation_cache_dir or not config.compilation_cache_dir:
    return
  path = os.path.expanduser(config.compilation_cache_dir)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def package_versions() -> dict[str, str]:
  out = {"python": sys.version.split()[0], "platform": platform.platform()}
  for name in VERSIONED_PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      continue
  return out


def write_run_info(workdir: epath.Path, config: ml_collections.ConfigDict) -> None:
  """The resolved config and the environment, next to the checkpoints (process 0)."""
  if jax.process_index() != 0:
    return
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
  devices = jax.devices()
  info = {"packages": package_versions(), "backend": jax.default_backend(),
          "device_kind": devices[0].device_kind, "device_count": len(devices),
          "process_count": jax.process_count()}
  (workdir / "versions.json").write_text(json.dumps(info, indent=2, sort_keys=True))


def _mean_train_metrics(pending: list[tuple[int, dict]]) -> tuple[int, dict[str, float]]:
  """Checks each step for non-finite loss / gradient norm, then averages over the interval."""
  host = jax.device_get([sums for _, sums in pending])
  total = None
  for (step, _), sums in zip(pending, host):
    metrics_lib.check_finite(step, sums, ("loss", "grad_norm"))
    total = metrics_lib.add_sums(total, sums)
  return pending[-1][0], metrics_lib.from_sums(total)


def evaluate(trainer: Trainer, params: Params, batches: Iterator[Batch], num_batches: int,
             step: int) -> dict[str, float]:
  """Means over `num_batches` of `batches`, an iterator made for this evaluation and closed
  after it (its worker processes stop)."""
  total = None
  try:
    for i in range(num_batches):
      try:
        local = next(batches)
      except StopIteration:
        if i == 0:
          raise ValueError("the eval input gave no batches") from None
        break
      if trainer.trainable.check_batch is not None:
        trainer.trainable.check_batch(local, f"eval batch {i} after step {step}")
      sums = jax.device_get(trainer.eval_step(params, trainer.put_batch(local)))
      total = metrics_lib.add_sums(total, sums)
  finally:
    close = getattr(batches, "close", None)
    if close is not None:
      close()
  return metrics_lib.from_sums(total)


def _initial_state(trainer: Trainer, ckpt: Any, config: ml_collections.ConfigDict,
                   train_iter: Any) -> TrainState:
  """The newest checkpoint in the workdir, else the configured initial one, else fresh."""
  state = ckpt.restore_latest(trainer.abstract_state, trainer.state_shardings, train_iter)
  if state is not None:
    logging.info("resumed at step %d", int(state.step))
    return state
  params = None
  if trainer.trainable.initial_params is not None:
    params = trainer.trainable.initial_params(trainer.abstract_with_shardings(),
                                         lambda: trainer.init_state().params)
  if params is not None:
    return trainer.state_from_params(params)
  return trainer.init_state()


def train_loop(trainable: Trainable, config: ml_collections.ConfigDict, workdir: Any,
               train_iter: Any,
               eval_iter_fn: Callable[[], Iterator[Batch]] | None = None,
               mesh: jax.sharding.Mesh | None = None) -> LoopResult:
  """Trains `trainable` until config.total_steps, resuming from `workdir` when it has a checkpoint.

  `train_iter` follows the input contract (next / get_state / set_state) and gives this
  process's rows of each global batch; `eval_iter_fn()` gives a fresh iterator over held-out
  batches for each evaluation.
  """
  processes.check_same_run(config)
  workdir = prepare_workdir(workdir)
  with console.log_to(run_log_path(workdir)) as log_path:
    return _train(trainable, config, workdir, train_iter, eval_iter_fn, mesh, log_path)


def run_log_path(workdir: epath.Path) -> pathlib.Path:
  """Where a process writes its whole log: in a local workdir, else in the temp folder."""
  name = "log.txt" if jax.process_index() == 0 else f"log_{jax.process_index()}.txt"
  if "://" in str(workdir):
    return pathlib.Path(tempfile.gettempdir()) / "vbert_jax_logs" / workdir.name / name
  return pathlib.Path(workdir) / name


def _train(trainable: Trainable, config: ml_collections.ConfigDict, workdir: epath.Path,
           train_iter: Any,
           eval_iter_fn: Callable[[], Iterator[Batch]] | None, mesh: jax.sharding.Mesh | None,
           log_path: pathlib.Path) -> LoopResult:
  setup_compilation_cache(config)
  trainer = Trainer(trainable, config, mesh)
  if jax.process_index() == 0:
    logging.info("%s", trainer.placement.summary())
  if int(config.log_every_steps) < 1:
    raise ValueError(f"config.log_every_steps={config.log_every_steps}: expected at least 1")
  if eval_iter_fn is not None:
    sharding.check_batch_size(config.eval.batch_size, trainer.mesh, trainer.rules,
                              key="config.eval.batch_size")
  write_run_info(workdir, config)
  ckpt = checkpoints.CheckpointManager(workdir, config)
  reporter = metrics_lib.Reporter(workdir)
  profile = metrics_lib.ProfileWindow(str(workdir / "profile"), config.profile.start_step,
                                      config.profile.num_steps)
  logging.info("writing checkpoints to %s; metrics.jsonl, TensorBoard events and the config to "
               "%s; the whole log to %s", ckpt.directory, workdir, log_path)
  try:
    state = _initial_state(trainer, ckpt, config, train_iter)
    result = _run(trainer, config, state, train_iter, eval_iter_fn, ckpt, reporter, profile)
  finally:
    profile.close()
    ckpt.close()
    reporter.close()
  logging.info("%s", final_summary(result, int(config.total_steps)))
  return result


def final_summary(result: LoopResult, total: int) -> str:
  """One line with the last logged train and eval figures of a run."""
  state = "preempted" if result.preempted else "finished"
  parts = [f"{state} at step {result.step} of {total}"]
  for kind, history in (("train", result.train_history), ("eval", result.eval_history)):
    if history:
      step, values = history[-1]
      parts.append(f"{kind} at step {step}: {metrics_lib.headline(values)}")
  return "; ".join(parts)


def _run(trainer: Trainer, config: ml_collections.ConfigDict, state: TrainState, train_iter: Any,
         eval_iter_fn: Callable[[], Iterator[Batch]] | None, ckpt: Any,
         reporter: metrics_lib.Reporter, profile: metrics_lib.ProfileWindow) -> LoopResult:
  trainable, total = trainer.trainable, int(config.total_steps)
  step = int(jax.device_get(state.step))
  batch_size = int(config.batch_size)
  flops = trainable.train_flops(batch_size) if trainable.train_flops else 0.0
  devices = trainer.mesh.devices.size
  peak = metrics_lib.peak_flops_per_device(trainer.mesh.devices.flat[0].device_kind,
                                           config.peak_flops_per_device)
  throughput = metrics_lib.Throughput(batch_size * trainable.tokens_per_example, flops, devices,
                                      peak)
  result = LoopResult(state, step, [], [])
  pending: list[tuple[int, dict]] = []

  def flush() -> None:
    if pending:
      last, means = _mean_train_metrics(pending)
      pending.clear()
      means.update(throughput.report(last))
      means.update(metrics_lib.real_rates(means))
      reporter.write(last, means, "train")
      result.train_history.append((last, means))

  logging.info("training from step %d to %d", step + 1, total)
  if jax.process_count() > 1 and trainable.batch_spec is not None:
    trainer.compile_train_step()
    processes.barrier("train_step_compiled")
  first, progress = step + 1, metrics_lib.Progress(total, step)
  log_every, eval_every = int(config.log_every_steps), int(config.eval.every_steps)
  save_every = int(config.checkpoint.every_steps)
  batches = _prefetcher(trainer, config, train_iter, first)
  try:
    while step < total:
      step += 1  # steps are numbered from 1: checkpoint N holds the state after step N
      profile.before_step(step)
      try:
        batch = next(batches)
      except StopIteration:
        raise ValueError(f"the train input ended before step {step} of {total}; expected an "
                         f"endless (repeating) iterator") from None
      state, sums = trainer.train_step(state, batch)
      profile.after_step(step, sums)
      pending.append((step, sums))
      if step == first:
        jax.block_until_ready(sums)  # the first step includes compilation: time from here
        throughput.start(step)
      last = step == total
      if step % log_every == 0 or last:
        flush()
        logging.info("%s; %s", progress.line(step), metrics_lib.headline(
            result.train_history[-1][1] if result.train_history else {}))
      if eval_iter_fn is not None and eval_every > 0 and (step % eval_every == 0 or last):
        values = evaluate(trainer, state.params, eval_iter_fn(), int(config.eval.num_batches),
                          step)
        reporter.write(step, values, "eval")
        result.eval_history.append((step, values))
        logging.info("eval at step %d: %s", step, metrics_lib.headline(values))
      preempted = ckpt.reached_preemption(step)
      if preempted or last or step % save_every == 0:
        flush()  # never save a state whose loss or gradient norm went non-finite
        ckpt.save(step, state, batches, force=preempted or last)
      if preempted:
        ckpt.wait()
        logging.warning("preempted: saved step %d, exiting", step)
        result.preempted = True
        break
  finally:
    batches.close()
  flush()
  reporter.flush()
  result.state, result.step = state, step
  return result


def _prefetcher(trainer: Trainer, config: ml_collections.ConfigDict, train_iter: Any,
                first: int) -> prefetch.Prefetcher:
  """The input's own thread draws, checks and transfers the next batches during the step;
  checkpoints take its state after the batches the loop has trained on."""
  check = None
  if trainer.trainable.check_batch is not None:
    check = lambda local, at: trainer.trainable.check_batch(local, f"train batch of step {at}")
  return prefetch.Prefetcher(train_iter, trainer.put_batch,
                             int(config.get("prefetch_batches", 2)), first, check)


# ---------------------------------------------------------------------------------------------
# VideoBERT pretraining: one instance of the trainer.


