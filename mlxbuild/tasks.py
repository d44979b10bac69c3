"""Plan → doit tasks: plain dicts whose actions call the stages.

Up-to-date checks are ours, not doit's file timestamps: a cache step is done
when its content-keyed entry exists, or when every step that consumes it is
done (so an evicted export is not rebuilt just to feed finished lowerings); a
package step is done when the published record carries its key. None of this
imports torch.

With a remote cache (``settings.remote_cache``), a consumer whose entry the
remote holds counts as satisfied too: it will be downloaded, so its inputs
need not exist here. A second machine then fetches only what its remaining
steps read (the lowered program and verification to package, not the weights
or the export). Remote lookups happen only for steps not done locally, so a
no-op build never touches the network.
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

from doit.exceptions import TaskFailed

from mlxbuild import artifacts
from mlxbuild.cache import Cache, CorruptEntry
from mlxbuild.errors import REPORTED, MlxbuildError, VerificationError
from mlxbuild.plan import Plan, Step
from mlxbuild.steps import StepKind
from mlxbuild.settings import Roots


def is_done(plan: Plan, step: Step, cache: Cache, _seen=None) -> bool:
    if step.kind is StepKind.PACKAGE:
        return artifacts.is_published(Path(step.params.out_dir), step.params.stem, step.key,
                                      _published_hashes(cache))
    if cache.has(step.kind, step.key):
        return _current(step, cache)
    users = [plan.steps[n] for n in step.dependents]
    return bool(users) and all(is_done(plan, u, cache) or _fetchable(u, cache) for u in users)


_HASHERS: dict = {}


def _published_hashes(cache: Cache):
    """sha256 of published files, remembered by (size, mtime, inode) beside the cache, so the
    no-op build checks every artifact's bytes against its record without reading them."""
    from mlxbuild.fingerprint import FileHasher

    hasher = _HASHERS.get(cache.root)
    if hasher is None:
        hasher = _HASHERS[cache.root] = FileHasher(cache.root / "published-hashes.json")
    return hasher


def _current(step: Step, cache: Cache) -> bool:
    """An existing entry still stands for its inputs. A verification stands for the bytes it
    checked: once the lowered program is rebuilt with other bytes, it is stale."""
    if step.kind is not StepKind.VERIFY or not cache.has("lower", step.params.lower):
        return True
    try:
        verified = json.loads((cache.path("verify", step.key) / "verify.json").read_text())
        program = cache.files("lower", step.params.lower)["model.pte"]["sha256"]
    except (OSError, ValueError, KeyError, MlxbuildError):
        return False
    return verified.get("artifact_sha256") == program


def _fetchable(step: Step, cache: Cache) -> bool:
    return step.kind is not StepKind.PACKAGE and cache.remote_has(step.kind, step.key)


class StepFailed(TaskFailed):
    """A step failed: doit counts it as a failed task; the kind says which exit code and
    report entry it becomes. Plain attributes, so it pickles from `-n N` workers.

    ``log`` is the file holding the whole traceback of an unexpected exception (the
    terminal gets the step, the exception's type and message, and this path)."""

    kind = "build"

    def __init__(self, message: str, exception=None, figures: dict | None = None,
                 log: str | None = None):
        super().__init__(message, exception)
        self.figures = figures  # a failed verification's numbers (verify.json), else None
        self.log = log


class VerificationFailed(StepFailed):
    kind = "verification"


def run_step(step: Step, roots: Roots, plan: Plan | None = None):
    from mlxbuild import progress, remote

    progress.begin(step.kind, step.label)
    progress.quiet_libraries()
    cache = Cache(roots.cache, remote=remote.connect(plan.remote_cache if plan else None))
    try:
        last = None
        for _ in range(MAX_REPAIRS):
            try:
                figures: dict = {}
                _attempt(step, roots, plan, cache, figures)
                # doit keeps a dict an action returns as the task's values: the reporter
                # reads a child step's measured peak memory from there.
                return figures or True
            except CorruptEntry as e:
                last = e
                repaired = _repair(step, e, roots, plan, cache)
                if not succeeded(repaired):
                    return repaired
        return StepFailed(f"{step.kind} {step.label}: cache entries kept failing their checks; "
                          f"last: {last}")
    except _WithFigures as w:
        return VerificationFailed(str(w.error), figures=w.figures)
    except REPORTED as e:
        return StepFailed(str(e))
    except OSError as e:
        if e.errno in RESOURCE_ERRNOS:  # a full disk is not a crash: one line, where and what
            where = e.filename or (step.params.out_dir if step.kind is StepKind.PACKAGE else roots.cache)
            return StepFailed(f"{step.kind} {step.label}: {os.strerror(e.errno)}: {where}")
        return crashed(step, roots, e)
    except Exception as e:  # a crash in a step (e.g. a model factory raising) is a build failure
        return crashed(step, roots, e)


def succeeded(result) -> bool:
    """What run_step returned means done: True, or the dict of its figures (doit's values)."""
    return result is True or isinstance(result, dict)


RESOURCE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
MAX_REPAIRS = 4  # entries one step may find corrupt and rebuild before it gives up


def _attempt(step: Step, roots: Roots, plan: Plan | None, cache: Cache, figures: dict) -> None:
    from mlxbuild import memory, progress, remote

    def waiting():
        progress.note("waiting for another build of this step")

    # One builder per step across processes: a second build waits, then reuses the entry.
    with cache.lock(step.kind, step.key, on_wait=waiting):
        if step.kind is StepKind.PACKAGE:
            if not artifacts.is_published(Path(step.params.out_dir), step.params.stem, step.key):
                artifacts.publish(step.params, cache, step.key)
            return
        if cache.has(step.kind, step.key) and not _current(step, cache):
            try:
                cache.read(step.kind, step.key)  # stale (its input was rebuilt), or damaged?
            except CorruptEntry as e:
                import sys

                print(f"warning: {step.kind} {step.label}: {e}; evicted, rebuilding it", file=sys.stderr,
                      flush=True)
            cache.remove(step.kind, step.key)
        if cache.has(step.kind, step.key):
            return  # (another build made it meanwhile)
        down = remote.fetch_entry(cache, step.kind, step.key)
        if down is not None:
            figures["cache"], figures["remote_down_bytes"] = "remote", down
            return
        from mlxbuild.stages import stage

        from mlxbuild import child

        make_inputs(plan, step, roots, cache)
        # (after its inputs: a repair that builds one reserves its own share)
        asked = time.monotonic()
        with memory.reserve(roots.cache, step.memory, memory.budget(), f"{step.kind} {step.label}",
                            on_wait=progress.note), cache.writing(step.kind, step.key) as out:
            # When its work began (wall clock: -n N workers are other processes) and how long
            # it waited for the memory budget; the report's timeline shows the work.
            figures["started_at"] = time.time()
            if time.monotonic() - asked > 0.05:
                figures["waited_s"] = round(time.monotonic() - asked, 3)
            try:
                if child.wanted(step, cache):
                    figures["peak_rss_mb"] = round(child.run(step, roots.cache, out) / 2**20, 1)
                    figures["process"] = "child"
                else:
                    stage(step.kind).run(step.params.model_copy(update={"label": step.label}), cache, out)
            except VerificationError as e:
                # The figures are in the entry about to be discarded: keep them for the report.
                raise _WithFigures(e, _read_json(out / f"{step.kind}.json")) from None
        figures["work_s"] = round(time.time() - figures["started_at"], 3)
    up = remote.push_entry(cache, step.kind, step.key)
    if up:
        figures["remote_up_bytes"] = up


def _repair(step: Step, error: CorruptEntry, roots: Roots, plan: Plan | None, cache: Cache):
    """A step found an entry it reads corrupt: evict it, say so in one line, rebuild it.
    True (or the rebuilt step's figures) when rebuilt: the step is tried again; else the failure."""
    import sys

    from mlxbuild import progress

    cache.remove(error.kind, error.key)
    source = next((s for s in (plan.steps.values() if plan else ()) if s.kind == error.kind
                   and s.key == error.key), None)
    if source is None or source is step:
        return StepFailed(f"{step.kind} {step.label}: {error}")
    print(f"warning: {step.kind} {step.label}: {error}; evicted, rebuilding it", file=sys.stderr,
          flush=True)
    result = run_step(source, roots, plan)
    progress.begin(step.kind, step.label)
    return result


TRACEBACK_ENV = "MLXBUILD_TRACEBACK"  # set by `doit build -v 2`; MLXBUILD_DEBUG=1 does the same
MESSAGE_LINES = 3  # of an exception's message, on the terminal (torch's run to pages)


def show_tracebacks() -> bool:
    return any(os.environ.get(v, "") not in ("", "0") for v in (TRACEBACK_ENV, "MLXBUILD_DEBUG"))


def crashed(step: Step, roots: Roots, error: BaseException) -> StepFailed:
    """An unexpected exception inside a step: its whole traceback goes to a log file beside
    the cache (one per step key, the latest failure), the terminal gets a few lines."""
    import traceback

    lines = [ln for ln in str(error).splitlines() if ln.strip()] or [""]
    shown = [ln if len(ln) <= 300 else ln[:297] + "..." for ln in lines[:MESSAGE_LINES]]
    if len(lines) > MESSAGE_LINES:
        shown.append(f"... ({len(lines) - MESSAGE_LINES} more lines in the log)")
    # A crash in a child step (mlxbuild.child) is told by the child's exception and traceback.
    name = getattr(error, "type_name", type(error).__name__)
    message = f"{step.kind} {step.label}: {name}: " + "\n    ".join(shown)
    log = None
    try:
        folder = roots.cache / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{step.kind}-{step.key[:16]}.log"
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(f"step: {step.name} ({step.kind} {step.label})\nkey: {step.key}\n"
                       f"time: {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n\n"
                       + (getattr(error, "child_traceback", "") or "".join(traceback.format_exception(error))))
        os.replace(tmp, path)
        log = str(path)
    except OSError as e:  # no log is no reason to hide the failure
        message += f"\n    (could not write the traceback log: {e})"
    return StepFailed(message, error if show_tracebacks() or log is None else None, log=log)


class _WithFigures(Exception):
    def __init__(self, error, figures):
        super().__init__(str(error))
        self.error, self.figures = error, figures


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def make_inputs(plan: Plan | None, step: Step, roots: Roots, cache: Cache) -> None:
    """Inputs that are not here: skipped because this step was in the remote cache, which
    then could not deliver it (corrupt, gone, unreachable), or built on another machine (a
    Ray worker, for a package the driver publishes): fetch or build them now, in this process."""
    from mlxbuild import progress

    for dep in [plan.steps[n] for n in step.deps] if plan else []:
        if dep.kind is not StepKind.PACKAGE and not cache.has(dep.kind, dep.key):
            result = run_step(dep, roots, plan)
            progress.begin(step.kind, step.label)
            if not succeeded(result):
                raise MlxbuildError(getattr(result, "message", str(result)))


def _clean_entry(step: Step, roots: Roots):
    Cache(roots.cache).remove(step.kind, step.key)


def task_dicts(plan: Plan, roots: Roots, run=run_step):
    """doit's task dicts for ``plan``; ``run(step, roots, plan)`` is each step's action (another
    executor's, e.g. mlxbuild.ray_executor, in place of running it here)."""
    from mlxbuild import remote

    cache = Cache(roots.cache, remote=remote.connect(plan.remote_cache))
    for step in plan.steps.values():
        kind, _, sub = step.name.partition(":")
        task = {
            "basename": kind,
            "name": sub,
            "doc": f"{step.kind} {step.label}",
            "title": lambda t, s=step: f"{s.kind} {s.label}",
            "actions": [(run, [step, roots, plan])],
            "task_dep": list(step.deps),
            "uptodate": [_Check(f"{step.kind} output present", is_done, plan, step, cache)],
        }
        if step.kind is StepKind.PACKAGE:
            out = Path(step.params.out_dir)
            task["targets"] = [str(out / f"{step.params.stem}.pte"),
                               str(artifacts.record_path(out, step.params.stem))]
            task["clean"] = True
        else:
            task["clean"] = [(_clean_entry, [step, roots])]
        yield task
    for group, packages in plan.groups.items():
        steps = [plan.steps[p] for p in packages]
        yield {"basename": group, "doc": f"build every target of {group}", "actions": None,
               "task_dep": packages,
               "uptodate": [_Check("every target published", _all_done, plan, steps, cache)],
               # Cleaning a manifest removes what it published, not the shared cache.
               "clean": [(_unpublish, [steps])]}


class _Check:
    """An up-to-date callable that doit can print (`doit info`) in one line."""

    def __init__(self, what, fn, *args):
        self.what, self.fn, self.args = what, fn, args

    def __call__(self, task=None, values=None):
        return self.fn(*self.args)

    def __repr__(self):
        return self.what


def _all_done(plan, steps, cache):
    return all(is_done(plan, s, cache) for s in steps)


def _unpublish(steps):
    for step in steps:
        artifacts.unpublish(Path(step.params.out_dir), step.params.stem)

