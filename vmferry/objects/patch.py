"""JSON patch (RFC 6902), JSON merge patch (RFC 7386) and patch-text parsing.

Both ``apply_*`` functions are pure: they never mutate their arguments and return a new
document. Errors raise ``vmferry.errors.Invalid`` naming the operation and the path
(``json patch op 2 (replace /spec/foo): path not found``); unparsable patch text raises
``vmferry.errors.BadRequest`` (see ``parse_patch``).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from vmferry.errors import BadRequest, Invalid
from vmferry.objects import limits

__all__ = [
    "Patch",
    "apply_json_patch",
    "apply_merge_patch",
    "json_equal",
    "parse_patch",
    "parse_pointer",
]

_OPS = ("add", "remove", "replace", "move", "copy", "test")


class _PatchError(Exception):
    """Internal: a failure of one op; turned into Invalid with the op index and path."""


def parse_pointer(pointer: str) -> list[str]:
    """Split an RFC 6901 JSON pointer into unescaped reference tokens.

    ``""`` is the whole document (``[]``); ``"/a~1b/c~0d"`` is ``["a/b", "c~d"]``.
    Raises ValueError for a pointer not starting with "/" or with a bad "~" escape.
    """
    if pointer == "":
        return []
    if not pointer.startswith("/"):
        raise ValueError(f'JSON pointer "{pointer}" must be empty or start with "/"')
    tokens = []
    for raw in pointer[1:].split("/"):
        rest = raw.replace("~0", "").replace("~1", "")
        if "~" in rest:
            raise ValueError(f'JSON pointer "{pointer}": "~" must be escaped as "~0" ("/" as "~1")')
        tokens.append(raw.replace("~1", "/").replace("~0", "~"))
    return tokens


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def json_equal(a: Any, b: Any) -> bool:
    """JSON equality: objects ignore key order, numbers compare by value, but booleans
    are never equal to numbers (unlike Python's ``True == 1``)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and bool(a == b)


def _array_index(token: str, array: list[Any], *, allow_end: bool, where: str) -> int:
    """The list index ``token`` names; ``len`` for "-" or ``len`` when ``allow_end``."""
    if token == "-":
        if allow_end:
            return len(array)
        raise _PatchError(f'path not found: "-" (past the end of the array at {where or "/"})')
    if not token.isdigit() or not token.isascii() or (len(token) > 1 and token[0] == "0"):
        raise _PatchError(
            f'path not found: "{token}" is not an array index (the value at {where or "/"} '
            f"is an array)"
        )
    index = int(token)
    limit = len(array) if allow_end else len(array) - 1
    if index > limit:
        raise _PatchError(
            f"path not found: array index {index} is out of range "
            f"(the array at {where or '/'} has {len(array)} elements)"
        )
    return index


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def _parent(doc: Any, tokens: list[str]) -> tuple[Any, str, str]:
    """Walk to the container of the last token; return (container, last token, the
    container's pointer for messages)."""
    node = doc
    where = ""
    for token in tokens[:-1]:
        if isinstance(node, dict):
            if token not in node:
                raise _PatchError(f"path not found: {where}/{_escape(token)} does not exist")
            node = node[token]
        elif isinstance(node, list):
            node = node[_array_index(token, node, allow_end=False, where=where)]
        else:
            raise _PatchError(
                f"path not found: the value at {where or '/'} is {_type_name(node)}, "
                f"not an object or array"
            )
        where += "/" + _escape(token)
    if not isinstance(node, dict | list):
        raise _PatchError(
            f"path not found: the value at {where or '/'} is {_type_name(node)}, "
            f"not an object or array"
        )
    return node, tokens[-1], where


def _get(doc: Any, tokens: list[str]) -> Any:
    if not tokens:
        return doc
    container, last, where = _parent(doc, tokens)
    if isinstance(container, dict):
        if last not in container:
            raise _PatchError("path not found")
        return container[last]
    return container[_array_index(last, container, allow_end=False, where=where)]


def _add(doc: Any, tokens: list[str], value: Any) -> Any:
    if not tokens:
        return value
    container, last, where = _parent(doc, tokens)
    if isinstance(container, dict):
        container[last] = value
    else:
        container.insert(_array_index(last, container, allow_end=True, where=where), value)
    return doc


def _remove(doc: Any, tokens: list[str]) -> tuple[Any, Any]:
    """Remove the value at ``tokens``; return (new doc, removed value)."""
    if not tokens:
        raise _PatchError("cannot remove the whole document")
    container, last, where = _parent(doc, tokens)
    if isinstance(container, dict):
        if last not in container:
            raise _PatchError("path not found")
        return doc, container.pop(last)
    return doc, container.pop(_array_index(last, container, allow_end=False, where=where))


def _replace(doc: Any, tokens: list[str], value: Any) -> Any:
    if not tokens:
        return value
    container, last, where = _parent(doc, tokens)
    if isinstance(container, dict):
        if last not in container:
            raise _PatchError("path not found")
        container[last] = value
    else:
        container[_array_index(last, container, allow_end=False, where=where)] = value
    return doc


def _pointer_field(op: dict[str, Any], field: str) -> tuple[str, list[str]]:
    if field not in op:
        raise _PatchError(f'missing "{field}"')
    pointer = op[field]
    if not isinstance(pointer, str):
        raise _PatchError(f'"{field}" must be a string (a JSON pointer like "/spec/x")')
    try:
        return pointer, parse_pointer(pointer)
    except ValueError as exc:
        raise _PatchError(str(exc)) from None


def _apply_op(doc: Any, op: dict[str, Any]) -> Any:
    name = op["op"]
    _, path = _pointer_field(op, "path")
    if name in ("add", "replace", "test") and "value" not in op:
        raise _PatchError('missing "value"')
    if name == "add":
        return _add(doc, path, copy.deepcopy(op["value"]))
    if name == "replace":
        return _replace(doc, path, copy.deepcopy(op["value"]))
    if name == "remove":
        return _remove(doc, path)[0]
    if name == "test":
        actual = _get(doc, path)
        if not json_equal(actual, op["value"]):
            raise _PatchError(
                f"test failed: the value is {json.dumps(actual, default=str)}, "
                f"expected {json.dumps(op['value'], default=str)}"
            )
        return doc
    from_pointer, source = _pointer_field(op, "from")
    if name == "copy":
        try:
            value = copy.deepcopy(_get(doc, source))
        except _PatchError as exc:
            raise _PatchError(f"from {from_pointer}: {exc}") from None
        return _add(doc, path, value)
    # move
    if path[: len(source)] == source and len(path) > len(source):
        raise _PatchError(f"cannot move {from_pointer} into its own child")
    if path == source:
        _get(doc, source)  # must exist, nothing else to do
        return doc
    try:
        doc, value = _remove(doc, source)
    except _PatchError as exc:
        raise _PatchError(f"from {from_pointer}: {exc}") from None
    return _add(doc, path, value)


def apply_json_patch(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """Apply an RFC 6902 JSON patch and return the patched copy (``doc`` is untouched).

    Supports add, remove, replace, move, copy and test, JSON pointers with ``~0``/``~1``
    escapes and ``-`` (append) for arrays. The patch is atomic: any failing op raises
    ``Invalid`` (``json patch op 2 (replace /spec/foo): path not found``) and nothing is
    applied. A patch whose result is not an object also raises ``Invalid``.
    """
    if not isinstance(ops, list):
        raise Invalid(
            "json patch must be a list of operations, "
            'e.g. [{"op": "replace", "path": "/spec/x", "value": 1}]'
        )
    result: Any = copy.deepcopy(doc)
    for index, op in enumerate(ops):
        if not isinstance(op, dict):
            raise Invalid(f"json patch op {index}: must be an object, not {_type_name(op)}")
        name = op.get("op")
        path = op.get("path")
        label = f"{name} {path}" if isinstance(path, str) else str(name)
        if name not in _OPS:
            raise Invalid(
                f"json patch op {index} ({label}): unknown op {json.dumps(name, default=str)} "
                f"(use one of {', '.join(_OPS)})"
            )
        try:
            result = _apply_op(result, op)
        except _PatchError as exc:
            raise Invalid(f"json patch op {index} ({label}): {exc}") from None
    if not isinstance(result, dict):
        raise Invalid(f"json patch result must be an object, not {_type_name(result)}")
    return result


def _merge(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge(result.get(key), value)
    return result


def apply_merge_patch(doc: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """Apply an RFC 7386 JSON merge patch and return the merged copy.

    ``null`` deletes a key, objects merge recursively, anything else (arrays included)
    replaces. ``doc`` and ``patch`` are not mutated. Raises Invalid when ``patch`` is not
    an object (a non-object merge patch would replace the whole document).
    """
    if not isinstance(patch, dict):
        raise Invalid(
            f'merge patch must be an object, e.g. {{"spec": {{"x": 1}}}}, not {_type_name(patch)}'
        )
    merged: dict[str, Any] = _merge(copy.deepcopy(doc), patch)
    return merged


# --- patch text ---------------------------------------------------------------------


class _Loader(limits.YamlLoader):
    """SafeLoader that leaves timestamps as strings (JSON has no datetime type) and
    refuses nesting deeper than ``limits.MAX_DEPTH``."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _jsonable(value: Any, where: str) -> Any:
    """Check that YAML produced only JSON types; map keys become strings."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if isinstance(key, bool):
                key = "true" if key else "false"
            elif key is None:
                key = "null"
            elif isinstance(key, int | float):
                key = str(key)
            elif not isinstance(key, str):
                raise BadRequest(f"patch: key {key!r} at {where or '/'} is not a string")
            out[key] = _jsonable(item, f"{where}/{_escape(key)}")
        return out
    if isinstance(value, list):
        return [_jsonable(item, f"{where}/{i}") for i, item in enumerate(value)]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise BadRequest(
        f"patch: the value at {where or '/'} is a {type(value).__name__}, which JSON cannot hold"
    )


@dataclass(frozen=True)
class Patch:
    """A parsed patch: ``type`` is "json" (``body`` is a list of ops) or "merge"
    (``body`` is an object; strategic merge patches are treated as merge patches)."""

    type: Literal["json", "merge"]
    body: Any

    def apply(self, doc: dict[str, Any]) -> dict[str, Any]:
        """Apply to ``doc`` and return the new document; raises Invalid on failure."""
        if self.type == "json":
            return apply_json_patch(doc, self.body)
        return apply_merge_patch(doc, self.body)


def parse_patch(kind: str, text: str) -> Patch:
    """Parse patch ``text`` (JSON or YAML) of type ``kind`` ("json", "merge" or
    "strategic"; strategic is treated as merge, like a simple client).

    Raises BadRequest for an unknown type, empty or unparsable text, a JSON patch that is
    not a list of objects, or a merge patch that is not an object.
    """
    if kind not in ("json", "merge", "strategic"):
        raise BadRequest(f'unknown patch type "{kind}" (use json, merge or strategic)')
    if not text or not text.strip():
        raise BadRequest("the patch is empty")
    limits.check_json_depth(text, "the patch")
    try:
        body = json.loads(text)
    except ValueError:
        try:
            body = yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: safe
        except yaml.YAMLError as exc:
            detail = " ".join(str(exc).split())
            raise BadRequest(f"unable to parse the patch as JSON or YAML: {detail}") from None
        body = _jsonable(body, "")
    if kind == "json":
        example = '[{"op": "replace", "path": "/spec/x", "value": 1}]'
        if not isinstance(body, list):
            raise BadRequest(
                f"a json patch must be a list of operations, e.g. {example}; got {_type_name(body)}"
            )
        for index, op in enumerate(body):
            if not isinstance(op, dict):
                raise BadRequest(
                    f"json patch op {index} must be an object like "
                    f'{{"op": "replace", "path": "/spec/x", "value": 1}}, not {_type_name(op)}'
                )
        return Patch("json", body)
    if not isinstance(body, dict):
        raise BadRequest(
            f'a {"strategic merge" if kind == "strategic" else "merge"} patch must be an object, e.g. {{"spec": {{"x": 1}}}}; '
            f"got {_type_name(body)}"
        )
    return Patch("merge", body)
