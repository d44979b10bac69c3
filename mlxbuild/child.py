"""Heavy steps in a process of their own, so the memory a step's tracing graphs, models and
lowered programs took goes back to the system when it ends, and the build process stays
small however many steps it runs (in one doit process, three targets of a 0.6B model once
peaked at 7.5x the weights).

The rule (``MLXBUILD_STEP_PROCESS``):

- ``auto`` (the default): a heavy step (weights, preprocessor, quantize, export, reference,
  lower, verify) runs in a child process when the model it handles is at least
  ``AUTO_BYTES`` (256 MiB: the weights entry on disk, the checkpoint's files for the weights
  step, a synthetic config's parameter count times its dtype's size; the lowered program for
  verify). Below that, the ~3 s a child spends importing torch and ExecuTorch would dominate,
  so tiny models (the tests, the default manifest) run in the build's own process.
- ``always`` / ``never``: every heavy step in a child / in the build process.

A child gets the step's typed params and the cache root, reads its inputs through the cache
(integrity checks included) and writes into the entry directory the parent made; the parent
seals the entry. Errors come back by class: a damaged input entry (repaired as in-process),
a verification failure (exit 4, figures kept), a one-line build error, or a crash whose
traceback goes to the step's log. The child's peak resident memory is measured by the kernel
(``wait4``) and reported per step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

MODE_ENV = "MLXBUILD_STEP_PROCESS"
AUTO_BYTES = 256 * 2**20
HEAVY = ("weights", "preprocessor", "quantize", "export", "reference", "lower", "verify", "baseline", "quality")
_DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


class ChildCrash(Exception):
    """An unexpected exception in a child step: its type, message and traceback."""

    def __init__(self, type_name: str, message: str, child_traceback: str) -> None:
        super().__init__(message)
        self.type_name, self.child_traceback = type_name, child_traceback


def mode() -> str:
    value = os.environ.get(MODE_ENV, "auto").strip().lower() or "auto"
    if value not in ("auto", "always", "never"):
        from mlxbuild.errors import UsageError

        raise UsageError(f"{MODE_ENV}={value!r}: expected auto, always or never")
    return value


def wanted(step, cache) -> bool:
    kind = str(step.kind)
    m = mode()
    if m == "never" or kind not in HEAVY:
        return False
    return m == "always" or model_bytes(step, cache) >= AUTO_BYTES


def model_bytes(step, cache) -> int:
    """What the rule measures (see the module docstring); 0 where it cannot tell."""
    p = step.params
    kind = str(step.kind)
    try:
        if kind in ("verify", "quality"):
            return sum(f["size"] for f in cache.files("lower", p.lower).values())
        if kind == "weights":
            return _source_bytes(p.load, p.dtype)
        weights = getattr(p, "weights", None)
        return sum(f["size"] for f in cache.files("weights", weights).values()) if weights else 0
    except Exception:  # noqa: BLE001 - no measure is no reason to fail: run it in-process
        return 0


def _source_bytes(load: dict, dtype: str) -> int:
    if "path" in load:
        return sum(f.stat().st_size for f in Path(load["path"]).glob("*.safetensors"))
    if "synthetic" in load:
        c = load["synthetic"].get("config") or {}
        return _synthetic_params(c) * _DTYPE_BYTES.get(dtype, 4)
    return 0  # a hub source: its size is known once downloaded, which this step does


def _synthetic_params(c: dict) -> int:
    """A synthetic config's parameter count, torch-free (mlxbuild.memory's)."""
    from mlxbuild.memory import model_shape

    return (model_shape({"synthetic": {"config": c}}) or {"params": 0})["params"]


def run(step, cache_root: Path, out: Path) -> int:
    """Run ``step`` into ``out`` in a child process; return its peak RSS in bytes. Raises
    what the step raised (by class), or ChildCrash."""
    from mlxbuild.cache import CorruptEntry
    from mlxbuild.errors import BuildError, VerificationError

    spec = out.with_name(out.name + ".step.json")
    error = out.with_name(out.name + ".error.json")
    spec.write_text(json.dumps({"kind": str(step.kind), "label": step.label, "cache": str(cache_root),
                                "params": step.params.model_dump(mode="json")}))
    proc = subprocess.Popen([sys.executable, "-m", "mlxbuild.child", str(spec), str(out), str(error)])
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        # The build is interrupted (SIGINT/SIGTERM): the child's half-written entry dies with it.
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        raise
    finally:
        spec.unlink(missing_ok=True)
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    if code == 0:
        try:
            # The child's own high-water mark: wait4's ru_maxrss also counts, at exec, the
            # memory of the build process the child was spawned from (Linux folds the old
            # address space's peak in), which can be the larger.
            return int(json.loads(error.read_text())["peak_rss"])
        except (OSError, ValueError, KeyError):
            return usage.ru_maxrss * 1024  # kilobytes on Linux
        finally:
            error.unlink(missing_ok=True)
    try:
        info = json.loads(error.read_text())
    except (OSError, ValueError):
        info = {"type": "ChildExit", "message": f"the step's process ended with {_exit(code)}", "traceback": ""}
    finally:
        error.unlink(missing_ok=True)
    if info["type"] == "CorruptEntry":
        raise CorruptEntry(*info["args"])
    if info["type"] == "VerificationError":
        raise VerificationError(info["message"])
    if info.get("reported"):
        raise BuildError(info["message"])
    raise ChildCrash(info["type"], info["message"], info.get("traceback", ""))


def _exit(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"


def main(spec_path: str, out: str, error_path: str) -> int:
    import traceback

    from mlxbuild import progress
    from mlxbuild.cache import Cache, CorruptEntry
    from mlxbuild.errors import REPORTED, VerificationError
    from mlxbuild.stages import stage
    from mlxbuild.steps import PARAMS, StepKind

    spec = json.loads(Path(spec_path).read_text())
    kind = StepKind(spec["kind"])
    progress.begin(kind, spec["label"])
    progress.quiet_libraries()
    params = PARAMS[kind](**spec["params"]).model_copy(update={"label": spec["label"]})

    def fail(info: dict, code: int) -> int:
        Path(error_path).write_text(json.dumps(info))
        return code

    try:
        stage(kind).run(params, Cache(Path(spec["cache"])), Path(out))
    except CorruptEntry as e:
        return fail({"type": "CorruptEntry", "args": [e.kind, e.key, e.file, e.problem]}, 3)
    except VerificationError as e:
        return fail({"type": "VerificationError", "message": str(e)}, 4)
    except REPORTED as e:
        return fail({"type": type(e).__name__, "message": str(e), "reported": True}, 2)
    except BaseException as e:  # noqa: BLE001 - everything else is a crash the parent logs
        return fail({"type": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()}, 1)
    Path(error_path).write_text(json.dumps({"peak_rss": peak_rss()}))
    return 0


def peak_rss() -> int:
    """This process's peak resident memory in bytes (VmHWM: since its exec, this program's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
