"""`doit build` in CI pipelines: exit codes, JSON/JUnit/Markdown reports, target filters,
plain output without a terminal, and the example GitHub Actions workflow.

One tiny manifest (a portable and an MLX target) is built by three invocations that
every test here reads (the `matrix` fixture): `--backend portable`, then
`mlxbuild build --target 'ci-tiny/mlx-*'`, then a no-op build with the reports asked
for through environment variables. Failures run on a copy of that workspace.
Builds run as subprocesses against the source frozen at session start (conftest.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shlex
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from buildlog import KINDS, STEP_LINE

# A text model's steps: every kind but the speech models' audio preprocessor.
TEXT_KINDS = tuple(k for k in KINDS if k != "preprocessor")
import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
NAME = "ci-tiny"
TARGETS = {"portable-fp32": "portable", "mlx-fp32": "mlx"}

TINY = """\
name: ci-tiny
version: 0.1.0
model:
  source:
    synthetic:
      architecture: qwen3
      seed: 0
      config: {vocab_size: 128, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1,
               num_attention_heads: 2, num_key_value_heads: 1, head_dim: 16,
               max_position_embeddings: 256, tie_word_embeddings: true, bos_token_id: 1,
               eos_token_id: 2}
  dtype: fp32
export: {max_context_length: 32}
targets:
  - {name: portable-fp32, backend: portable, quantization: none}
  - {name: mlx-fp32, backend: mlx, quantization: none}
"""

# A `module:` source whose factory raises: the weights step fails, a build failure.
BROKEN = """\
name: ci-broken
version: 0.1.0
model:
  source: {module: "ci_broken_factory:make"}
  dtype: fp32
export: {max_context_length: 32}
targets:
  - {name: portable-fp32, backend: portable, quantization: none}
"""
FACTORY = 'def make(**kwargs):\n    raise RuntimeError("factory exploded on purpose")\n'


def tool(name: str) -> str:
    return str(BIN / name)


@dataclass
class Run:
    args: list
    rc: int
    out: str
    err: str

    def steps(self, marker: str) -> list[tuple[str, str]]:
        want = {".": ".  ", "ok": "ok ", "--": "-- "}[marker]
        return [(m.group(2), m.group(3)) for m in map(STEP_LINE.match, self.out.splitlines())
                if m and m.group(1) == want]

    def labels(self, kind: str, marker: str = ".") -> set[str]:
        return {label for k, label in self.steps(marker) if k == kind}

    def __str__(self):
        tail = lambda s: "\n".join(s.strip().splitlines()[-30:])  # noqa: E731
        return f"$ {shlex.join(map(str, self.args))} (exit {self.rc})\n--- stdout\n{tail(self.out)}\n--- stderr\n{tail(self.err)}"


class Workspace:
    def __init__(self, root: Path, make_env):
        self.root, self._make_env = Path(root), make_env

    def env(self, **extra) -> dict:
        env = self._make_env(MLXBUILD_CACHE=self.root / "cache", MLXBUILD_ARTIFACTS=self.root / "artifacts",
                             GITHUB_STEP_SUMMARY=self.root / "summary.md", **extra)
        for var in ("MLXBUILD_REPORT", "MLXBUILD_JUNIT", "MLXBUILD_PLAIN", "MLXBUILD_STEP_SUMMARY"):
            if var not in extra:
                env.pop(var, None)
        env["PYTHONPATH"] += os.pathsep + str(self.root / "modules")  # the broken factory
        return env

    def run(self, *args, **extra) -> Run:
        p = subprocess.run([str(a) for a in args], cwd=self.root, env=self.env(**extra),
                           capture_output=True, text=True, timeout=900)
        return Run(list(args), p.returncode, p.stdout, p.stderr)

    def json(self, rel: str) -> dict:
        return json.loads((self.root / rel).read_text())

    def junit(self, rel: str) -> ET.Element:
        return ET.parse(self.root / rel).getroot()

    def record(self, target: str) -> dict:
        return json.loads((self.root / "artifacts" / NAME / "0.1.0" / f"{NAME}-{target}.json").read_text())


def make_workspace(root: Path, make_env) -> Workspace:
    (root / "manifests").mkdir(parents=True)
    (root / "manifests" / "tiny.yaml").write_text(TINY)
    (root / "manifests" / "broken.yaml").write_text(BROKEN)
    (root / "modules").mkdir()
    (root / "modules" / "ci_broken_factory.py").write_text(FACTORY)
    (root / "summary.md").write_text("# an earlier step's summary\n")
    return Workspace(root, make_env)


def targets_of(report: dict) -> dict:
    return {t["target"]: t for m in report["manifests"] for t in m["targets"]}


def properties(case: ET.Element) -> dict:
    return {p.get("name"): p.get("value") for p in case.iter("property")}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, subprocess_env):
    ws = make_workspace(tmp_path_factory.mktemp("ci") / "ws", subprocess_env)
    runs = {
        "backend": ws.run(tool("doit"), "build", "--backend", "portable", "--report", "reports/backend.json",
                          "--junit", "reports/backend.xml", "manifests/tiny.yaml"),
        "target": ws.run(tool("mlxbuild"), "build", "--target", f"{NAME}/mlx-*", "--report",
                         "reports/target.json", "manifests/tiny.yaml"),
        "noop": ws.run(tool("doit"), "build", "manifests/tiny.yaml",
                       MLXBUILD_REPORT="reports/noop.json", MLXBUILD_JUNIT="reports/noop.xml"),
    }
    for r in runs.values():
        assert r.rc == 0, r
    return ws, runs


@pytest.fixture(scope="module")
def failed(matrix, tmp_path_factory):
    """A copy of the built workspace where verification must fail: the reference logits
    are shifted far outside any tolerance, the verify entries and published records gone."""
    src, _ = matrix
    ws = Workspace(tmp_path_factory.mktemp("ci-failed") / "ws", src._make_env)
    shutil.copytree(src.root, ws.root, symlinks=True)
    from test_build import reseal

    for logits in (ws.root / "cache" / "reference").glob("*/*/logits.npy"):
        ref = np.load(logits)
        ref[:, ::7] += np.abs(ref).max()
        np.save(logits, ref)
        reseal(logits.parent)  # wrong but consistent, so verification (not integrity) catches it
    shutil.rmtree(ws.root / "cache" / "verify")
    for record in (ws.root / "artifacts" / NAME / "0.1.0").glob("*.json"):
        record.unlink()
    runs = {
        # Two worker processes: the failures' kinds travel back to the main process.
        "verification": ws.run(tool("doit"), "build", "-n", "2", "--report", "reports/verify.json",
                               "--junit", "reports/verify.xml", "manifests/tiny.yaml"),
        "build": ws.run(tool("doit"), "build", "--report", "reports/build.json", "--junit",
                        "reports/build.xml", "manifests/broken.yaml"),
    }
    return ws, runs


# --------------------------------------------------------------------------- filters


def test_backend_filter_plans_and_runs_only_matching_targets(matrix):
    ws, runs = matrix
    r = runs["backend"]
    assert sorted(k for k, _ in r.steps(".")) == sorted(TEXT_KINDS), r  # one of each, nothing of the MLX target
    for kind in ("lower", "verify", "package"):
        assert r.labels(kind) == {f"{NAME}/portable-fp32"}, r
    assert r.labels("export") == {f"{NAME} none/plain"}, r
    assert "mlx" not in r.out, r  # not planned: not even an up-to-date line
    assert set(targets_of(ws.json("reports/backend.json"))) == {"portable-fp32"}


def test_target_filter_runs_only_that_targets_steps(matrix):
    ws, runs = matrix
    r = runs["target"]
    assert sorted(k for k, _ in r.steps(".")) == sorted(["export", "lower", "verify", "quality", "package"]), r
    assert r.labels("export") == {f"{NAME} none/mlx"}, r
    for kind in ("lower", "verify", "quality", "package"):
        assert r.labels(kind) == {f"{NAME}/mlx-fp32"}, r
    # Shared upstream steps were built by the first run: up to date now.
    assert {k for k, _ in r.steps("--")} == {"weights", "tokenizer", "quantize", "reference", "baseline"}, r
    assert "portable" not in r.out, r
    assert targets_of(ws.json("reports/target.json"))["mlx-fp32"]["status"] == "built"


@pytest.mark.parametrize("args, message", [
    (["--backend", "cuda"], r"--backend cuda matches no target; the manifests have: ci-tiny/portable-fp32 \(portable\)"),
    (["--target", "nope-*", "--backend", "mlx"], r"--target 'nope-\*' --backend mlx matches no target"),
    (["--no-such-option"], r"no-such-option"),
], ids=["backend", "target", "unknown-option"])
def test_usage_errors_exit_2_in_one_line(tmp_path, subprocess_env, args, message):
    ws = make_workspace(tmp_path / "ws", subprocess_env)
    r = ws.run(tool("doit"), "build", *args, "--report", "reports/r.json", "manifests/tiny.yaml")
    assert r.rc == 2, r
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), r
    assert not (ws.root / "cache").exists(), "nothing planned, nothing written"
    if args[0] != "--no-such-option":  # the options were read: the report says why
        report = ws.json("reports/r.json")
        assert (report["exit_code"], report["error"]["kind"]) == (2, "usage"), report


# --------------------------------------------------------------------------- reports


def test_json_report_describes_each_target(matrix):
    ws, _ = matrix
    built = ws.json("reports/backend.json")
    assert (built["exit_code"], built["result"], built["error"]) == (0, "success", None)
    assert built["counts"] == {"built": 1, "up-to-date": 0, "failed": 0, "not-run": 0}
    [manifest] = built["manifests"]
    assert (manifest["path"], manifest["name"], manifest["version"]) == ("manifests/tiny.yaml", NAME, "0.1.0")
    t = targets_of(built)["portable-fp32"]
    record = ws.record("portable-fp32")
    pte = Path(t["artifact"]) if Path(t["artifact"]).is_absolute() else ws.root / t["artifact"]
    assert (t["status"], t["failure"], t["backend"], t["scheme"]) == ("built", None, "portable", "none")
    assert t["sha256"] == hashlib.sha256(pte.read_bytes()).hexdigest() == record["sha256"]
    assert t["size"] == pte.stat().st_size == record["size"]
    assert t["verification"] == record["verification"] and t["verification"]["passed"] is True
    assert sorted(s["step"] for s in t["steps"]) == sorted(TEXT_KINDS)
    assert all(s["status"] == "ran" and s["seconds"] > 0 for s in t["steps"]), t["steps"]
    assert t["seconds"] == pytest.approx(sum(s["seconds"] for s in t["steps"]), abs=0.01)

    noop = ws.json("reports/noop.json")  # asked for through MLXBUILD_REPORT
    assert noop["exit_code"] == 0 and noop["counts"]["up-to-date"] == 2, noop["counts"]
    for name, backend in TARGETS.items():
        t = targets_of(noop)[name]
        assert (t["status"], t["backend"]) == ("up-to-date", backend)
        assert t["sha256"] == ws.record(name)["sha256"]
        assert {s["status"] for s in t["steps"]} == {"up-to-date"} and t["seconds"] == 0


def test_junit_has_one_testcase_per_target_with_figures(matrix):
    ws, _ = matrix
    report = ws.json("reports/noop.json")
    root = ws.junit("reports/noop.xml")  # asked for through MLXBUILD_JUNIT
    assert root.tag == "testsuites" and (root.get("tests"), root.get("failures")) == ("2", "0")
    cases = {c.get("name"): c for c in root.iter("testcase")}
    assert set(cases) == set(TARGETS)
    for name, case in cases.items():
        want = targets_of(report)[name]
        props = properties(case)
        assert case.get("classname") == NAME
        assert (props["status"], props["backend"], props["sha256"]) == ("up-to-date", TARGETS[name], want["sha256"])
        assert float(props["verification.max_rel_error"]) == want["verification"]["max_rel_error"]
        assert float(props["verification.tolerance.max_rel_error"]) == want["verification"]["tolerance"]["max_rel_error"]
        assert case.find("failure") is None
        out = case.find("system-out").text
        assert f"verification.max_rel_error: {props['verification.max_rel_error']}" in out
    assert [c.get("name") for c in ws.junit("reports/backend.xml").iter("testcase")] == ["portable-fp32"]


def test_github_step_summary_is_appended(matrix):
    ws, _ = matrix
    text = (ws.root / "summary.md").read_text()
    assert text.startswith("# an earlier step's summary\n")
    headlines = re.findall(r"^### .*mlxbuild: (\d+) built, (\d+) up to date, (\d+) failed .*exit 0", text, re.M)
    assert headlines == [("1", "0", "0"), ("1", "0", "0"), ("0", "2", "0")], text
    sha = ws.record("mlx-fp32")["sha256"][:12]
    assert re.search(rf"^\| `{NAME}/mlx-fp32` \| mlx \| none \| up-to-date \| [\d.]+ [KM]?B \| `{sha}` \|", text, re.M), text


def test_output_without_a_terminal_is_plain_lines(matrix):
    _, runs = matrix
    for r in runs.values():
        assert "\r" not in r.out + r.err and "\x1b[" not in r.out + r.err, r
        for line in r.out.splitlines():
            assert line[:3] in (".  ", "ok ", "-- "), (line, str(r))


# --------------------------------------------------------------------------- failures


def test_verification_failure_exits_4_and_reports_the_figures(failed):
    ws, runs = failed
    r = runs["verification"]
    assert r.rc == 4, r
    report = ws.json("reports/verify.json")
    assert (report["exit_code"], report["result"]) == (4, "verification failure")
    assert report["counts"]["failed"] == 2
    cases = {c.get("name"): c for c in ws.junit("reports/verify.xml").iter("testcase")}
    for name in TARGETS:
        t = targets_of(report)[name]
        assert t["status"] == "failed" and t["failure"]["kind"] == "verification", t
        assert t["failure"]["step"] == "verify"
        assert re.match(rf"{NAME}/{name}: verification failed: max abs error", t["failure"]["message"])
        figures = t["verification"]
        assert figures["passed"] is False and figures["max_rel_error"] > figures["tolerance"]["max_rel_error"]
        assert t["artifact"] is None and not (ws.root / "artifacts" / NAME / "0.1.0" / f"{NAME}-{name}.json").exists()
        failure = cases[name].find("failure")
        assert failure.get("type") == "verification" and failure.get("message") == t["failure"]["message"]
        assert float(properties(cases[name])["verification.max_rel_error"]) == figures["max_rel_error"]


def test_build_failure_exits_1_and_names_the_step(failed):
    ws, runs = failed
    r = runs["build"]
    assert r.rc == 1, r
    assert "factory exploded on purpose" in r.out + r.err, r
    report = ws.json("reports/build.json")
    [t] = targets_of(report).values()
    assert (report["exit_code"], t["status"]) == (1, "failed")
    assert (t["failure"]["kind"], t["failure"]["step"]) == ("build", "weights"), t
    assert "RuntimeError: factory exploded on purpose" in t["failure"]["message"]
    # The steps after the failed one never ran.
    assert {s["step"]: s["status"] for s in t["steps"]}["lower"] == "not-run"
    [case] = ws.junit("reports/build.xml").iter("testcase")
    assert case.find("failure").get("type") == "build"


def test_bad_manifest_exits_3_and_still_writes_the_reports(tmp_path, subprocess_env):
    ws = make_workspace(tmp_path / "ws", subprocess_env)
    bad = ws.root / "manifests" / "tiny.yaml"
    bad.write_text(TINY.replace("backend: mlx", "backend: metal"))
    line = next(i for i, ln in enumerate(bad.read_text().splitlines(), 1) if "metal" in ln)
    r = ws.run(tool("doit"), "build", "--report", "reports/r.json", "--junit", "reports/r.xml",
               "manifests/tiny.yaml")
    assert r.rc == 3, r
    assert len(r.err.strip().splitlines()) == 1 and "targets[1].backend" in r.err, r
    report = ws.json("reports/r.json")
    assert report["error"]["kind"] == "manifest" and report["error"]["line"] == line, report
    assert report["manifests"] == [] and report["result"] == "bad manifest"
    failure = next(ws.junit("reports/r.xml").iter("failure"))
    assert failure.get("type") == "manifest" and "targets[1].backend" in failure.get("message")
    assert "bad manifest" in (ws.root / "summary.md").read_text()
    assert not (ws.root / "cache").exists() and not (ws.root / "artifacts").exists()
    assert not [p for p in (ws.root / "reports").iterdir() if p.name.startswith(".")], "no temporary files left"


class _Task:
    def __init__(self, name):
        self.name, self.actions = name, [object()]

    def title(self):
        return self.name.replace(":", " ")


def test_build_failure_wins_over_verification_failure():
    """Exit code precedence, on the objects a worker process sends back (pickled)."""
    from doit.exceptions import UnmetDependency
    from doit.reporter import ZeroReporter

    from mlxbuild.report import Recorder, exit_code
    from mlxbuild.tasks import StepFailed, VerificationFailed

    recorder = Recorder(ZeroReporter(io.StringIO(), {}))
    recorder.execute_task(_Task("verify:a/x"))
    fail = pickle.loads(pickle.dumps(VerificationFailed("a/x: verification failed", figures={"max_abs_error": 2.0})))
    recorder.add_failure(_Task("verify:a/x"), fail)
    recorder.add_failure(_Task("package:a/x"), UnmetDependency("verify:a/x"))
    assert recorder.outcomes["verify:a/x"].figures == {"max_abs_error": 2.0}
    assert exit_code(recorder.outcomes, 1) == 4
    recorder.add_failure(_Task("lower:a/y"), pickle.loads(pickle.dumps(StepFailed("a/y: lowering failed"))))
    assert exit_code(recorder.outcomes, 1) == 1
    assert exit_code({}, 0) == 0 and exit_code({}, 2) == 1


# --------------------------------------------------------------------------- terminal output


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("env, live, colour", [({}, True, True), ({"NO_COLOR": "1"}, True, False),
                                               ({"MLXBUILD_PLAIN": "1"}, False, False)],
                         ids=["terminal", "no-color", "plain"])
def test_progress_on_a_terminal(monkeypatch, env, live, colour):
    from mlxbuild import progress
    from mlxbuild.doit_plugin import ProgressReporter

    for var in ("NO_COLOR", "MLXBUILD_PLAIN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TERM", "xterm")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out, err = _Terminal(), _Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    reporter = ProgressReporter(out, {})
    task = _Task("quantize:tiny 4w")
    reporter.execute_task(task)
    progress.begin("quantize", "tiny 4w")
    progress.note("quantizing 12 layers")
    reporter.add_success(task)
    reporter.skip_uptodate(_Task("lower:tiny/mlx"))
    reporter.complete_run()
    shown = out.getvalue() + err.getvalue()
    assert ("\r" in shown) == live, repr(shown)
    assert ("\x1b[32mok\x1b[0m quantize tiny 4w" in shown) == colour, repr(shown)
    if live:  # the note joins the status line of the running step
        assert re.search(r"⋯ quantize tiny 4w \d+ s · quantizing 12 layers \[", out.getvalue()), repr(shown)
    else:
        assert re.fullmatch(r"\.  quantize tiny 4w\nok quantize tiny 4w \(\d+\.\d s\)\n-- lower tiny/mlx\n",
                            out.getvalue()), repr(shown)
        assert err.getvalue().startswith("   quantize tiny 4w: quantizing 12 layers [")


# --------------------------------------------------------------------------- the example workflow

WORKFLOW = REPO / "docs" / "examples" / "github-actions.yml"


def shell_commands(script: str) -> list[list[str]]:
    """Simple commands of a `run:` script: continuation lines joined, split at ; && || |
    and newlines, leading VAR=value and do/then keywords dropped. GitHub expressions
    `${{ ... }}` stand for one word."""
    script = re.sub(r"\$\{\{.*?\}\}", "EXPR", script.replace("\\\n", " "))
    commands = []
    for line in script.splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lex.whitespace_split, lex.commenters = True, "#"
        current = []
        for word in list(lex) + [";"]:
            if word and set(word) <= set(";&|"):
                while current and (re.match(r"^\w+=", current[0]) or current[0] in ("do", "then")):
                    current.pop(0)
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(word)
    return commands


def parse_doit(argv: list[str]):
    """Parse a doit command line with doit's own parser and our commands' options."""
    from doit.doit_cmd import DoitMain

    from mlxbuild.doit_plugin import ManifestLoader

    main = DoitMain(ManifestLoader(), extra_config={"GLOBAL": {}})
    commands = main.get_cmds()
    assert argv and argv[0] in commands, f"doit has no command {argv[:1]}"
    command = commands.get_plugin(argv[0])(task_loader=ManifestLoader(), config=main.config,
                                           bin_name="doit", cmds=commands)
    return command.cmdparser.parse(argv[1:])


def test_example_workflow_runs_only_commands_the_cli_accepts():
    from mlxbuild import cli

    workflow = yaml.safe_load(WORKFLOW.read_text())
    job, lane = workflow["jobs"]["build"], workflow["jobs"]["latest-dependencies"]
    assert set(workflow["jobs"]) == {"build", "latest-dependencies"}
    # The lane runs the repository's script, which exists and is executable.
    [lane_script] = [s["run"] for s in lane["steps"] if "run" in s]
    assert os.access(REPO / lane_script.split()[0], os.X_OK), lane_script
    scripts = [step["run"] for step in job["steps"] if "run" in step]
    invocations = [c for s in scripts for c in shell_commands(s) if c[0] in ("doit", "mlxbuild")]
    seen = set()
    for argv in invocations:
        doit_args = argv[1:] if argv[0] == "doit" else cli.main(argv[1:], parse_only=True)
        if isinstance(doit_args, list):
            params, positional = parse_doit(doit_args)  # raises CmdParseError on an unknown option
            seen.add(doit_args[0])
            if doit_args[0] == "build":
                assert params["report"] and params["junit"] and params["continue"], argv
                assert positional == ["EXPR"], argv  # the matrix's manifest
        else:
            seen.add(doit_args.cmd)  # argparse exits (SystemExit 2) on an unknown option
    assert {"build", "release", "check-bundle", "validate", "doctor"} <= seen, seen
    assert any("requirements/lock.txt" in s and "-c" in s for s in scripts)  # installs through the lock
    for entry in job["strategy"]["matrix"]["include"]:
        assert (REPO / entry["manifest"]).exists(), entry
    cache_key = next(s for s in job["steps"] if str(s.get("uses", "")).startswith("actions/cache/restore"))["with"]["key"]
    assert "tool-versions.lock" in cache_key and "matrix.manifest" in cache_key
    # The documentation shows this very file.
    assert WORKFLOW.read_text().strip() in (REPO / "docs" / "ci.md").read_text()
