"""A small stage runner: each stage owns one folder under the work folder and a done-marker.

A stage's folder is `<workdir>/<name>`; its markers sit beside it, so that the tools writing
into the folder see only their own files. When a stage starts it writes `<name>.stage.json` (its
fingerprint: the config it depends on and the fingerprints of the stages it reads); when its
function returns, `<name>.done.json` is written atomically, last. On the next run:

  - the done-marker present with the same fingerprint: the stage is skipped, its summary reused;
  - the folder present without a done-marker (an interrupted run) or with another fingerprint: the
    folder is removed and the stage rebuilt from nothing, so that outputs of two runs never mix;
    a stage marked `resumable` (its own tool resumes exactly, like the feature extractor and the
    checkpointed trainer) continues in place instead, when its start-marker fingerprint matches.

Every build of a stage gets a new id, kept in its done-marker; the stages that read it include
that id in their fingerprints, so a stage rebuilt for any reason rebuilds every stage after it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import shutil
import sys
import time
import uuid
from typing import Any, Callable, Mapping, Sequence

from vbert_jax import atomic

DONE = "done.json"
STARTED = "stage.json"


@dataclasses.dataclass(frozen=True)
class Stage:
  """`run(folder)` builds the stage into `folder` and returns a JSON-able summary."""
  name: str
  run: Callable[[pathlib.Path], Mapping[str, Any] | None]
  config: Any = None  # what the outputs depend on (JSON-able)
  inputs: Sequence[str] = ()  # names of earlier stages whose outputs it reads
  resumable: bool = False
  description: str = ""


@dataclasses.dataclass
class StageResult:
  name: str
  folder: pathlib.Path
  summary: dict
  reused: bool
  seconds: float


def fingerprint(config: Any, upstream: Sequence[str]) -> str:
  text = json.dumps({"config": config, "upstream": list(upstream)}, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_json(path: pathlib.Path) -> dict | None:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def _write_json(path: pathlib.Path, value: Mapping[str, Any]) -> None:
  atomic.write_atomic(path, lambda tmp: pathlib.Path(tmp).write_text(
      json.dumps(value, indent=1, sort_keys=True, default=str)))


class Runner:
  """Runs stages in order under `workdir`, printing one progress line per stage."""

  def __init__(self, workdir, log: Callable[[str], None] | None = None):
    self.workdir = pathlib.Path(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    self.results: dict[str, StageResult] = {}
    self._prints: dict[str, str] = {}

  def folder(self, name: str) -> pathlib.Path:
    return self.workdir / name

  def marker(self, name: str, kind: str) -> pathlib.Path:
    """`<workdir>/<name>.done.json` (kind DONE) or `<workdir>/<name>.stage.json` (STARTED)."""
    return self.workdir / f"{name}.{kind}"

  def status(self, stage: Stage) -> str:
    """'done', 'resume', 'rebuild' (a stale or half-written folder) or 'new'."""
    folder, want = self.folder(stage.name), self._fingerprint(stage)
    done = _read_json(self.marker(stage.name, DONE))
    if not folder.exists():
      return "new" if done is None else "rebuild"
    if done is not None and done.get("fingerprint") == want:
      return "done"
    started = _read_json(self.marker(stage.name, STARTED))
    if (stage.resumable and done is None and started is not None
        and started.get("fingerprint") == want):
      return "resume"
    return "rebuild"

  def _fingerprint(self, stage: Stage) -> str:
    missing = [n for n in stage.inputs if n not in self._prints]
    if missing:
      raise ValueError(f"stage {stage.name!r} reads stages {missing} that have not run yet")
    return fingerprint(stage.config, [self._prints[n] for n in stage.inputs])

  def run(self, stage: Stage, index: int = 0, total: int = 0) -> StageResult:
    folder, want = self.folder(stage.name), self._fingerprint(stage)
    head = f"[{index}/{total}] {stage.name}" if total else f"[{stage.name}]"
    state = self.status(stage)
    t0 = time.time()
    done_file, start_file = self.marker(stage.name, DONE), self.marker(stage.name, STARTED)
    if state == "done":
      done = _read_json(done_file)
      summary, build = done.get("summary", {}), done.get("build", "")
      self.log(f"{head}: done in an earlier run, reused ({folder})")
      result = StageResult(stage.name, folder, summary, True, 0.0)
    else:
      if state == "rebuild":
        why = ("another configuration or other inputs" if done_file.exists()
               else "an interrupted run")
        self.log(f"{head}: {folder} was left by {why}; removing it and rebuilding")
        done_file.unlink(missing_ok=True)  # first: a crash below must not leave it valid
        shutil.rmtree(folder, ignore_errors=True)
      elif state == "resume":
        self.log(f"{head}: resuming the interrupted stage in {folder}")
      folder.mkdir(parents=True, exist_ok=True)
      _write_json(start_file, {"stage": stage.name, "fingerprint": want,
                               "config": stage.config})
      self.log(f"{head}: {stage.description or 'running'}")
      summary = dict(stage.run(folder) or {})
      seconds = time.time() - t0
      build = uuid.uuid4().hex
      _write_json(done_file, {"stage": stage.name, "fingerprint": want, "build": build,
                              "summary": summary, "seconds": round(seconds, 2)})
      self.log(f"{head}: finished in {seconds:.1f} s")
      result = StageResult(stage.name, folder, summary, False, seconds)
    self._prints[stage.name] = f"{want}:{build}"
    self.results[stage.name] = result
    return result

  def run_all(self, stages: Sequence[Stage]) -> dict[str, StageResult]:
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
      raise ValueError(f"stage names repeat: {names}")
    for i, stage in enumerate(stages, 1):
      self.run(stage, i, len(stages))
    return self.results
