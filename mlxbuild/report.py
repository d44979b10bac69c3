"""What a build did, for CI: the exit code, a JSON report, JUnit XML and a Markdown summary.

Exit codes of `doit build` / `mlxbuild build` (doit's own 0 and 1 keep their meaning;
doit's 3, "error before any task ran", is what a bad manifest already returned):

    0  success: every selected target is built (or up to date) and verified
    1  build failure: a step failed (load, quantize, export, lower, package, or a crash)
    2  usage error: unknown option or task, a --target/--backend filter matching nothing
    3  bad manifest: a manifest is invalid or cannot be planned; nothing ran
    4  verification failure: every failed step was a verification

When both a build step and a verification fail (``--continue`` or ``-n N``), the
code is 1: 4 promises that everything else built, so a script can treat it as
"the numbers diverged" rather than "the build is broken". The report names
every failure with its kind either way.

doit's 2 ("a task raised") does not occur: a crash inside a step is a build
failure (1), with its traceback shown.

The :class:`Recorder` sits between doit's runner and the console reporter and
notes every step's outcome; doit calls the reporter in the main process, also
for steps run in ``-n N`` worker processes, and the failures arrive there as the
picklable :class:`mlxbuild.tasks.StepFailed` carrying their kind.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

EXIT_OK, EXIT_BUILD, EXIT_USAGE, EXIT_MANIFEST, EXIT_VERIFICATION = 0, 1, 2, 3, 4
EXIT_SIGINT, EXIT_SIGTERM = 130, 143  # 128 + the signal, as shells report a killed command
MEANING = {EXIT_OK: "success", EXIT_BUILD: "build failure", EXIT_USAGE: "usage error",
           EXIT_MANIFEST: "bad manifest", EXIT_VERIFICATION: "verification failure",
           EXIT_SIGINT: "interrupted (SIGINT)", EXIT_SIGTERM: "interrupted (SIGTERM)"}
FORMAT = "mlxbuild-build-report/1"

# Figures of the verification record worth a JUnit property and a summary column.
FIGURES = ("passed", "executed", "max_abs_error", "max_rel_error", "top1_agreement",
           "top1_agreement_decisive", "positions", "check", "reason")
# ... and of the quality record (the artifact against the unquantized model).
QUALITY_FIGURES = ("passed", "measured", "kld_mean", "kld_p99", "top1", "ppl_float", "ppl", "ppl_increase",
                   "positions", "reason")


# --------------------------------------------------------------------------- outcomes


@dataclass
class Outcome:
    status: str = "not-run"  # ran | up-to-date | failed | ignored | not-run
    started: float | None = None
    seconds: float | None = None
    kind: str | None = None  # failure kind: build | verification | dependency (an upstream failed)
    message: str | None = None
    figures: dict | None = None
    log: str | None = None  # a crashed step's traceback log
    peak_rss_mb: float | None = None  # a step run in its own process (mlxbuild.child)
    remote: bool = False  # its entry came from the remote cache rather than being built here
    started_at: float | None = None  # wall clock when its work began (after any wait for memory)
    waited: float | None = None  # seconds it waited for the memory budget
    remote_bytes: tuple[int, int] = (0, 0)  # downloaded from / uploaded to the remote cache
    node: str | None = None  # the Ray node that ran it (--executor ray)
    attempts: int | None = None  # tries on Ray, when its worker died (mlxbuild.ray_executor)
    overhead: float | None = None  # seconds a Ray step spent beside its work (inputs, upload, reply)


def failure_kind(fail) -> str:
    from doit.exceptions import UnmetDependency

    if isinstance(fail, UnmetDependency):
        return "dependency"
    return getattr(fail, "kind", "build")


class Recorder:
    """Forwards every reporter call to doit's reporter and notes each task's outcome.

    Every method doit may call is defined on the class: in ``-n N`` workers doit
    checks the reporter's class for the method before forwarding a call."""

    def __init__(self, inner):
        self.inner = inner
        self.outcomes: dict[str, Outcome] = {}
        self.runtime_errors: list[str] = []

    def _get(self, task) -> Outcome:
        return self.outcomes.setdefault(task.name, Outcome())

    def initialize(self, tasks, selected_tasks):
        if hasattr(self.inner, "initialize"):
            self.inner.initialize(tasks, selected_tasks)

    def get_status(self, task):
        self.inner.get_status(task)

    def execute_task(self, task):
        self._get(task).started = time.monotonic()
        self.inner.execute_task(task)

    def add_success(self, task):
        o = self._get(task)
        o.status = "ran"
        o.seconds = _since(o.started)
        values = getattr(task, "values", None) or {}
        o.peak_rss_mb = values.get("peak_rss_mb")
        o.remote = values.get("cache") == "remote"
        o.started_at, o.waited = values.get("started_at"), values.get("waited_s")
        o.remote_bytes = (values.get("remote_down_bytes") or 0, values.get("remote_up_bytes") or 0)
        o.node, o.attempts, o.overhead = values.get("node"), values.get("attempts"), values.get("overhead_s")
        if values.get("work_s") is not None:
            o.seconds = values["work_s"]  # the work, timed where it ran; a wait is its own field
        self.inner.add_success(task)

    def add_failure(self, task, fail):
        o = self._get(task)
        o.status, o.kind, o.seconds = "failed", failure_kind(fail), _since(o.started)
        o.message = getattr(fail, "message", str(fail))
        o.figures = getattr(fail, "figures", None)
        o.log = getattr(fail, "log", None)
        self.inner.add_failure(task, fail)

    def skip_uptodate(self, task):
        self._get(task).status = "up-to-date"
        self.inner.skip_uptodate(task)

    def skip_ignore(self, task):
        self._get(task).status = "ignored"
        self.inner.skip_ignore(task)

    def cleanup_error(self, exception):
        self.inner.cleanup_error(exception)

    def runtime_error(self, msg):
        self.runtime_errors.append(msg)
        self.inner.runtime_error(msg)

    def teardown_task(self, task):
        self.inner.teardown_task(task)

    def complete_run(self):
        self.inner.complete_run()

    def __getattr__(self, name):  # anything else a reporter offers
        return getattr(self.inner, name)


def mark_interrupted(outcomes: dict[str, Outcome], signame: str) -> list[str]:
    """Steps started and not finished when the build was interrupted: failed, kind
    ``interrupted``. Returns their task names."""
    names = []
    for name, o in outcomes.items():
        if o.started is not None and o.status == "not-run":
            o.status, o.kind, o.seconds = "failed", "interrupted", _since(o.started)
            o.message = f"interrupted by {signame}"
            names.append(name)
    return names


def _since(start):
    return None if start is None else round(time.monotonic() - start, 3)


def exit_code(outcomes: dict[str, Outcome], doit_result: int) -> int:
    kinds = {o.kind for o in outcomes.values() if o.status == "failed" and o.kind != "dependency"}
    if kinds - {"verification"}:
        return EXIT_BUILD
    if kinds:
        return EXIT_VERIFICATION
    return EXIT_OK if doit_result == 0 else EXIT_BUILD


# --------------------------------------------------------------------------- the report


def build_report(plan, outcomes: dict[str, Outcome], code: int, *, error: dict | None = None,
                 started: float | None = None, seconds: float | None = None,
                 argv: list[str] | None = None, t0: float | None = None) -> dict:
    """The JSON report: per manifest, per target, what happened and what was published.
    ``t0`` (time.monotonic() when the build began) gives each step its ``start`` offset."""
    manifests = []
    for path, packages in (plan.groups.items() if plan is not None else ()):
        targets = [_target(plan, plan.steps[p], outcomes, t0, started) for p in packages]
        first = plan.steps[packages[0]].params.record if packages else {}
        manifests.append({"path": str(path), "name": first.get("name"), "version": first.get("version"),
                          "targets": targets})
    counts = {s: 0 for s in ("built", "up-to-date", "failed", "not-run")}
    for m in manifests:
        for t in m["targets"]:
            counts[t["status"]] += 1
    # Per step, not per target: a step shared by targets counts once.
    steps = {n: o for n, o in outcomes.items() if plan is not None and n in plan.steps
             and plan.steps[n].kind != "package"}
    hits = {"hit": 0, "remote": 0, "built": 0}
    for o in steps.values():
        if _cache(o):
            hits[_cache(o)] += 1
    ran = sum(hits.values())
    cache = {**hits, "hit_rate": round((hits["hit"] + hits["remote"]) / ran, 3) if ran else None,
             "remote_down_bytes": sum(o.remote_bytes[0] for o in steps.values()),
             "remote_up_bytes": sum(o.remote_bytes[1] for o in steps.values())}
    return {
        "format": FORMAT,
        "command": argv,
        "started": _dt.datetime.fromtimestamp(started or time.time(), _dt.timezone.utc).isoformat(),
        "seconds": None if seconds is None else round(seconds, 3),
        "exit_code": code,
        "result": MEANING.get(code, "failure"),
        "error": error,
        "counts": counts,
        "cache": cache,
        "manifests": manifests,
    }


def _chain(plan, step) -> list:
    """The step and everything upstream of it, in plan (topological) order."""
    seen, todo = set(), [step.name]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(plan.steps[name].deps)
    return [s for n, s in plan.steps.items() if n in seen]


def _cache(o: Outcome) -> str | None:
    """How the step's cache entry was come by: ``hit`` (up to date), ``remote`` (downloaded
    from the remote cache), ``built``; None when it did not run."""
    if o.status == "up-to-date":
        return "hit"
    if o.status == "ran":
        return "remote" if o.remote else "built"
    return None


def _start(o: Outcome, t0: float | None, started: float | None) -> float | None:
    """Seconds after the build began that the step's work began."""
    if o.started_at is not None and started is not None:
        return round(o.started_at - started, 3)
    return None if t0 is None or o.started is None else round(o.started - t0, 3)


def _target(plan, package, outcomes, t0: float | None = None, started: float | None = None) -> dict:
    rec = package.params.record
    chain = _chain(plan, package)
    steps = []
    for s in chain:
        o = outcomes.get(s.name, Outcome())
        steps.append({"step": s.kind, "task": s.name, "label": s.label, "key": s.key, "status": o.status,
                      "cache": _cache(o), "seconds": o.seconds,
                      "start": _start(o, t0, started),
                      **({"waited": o.waited} if o.waited else {}),
                      **({"memory_estimate_mb": round(s.memory / 2**20, 1)} if s.memory else {}),
                      **({"peak_rss_mb": o.peak_rss_mb} if o.peak_rss_mb is not None else {}),
                      **({"node": o.node, "attempts": o.attempts} if o.node else {}),
                      **({"overhead": o.overhead} if o.overhead is not None else {})})
    root = next(((s, outcomes[s.name]) for s in chain
                 if s.name in outcomes and outcomes[s.name].status == "failed"
                 and outcomes[s.name].kind != "dependency"), None)
    pkg = outcomes.get(package.name, Outcome())
    if root is not None:
        status = "failed"
    elif pkg.status == "ran":
        status = "built"
    elif pkg.status == "up-to-date":
        status = "up-to-date"
    else:
        status = "not-run"

    out_dir, stem = Path(package.params.out_dir), package.params.stem
    entry = {
        "target": rec["target"], "name": f"{rec['name']}/{rec['target']}", "status": status,
        "backend": rec["backend"], "scheme": rec["scheme"], "dtype": rec["dtype"],
        "failure": None, "artifact": None, "record": None, "sha256": None, "size": None,
        "files": None, "verification": None, "quality": None, "speed": None,
        "seconds": round(sum(x["seconds"] or 0.0 for x in steps if x["status"] in ("ran", "failed")), 3),
        "steps": steps,
    }
    if root is not None:
        step, o = root
        entry["failure"] = {"kind": o.kind, "step": step.kind, "task": step.name, "message": o.message,
                            "log": o.log}
        entry["quality" if step.kind == "quality" else "verification"] = o.figures
    elif status == "not-run":
        entry["failure"] = None
    if status in ("built", "up-to-date"):
        record_file = out_dir / f"{stem}.json"
        try:
            published = json.loads(record_file.read_text())
        except (OSError, ValueError):
            published = {}
        entry.update(artifact=_shown(out_dir / f"{stem}.pte"), record=_shown(record_file),
                     sha256=published.get("sha256"), size=published.get("size"),
                     files={_shown(out_dir / f): info for f, info in published.get("files", {}).items()},
                     verification=published.get("verification"), quality=published.get("quality"),
                     speed=published.get("speed"))
    return entry


def _shown(path: Path) -> str:
    """A path relative to the working directory when it lies below it, else absolute."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(Path(path).resolve())


def error_entry(kind: str, err) -> dict:
    out = {"kind": kind, "message": str(err)}
    for attr in ("file", "line", "column", "field"):
        if getattr(err, attr, None) is not None:
            out[attr] = getattr(err, attr)
    return out


# --------------------------------------------------------------------------- writers


def write_atomic(path, text: str) -> None:
    """Write beside the destination and rename: a reader never sees half a report."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp's 0600 would make a CI artifact unreadable to anyone else: as open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_json(report: dict) -> str:
    return json.dumps(report, indent=1, default=str) + "\n"


def _flat(prefix: str, value) -> list[tuple[str, str]]:
    if isinstance(value, dict):
        return [kv for k, v in value.items() for kv in _flat(f"{prefix}.{k}", v)]
    if value is None or isinstance(value, (list, tuple)):
        return []
    return [(prefix, _fmt(value))]


def _fmt(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    return str(value)


def _properties(t: dict) -> list[tuple[str, str]]:
    props = [(k, _fmt(t[k])) for k in ("status", "backend", "scheme", "dtype", "artifact", "sha256",
                                        "size") if t.get(k) is not None]
    v = t.get("verification") or {}
    for k in FIGURES:
        if v.get(k) is not None:
            props.append((f"verification.{k}", _fmt(v[k])))
    props += _flat("verification.tolerance", v.get("tolerance"))
    q = t.get("quality") or {}
    for k in QUALITY_FIGURES:
        if q.get(k) is not None:
            props.append((f"quality.{k}", _fmt(q[k])))
    props += _flat("quality.gate", q.get("gate"))
    props += _flat("speed", {k: v for k, v in (t.get("speed") or {}).items() if k.endswith("_per_s")})
    props += [(f"seconds.{s['step']}", _fmt(s["seconds"])) for s in t["steps"] if s["seconds"] is not None]
    return props


def to_junit(report: dict) -> str:
    """One <testsuite> per manifest, one <testcase> per target: it passes when the target
    is built (or up to date) and verified. Figures are <properties> and system-out."""
    root = ET.Element("testsuites", name="mlxbuild")
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    suites = []
    if report.get("error"):
        err = report["error"]
        suite = ET.SubElement(root, "testsuite", name="mlxbuild")
        case = ET.SubElement(suite, "testcase", classname="mlxbuild", name=err.get("file") or err["kind"])
        ET.SubElement(case, "failure", message=err["message"], type=err["kind"]).text = err["message"]
        suites.append((suite, {"tests": 1, "failures": 1, "errors": 0, "skipped": 0}, 0.0))
    for m in report["manifests"]:
        suite = ET.SubElement(root, "testsuite", name=f"{m['name']} {m['version']} ({m['path']})")
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        seconds = 0.0
        for t in m["targets"]:
            counts["tests"] += 1
            seconds += t["seconds"] or 0.0
            case = ET.SubElement(suite, "testcase", classname=m["name"] or m["path"], name=t["target"],
                                 time=f"{t['seconds'] or 0.0:.3f}")
            props = ET.SubElement(case, "properties")
            for name, value in _properties(t):
                ET.SubElement(props, "property", name=name, value=value)
            if t["status"] == "failed":
                counts["failures"] += 1
                f = t["failure"]
                ET.SubElement(case, "failure", message=f["message"] or "", type=f["kind"]).text = (
                    f"{f['task']}: {f['message']}")
            elif t["status"] == "not-run":
                counts["skipped"] += 1
                ET.SubElement(case, "skipped", message="not run: the build stopped at an earlier "
                              "failure (doit build --continue builds every target it can)")
            ET.SubElement(case, "system-out").text = "\n".join(f"{k}: {v}" for k, v in _properties(t)) + "\n"
        suites.append((suite, counts, seconds))
    for suite, counts, seconds in suites:
        for k, v in counts.items():
            suite.set(k, str(v))
            totals[k] += v
        suite.set("time", f"{seconds:.3f}")
    for k, v in totals.items():
        root.set(k, str(v))
    if report.get("seconds") is not None:
        root.set("time", f"{report['seconds']:.3f}")
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _md(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _size(n) -> str:
    if n is None:
        return ""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def to_markdown(report: dict) -> str:
    """A GitHub step summary: a headline and one table row per target."""
    c = report["counts"]
    icon = "✅" if report["exit_code"] == 0 else "❌"
    lines = [f"### {icon} mlxbuild: {c['built']} built, {c['up-to-date']} up to date, {c['failed']} failed"
             + (f", {c['not-run']} not run" if c["not-run"] else "")
             + f" (exit {report['exit_code']}: {report['result']})", ""]
    if report.get("error"):
        lines += [f"**{report['error']['kind']} error:** `{_md(report['error']['message'])}`", ""]
    rows = [(m, t) for m in report["manifests"] for t in m["targets"]]
    if rows:
        lines += ["| target | backend | scheme | status | size | sha256 | max rel error | top-1 "
                  "| KLD vs float | top-1 vs float | time |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for m, t in rows:
            v = t.get("verification") or {}
            status = t["status"]
            if t["failure"]:
                status = f"failed ({t['failure']['kind']}): {_md(t['failure']['message'])}"
            rel = v.get("max_rel_error")
            top1 = v.get("top1_agreement")
            lines.append("| " + " | ".join([
                f"`{t['name']}`", t["backend"], t["scheme"], status, _size(t["size"]),
                f"`{t['sha256'][:12]}`" if t["sha256"] else "",
                f"{rel:.2e}" if isinstance(rel, (int, float)) else "",
                f"{top1:.0%}" if isinstance(top1, (int, float)) else "",
                *_quality_cells(t.get("quality") or {}),
                f"{t['seconds']:.1f} s"]) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _quality_cells(q: dict) -> list[str]:
    if q.get("kld_mean") is None:
        return ["not measured" if q.get("measured") is False else "", ""]
    return [f"{q['kld_mean']:.2e}", f"{q['top1']:.0%}"]


def write_reports(report: dict, json_path=None, junit_path=None, summary_path=None) -> list[str]:
    """Write each report asked for; return one error line per report that could not be written."""
    problems = []
    for path, render, append in ((json_path, to_json, False), (junit_path, to_junit, False),
                                 (summary_path, to_markdown, True)):
        if not path:
            continue
        try:
            if append:  # GITHUB_STEP_SUMMARY is shared by the job's steps: add, in one write
                with open(path, "a", encoding="utf-8") as f:
                    f.write(render(report))
            else:
                write_atomic(path, render(report))
        except OSError as e:
            problems.append(f"cannot write {path}: {e.strerror or e}")
    return problems
