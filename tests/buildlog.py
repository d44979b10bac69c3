"""What the end-to-end tests share about running `doit build` as a user does."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from mlxbuild.steps import StepKind

KINDS = tuple(k.value for k in StepKind)
# The reporter's step lines: '.  ' started, 'ok ' finished (with its time), '-- ' up to date.
STEP_LINE = re.compile(r"^(\.  |ok |-- )(" + "|".join(KINDS) + r") (.+?)(?: \(\d+(?:\.\d+)? s\))?$")


# A one-layer Qwen3 with synthetic weights: `model.source` of the small end-to-end manifests.
TINY_SOURCE = """\
  source:
    synthetic:
      architecture: qwen3
      seed: 0
      config: {vocab_size: 128, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1,
               num_attention_heads: 2, num_key_value_heads: 1, head_dim: 16, bos_token_id: 1, eos_token_id: 2}
"""


def doit_command() -> list[str]:
    script = Path(sys.executable).with_name("doit")
    return [str(script)] if script.exists() else [sys.executable, "-m", "doit"]
