"""Exception hierarchy shared by all mlxbuild modules."""

from __future__ import annotations

from backends.errors import BackendError


class MlxbuildError(Exception):
    """Base class for every error mlxbuild reports to the user."""


class ManifestError(MlxbuildError):
    """A manifest could not be read or is invalid.

    ``str(err)`` is a single line, compiler style::

        manifests/qwen.yaml:12:5: targets[1].backend: 'metal' is not allowed; expected one of: ...

    ``field`` is the dotted path of the offending node (``None`` for file-level
    problems such as YAML syntax errors, in which case it is left out).
    ``line`` and ``column`` are 1-based.
    """

    def __init__(
        self,
        file: str,
        line: int,
        column: int,
        field: str | None,
        message: str,
    ) -> None:
        self.file = str(file)
        self.line = int(line)
        self.column = int(column)
        self.field = field or None
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}"
        if self.field:
            return f"{where}: {self.field}: {self.message}"
        return f"{where}: {self.message}"

    def __repr__(self) -> str:
        return (
            f"ManifestError(file={self.file!r}, line={self.line}, column={self.column}, "
            f"field={self.field!r}, message={self.message!r})"
        )

    def __reduce__(self):  # keep picklable (doit may run tasks in subprocesses)
        return (type(self), (self.file, self.line, self.column, self.field, self.message))


class UsageError(MlxbuildError):
    """The command line asks for something that cannot be done (e.g. a target filter
    that matches no target). ``str(err)`` is one line."""


class BuildError(MlxbuildError):
    """A build step (load, quantize, export, lower, serialize) failed."""


class VerificationError(BuildError):
    """A built artifact failed verification (e.g. outputs diverge from eager)."""


# What the build reports as one line: its own errors and the backends' (which stand
# alone and so have their own class).
REPORTED = (MlxbuildError, BackendError)
