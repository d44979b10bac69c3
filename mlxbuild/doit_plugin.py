"""doit integration: a task loader that reads manifests, a `build` command, a reporter.

`doit build manifests/qwen.yaml` selects the task named after the manifest
path: a group over every target of that manifest. Any other doit verb works
the same way from a directory whose pyproject sets ``[tool.doit] loader =
"mlxbuild"`` (`doit list manifests/qwen.yaml`, `doit clean ...`,
`doit forget ...`), or from anywhere as `mlxbuild doit VERB ...`.
"""

from __future__ import annotations

import codecs
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from doit.cmd_base import DoitCmdBase, TaskLoader2
from doit.cmd_run import Run
from doit.cmdparse import CmdParseError
from doit.exceptions import InvalidCommand
from doit.loader import generate_tasks
from doit.reporter import ConsoleReporter

from mlxbuild import progress

DEFAULT_MANIFEST = "manifests/qwen.yaml"
MANIFEST_SUFFIXES = (".yaml", ".yml")


def manifest_args(pos_args) -> list[str]:
    return [a for a in pos_args if a.endswith(MANIFEST_SUFFIXES)]


class ManifestLoader(TaskLoader2):
    """Tasks for the manifests named on the command line (default: manifests/qwen.yaml).

    Verbs that take exactly one task name (`doit info`) get their manifest from
    ``-m/--manifest`` instead: `doit info -m other.yaml lower:other/mlx-4w`.
    """

    cmd_options = ({
        "name": "manifests", "short": "m", "long": "manifest", "type": list, "default": [],
        "help": "manifest(s) whose tasks to load, besides any named as positional arguments",
    },)

    def setup(self, opt_values):
        from mlxbuild.selection import TargetFilter

        self.extra_manifests = list(opt_values.get("manifests") or [])
        # `build --target/--backend` (other verbs have no such options: everything)
        self.select = TargetFilter(tuple(opt_values.get("only_targets") or ()),
                                   tuple(opt_values.get("only_backends") or ()))
        self.shard = opt_values.get("shard") or ""  # parsed when planning: a bad one is a usage error
        self.measure_speed = bool(opt_values.get("measure_speed"))
        self.executor_text = opt_values.get("executor") or "local"  # parsed when planning
        self.executor = None  # a mlxbuild.ray_executor.RayExecutor once connected
        self.plan = None

    def load_doit_config(self):
        from mlxbuild.settings import roots

        r = roots()
        return {"dep_file": str(r.doit_db), "backend": "json", "reporter": ProgressReporter}

    def load_tasks(self, cmd, pos_args):
        from mlxbuild.errors import MlxbuildError, UsageError
        from mlxbuild.build import plan_manifests
        from mlxbuild.report import EXIT_BUILD, EXIT_MANIFEST, EXIT_USAGE
        from mlxbuild.settings import roots
        from mlxbuild.tasks import task_dicts

        paths = list(dict.fromkeys(getattr(self, "extra_manifests", []) + manifest_args(pos_args)))
        if not paths:
            if not Path(DEFAULT_MANIFEST).exists():
                raise InvalidCommand(f"name a manifest, e.g. `doit build {DEFAULT_MANIFEST}`")
            paths = [DEFAULT_MANIFEST]
        r = roots()
        try:
            from mlxbuild import ray_executor

            spec = ray_executor.parse(getattr(self, "executor_text", "local"))
            select = getattr(self, "select", None)
            if getattr(self, "shard", ""):
                import dataclasses

                from mlxbuild.selection import parse_shard

                select = dataclasses.replace(select, shard=parse_shard(self.shard))
            plan = plan_manifests(paths, r, select, measure_speed=getattr(self, "measure_speed", False),
                                  gpu_elsewhere=spec.mode != "local")
            if getattr(cmd, "name", None) in ("build", "release"):
                self.executor = ray_executor.start(spec, plan)  # None: this machine
                if self.executor is None and spec.mode != "local":  # auto fell back to this machine
                    from mlxbuild.build import preflight

                    preflight({s.params.backend for s in plan.steps.values() if s.kind == "lower"})
                if self.executor is None and not plan.remote_cache:
                    # (on Ray each worker has its own budget; a remote cache may hold the step)
                    from mlxbuild import memory
                    from mlxbuild.cache import Cache

                    refuse_over_budget(plan, Cache(r.cache), memory.budget())
        except MlxbuildError as e:
            # One line, and the exit code doit uses for errors before any task runs.
            print(f"error: {e}", file=sys.stderr)
            from mlxbuild.memory import OverBudget

            code = EXIT_USAGE if isinstance(e, UsageError) else EXIT_BUILD if isinstance(e, OverBudget) \
                else EXIT_MANIFEST
            raise PlanFailed(code, e)
        self.plan = plan
        if getattr(cmd, "name", None) in ("build", "release"):
            try:
                writable(r.cache, r.artifacts)
            except UsageError as e:
                print(f"error: {e}", file=sys.stderr)
                raise PlanFailed(EXIT_USAGE, e)
        r.cache.mkdir(parents=True, exist_ok=True)
        from mlxbuild.cache import Cache

        Cache(r.cache).clean_scratch()  # what builds killed earlier left behind
        run = self.executor.run if getattr(self, "executor", None) else None
        return generate_tasks("mlxbuild", task_dicts(plan, r, **({"run": run} if run else {})))


def refuse_over_budget(plan, cache, limit: int) -> None:
    """Refuse, before any step runs, a build with a step that has to run here and alone
    exceeds the budget: otherwise it fails only when its turn comes, after hours of the
    steps before it (an 8B model's XNNPACK lowering after its quantization and export).
    A step already in the cache does not run and is not counted."""
    from mlxbuild.memory import OverBudget, over_budget
    from mlxbuild.tasks import is_done

    over = [s for s in plan.steps.values() if s.memory > limit and not is_done(plan, s, cache)]
    if over:
        first = over[0]
        more = f"; {len(over) - 1} more step(s) too" if len(over) > 1 else ""
        raise OverBudget(over_budget(f"{first.kind} {first.label}", first.memory, limit) + more
                         + "; nothing was run (--target builds the others)")


def writable(*folders: Path) -> None:
    """Every folder a build writes to exists (or can be made) and takes a file: checked
    before any step, so a read-only or full artifacts directory is not found at the end."""
    import tempfile

    from mlxbuild.errors import UsageError

    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as e:
            raise UsageError(f"{folder}: not writable ({e.strerror}); set MLXBUILD_CACHE / "
                             "MLXBUILD_ARTIFACTS to folders this build can write") from None


class Terminated(BaseException):
    """SIGTERM, raised in the build's main process like KeyboardInterrupt is for SIGINT."""


def _terminate_raises():
    """Make SIGTERM raise Terminated in this process; ``-n N`` workers (forked with the
    handler) die of it quietly, as they would by default. Returns the previous handler."""
    main = os.getpid()

    def handler(signum, frame):
        if os.getpid() != main:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise Terminated()

    return signal.signal(signal.SIGTERM, handler)


class PlanFailed(SystemExit):
    """Manifests could not be planned: exit with `code` (the message is already printed)."""

    def __init__(self, code: int, error):
        super().__init__(code)
        self.error = error


BUILD_OPTIONS = (
    {"name": "only_targets", "long": "target", "type": list, "default": [], "metavar": "GLOB",
     "help": "build only targets whose name (or manifest/name) matches GLOB (repeatable)"},
    {"name": "only_backends", "long": "backend", "type": list, "default": [], "metavar": "NAME",
     "help": "build only targets of backend NAME (repeatable)"},
    {"name": "report", "long": "report", "type": str, "default": "", "metavar": "PATH.json",
     "env_var": "MLXBUILD_REPORT", "help": "write a JSON build report here, also when the build fails"},
    {"name": "junit", "long": "junit", "type": str, "default": "", "metavar": "PATH.xml",
     "env_var": "MLXBUILD_JUNIT", "help": "write JUnit XML here (one testcase per target)"},
    {"name": "shard", "long": "shard", "type": str, "default": "", "metavar": "I/N", "env_var": "MLXBUILD_SHARD",
     "help": "build only the I-th of N deterministic shares of the targets (a CI matrix of N jobs)"},
    {"name": "measure_speed", "long": "measure-speed", "type": bool, "default": False,
     "env_var": "MLXBUILD_MEASURE_SPEED",
     "help": "record each target's prefill/decode tokens per second on this host (median of 3 runs)"},
    {"name": "memory_budget", "long": "memory-budget", "type": str, "default": "", "metavar": "SIZE",
     "env_var": "MLXBUILD_MEMORY_BUDGET",
     "help": "most memory the running steps may take together, by their estimates (12G, 800M, 75%%; "
             "default 80%% of physical memory); a step over it alone fails before it starts"},
    {"name": "executor", "long": "executor", "type": str, "default": "local",
     "metavar": "local|ray[=ADDRESS]|auto[=ADDRESS]", "env_var": "MLXBUILD_EXECUTOR",
     "help": "where steps run: this machine (local), a Ray cluster (ray; ADDRESS or RAY_ADDRESS, "
             "else the cluster `ray start` made here), or a cluster when one answers, else here (auto); "
             "Ray workers exchange entries through the remote cache"},
    {"name": "plain", "long": "plain", "type": bool, "default": False, "env_var": "MLXBUILD_PLAIN",
     "help": "plain line-by-line output even on a terminal (no status line, no colour)"},
)


class Build(Run):
    """Build manifests: `doit build manifests/qwen.yaml [more.yaml ...] [-n N]`.

    Exit codes, reports and target filters for CI: see mlxbuild.report and docs/ci.md."""

    name = "build"
    doc_purpose = "build the .pte artifacts of one or more manifests"
    doc_usage = ("[-n N] [-v 0|1|2] [--target GLOB] [--backend NAME] [--report PATH.json] "
                 "[--junit PATH.xml] [--shard I/N] [--measure-speed] [--memory-budget SIZE] "
                 "[--executor local|ray[=ADDRESS]|auto] MANIFEST.yaml "
                 "[MANIFEST.yaml ...] [TASK ...]")
    doc_description = None
    cmd_options = Run.cmd_options + BUILD_OPTIONS
    # `--backend` selects targets here; doit's own --backend (its database format) is
    # fixed to json by the loader's config.
    base_options = tuple(o for o in DoitCmdBase.base_options if o["name"] != "backend")

    def __init__(self, task_loader=None, **kwargs):
        # The build verb always reads manifests, whatever loader the local config names;
        # set before the base class builds the option parser from the loader's options.
        loader = ManifestLoader()
        loader.cmd_names = getattr(task_loader, "cmd_names", [])
        loader.config = getattr(task_loader, "config", {})
        super().__init__(task_loader=loader, **kwargs)
        self.recorder = None

    def parse_execute(self, in_args):
        from mlxbuild.report import EXIT_USAGE

        try:
            return super().parse_execute(_executor_value(in_args))
        except (CmdParseError, InvalidCommand) as e:
            if isinstance(e, InvalidCommand):
                e.cmd_used, e.bin_name = self.name, self.bin_name
            print(f"error: {e}".rstrip(), file=sys.stderr)
            return EXIT_USAGE

    def execute(self, params, args):
        from mlxbuild import report

        started, t0 = time.time(), time.monotonic()
        if params.get("plain"):
            os.environ["MLXBUILD_PLAIN"] = "1"  # worker processes and progress notes see it too
        if params.get("memory_budget"):
            from mlxbuild.memory import BUDGET_ENV

            os.environ[BUDGET_ENV] = params["memory_budget"]  # read by each step, in any worker
        if params.get("verbosity") == 2:
            from mlxbuild.tasks import TRACEBACK_ENV

            os.environ[TRACEBACK_ENV] = "1"  # a crashed step's traceback on the terminal too
        error, doit_result = None, None
        previous = _terminate_raises()
        try:
            doit_result = super().execute(params, args)
        except PlanFailed as e:
            kind = "usage" if e.code == report.EXIT_USAGE else "manifest"
            error, code = report.error_entry(kind, e.error), e.code
        except (KeyboardInterrupt, Terminated) as e:
            # A cancelled CI job: stop, say so in one line, and still write the reports.
            signame = "SIGTERM" if isinstance(e, Terminated) else "SIGINT"
            code = report.EXIT_SIGTERM if isinstance(e, Terminated) else report.EXIT_SIGINT
            stopped = report.mark_interrupted(self.recorder.outcomes if self.recorder else {}, signame)
            error = {"kind": "interrupted", "message": f"interrupted by {signame}"}
            titles = [self._title(n) for n in stopped]
            print(f"\ninterrupted by {signame}" + (f": stopped {', '.join(titles)}" if titles else ""),
                  file=sys.stderr, flush=True)
        else:
            code = report.exit_code(self.recorder.outcomes if self.recorder else {}, doit_result)
        finally:
            signal.signal(signal.SIGTERM, previous)
            executor = getattr(self.loader, "executor", None)
            if executor is not None:
                executor.shutdown()  # cancels what still runs (an interrupt), then disconnects
        summary = (os.environ.get("GITHUB_STEP_SUMMARY")
                   if os.environ.get("MLXBUILD_STEP_SUMMARY", "1") != "0" else None)
        if params.get("report") or params.get("junit") or summary:
            rep = report.build_report(getattr(self.loader, "plan", None),
                                      self.recorder.outcomes if self.recorder else {}, code,
                                      error=error, started=started, seconds=time.monotonic() - t0,
                                      argv=[Path(sys.argv[0]).name, *sys.argv[1:]], t0=t0)
            for problem in report.write_reports(rep, params.get("report"), params.get("junit"), summary):
                print(f"error: {problem}", file=sys.stderr)
                code = code or report.EXIT_BUILD
        return code

    def _title(self, task_name: str) -> str:
        plan = getattr(self.loader, "plan", None)
        step = plan.steps.get(task_name) if plan else None
        return f"{step.kind} {step.label}" if step else task_name

    def _execute(self, outfile, verbosity=None, always=False, continue_=False, reporter="console",
                 num_process=0, par_type="process", single=False, auto_delayed_regex=False,
                 force_verbosity=False, failure_verbosity=0, pdb=False):
        # doit's Run, with its reporter wrapped in a Recorder that notes every outcome.
        from mlxbuild.report import Recorder

        executor = getattr(self.loader, "executor", None)
        if executor is not None:
            # Steps wait on Ray in threads of this process; Ray decides how many run at once.
            par_type, num_process = "thread", max(num_process, executor.slots())
        cls = self.reporters[reporter] if isinstance(reporter, str) else reporter
        stream = codecs.open(outfile, "w", encoding="utf-8") if isinstance(outfile, str) else outfile
        try:
            inner = cls(stream, {"failure_verbosity": failure_verbosity}) if isinstance(cls, type) else cls
            self.recorder = Recorder(inner)
            return super()._execute(stream, verbosity, always, continue_, self.recorder, num_process,
                                    par_type, single, auto_delayed_regex, force_verbosity,
                                    failure_verbosity, pdb)
        finally:
            if isinstance(outfile, str):
                stream.close()


def _executor_value(args: list[str]) -> list[str]:
    """doit takes every argument ``NAME=VALUE`` for a command-line variable before the command
    parses its options, so ``--executor ray=HOST:PORT`` reaches us as a bare ``--executor``
    and a variable ``ray``: put the value back where it was."""
    from doit import get_var

    from mlxbuild.ray_executor import MODES

    args = list(args)
    for i, a in enumerate(args):
        if a == "--executor" and (i + 1 == len(args) or args[i + 1].partition("=")[0] not in MODES):
            for mode in ("ray", "auto"):
                if get_var(mode) is not None:
                    args.insert(i + 1, f"{mode}={get_var(mode)}")
                    break
    return args


class ProgressReporter(ConsoleReporter):
    """doit's console reporter, plus how long each step took.

    Plain (not a terminal, --plain): one line per event, `.  ` started, `ok ` finished
    (with seconds), `-- ` up to date. Live (a terminal): the same `ok`/`--` lines, and
    one status line kept last that shows the running steps, their elapsed time and the
    latest sub-step note (see mlxbuild.progress)."""

    TICK = 0.5  # seconds between status line redraws

    def __init__(self, outstream, options):
        super().__init__(outstream, options)
        self._started = {}
        self.live = progress.is_live(outstream)
        self.colour = progress.use_colour(outstream)
        self._lock = threading.RLock()
        self._pending = ""  # text written without its newline yet
        self._note = ""
        self._ticker = None
        self._stop = threading.Event()
        if self.live:
            progress.listen(self._set_note)

    # -- output
    def write(self, text):
        if not self.live:
            return super().write(text)
        with self._lock:
            self._pending += text
            if self._pending.endswith("\n"):
                self.outstream.write(progress.CLEAR_LINE + self._pending)
                self._pending = ""
                self._draw()

    def _paint(self, code, text):
        return f"\x1b[{code}m{text}\x1b[0m" if self.colour else text

    def _draw(self):
        """Redraw the status line (caller holds the lock)."""
        if self._pending:
            return
        now = time.monotonic()
        running = [(name, now - t0) for name, (t0, _) in self._started.items()]
        if running:
            parts = [f"{self._started[n][1]} {s:.0f} s" for n, s in running]
            line = ("⋯ " if len(parts) == 1 else f"⋯ {len(parts)} running: ") + ", ".join(parts)
            if self._note and len(running) == 1:
                line += f" · {self._note}"
            width = max(20, shutil.get_terminal_size().columns - 1)
            self.outstream.write(progress.CLEAR_LINE + line[:width])
        else:
            self.outstream.write(progress.CLEAR_LINE)
        self.outstream.flush()

    def _set_note(self, text):
        with self._lock:
            self._note = text
            self._draw()

    def _tick(self):
        while not self._stop.wait(self.TICK):
            with self._lock:
                self._draw()

    # -- doit's reporter interface
    def execute_task(self, task):
        if task.actions and not task.name.startswith("_"):
            with self._lock:
                self._started[task.name] = (time.monotonic(), task.title())
                self._note = ""
                if not self.live:
                    self.write(f".  {task.title()}\n")
                else:
                    if self._ticker is None:
                        self._ticker = threading.Thread(target=self._tick, daemon=True)
                        self._ticker.start()
                    self._draw()

    def add_success(self, task):
        with self._lock:
            start = self._started.pop(task.name, None)
            if start is not None and task.actions:
                self.write(f"{self._paint('32', 'ok')} {task.title()} ({time.monotonic() - start[0]:.1f} s)\n")

    def add_failure(self, task, fail):
        with self._lock:
            self._started.pop(task.name, None)
            super().add_failure(task, fail)

    def _write_failure(self, result, write_exception=True):
        # A step's failure is its message and, for a crash, the log with the traceback;
        # doit's own form (exception class, task id, traceback) only where asked for.
        fail = result["exception"]
        if not getattr(fail, "log", None) and not hasattr(fail, "figures"):
            return super()._write_failure(result, write_exception)
        if not write_exception:
            return
        text = fail.message
        title = result["task"].title()
        if not text.startswith(title):
            text = f"{title}: {text}"
        self.write(f"{self._paint('31', 'FAIL')} {text}\n")
        if fail.log:
            self.write(f"     full traceback: {fail.log}\n")
        if fail.traceback:
            self.write("".join(fail.traceback))

    def complete_run(self):
        # The output a crashed step captured goes to its log; an empty capture is not shown.
        keep = []
        for result in self.failures:
            log, task = getattr(result["exception"], "log", None), result["task"]
            captured = "".join(f"{a.out or ''}{a.err or ''}" for a in task.actions) if task.executed else ""
            if log and captured.strip():
                try:
                    with open(log, "a") as f:
                        f.write("\n--- captured output\n" + captured)
                except OSError:
                    pass
            if not log and captured.strip():
                keep.append(result)
        self.failures = keep
        self._finish()

    def skip_uptodate(self, task):
        if not task.name.startswith("_"):
            self.write(f"{self._paint('2', '--')} {task.title()}\n")

    def _finish(self):
        if self.live:
            self._stop.set()
            if self._ticker is not None:
                self._ticker.join()
            progress.listen(None)
            with self._lock:
                self._started.clear()
                self._draw()
        super().complete_run()

