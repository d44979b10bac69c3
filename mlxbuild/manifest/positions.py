"""YAML with positions: the manifest's text composed into plain data and a table of
where each node is (line, column), so every problem is reported at its node."""

from __future__ import annotations

from typing import Any

import yaml

from mlxbuild.errors import ManifestError


_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"

_MAX_NODES = 100_000  # guards against alias bombs

Positions = dict[tuple, tuple[int, int]]


def _pos(mark: yaml.Mark | None) -> tuple[int, int]:
    if mark is None:
        return (1, 1)
    return (mark.line + 1, mark.column + 1)


def _display(path: tuple, data: Any = None) -> str:
    """``('targets', 1, 'backend')`` -> ``targets[1].backend``."""
    out = ""
    cur = data
    for el in path:
        if isinstance(el, int) and not isinstance(el, bool) and not isinstance(cur, dict):
            out += f"[{el}]"
        else:
            out += ("." if out else "") + str(el)
        if isinstance(cur, dict):
            cur = cur.get(el)
        elif isinstance(cur, list) and isinstance(el, int) and 0 <= el < len(cur):
            cur = cur[el]
        else:
            cur = None
    return out


class _Composer:
    def __init__(self, loader: yaml.SafeLoader, file: str) -> None:
        self.loader = loader
        self.file = file
        self.positions: Positions = {}
        self._active: set[int] = set()
        self._count = 0

    def fail(self, node: yaml.Node, path: tuple, message: str) -> ManifestError:
        line, col = _pos(node.start_mark)
        return ManifestError(self.file, line, col, _display(path) or None, message)

    def build(self, node: yaml.Node, path: tuple) -> Any:
        self._count += 1
        if self._count > _MAX_NODES:
            raise self.fail(node, path, f"manifest too large (more than {_MAX_NODES} YAML nodes)")
        if isinstance(node, yaml.ScalarNode):
            return self.loader.construct_object(node, deep=True)
        if id(node) in self._active:
            raise self.fail(node, path, "recursive YAML aliases are not supported")
        self._active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                if node.tag != _SEQ_TAG:
                    raise self.fail(node, path, f"unsupported YAML tag {node.tag!r}")
                items = []
                for i, child in enumerate(node.value):
                    self.positions[(*path, i)] = _pos(child.start_mark)
                    items.append(self.build(child, (*path, i)))
                return items
            if isinstance(node, yaml.MappingNode):
                return self.build_mapping(node, path)
            raise self.fail(node, path, f"unsupported YAML node {type(node).__name__}")
        finally:
            self._active.discard(id(node))

    def build_mapping(self, node: yaml.MappingNode, path: tuple) -> dict:
        if node.tag != _MAP_TAG:
            raise self.fail(node, path, f"unsupported YAML tag {node.tag!r}")
        first_seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.key(key_node, path)
            if key in first_seen:
                line = first_seen[key].start_mark.line + 1
                raise self.fail(
                    key_node, (*path, key), f"duplicate key {key!r} (first defined on line {line})"
                )
            first_seen[key] = key_node
        if any(k.tag == _MERGE_TAG for k, _ in node.value):
            self.loader.flatten_mapping(node)  # resolves `<<: *anchor` (own keys win)
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = self.key(key_node, path)
            self.positions[(*path, key)] = _pos(key_node.start_mark)
            out.pop(key, None)  # keep file order for overridden merged keys
            out[key] = self.build(value_node, (*path, key))
        return out

    def key(self, key_node: yaml.Node, path: tuple) -> Any:
        if not isinstance(key_node, yaml.ScalarNode):
            raise self.fail(key_node, path, "mapping keys must be plain scalars")
        return self.loader.construct_object(key_node, deep=True)


def _yaml_error(file: str, text: str, e: yaml.YAMLError) -> ManifestError:
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        line, col = _pos(mark)
        what = e.problem or e.context or "syntax error"
        if what.startswith("but "):
            what = what[4:]
        if e.context and e.problem and e.context_mark is not None:
            what = f"{what} ({e.context} on line {e.context_mark.line + 1})"
        return ManifestError(file, line, col, None, f"invalid YAML: {what}")
    if isinstance(e, yaml.reader.ReaderError):
        before = text[: e.position]
        line = before.count("\n") + 1
        col = e.position - (before.rfind("\n") + 1) + 1
        return ManifestError(file, line, col, None, f"invalid YAML: {e.reason}")
    return ManifestError(file, 1, 1, None, f"invalid YAML: {e}")


def compose(text: str, file: str, fields=()) -> tuple[Any, Positions]:
    """``fields``: the top-level fields, named when the manifest is empty."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise ManifestError(
                file, 1, 1, None,
                f"manifest is empty; expected a mapping with: {', '.join(fields)}",
            )
        comp = _Composer(loader, file)
        comp.positions[()] = _pos(node.start_mark)
        data = comp.build(node, ())
        return data, comp.positions
    except yaml.YAMLError as e:
        raise _yaml_error(file, text, e) from None
    finally:
        loader.dispose()
