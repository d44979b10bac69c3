"""pydantic's validation errors translated into one located line: the first problem, at
its YAML node, in the words of the manifest (``file:line:col: field: message``)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from mlxbuild.errors import ManifestError
from mlxbuild.manifest.positions import Positions, _display


class _Issue(ValueError):
    """Raised inside validators: ``sub`` is a path relative to the validated value."""

    def __init__(self, sub: tuple, message: str) -> None:
        super().__init__(message)
        self.sub = tuple(sub)
        self.message = message


def _describe(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"a boolean ({str(v).lower()})"
    if isinstance(v, int):
        return f"an integer ({v})"
    if isinstance(v, float):
        return f"a number ({v})"
    if isinstance(v, str):
        return f"a string ({v!r})"
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, list):
        return "a list"
    return f"a {type(v).__name__}"


def _show(v: Any) -> str:
    if isinstance(v, (str, int, float)) or v is None:
        return repr(v)
    return _describe(v)


_TYPE_WORDS = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "a boolean",
    "bool_parsing": "a boolean",
    "string_type": "a string",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "list_type": "a list",
}


def _translate(err: dict) -> str:
    """A short message for one pydantic error (without location)."""
    t = err["type"]
    ctx = err.get("ctx") or {}
    inp = err.get("input")
    exc = ctx.get("error")
    if isinstance(exc, _Issue):
        return exc.message
    if t == "missing":
        return "required field is missing"
    if t in _TYPE_WORDS:
        return f"expected {_TYPE_WORDS[t]}, got {_describe(inp)}"
    if t == "greater_than_equal":
        return f"must be >= {ctx.get('ge')}, got {inp!r}"
    if t == "greater_than":
        return f"must be > {ctx.get('gt')}, got {inp!r}"
    if t == "less_than_equal":
        return f"must be <= {ctx.get('le')}, got {inp!r}"
    if t == "less_than":
        return f"must be < {ctx.get('lt')}, got {inp!r}"
    if t == "too_short":
        n = ctx.get("min_length", 1)
        return f"must not be empty (at least {n} item{'s' if n != 1 else ''} required)"
    if t == "too_long":
        return f"too many items (at most {ctx.get('max_length')})"
    if t == "extra_forbidden":
        return "unknown field"
    if t == "literal_error":
        return f"{_show(inp)} is not allowed; expected one of: {ctx.get('expected')}"
    if t == "string_pattern_mismatch":
        return f"{inp!r} does not match the pattern {ctx.get('pattern')}"
    if exc is not None:
        return str(exc)
    return str(err.get("msg", "invalid value"))


def _locate(err: dict, data: Any, positions: Positions) -> tuple[tuple[int, int], str]:
    """(line, col) and dotted field for one pydantic error."""
    loc = tuple(err["loc"])
    exc = (err.get("ctx") or {}).get("error")
    sub = exc.sub if isinstance(exc, _Issue) else ()
    keep_tail = err["type"] == "missing"

    path: list = []
    cur = data
    rest: tuple = ()
    for i, el in enumerate(loc):
        if isinstance(cur, dict) and _has_key(cur, el):
            cur = cur[el]
        elif (
            isinstance(cur, list)
            and isinstance(el, int)
            and not isinstance(el, bool)
            and 0 <= el < len(cur)
        ):
            cur = cur[el]
        else:
            rest = loc[i:] if keep_tail else ()  # drop '[key]', union tags, ...
            break
        path.append(el)
    full = (*path, *rest, *sub)

    # position: deepest prefix of `full` that exists in the file
    pos = positions.get(())
    for n in range(len(full), -1, -1):
        if full[:n] in positions:
            pos = positions[full[:n]]
            break
    return pos or (1, 1), _display(full, data)


def _has_key(d: dict, key: Any) -> bool:
    try:
        return key in d
    except TypeError:
        return False


def first_error(e: ValidationError, data: Any, positions: Positions, file: str) -> ManifestError:
    best = None
    for idx, err in enumerate(e.errors()):
        (line, col), field = _locate(err, data, positions)
        key = (line, col, idx)
        if best is None or key < best[0]:
            best = (key, field, _translate(err))
    assert best is not None
    (line, col, _), field, message = best
    return ManifestError(file, line, col, field or None, message)
