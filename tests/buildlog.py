"""What the end-to-end tests share about running `doit build` as a user does."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from mlxbuild.steps import StepKind

KINDS = tuple(k.value for k in StepKind)
# The reporter's step lines: '.  ' started, 'ok ' finished (with its time), '-- ' up to date.
STEP_LINE = re.compile(r"^(\.  |ok |-- )(" + "|".join(KINDS) + r") (.+?)(?: \(\d+(?:\.\d+)? s\))?$")


def doit_command() -> list[str]:
    script = Path(sys.executable).with_name("doit")
    return [str(script)] if script.exists() else [sys.executable, "-m", "doit"]
