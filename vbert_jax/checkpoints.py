"""Checkpoints: the train state and the input iterator's state, saved and restored together.

`CheckpointManager` wraps an Orbax `CheckpointManager` for the training loop: asynchronous saves
every N steps, keep-last-K, a save on preemption (SIGTERM, or the TPU notice through JAX's
preemption sync point), restore onto any mesh or device count, and a fall-back to the previous
step when the newest one does not restore. Each process saves its own input iterator state, so
a resumed run sees exactly the examples it would have seen.

`export_params` / `load_params` move parameters alone (for inference or as an initial
checkpoint) and convert between the model's scanned (`encoder/layers/...` with a leading layer
axis) and unscanned (`encoder/layer_{i}/...`) layouts; `load_initial` starts a fresh run from
such an export or from a BERT directory; `read_checkpoint` reads a run's state for inspection.
All paths go through `etils.epath`, so `gs://` works wherever its credentials do.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import json
import os
import re
import signal
import threading
from typing import Any, Callable, Mapping, Sequence

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any
STATE = "state"
DATA = "data"
CHECKPOINT_SUBDIR = "checkpoints"
# The model's layer names: `encoder/layers` when scanned, `encoder/layer_{i}` when not.
SCANNED = "layers"
UNSCANNED_0 = "layer_0"


class CheckpointMismatchError(ValueError):
  """A checkpoint was written with another config: its shapes or parameters differ."""


# --------------------------------------------------------------------------------------------
# The input iterator's state: one small JSON file per process.
# --------------------------------------------------------------------------------------------


def _encode_state(state: Any) -> str:
  # Grain's DataLoader gives bytes, a dataset iterator a JSON-able dict: keep both lossless.
  if isinstance(state, (bytes, bytearray)):
    return json.dumps({"bytes": base64.b64encode(bytes(state)).decode("ascii")})
  return json.dumps({"json": state})


def _decode_state(text: str) -> Any:
  record = json.loads(text)
  if "bytes" in record:
    return base64.b64decode(record["bytes"])
  return record["json"]


_PROCESS_FILE_RE = re.compile(r"^process_\d+-of-\d+\.json$")


def _process_file(directory: epath.Path) -> epath.Path:
  return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"


class DataIteratorHandler(ocp.CheckpointHandler):
  """Writes each process's iterator state to its own file (the hosts read different shards)."""

  def save(self, directory: epath.Path, args: "DataIteratorSave") -> None:
    _process_file(directory).write_text(_encode_state(args.state))

  def restore(self, directory: epath.Path, args: "DataIteratorRestore | None" = None) -> Any:
    """This process's state; None when the checkpoint was written by another process count."""
    del args
    path = _process_file(directory)
    if path.exists():
      return _decode_state(path.read_text())
    found = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
    if any(_PROCESS_FILE_RE.match(name) for name in found):
      # A pod's checkpoint on a laptop: the hosts' shards of the input do not map onto ours.
      logging.warning("%s: the input iterator states are for another number of processes "
                      "(%s); this run's input starts from its beginning", directory, found)
      return None
    raise FileNotFoundError(f"{path}: no input iterator state for process "
                            f"{jax.process_index()} of {jax.process_count()}; found {found}")

  def metadata(self, directory: epath.Path) -> None:
    del directory
    return None

  def finalize(self, directory: epath.Path) -> None:
    del directory

  def close(self) -> None:
    pass


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
  # The state is taken when `save` is called, since the iterator moves on during an async save.
  state: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
  pass


# --------------------------------------------------------------------------------------------
# Shape checks against a checkpoint's metadata.
# --------------------------------------------------------------------------------------------


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _flat_with_paths(tree: PyTree) -> dict[str, Any]:
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
  return {"/".join(_key_name(k) for k in path): leaf for path, leaf in leaves if leaf is not None}


def check_shapes(stored: PyTree, expected: PyTree, where: str, what: str = "parameter") -> None:
  """Raises CheckpointMismatchError naming the first paths whose shapes or presence differ."""
  stored_flat = _flat_with_paths(stored)
  expected_flat = _flat_with_paths(expected)
  problems = []
  for path, leaf in expected_flat.items():
    if path not in stored_flat:
      problems.append(f"{what} {path!r} (shape {tuple(leaf.shape)}) is missing from the checkpoint")
      continue
    got = tuple(getattr(stored_flat[path], "shape", ()) or ())
    if got != tuple(leaf.shape):
      problems.append(f"{what} {path!r} has shape {got} in the checkpoint but "
                      f"{tuple(leaf.shape)} in the config")
  extra = sorted(set(stored_flat) - set(expected_flat))
  problems += [f"{what} {path!r} is in the checkpoint but not in the config" for path in extra]
  if problems:
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    raise CheckpointMismatchError(
        f"{where} was written with another config: " + "; ".join(problems[:5]) + more +
        ". Check the variant, vocabulary sizes, max_len and scan_layers against the run that "
        "wrote it.")


def _with_shardings(abstract: PyTree, shardings: PyTree | None) -> PyTree:
  def one(leaf, sharding):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                       sharding=getattr(x, "sharding", None)),
                        abstract)
  return jax.tree.map(one, abstract, shardings)


# --------------------------------------------------------------------------------------------
# Processes: a barrier, and preemption (SIGTERM on one process, JAX's sync point across many).
# --------------------------------------------------------------------------------------------


_BARRIER_TIMEOUT_S = 1800
_barrier_count = 0


def sync_processes(name: str) -> None:
  """Waits for every process on the coordination service (a no-op in a single process).

  Not a device collective: Orbax's own synchronisation and the first train step are, and on CPU
  (gloo) those were seen to time out after 30 s when one process started them much later than
  the others on a loaded machine.
  """
  global _barrier_count
  client = jax._src.distributed.global_state.client  # pylint: disable=protected-access
  if client is None or jax.process_count() == 1:
    return
  _barrier_count += 1  # barrier names are single-use
  client.wait_at_barrier(f"vbert_{name}_{_barrier_count}", _BARRIER_TIMEOUT_S * 1000)


def _jax_preemption_service() -> bool:
  # With a distributed client JAX already catches SIGTERM and agrees on a step across hosts;
  # a Python handler here would replace its handler and break that agreement.
  state = jax._src.distributed.global_state  # pylint: disable=protected-access
  return state.client is not None and state.preemption_sync_manager is not None


class _SigtermFlag:
  """Records SIGTERM instead of dying, so the loop can save and exit cleanly."""

  def __init__(self):
    self.event = threading.Event()
    self._previous = None
    self.installed = False

  def install(self) -> None:
    if threading.current_thread() is not threading.main_thread():
      logging.warning("not on the main thread: SIGTERM will not trigger a preemption save")
      return
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    self.installed = True

  def _handle(self, signum, frame) -> None:
    del frame
    logging.warning("received signal %d: saving a checkpoint after this step, then exiting", signum)
    self.event.set()

  def uninstall(self) -> None:
    if self.installed and threading.current_thread() is threading.main_thread():
      signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)
      self.installed = False


# --------------------------------------------------------------------------------------------
# The manager used by the training loop.
# --------------------------------------------------------------------------------------------


def _workdir_path(workdir: Any) -> epath.Path:
  if workdir is None or not str(workdir).strip():
    raise ValueError("workdir is empty: pass --workdir=DIR, a local or gs:// directory where "
                     "checkpoints and metrics are written")
  return _path(workdir)


def _path(path: Any) -> epath.Path:
  """Orbax wants absolute paths; a local relative one is taken from the working directory."""
  text = os.fspath(path)
  return epath.Path(text if "://" in text else os.path.abspath(text))


def _checkpoint_options(config: Any) -> tuple[int, int | None, bool]:
  section = config.checkpoint
  every, keep, use_async = section["every_steps"], section["keep"], section["async"]
  if int(every) < 1:
    raise ValueError(f"config.checkpoint.every_steps={every}: expected a positive number of steps")
  if keep is not None and int(keep) < 1:
    raise ValueError(f"config.checkpoint.keep={keep}: expected at least 1 checkpoint to keep")
  return int(every), (int(keep) if keep is not None else None), bool(use_async)


class CheckpointManager:
  """Saves and restores (train state, input iterator state) under `workdir/checkpoints`."""

  def __init__(self, workdir: Any, config: Any):
    self.directory = _workdir_path(workdir) / CHECKPOINT_SUBDIR
    every, keep, use_async = _checkpoint_options(config)
    try:
      self.directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise OSError(f"cannot create the checkpoint directory {self.directory}: {e}") from e
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=every, max_to_keep=keep, enable_async_checkpointing=use_async,
        create=True, cleanup_tmp_directories=True)
    # Handlers are named up front so that a fresh process can read a step's metadata.
    handlers = {STATE: ocp.StandardCheckpointHandler(), DATA: DataIteratorHandler()}
    self._mngr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    self._use_jax_preemption = _jax_preemption_service()
    self._sigterm = _SigtermFlag()
    if not self._use_jax_preemption:
      self._sigterm.install()

  # Steps -------------------------------------------------------------------------------------

  def all_steps(self) -> Sequence[int]:
    return self._mngr.all_steps()

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def should_save(self, step: int) -> bool:
    return self._mngr.should_save(step)

  # Saving ------------------------------------------------------------------------------------

  def save(self, step: int, state: PyTree, data_iter: Any, force: bool = False) -> bool:
    """Starts an (asynchronous) save of `state` and `data_iter`'s state; False if skipped."""
    if step in self._mngr.all_steps():
      return False
    if not force and not self._mngr.should_save(step):
      return False
    args = ocp.args.Composite(**{
        STATE: ocp.args.StandardSave(state),
        DATA: DataIteratorSave(data_iter.get_state()),
    })
    saved = self._mngr.save(step, args=args, force=force)
    if saved:
      logging.info("saving checkpoint %s", self.directory / str(step))
    return saved

  def reached_preemption(self, step: int) -> bool:
    """True once the process was asked to stop: save now (force=True), wait, exit 0."""
    if self._use_jax_preemption:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._sigterm.event.is_set()

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()
    self._sigterm.uninstall()

  # Restoring ---------------------------------------------------------------------------------

  def restore_latest(self, abstract_state: PyTree, shardings: PyTree | None,
                     data_iter: Any | None) -> PyTree | None:
    """Restores the newest checkpoint that restores, onto `shardings`; None when there is none.

    A step that fails to read (truncated, partial or corrupt) is reported, moved aside to
    `<step>.corrupt-<time>` so that the run can write that step again, and the previous step is
    tried. A checkpoint from another config raises CheckpointMismatchError instead.
    """
    # The hosts enter and leave together: Orbax's own synchronisation and the first step are
    # device collectives, which fail when the hosts arrive far apart.
    sync_processes("restore_start")
    state = self._restore_latest(_with_shardings(abstract_state, shardings), data_iter)
    sync_processes("restored")
    return state

  def _restore_latest(self, target: PyTree, data_iter: Any | None) -> PyTree | None:
    for step in sorted(self._mngr.all_steps(), reverse=True):
      try:
        state, data_state = self._restore_step(step, target)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        path = self.directory / str(step)
        logging.warning("checkpoint %s failed to restore (%s: %s); using the previous one",
                        path, type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")
        self._quarantine(step)
        continue
      if data_iter is not None and data_state is not None:
        data_iter.set_state(data_state)
      logging.info("restored checkpoint %s", self.directory / str(step))
      return state
    return None

  def _restore_step(self, step: int, target: PyTree) -> tuple[PyTree, Any]:
    metadata = self._mngr.item_metadata(step)[STATE]
    if metadata is None:
      raise FileNotFoundError(f"{self.directory / str(step) / STATE}: no train state metadata")
    check_shapes(_metadata_tree(metadata), target, where=f"checkpoint {self.directory / str(step)}",
                 what="train state entry")
    restored = self._mngr.restore(step, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardRestore(target),
        DATA: DataIteratorRestore(),
    }))
    return restored[STATE], restored[DATA]

  def _quarantine(self, step: int) -> None:
    # Only one process renames; the others wait for it before listing the steps again.
    if jax.process_index() == 0:
      stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
      source = self.directory / str(step)
      source.rename(self.directory / f"{step}.corrupt-{stamp}")
    sync_processes(f"quarantine_{step}")
    self._mngr.reload()


def _metadata_tree(metadata: Any) -> PyTree:
  # Orbax wraps the tree metadata in an object on newer versions and gives the tree on older ones.
  tree = getattr(metadata, "tree", metadata)
  return tree


# --------------------------------------------------------------------------------------------
# Parameters alone: export, load, scanned <-> unscanned layouts.
# --------------------------------------------------------------------------------------------


def _params_of(state_or_params: Any) -> PyTree:
  if hasattr(state_or_params, "params"):
    return state_or_params.params
  if isinstance(state_or_params, Mapping) and isinstance(state_or_params.get("params"), Mapping):
    return state_or_params["params"]
  return state_or_params


def export_params(state_or_params: Any, path: Any) -> epath.Path:
  """Writes the parameters alone (no optimizer state) to `path`; returns the path."""
  path = _path(path)
  if path.exists():
    raise FileExistsError(f"{path} already exists: choose a new path for the exported parameters")
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, _params_of(state_or_params))
  return path


def _has_key(tree: Any, key: str) -> bool:
  return isinstance(tree, Mapping) and any(
      k == key or _has_key(v, key) for k, v in tree.items())


def convert_layout(params: Mapping, abstract_params: Mapping) -> Mapping:
  """Converts `params` to the scanned (`encoder/layers`, leading layer axis) or unscanned
  (`encoder/layer_{i}`) layout that `abstract_params` uses; the model owns both layouts."""
  from vbert_jax import model  # pylint: disable=g-import-not-at-top
  stored_scanned, wanted_scanned = _has_key(params, SCANNED), _has_key(abstract_params, SCANNED)
  if _has_key(params, UNSCANNED_0) and wanted_scanned and not stored_scanned:
    return model.scan_params(params)
  if stored_scanned and _has_key(abstract_params, UNSCANNED_0) and not wanted_scanned:
    return model.unscan_params(params)
  return params


def _read_params_host(path: epath.Path) -> PyTree:
  # Restored as host numpy arrays: the checkpoint may come from a mesh this machine lacks. The
  # handler reads one item directory, be it an export or the `state` item of a step.
  handler = ocp.PyTreeCheckpointHandler()
  try:
    metadata = _metadata_tree(handler.metadata(path))
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata,
                                is_leaf=lambda x: not isinstance(x, (Mapping, list, tuple)))
    return handler.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  finally:
    handler.close()


def read_checkpoint(workdir: Any, step: int | None = None) -> tuple[int, PyTree]:
  """(step, train state as host numpy arrays) of a run's checkpoint, the newest by default.

  For inspection: no config, mesh or abstract state needed; custom nodes (such as a train state
  dataclass) come back as nested dicts.
  """
  directory = _path(workdir) / CHECKPOINT_SUBDIR
  steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) \
      if directory.exists() else []
  if not steps:
    raise FileNotFoundError(f"{directory}: no checkpoints")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise FileNotFoundError(f"{directory}: no checkpoint at step {step}; found {steps}")
  return step, _read_params_host(directory / str(step) / STATE)


def load_params(path: Any, abstract_params: PyTree | None = None) -> PyTree:
  """Reads exported parameters; with `abstract_params`, in its layout and on its shardings.

  Without `abstract_params` the parameters come back as host numpy arrays in the layout they
  were saved in.
  """
  path = _path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path}: no exported parameters there (expected a directory written "
                            "by checkpoints.export_params)")
  params = _read_params_host(path)
  if abstract_params is None:
    return params
  params = convert_layout(params, abstract_params)
  check_shapes(params, abstract_params, where=f"parameters {path}")

  def place(value, abstract):
    value = np.asarray(value, dtype=abstract.dtype)
    sharding = getattr(abstract, "sharding", None)
    return jax.device_put(value, sharding) if sharding is not None else jax.numpy.asarray(value)
  return jax.tree.map(place, params, abstract_params)


# --------------------------------------------------------------------------------------------
# The initial checkpoint of a fresh run.
# --------------------------------------------------------------------------------------------


def _abstract_params(abstract_state: Any) -> PyTree:
  if hasattr(abstract_state, "params"):
    return abstract_state.params
  if isinstance(abstract_state, Mapping) and "params" in abstract_state:
    return abstract_state["params"]
  raise TypeError(f"abstract_state of type {type(abstract_state).__name__} has no 'params'")


def _config_get(config: Any, dotted: str) -> Any:
  node = config
  for part in dotted.split("."):
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      return None
  return node


def load_initial(config: Any, abstract_state: Any,
                 params: PyTree | Callable[[], PyTree] | None = None) -> PyTree | None:
  """Parameters for a fresh run from `config.init.checkpoint` or `config.init.bert_dir`.

  `config.init.checkpoint` is a directory written by `export_params` (from either layer layout):
  the parameters come back on the shardings of `abstract_state.params`. `config.init.bert_dir` is
  a Hugging Face BERT directory: it replaces the text part of `params`, the freshly initialised
  (sharded) parameters, whose visual rows stay random; `params` may be a function that makes
  them, so that a run without BERT does not pay for them. None when neither is configured; the
  loop builds the optimizer state around what comes back.
  """
  checkpoint = _config_get(config, "init.checkpoint")
  bert_dir = _config_get(config, "init.bert_dir")
  if checkpoint and bert_dir:
    raise ValueError(f"config.init.checkpoint={checkpoint!r} and config.init.bert_dir="
                     f"{bert_dir!r} are both set: choose one initial checkpoint")
  if checkpoint:
    logging.info("initialising parameters from %s", checkpoint)
    return load_params(checkpoint, _abstract_params(abstract_state))
  if bert_dir:
    if params is None:
      raise ValueError(f"config.init.bert_dir={bert_dir!r}: BERT fills the text part of freshly "
                       "initialised parameters; pass them as `params`")
    params = params() if callable(params) else params
    from vbert_jax import bert_import  # pylint: disable=g-import-not-at-top
    from vbert_jax import train  # pylint: disable=g-import-not-at-top
    logging.info("initialising the text part of the parameters from the BERT directory %s",
                 bert_dir)
    return bert_import.init_from_bert(params, bert_dir, train.model_config(config),
                                      max_len=_config_get(config, "max_len"))
  return None
