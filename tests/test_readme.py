"""The README states facts the code owns; keep them from drifting."""

import re
import subprocess
import sys
from pathlib import Path

from backends import capabilities

ROOT = Path(__file__).resolve().parents[1]


def test_capability_table_matches_code():
    readme = (ROOT / "README.md").read_text()
    table = [line for line in capabilities.render_markdown().splitlines() if line.startswith("|")]
    assert "\n".join(table) in readme


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```sh\n(.*?)\n```", readme, flags=re.S)
    test_command = next(c for c in commands if c.rstrip().endswith("pytest"))
    assert test_command in (ROOT / ".ci" / "run").read_text()
    build_command = commands[0]
    assert build_command.endswith("doit build manifests/qwen.yaml")


def test_mlxbuild_validate_accepts_shipped_manifests():
    manifests = sorted(str(p) for p in (ROOT / "manifests").glob("*.yaml"))
    out = subprocess.run([sys.executable, "-m", "mlxbuild.cli", "validate", *manifests],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("ok: ") == len(manifests)
