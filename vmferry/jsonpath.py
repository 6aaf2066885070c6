"""kubectl's JSONPath template dialect, for ``vmferry get -o jsonpath='{.status.phase}'``.

The grammar and the output follow ``k8s.io/client-go/util/jsonpath``:

- Text outside ``{...}`` is printed as it is, except that ``\\n`` and ``\\t`` become a
  newline and a tab. Inside an action, ``{"\\n"}`` / ``{'\\t'}`` are string literals.
- Paths: ``.field`` (``\\.`` escapes a dot inside a name: ``{.data.ca\\.crt}``), ``.*``,
  ``..field`` (recursive descent), ``[n]``, ``[-1]``, slices ``[start:end:step]``,
  ``[*]``, quoted keys ``['name']`` (as in kubectl, an unescaped dot in a quoted key
  separates fields: ``['app\\.kubernetes\\.io/name']`` is one key), unions ``[a,b]``
  and filters ``[?(@.type=="Ready")]`` with ``== != < > <= >=`` or a bare path
  (existence). ``@`` and ``$`` both mean the current object.
- ``{range <path>}...{end}`` repeats its body for each value (nestable).
- Each action prints its values separated by one space: strings raw, numbers as Go's
  ``%v`` prints them, booleans lowercase, ``null`` for null, objects and lists as compact
  JSON with sorted keys (as Go's ``encoding/json`` writes a map).

``parse()`` only parses, so parse errors can be reported (and tested) before any data is
fetched; ``Template.execute()`` / ``render()`` evaluate. Both raise :class:`JsonPathError`,
whose message starts with ``error parsing jsonpath "<template>":`` or ``error executing
jsonpath "<template>":``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypeAlias

__all__ = [
    "JsonPathError",
    "Template",
    "format_value",
    "parse",
    "render",
    "to_compact_json",
    "to_indented_json",
]


class JsonPathError(ValueError):
    """A template that does not parse, or that fails on the data it is applied to.

    ``position`` is the 0-based offset in the template where a parse error was found
    (None for evaluation errors).
    """

    def __init__(self, message: str, *, position: int | None = None) -> None:
        super().__init__(message)
        self.position = position


class _EvalError(Exception):
    """Raised inside evaluation; wrapped into a JsonPathError naming the template."""


class _MissingKey(_EvalError):
    pass


# ---------------------------------------------------------------------------------------
# Syntax tree


@dataclass(frozen=True)
class Field:
    name: str  # "" means the current object (``{.}``)


@dataclass(frozen=True)
class Wildcard:
    pass


@dataclass(frozen=True)
class Recursive:
    pass


@dataclass(frozen=True)
class Index:
    """``[start:end:step]`` with kubectl's "known"/"derived" flags (see ``_eval_index``)."""

    start: int | None
    end: int | None
    step: int | None
    end_derived: bool = False  # ``[n]``: end is start + 1


@dataclass(frozen=True)
class Union:
    alternatives: tuple[tuple[Step, ...], ...]


@dataclass(frozen=True)
class Filter:
    left: tuple[Step, ...]
    operator: str  # one of _OPERATORS, or "exists"
    right: tuple[Step, ...]


@dataclass(frozen=True)
class Literal:
    value: str | int | float | bool
    per_input: bool  # numbers and booleans repeat per input value; strings appear once


Step: TypeAlias = Field | Wildcard | Recursive | Index | Union | Filter | Literal


@dataclass(frozen=True)
class TextNode:
    text: str


@dataclass(frozen=True)
class ActionNode:
    steps: tuple[Step, ...]


@dataclass(frozen=True)
class RangeNode:
    steps: tuple[Step, ...]
    body: tuple[Node, ...]


Node: TypeAlias = TextNode | ActionNode | RangeNode

_OPERATORS = ("==", "!=", "<=", ">=", "<", ">")
_TERMINATORS = frozenset(" .,[]$@{}")
_SLICE_RE = re.compile(r"^(-?\d*)(:-?\d*)?(:-?\d*)?$")


# ---------------------------------------------------------------------------------------
# Parser


class _ParseError(Exception):
    def __init__(self, message: str, position: int) -> None:
        super().__init__(message)
        self.message = message
        self.position = position


def _unescape_text(text: str) -> str:
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _is_alnum(ch: str) -> bool:
    return ch == "_" or ch.isalnum()


class _ActionParser:
    """Parses the steps of one action from ``text[pos:]``.

    With ``until_brace`` the action ends at an unquoted ``}`` (a top-level ``{...}``);
    otherwise at the end of the text (a filter operand or a quoted key). ``base`` is added
    to positions so that errors point into the whole template.
    """

    def __init__(self, text: str, pos: int, *, until_brace: bool, base: int = 0) -> None:
        self.text = text
        self.pos = pos
        self.until_brace = until_brace
        self.base = base

    def error(self, message: str, at: int | None = None) -> _ParseError:
        return _ParseError(message, self.base + (self.pos if at is None else at))

    def peek(self, n: int = 0) -> str:
        i = self.pos + n
        return self.text[i] if i < len(self.text) else ""

    def parse(self) -> tuple[list[str | Step], int]:
        """Return the tokens (identifiers as ``str``, everything else as steps) and the
        position just after the action."""
        tokens: list[str | Step] = []
        while True:
            ch = self.peek()
            if ch == "":
                if self.until_brace:
                    raise self.error('unclosed action: missing "}"')
                return tokens, self.pos
            if ch == "}" and self.until_brace:
                return tokens, self.pos + 1
            if ch == "\n" and self.until_brace:
                raise self.error('unclosed action: missing "}" before the end of the line')
            if self.text.startswith("[?(", self.pos):
                tokens.append(self.parse_filter())
            elif self.text.startswith("..", self.pos):
                if tokens and isinstance(tokens[-1], Recursive):
                    raise self.error("invalid multiple recursive descent")
                self.pos += 2
                tokens.append(Recursive())
                if _is_alnum(self.peek()):
                    tokens.append(self.parse_field())
                elif self.peek() == "*":
                    self.pos += 1
                    tokens.append(Wildcard())
            elif ch in " \t@$":
                self.pos += 1
            elif ch == "[":
                tokens.extend(self.parse_bracket())
            elif ch in "\"'":
                tokens.append(Literal(self.parse_quoted(ch), per_input=False))
            elif ch == ".":
                self.pos += 1
                tokens.append(self.parse_field())
            elif ch in "+-" or ch.isdigit():
                tokens.append(self.parse_number())
            elif _is_alnum(ch):
                tokens.append(self.parse_identifier())
            else:
                raise self.error(f"unrecognized character in action: {ch!r}")

    def read_name(self) -> str:
        """A field or identifier name up to the next unescaped terminator; ``\\x`` is ``x``."""
        out: list[str] = []
        while True:
            ch = self.peek()
            if ch == "" or ch in _TERMINATORS or ch == "\n":
                return "".join(out)
            if ch == "\\" and self.peek(1) != "":
                out.append(self.peek(1))
                self.pos += 2
                continue
            out.append(ch)
            self.pos += 1

    def parse_field(self) -> Step:
        name = self.read_name()
        return Wildcard() if name == "*" else Field(name)

    def parse_identifier(self) -> str | Step:
        start = self.pos
        name = self.read_name()
        if name in ("true", "false"):
            return Literal(name == "true", per_input=True)
        if name not in ("range", "end"):
            raise self.error(f"unrecognized identifier {name!r}", start)
        return name

    def parse_number(self) -> Step:
        start = self.pos
        if self.peek() in "+-":
            self.pos += 1
        while self.peek() == "." or self.peek().isdigit():
            self.pos += 1
        text = self.text[start : self.pos]
        try:
            return Literal(int(text), per_input=True)
        except ValueError:
            pass
        try:
            return Literal(float(text), per_input=True)
        except ValueError:
            raise self.error(f"cannot parse number {text!r}", start) from None

    def scan_quoted(self, quote: str) -> int:
        """Return the position just after the quoted string starting at ``self.pos``."""
        i = self.pos + 1
        while i < len(self.text):
            ch = self.text[i]
            if ch == "\\":
                i += 2
                continue
            if ch == quote:
                return i + 1
            if ch == "\n":
                break
            i += 1
        raise self.error("unterminated quoted string")

    def parse_quoted(self, quote: str) -> str:
        start = self.pos
        end = self.scan_quoted(quote)
        body = self.text[start + 1 : end - 1]
        self.pos = end
        if quote == "'":  # as Go's UnquoteExtend: a single-quoted string may hold '"'
            body = body.replace("\\'", "'").replace('"', '\\"')
        try:
            value = json.loads(f'"{body}"', strict=False)
        except ValueError:
            raise self.error(
                f"invalid escape in quoted string {self.text[start:end]}", start
            ) from None
        assert isinstance(value, str)
        return value

    def scan_to(self, closer: str, what: str) -> int:
        """Return the position of the first unquoted ``closer`` at or after ``self.pos``."""
        start = self.pos
        i = self.pos
        while i < len(self.text):
            ch = self.text[i]
            if ch in "\"'":
                saved = self.pos
                self.pos = i
                i = self.scan_quoted(ch)
                self.pos = saved
                continue
            if ch == closer:
                return i
            if ch == "\n":
                break
            i += 1
        raise self.error(f"unterminated {what}", start)

    def parse_bracket(self) -> list[Step]:
        start = self.pos
        close = self.scan_to("]", 'array index: missing "]"')
        content = self.text[start + 1 : close]
        self.pos = close + 1
        return self.bracket_steps(content, self.base + start + 1)

    def bracket_steps(self, content: str, base: int) -> list[Step]:
        parts = _split_unquoted(content, ",")
        if len(parts) > 1:
            alternatives = []
            offset = 0
            for part in parts:
                alternatives.append(tuple(self.bracket_steps(part.strip(), base + offset)))
                offset += len(part) + 1
            return [Union(tuple(alternatives))]
        text = content.strip()
        if text == "*":
            return [Index(None, None, None)]
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
            return _quoted_key_steps(text[1:-1])
        if text == "":
            raise _ParseError("empty array index []", base)
        match = _SLICE_RE.match(text)
        if match is None:
            raise _ParseError(f"invalid array index [{text}]", base)
        start_s, end_s, step_s = match.groups()
        start = int(start_s) if start_s else None
        if end_s is None:  # [n]: a single element
            if start is None:
                raise _ParseError(f"invalid array index [{text}]", base)
            return [Index(start, start + 1, None, end_derived=True)]
        end = int(end_s[1:]) if end_s[1:] else None
        step = int(step_s[1:]) if step_s is not None and step_s[1:] else None
        return [Index(start, end, step)]

    def parse_filter(self) -> Step:
        start = self.pos
        self.pos += 3  # "[?("
        try:
            close = self.scan_to(")", 'filter: missing ")"')
        except _ParseError as e:
            raise self.error(e.message, start) from None
        if close + 1 >= len(self.text) or self.text[close + 1] != "]":
            raise self.error('unclosed filter: expected "]" after ")"', close + 1)
        expr = self.text[self.pos : close]
        expr_base = self.base + self.pos
        self.pos = close + 2
        op_at = _find_operator(expr)
        if op_at is None:
            if not expr.strip():
                raise _ParseError("empty filter expression", self.base + start)
            return Filter(_parse_operand(expr, expr_base), "exists", ())
        op_start, op_end = op_at
        operator = expr[op_start:op_end]
        if operator not in _OPERATORS:
            raise _ParseError(f"unrecognized filter operator {operator!r}", expr_base + op_start)
        if not expr[:op_start].strip() or not expr[op_end:].strip():
            raise _ParseError(
                f"filter operator {operator!r} needs an operand on each side",
                expr_base + op_start,
            )
        left = _parse_operand(expr[:op_start], expr_base)
        right = _parse_operand(expr[op_end:], expr_base + op_end)
        return Filter(left, operator, right)


def _split_unquoted(text: str, sep: str) -> list[str]:
    parts: list[str] = []
    quote = ""
    current: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if quote:
            current.append(ch)
            if ch == "\\" and i + 1 < len(text):
                current.append(text[i + 1])
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
            current.append(ch)
        elif ch == sep:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    return parts


def _quoted_key_steps(key: str) -> list[Step]:
    """``['a.b']`` is ``.a.b`` and ``['a\\.b']`` is the single key ``a.b``, as in kubectl."""
    steps: list[Step] = []
    current: list[str] = []
    i = 0
    while i < len(key):
        ch = key[i]
        if ch == "\\" and i + 1 < len(key):
            current.append(key[i + 1])
            i += 2
            continue
        if ch == ".":
            steps.append(Field("".join(current)))
            current = []
        else:
            current.append(ch)
        i += 1
    steps.append(Field("".join(current)))
    return steps


def _find_operator(expr: str) -> tuple[int, int] | None:
    quote = ""
    i = 0
    while i < len(expr):
        ch = expr[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch in "!<>=":
            end = i
            while end < len(expr) and expr[end] in "!<>=~":
                end += 1
            return i, end
        i += 1
    return None


def _parse_operand(text: str, base: int) -> tuple[Step, ...]:
    tokens, _ = _ActionParser(text, 0, until_brace=False, base=base).parse()
    for token in tokens:
        if isinstance(token, str):
            raise _ParseError(f"{token!r} is not allowed inside a filter", base)
    return tuple(t for t in tokens if not isinstance(t, str))


@dataclass
class _Frame:
    nodes: list[Node] = field(default_factory=list)
    range_steps: tuple[Step, ...] = ()
    range_position: int = 0


def _parse_nodes(template: str) -> tuple[Node, ...]:
    stack: list[_Frame] = [_Frame()]
    pos = 0
    while pos < len(template):
        brace = template.find("{", pos)
        if brace < 0:
            stack[-1].nodes.append(TextNode(_unescape_text(template[pos:])))
            break
        if brace > pos:
            stack[-1].nodes.append(TextNode(_unescape_text(template[pos:brace])))
        tokens, pos = _ActionParser(template, brace + 1, until_brace=True).parse()
        if tokens and tokens[0] == "range":
            steps = tokens[1:]
            if any(isinstance(t, str) for t in steps) or not steps:
                raise _ParseError("range needs a path: {range .items[*]}", brace)
            stack.append(_Frame(range_steps=tuple(_only_steps(steps)), range_position=brace))
        elif tokens == ["end"]:
            if len(stack) == 1:
                raise _ParseError("not in range, nothing to end", brace)
            frame = stack.pop()
            stack[-1].nodes.append(RangeNode(frame.range_steps, tuple(frame.nodes)))
        elif any(isinstance(t, str) for t in tokens):
            raise _ParseError('"range" and "end" must stand at the start of an action', brace)
        else:
            stack[-1].nodes.append(ActionNode(tuple(_only_steps(tokens))))
    if len(stack) > 1:
        raise _ParseError("range without a matching {end}", stack[-1].range_position)
    return tuple(stack[0].nodes)


def _only_steps(tokens: Sequence[str | Step]) -> Iterator[Step]:
    for token in tokens:
        assert not isinstance(token, str)
        yield token


# ---------------------------------------------------------------------------------------
# Evaluation


class _Evaluator:
    def __init__(self, allow_missing_keys: bool) -> None:
        self.allow_missing_keys = allow_missing_keys

    def nodes(self, nodes: Sequence[Node], data: Any, out: list[list[Any]]) -> None:
        for node in nodes:
            if isinstance(node, TextNode):
                out.append([node.text])
            elif isinstance(node, ActionNode):
                out.append(self.steps(node.steps, [data]))
            else:
                for value in self.steps(node.steps, [data]):
                    self.nodes(node.body, value, out)

    def steps(self, steps: Sequence[Step], values: list[Any]) -> list[Any]:
        after_recursive = False
        for step in steps:
            values = self.step(step, values, after_recursive)
            after_recursive = isinstance(step, Recursive)
        return values

    def step(self, step: Step, values: list[Any], after_recursive: bool) -> list[Any]:
        if isinstance(step, Field):
            return self.field(step, values)
        if isinstance(step, Index):
            out: list[Any] = []
            for value in values:
                if value is None or (after_recursive and not isinstance(value, list)):
                    continue
                out.extend(_eval_index(step, value))
            return out
        if isinstance(step, Filter):
            out = []
            for value in values:
                if value is None or (after_recursive and not isinstance(value, list)):
                    continue
                out.extend(self.filter(step, value))
            return out
        if isinstance(step, Wildcard):
            out = []
            for value in values:
                if isinstance(value, dict):
                    out.extend(value.values())
                elif isinstance(value, list):
                    out.extend(value)
            return out
        if isinstance(step, Recursive):
            out = []
            for value in values:
                _descend(value, out)
            return out
        if isinstance(step, Union):
            out = []
            for alternative in step.alternatives:
                out.extend(self.steps(alternative, values))
            return out
        if step.per_input:
            return [step.value for _ in values]
        return [step.value]

    def field(self, step: Field, values: list[Any]) -> list[Any]:
        if not values:
            return []
        if step.name == "":
            return [v for v in values if v is not None]
        found = [v[step.name] for v in values if isinstance(v, dict) and step.name in v]
        if not found and not self.allow_missing_keys:
            raise _MissingKey(f"key {json.dumps(step.name)} not found")
        return found

    def filter(self, step: Filter, value: Any) -> list[Any]:
        if not isinstance(value, list):
            raise _EvalError(f"{_type_name(value)} is not an array and cannot be filtered")
        strict = _Evaluator(allow_missing_keys=False)
        out = []
        for element in value:
            try:
                lefts = strict.steps(step.left, [element])
            except _MissingKey:
                lefts = []
            if step.operator == "exists":
                if lefts:
                    out.append(element)
                continue
            try:
                rights = strict.steps(step.right, [element])
            except _MissingKey:
                rights = []
            if not lefts or not rights:
                continue
            if len(lefts) > 1 or len(rights) > 1:
                raise _EvalError("can only compare one element at a time")
            if _compare(lefts[0], step.operator, rights[0]):
                out.append(element)
        return out


def _eval_index(step: Index, value: Any) -> list[Any]:
    """kubectl's ``evalArray``: negative indexes count from the end; an index outside the
    list is an error (``[0]`` of an empty list too), except for an empty selection."""
    if not isinstance(value, list):
        raise _EvalError(f"{_type_name(value)} is not an array; [ ] needs an array")
    length = len(value)
    start = step.start if step.start is not None else 0
    if start < 0:
        start += length
    end = step.end if step.end is not None else length
    if end < 0 or (step.end_derived and end == 0):
        end += length
    if end == start:
        return []
    if start >= length or start < 0:
        raise _EvalError(f"array index out of bounds: index {start}, length {length}")
    if end > length or end < 0:
        raise _EvalError(f"array index out of bounds: index {end - 1}, length {length}")
    if start > end:
        raise _EvalError(f"starting index {start} is greater than ending index {end}")
    step_size = 1
    if step.step is not None:
        if step.step <= 0:
            raise _EvalError("step must be > 0")
        step_size = step.step
    return value[start:end:step_size]


def _descend(value: Any, out: list[Any]) -> None:
    """Pre-order: every non-empty object or list, starting with ``value`` itself."""
    if isinstance(value, dict) and value:
        out.append(value)
        for child in value.values():
            _descend(child, out)
    elif isinstance(value, list) and value:
        out.append(value)
        for child in value:
            _descend(child, out)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _compare(left: Any, operator: str, right: Any) -> bool:
    comparable = (_is_number(left) and _is_number(right)) or (
        type(left) is type(right) and isinstance(left, str | bool)
    )
    if operator in ("==", "!="):
        equal = comparable and left == right
        return equal if operator == "==" else not equal
    if not comparable or isinstance(left, bool):
        raise _EvalError(
            f"cannot compare {_type_name(left)} {_short(left)} {operator} "
            f"{_type_name(right)} {_short(right)}"
        )
    if operator == "<":
        return bool(left < right)
    if operator == ">":
        return bool(left > right)
    if operator == "<=":
        return bool(left <= right)
    return bool(left >= right)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if _is_number(value):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    return type(value).__name__


def _short(value: Any) -> str:
    text = to_compact_json(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ---------------------------------------------------------------------------------------
# Output formatting (Go's fmt %v and encoding/json, as kubectl prints)


def _float_digits(value: float) -> tuple[str, int, bool]:
    """Shortest round-trip digits ``d1d2...``, decimal exponent ``x`` (value is
    ``d1.d2... * 10**x``) and the sign."""
    sign, digits, exponent = Decimal(repr(value)).as_tuple()
    assert isinstance(exponent, int)
    text = "".join(map(str, digits)).rstrip("0") or "0"
    exponent += len(digits) - len(text)
    return text, len(text) - 1 + exponent if text != "0" else 0, bool(sign)


def _fixed(digits: str, point: int) -> str:
    """``digits`` with the decimal point after ``point`` digits (may be <= 0 or > len)."""
    if point <= 0:
        return "0." + "0" * -point + digits
    if point >= len(digits):
        return digits + "0" * (point - len(digits))
    return digits[:point] + "." + digits[point:]


def _scientific(digits: str, exponent: int, min_exp_digits: int) -> str:
    mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    sign = "-" if exponent < 0 else "+"
    return f"{mantissa}e{sign}{abs(exponent):0{min_exp_digits}d}"


def _go_float(value: float, *, json_style: bool) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    digits, exponent, negative = _float_digits(value)
    prefix = "-" if negative else ""
    if json_style:  # encoding/json: 'f' format unless 1e-6 > |v| or |v| >= 1e21
        if value != 0 and (abs(value) < 1e-6 or abs(value) >= 1e21):
            return prefix + _scientific(digits, exponent, 1 if exponent < 0 else 2)
        return prefix + _fixed(digits, exponent + 1)
    # fmt %v: shortest 'g' with the exponent threshold 21
    if digits != "0" and (exponent < -4 or exponent >= 21):
        return prefix + _scientific(digits, exponent, 2)
    return prefix + _fixed(digits, exponent + 1)


def format_value(value: Any) -> str:
    """One value as kubectl's JSONPath prints it: strings raw, ``true``/``false``,
    ``null``, numbers as Go's ``%v``, objects and lists as compact JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _go_float(value, json_style=False)
    return to_compact_json(value)


def _json(value: Any, indent: str | None, level: int) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _go_float(value, json_style=True)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = sorted((str(k), v) for k, v in value.items())
        parts = [
            f"{json.dumps(k, ensure_ascii=False)}:{'' if indent is None else ' '}"
            f"{_json(v, indent, level + 1)}"
            for k, v in items
        ]
        return _join_json("{", parts, "}", indent, level)
    if isinstance(value, list | tuple):
        if not value:
            return "[]"
        return _join_json("[", [_json(v, indent, level + 1) for v in value], "]", indent, level)
    raise _EvalError(f"cannot print a value of type {type(value).__name__}")


def _join_json(open_: str, parts: list[str], close: str, indent: str | None, level: int) -> str:
    if indent is None:
        return open_ + ",".join(parts) + close
    inner = "\n" + indent * (level + 1)
    return open_ + inner + ("," + inner).join(parts) + "\n" + indent * level + close


def to_compact_json(value: Any) -> str:
    """Compact JSON with sorted keys, as Go's ``json.Marshal`` writes unstructured data."""
    return _json(value, None, 0)


def to_indented_json(value: Any) -> str:
    """JSON indented by 4 spaces with sorted keys (Go's ``json.MarshalIndent``)."""
    return _json(value, "    ", 0)


# ---------------------------------------------------------------------------------------
# Public API


@dataclass(frozen=True)
class Template:
    """A parsed template; ``execute`` may be called any number of times."""

    source: str
    nodes: tuple[Node, ...]

    def execute(self, data: Any, *, allow_missing_keys: bool = False, as_json: bool = False) -> str:
        """Render ``data``.

        ``allow_missing_keys`` makes a missing key print nothing instead of raising (what
        ``kubectl get`` does by default, ``--allow-missing-template-keys=true``).
        ``as_json`` is ``-o jsonpath-as-json``: each action's values as an indented JSON
        array. Raises JsonPathError on a missing key, an index out of bounds, or a value
        of the wrong type for the step applied to it.
        """
        results = self.find_results(data, allow_missing_keys=allow_missing_keys)
        try:
            if as_json:
                return "".join(to_indented_json(values) + "\n" for values in results)
            return "".join(" ".join(format_value(v) for v in values) for values in results)
        except _EvalError as e:
            raise self._execution_error(e) from None

    def find_results(self, data: Any, *, allow_missing_keys: bool = False) -> list[list[Any]]:
        """The values of each text node and action, in template order (a range's body
        contributes once per iteration); what ``execute`` prints. Raises JsonPathError."""
        results: list[list[Any]] = []
        try:
            _Evaluator(allow_missing_keys).nodes(self.nodes, data, results)
        except _EvalError as e:
            raise self._execution_error(e) from None
        return results

    def _execution_error(self, error: _EvalError) -> JsonPathError:
        return JsonPathError(f"error executing jsonpath {json.dumps(self.source)}: {error}")


def parse(template: str) -> Template:
    """Parse a template; raise JsonPathError saying what is wrong and where."""
    try:
        return Template(template, _parse_nodes(template))
    except _ParseError as e:
        raise JsonPathError(
            f"error parsing jsonpath {json.dumps(template)}: {e.message} "
            f"(at position {e.position + 1})",
            position=e.position,
        ) from None


def render(
    template: str, data: Any, *, allow_missing_keys: bool = False, as_json: bool = False
) -> str:
    """Parse ``template`` and render ``data`` with it (see ``Template.execute``)."""
    return parse(template).execute(data, allow_missing_keys=allow_missing_keys, as_json=as_json)
