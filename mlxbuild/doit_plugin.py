"""doit integration: a task loader that reads manifests, a `build` command, a reporter.

`doit build manifests/qwen.yaml` selects the task named after the manifest
path: a group over every target of that manifest. Any other doit verb works
the same way from a directory whose pyproject sets ``[tool.doit] loader =
"mlxbuild"`` (`doit list manifests/qwen.yaml`, `doit clean ...`,
`doit forget ...`), or from anywhere as `mlxbuild doit VERB ...`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from doit.cmd_base import TaskLoader2
from doit.cmd_run import Run
from doit.exceptions import InvalidCommand
from doit.loader import generate_tasks
from doit.reporter import ConsoleReporter

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
        self.extra_manifests = list(opt_values.get("manifests") or [])

    def load_doit_config(self):
        from mlxbuild.settings import roots

        r = roots()
        return {"dep_file": str(r.doit_db), "backend": "json", "reporter": ProgressReporter}

    def load_tasks(self, cmd, pos_args):
        from mlxbuild.errors import MlxbuildError
        from mlxbuild.build import plan_manifests
        from mlxbuild.settings import roots
        from mlxbuild.tasks import task_dicts

        paths = list(dict.fromkeys(getattr(self, "extra_manifests", []) + manifest_args(pos_args)))
        if not paths:
            if not Path(DEFAULT_MANIFEST).exists():
                raise InvalidCommand(f"name a manifest, e.g. `doit build {DEFAULT_MANIFEST}`")
            paths = [DEFAULT_MANIFEST]
        r = roots()
        try:
            plan = plan_manifests(paths, r)
        except MlxbuildError as e:
            # One line, and the exit code doit uses for errors before any task runs.
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(3)
        r.cache.mkdir(parents=True, exist_ok=True)
        return generate_tasks("mlxbuild", task_dicts(plan, r))


class Build(Run):
    """Build manifests: `doit build manifests/qwen.yaml [more.yaml ...] [-n N]`."""

    name = "build"
    doc_purpose = "build the .pte artifacts of one or more manifests"
    doc_usage = "[-n N] [-v 0|1|2] MANIFEST.yaml [MANIFEST.yaml ...] [TASK ...]"
    doc_description = None

    def __init__(self, task_loader=None, **kwargs):
        # The build verb always reads manifests, whatever loader the local config names;
        # set before the base class builds the option parser from the loader's options.
        loader = ManifestLoader()
        loader.cmd_names = getattr(task_loader, "cmd_names", [])
        loader.config = getattr(task_loader, "config", {})
        super().__init__(task_loader=loader, **kwargs)


class ProgressReporter(ConsoleReporter):
    """doit's console reporter, plus how long each step took."""

    def __init__(self, outstream, options):
        super().__init__(outstream, options)
        self._started = {}

    def execute_task(self, task):
        self._started[task.name] = time.monotonic()
        if task.actions and not task.name.startswith("_"):
            self.write(f".  {task.title()}\n")

    def add_success(self, task):
        start = self._started.pop(task.name, None)
        if start is not None and task.actions:
            self.write(f"ok {task.title()} ({time.monotonic() - start:.1f} s)\n")
