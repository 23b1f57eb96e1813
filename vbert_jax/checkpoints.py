"""Checkpoints: the train state and the input iterator's state, saved and restored together.

`CheckpointManager` wraps an Orbax `CheckpointManager` for the training loop: asynchronous saves
every N steps, keep-last-K, a save on preemption (SIGTERM, or the TPU notice through JAX's
preemption sync point), restore onto any mesh, device count or host count, and a recovery that
all processes decide together (`restore_latest`). Each process saves the input iterator's state
beside the model, so a resumed run sees exactly the examples it would have seen.

`export_params` / `load_params` move parameters alone (for inference or as an initial
checkpoint; a model converts its own layouts on the way in, `vbert_jax.model.load`);
`read_checkpoint` reads a run's state for inspection. Nothing here knows a model.
All paths go through `etils.epath`, so `gs://` works wherever its credentials do.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import errno
import json
import os
import re
import signal
import threading
import time
from typing import Any, Callable, Mapping, Sequence

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from vbert_jax import processes
from vbert_jax import stream

PyTree = Any
STATE = "state"
DATA = "data"
CHECKPOINT_SUBDIR = "checkpoints"


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
    """This process's state, or, from a run on another number of processes, theirs.

    The state is a position in the global input stream (`vbert_jax/stream.py`), the same on
    every process, so a checkpoint of 2 hosts resumes on 1 or on 4.
    """
    del args
    path = _process_file(directory)
    if path.exists():
      return _decode_state(path.read_text())
    found = sorted(p.name for p in directory.iterdir() if _PROCESS_FILE_RE.match(p.name)) \
        if directory.exists() else []
    if not found:
      raise FileNotFoundError(f"{path}: no input iterator state for process "
                              f"{jax.process_index()} of {jax.process_count()}; expected "
                              f"files process_<i>-of-<n>.json")
    states = [_decode_state((directory / name).read_text()) for name in found]
    if any(state != states[0] for state in states):
      raise ValueError(f"{directory}: the input states of {found} differ; expected one "
                       f"position of the global stream")
    logging.info("%s: input state of %s, written by another number of processes", directory,
                 found[0])
    return states[0]

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
# Preemption: SIGTERM on one process, JAX's sync point across many.
# --------------------------------------------------------------------------------------------


def _jax_preemption_service() -> bool:
  # With a distributed client JAX already catches SIGTERM and agrees on a step across hosts;
  # a Python handler here would replace its handler and break that agreement.
  return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


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


@dataclasses.dataclass(frozen=True)
class RestoreOptions:
  """How often a read that failed for a reason a retry may clear is tried again."""
  retries: int = 3
  backoff_s: float = 2.0  # before retry k (from 0): backoff_s * 2**k


def _checkpoint_options(config: Any) -> tuple[int, int | None, bool, RestoreOptions]:
  section = config.checkpoint
  every, keep, use_async = section["every_steps"], section["keep"], section["async"]
  if int(every) < 1:
    raise ValueError(f"config.checkpoint.every_steps={every}: expected a positive number of steps")
  if keep is not None and int(keep) < 1:
    raise ValueError(f"config.checkpoint.keep={keep}: expected at least 1 checkpoint to keep")
  defaults = RestoreOptions()
  restore = RestoreOptions(int(section.get("restore_retries", defaults.retries)),
                           float(section.get("restore_backoff_s", defaults.backoff_s)))
  if restore.retries < 0 or restore.backoff_s < 0:
    raise ValueError(f"config.checkpoint.restore_retries={restore.retries}, restore_backoff_s="
                     f"{restore.backoff_s}: expected non-negative numbers")
  return int(every), (int(keep) if keep is not None else None), bool(use_async), restore


class CheckpointManager:
  """Saves and restores (train state, input iterator state) under `workdir/checkpoints`."""

  def __init__(self, workdir: Any, config: Any):
    self.directory = _workdir_path(workdir) / CHECKPOINT_SUBDIR
    every, keep, use_async, self._restore_options = _checkpoint_options(config)
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
    """Restores the newest checkpoint that every process can read, onto `shardings`; None when
    there is none.

    The processes decide together: they take process 0's list of steps and, newest first, each
    reads the step (an error that a retry may clear is retried with backoff), then all share
    their outcomes. A step that any process cannot read (files missing or unparsable) is
    skipped by all; process 0 moves it aside once, to `<step>.unreadable-<time>`, so that the
    run can write that step again, and nothing is deleted. Running out of memory, storage that
    stays unavailable, or a checkpoint of another config (CheckpointMismatchError) stops every
    process, naming the process and the step, with the checkpoint left in place.
    """
    target = _with_shardings(abstract_state, shardings)
    steps = json.loads(processes.all_gather("checkpoint_steps",
                                            json.dumps(sorted(self._mngr.all_steps())))[0])
    for step in sorted(steps, reverse=True):
      outcome, restored = self._read_with_retries(step, target)
      outcomes = [json.loads(o) for o in processes.all_gather(
          f"restore_outcome_{step}", json.dumps(outcome))]
      _stop_on_fatal(outcomes, self.directory / str(step))
      unreadable = [(i, o["reason"]) for i, o in enumerate(outcomes) if o["kind"] == UNREADABLE]
      if not unreadable:
        state, data_state = restored
        if data_iter is not None and data_state is not None:
          data_iter.set_state(data_state)
        logging.info("restored checkpoint %s", self.directory / str(step))
        return state
      del restored
      reasons = "; ".join(f"process {i}: {reason}" for i, reason in unreadable)
      logging.warning("checkpoint %s cannot be read (%s); setting it aside and trying the one "
                      "before", self.directory / str(step), reasons)
      self._set_aside(step)
    return None

  def _read_with_retries(self, step: int, target: PyTree) -> tuple[dict[str, str], Any]:
    """({"kind", "reason"}, (state, data state) or None) of this process's read of `step`."""
    options = self._restore_options
    for attempt in range(options.retries + 1):
      try:
        return {"kind": OK, "reason": ""}, self._read_step(step, target)
      except Exception as e:  # pylint: disable=broad-except
        kind, reason = classify_restore_error(e)
        if kind == TRANSIENT and attempt < options.retries:
          wait = options.backoff_s * 2 ** attempt
          logging.warning("reading checkpoint %s failed (%s); retry %d of %d in %.1f s",
                          self.directory / str(step), reason, attempt + 1, options.retries,
                          wait)
          time.sleep(wait)
          continue
        if kind == TRANSIENT:
          reason = f"{reason} (still failing after {options.retries} retries)"
        return {"kind": kind, "reason": reason}, None
    raise AssertionError("unreachable")

  def _read_step(self, step: int, target: PyTree) -> tuple[PyTree, Any]:
    """This process's shards of `step` and its input state, read by the handlers themselves:
    Orbax's manager would wait at a barrier for processes whose read failed."""
    path = self.directory / str(step)
    handler = ocp.StandardCheckpointHandler()
    try:
      metadata = handler.metadata(path / STATE)
      if metadata is None:
        raise FileNotFoundError(f"{path / STATE}: no train state metadata")
      check_shapes(_metadata_tree(metadata), target, where=f"checkpoint {path}",
                   what="train state entry")
      state = handler.restore(path / STATE, args=ocp.args.StandardRestore(target))
    finally:
      handler.close()
    return state, DataIteratorHandler().restore(path / DATA)

  def _set_aside(self, step: int) -> None:
    # Only one process renames; the others wait for it before listing the steps again.
    if jax.process_index() == 0:
      stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
      source = self.directory / str(step)
      source.rename(self.directory / f"{step}.unreadable-{stamp}")
    processes.barrier(f"set_aside_{step}")
    self._mngr.reload()


# Outcomes of one process's read of a checkpoint.
OK, TRANSIENT, UNREADABLE = "ok", "transient", "unreadable"
OUT_OF_MEMORY, MISMATCH = "out of memory", "mismatch"
_TRANSIENT_TEXT = re.compile(r"\bUNAVAILABLE\b|DEADLINE_EXCEEDED|\bABORTED\b|timed? ?out|"
                             r"connection (reset|refused|aborted)|temporar(y|ily)|"
                             r"\b(429|500|502|503|504)\b", re.IGNORECASE)
_OOM_TEXT = re.compile(r"RESOURCE_EXHAUSTED|out of memory|\bOOM\b", re.IGNORECASE)
_TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT,
                               errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED,
                               errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EINTR})


def classify_restore_error(error: BaseException) -> tuple[str, str]:
  """(kind, one-line reason) of a failed checkpoint read.

  A retry may clear I/O trouble and timeouts (TRANSIENT); missing or unparsable files make the
  checkpoint UNREADABLE; running out of memory and a checkpoint of another config (MISMATCH)
  stop the run, since an older checkpoint would fail the same way.
  """
  first = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
  reason = f"{type(error).__name__}: {first}" if first else type(error).__name__
  if isinstance(error, (CheckpointMismatchError, stream.StreamMismatchError)):
    return MISMATCH, str(error)  # whole: it lists what differs
  if isinstance(error, MemoryError) or _OOM_TEXT.search(str(error)):
    return OUT_OF_MEMORY, reason
  if isinstance(error, (TimeoutError, ConnectionError)):
    return TRANSIENT, reason
  if isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS:
    return TRANSIENT, reason
  if not isinstance(error, (FileNotFoundError, IsADirectoryError, NotADirectoryError)) and \
      _TRANSIENT_TEXT.search(str(error)):
    return TRANSIENT, reason
  return UNREADABLE, reason


class CheckpointRestoreError(RuntimeError):
  """A checkpoint could not be restored and no older one would fare better; the run stops."""


def _stop_on_fatal(outcomes: Sequence[Mapping[str, str]], path: epath.Path) -> None:
  """Raises on every process when any process's read cannot be answered by skipping the step."""
  for index, outcome in enumerate(outcomes):
    kind, reason = outcome["kind"], outcome["reason"]
    if kind == MISMATCH:
      raise CheckpointMismatchError(f"{reason} (read by process {index})")
    if kind == OUT_OF_MEMORY:
      raise CheckpointRestoreError(
          f"restoring checkpoint {path} ran out of memory on process {index} ({reason}); it was "
          f"left in place. Restore onto more devices or shard the state more "
          f"(config.mesh.fsdp), or free memory on the host.")
    if kind == TRANSIENT:
      raise CheckpointRestoreError(
          f"checkpoint {path} could not be read on process {index}: {reason}; storage seems "
          f"unavailable, so nothing was set aside. Run again once it answers.")


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


def load_params(path: Any, abstract_params: PyTree | None = None,
                convert: Callable[[PyTree, PyTree], PyTree] | None = None) -> PyTree:
  """Reads exported parameters; with `abstract_params`, on its shardings.

  Without `abstract_params` the parameters come back as host numpy arrays as they were saved.
  `convert(params, abstract_params)` first brings them to the structure that `abstract_params`
  has (a model's own layouts: `vbert_jax.model.load`).
  """
  path = _path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path}: no exported parameters there (expected a directory written "
                            "by checkpoints.export_params)")
  params = _read_params_host(path)
  if abstract_params is None:
    return params
  if convert is not None:
    params = convert(params, abstract_params)
  check_shapes(params, abstract_params, where=f"parameters {path}")

  def place(value, abstract):
    value = np.asarray(value, dtype=abstract.dtype)
    sharding = getattr(abstract, "sharding", None)
    return jax.device_put(value, sharding) if sharding is not None else jax.numpy.asarray(value)
  return jax.tree.map(place, params, abstract_params)
