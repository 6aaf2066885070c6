"""The API's request limits, in one place: the numbers and the checks that enforce them.

As kube-apiserver (and etcd behind it) has them, each refused with a 4xx error that names
the limit:

- a request body is at most :data:`MAX_REQUEST_BYTES` (3 MiB, kube-apiserver's
  ``MaxRequestBodyBytes``); the controller's gRPC server receives no larger message
  (``vmferry.grpc_options.api_server_options``) and the client turns gRPC's refusal into
  ``RequestEntityTooLarge`` naming the limit (``vmferry.client``);
- a stored object is at most :data:`MAX_OBJECT_BYTES` serialized (1.5 MiB, etcd's
  default request limit), checked by :func:`check_object` (``schema.validate``);
- JSON and YAML nest at most :data:`MAX_DEPTH` levels, checked *before* anything
  recursive touches the document (:func:`loads_json`, :class:`YamlLoader`), and again on
  the decoded object (:func:`check_object`);
- strings are valid Unicode (no lone surrogates such as ``"\\ud800"``, which cannot be
  stored as UTF-8), reported with their field path;
- labels: at most :data:`MAX_LABELS` per object, keys ``[prefix/]name`` with a prefix of
  at most 253 and a name of at most 63 characters, values of at most 63
  (:mod:`vmferry.objects.names`); annotations at most :data:`MAX_ANNOTATIONS_BYTES` in
  total;
- quantities: a VMI's memory at most :data:`MAX_MEMORY_BYTES`, its cores, sockets,
  threads and vCPUs at most :data:`MAX_CPUS` each (the scheduler then refuses memory no
  node has);
- error messages fit on the wire: an echoed value is cut to :data:`MAX_ECHO_CHARS`
  (:func:`shorten`), a whole message to :data:`MAX_MESSAGE_BYTES` (:func:`fit_message`),
  well below gRPC's 8 KiB metadata limit that otherwise turns a long error into
  ``RESOURCE_EXHAUSTED``.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from typing import Any

import yaml

from vmferry.errors import BadRequest, Invalid

__all__ = [
    "MAX_ANNOTATIONS_BYTES",
    "MAX_CPUS",
    "MAX_DEPTH",
    "MAX_ECHO_CHARS",
    "MAX_LABELS",
    "MAX_MEMORY_BYTES",
    "MAX_MESSAGE_BYTES",
    "MAX_OBJECT_BYTES",
    "MAX_PROBLEMS",
    "MAX_REQUEST_BYTES",
    "YamlLoader",
    "check_json_depth",
    "check_object",
    "depth_message",
    "echo",
    "fit_message",
    "loads_json",
    "shorten",
]

MAX_REQUEST_BYTES = 3 << 20  # kube-apiserver's MaxRequestBodyBytes
MAX_OBJECT_BYTES = 3 << 19  # 1.5 MiB serialized: etcd's default --max-request-bytes
MAX_DEPTH = 100  # nesting levels of a JSON/YAML document
MAX_LABELS = 256  # labels per object (each is indexed by every selector)
MAX_ANNOTATIONS_BYTES = 256 << 10  # Kubernetes' TotalAnnotationSizeLimitB
MAX_MEMORY_BYTES = 16 << 40  # 16 TiB: a VMI's guest memory (or memory request)
MAX_CPUS = 512  # a VMI's cores, sockets, threads or vCPUs, each
MAX_ECHO_CHARS = 256  # of a value echoed in an error message
MAX_PROBLEMS = 20  # validation problems listed in one error
MAX_MESSAGE_BYTES = 4096  # an error message as sent (grpc-message, percent-encoded)


def shorten(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """``text``, cut to ``limit`` characters with ``… (N more characters)``."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit} more characters)"


def echo(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """``text`` as an error message shows it: JSON-quoted, cut to ``limit`` characters
    (``"abc"… (N more characters)``)."""
    if len(text) <= limit:
        return json.dumps(text)
    return f"{json.dumps(text[:limit])}… ({len(text) - limit} more characters)"


def _wire_bytes(char: str) -> int:
    """Bytes of one character in a grpc-message header (non-printable ASCII and UTF-8
    bytes are percent-encoded: three bytes each)."""
    if " " <= char <= "~" and char != "%":
        return 1
    return 3 * len(char.encode("utf-8", "surrogatepass"))


def fit_message(message: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """``message`` cut so that it fits ``limit`` bytes on the wire, saying how much was cut."""
    if len(message) * 12 <= limit:  # fits even if every character took 12 bytes
        return message
    used = 0
    for index, char in enumerate(message):
        used += _wire_bytes(char)
        if used > limit - 64:  # room for the note
            return f"{message[:index]}… (message cut: {len(message) - index} more characters)"
    return message


def depth_message(limit: int = MAX_DEPTH) -> str:
    return f"nesting deeper than {limit} levels (the maximum nesting depth)"


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def _nests_deeper(text: str, limit: int) -> bool:
    """JSON ``text`` nests brackets deeper than ``limit``, found without recursing and in C
    loops: strings removed, then the running balance of brackets (a cumulative sum)."""
    if text.count("[") + text.count("{") <= limit:
        return False  # cannot nest deeper than the limit
    import numpy as np  # only for documents with many brackets: keeps the CLI's start fast

    data = _JSON_STRING.sub(b"", text.encode("utf-8", "surrogatepass"))
    steps = _bracket_steps()[np.frombuffer(data, dtype=np.uint8)]
    return bool(steps.size) and int(np.cumsum(steps, dtype=np.int32).max()) > limit


@functools.cache
def _bracket_steps() -> Any:
    import numpy as np

    steps = np.zeros(256, dtype=np.int8)
    steps[list(b"[{")] = 1
    steps[list(b"]}")] = -1
    return steps


def check_json_depth(text: str, what: str) -> None:
    """BadRequest when JSON (or flow-style YAML) ``text`` nests deeper than :data:`MAX_DEPTH`."""
    if _nests_deeper(text, MAX_DEPTH):
        raise BadRequest(f"{what}: {depth_message()}")


def loads_json(data: str | bytes, what: str) -> Any:
    """Decode a JSON document of a request or a file; BadRequest names ``what`` when it is
    not JSON, is nested deeper than :data:`MAX_DEPTH`, or holds invalid Unicode."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as e:
        raise BadRequest(f"{what} is not valid UTF-8: {e}") from None
    check_json_depth(text, what)
    try:
        return json.loads(text)
    except ValueError as e:
        raise BadRequest(f"{what} is not valid JSON: {shorten(str(e))}") from None


class YamlLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses documents nested deeper than :data:`MAX_DEPTH`
    while composing them (PyYAML's composer recurses once per level)."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.YAMLError(f"{depth_message()} (at line {mark.line + 1})")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _path(parts: tuple[str | int, ...]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", part):
            part = shorten(part, 64)
            out += f".{part}" if out else part
        else:
            out += f"[{shorten(part, 64)}]"
    return out


def _unicode_problem(text: str) -> str | None:
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (
            f"invalid Unicode: lone surrogate U+{ord(text[e.start]):04X} at character "
            f"{e.start} (strings must be valid UTF-8)"
        )
    return None


def _structure_problems(obj: object) -> list[str]:
    """Nesting deeper than :data:`MAX_DEPTH` and invalid Unicode, each with its field
    path; an explicit stack, so a deep object cannot exhaust Python's."""
    problems: list[str] = []
    stack: list[tuple[object, tuple[str | int, ...]]] = [(obj, ())]
    while stack and len(problems) < MAX_PROBLEMS:
        value, parts = stack.pop()
        if isinstance(value, str):
            problem = _unicode_problem(value)
            if problem:
                problems.append(f"{_path(parts) or 'manifest'}: {problem}")
            continue
        if isinstance(value, Mapping | list | tuple) and len(parts) >= MAX_DEPTH:
            problems.append(f"{_path(parts[:8])}...: {depth_message()}")
            break
        if isinstance(value, Mapping):
            children: list[tuple[object, tuple[str | int, ...]]] = []
            for key, item in value.items():
                if isinstance(key, str) and (problem := _unicode_problem(key)):
                    problems.append(f"{_path(parts) or 'manifest'}: key {problem}")
                children.append((item, (*parts, str(key))))
        elif isinstance(value, list | tuple):
            children = [(item, (*parts, i)) for i, item in enumerate(value)]
        else:
            continue
        stack.extend(reversed(children))
    return problems


def check_object(obj: Mapping[str, Any], subject: str) -> None:
    """Refuse an object that is nested too deep, holds invalid Unicode, or is larger than
    :data:`MAX_OBJECT_BYTES` serialized. Raises Invalid prefixed by ``subject``."""
    problems = _structure_problems(obj)
    if problems:
        raise Invalid(f"{subject}: " + "; ".join(problems))
    size = len(json.dumps(obj, separators=(",", ":"), ensure_ascii=False, default=str).encode())
    if size > MAX_OBJECT_BYTES:
        raise Invalid(
            f"{subject}: the object is {size} bytes serialized, more than the maximum object "
            f"size of {MAX_OBJECT_BYTES} bytes (1.5 MiB); keep large data out of the API "
            "(e.g. split a ConfigMap)"
        )
