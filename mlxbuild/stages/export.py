"""torch.export one (scheme, flavour) and save it: every lowering starts from these files.

The task kind (``mlxbuild.task_kinds``) decides the methods and their example inputs;
each method's program is saved as ``<method>.pt2``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import delegate
from mlxbuild import task_kinds


def run(params: dict, cache, out: Path) -> dict:
    kind = task_kinds.get(params.get("task"))
    programs, info = kind.export(params, cache, params["flavour"])
    for name, program in programs.items():
        torch.export.save(program, out / f"{name}.pt2")
    info = {"flavour": params["flavour"], "task": params.get("task", "text-generation"),
            "methods": list(programs), **info,
            "graph_nodes": {name: len(p.graph.nodes) for name, p in programs.items()}}
    (out / "export.json").write_text(json.dumps(info, indent=1))
    return info


def load_programs(entry: Path, flavour_name: str) -> dict:
    """Reload the saved programs by method; the flavour's custom ops must be registered first."""
    import torchao  # noqa: F401

    delegate.flavour(flavour_name).attention_implementation()
    methods = json.loads((entry / "export.json").read_text())["methods"]
    return {name: torch.export.load(entry / f"{name}.pt2") for name in methods}
