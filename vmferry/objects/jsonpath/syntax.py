"""The JSONPath template syntax: the tree a template parses into, and the parser.

:func:`parse_nodes` turns a template into :data:`Node` s (text, actions, ranges), each
action a sequence of :data:`Step` s; it raises :class:`ParseError` with the 0-based
position of the problem, which :func:`vmferry.objects.jsonpath.parse` turns into a
:class:`JsonPathError` naming the template.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias


class JsonPathError(ValueError):
    """A template that does not parse, or that fails on the data it is applied to.

    ``position`` is the 0-based offset in the template where a parse error was found
    (None for evaluation errors).
    """

    def __init__(self, message: str, *, position: int | None = None) -> None:
        super().__init__(message)
        self.position = position


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


class ParseError(Exception):
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

    def error(self, message: str, at: int | None = None) -> ParseError:
        return ParseError(message, self.base + (self.pos if at is None else at))

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
            raise ParseError("empty array index []", base)
        match = _SLICE_RE.match(text)
        if match is None:
            raise ParseError(f"invalid array index [{text}]", base)
        start_s, end_s, step_s = match.groups()
        start = int(start_s) if start_s else None
        if end_s is None:  # [n]: a single element
            if start is None:
                raise ParseError(f"invalid array index [{text}]", base)
            return [Index(start, start + 1, None, end_derived=True)]
        end = int(end_s[1:]) if end_s[1:] else None
        step = int(step_s[1:]) if step_s is not None and step_s[1:] else None
        return [Index(start, end, step)]

    def parse_filter(self) -> Step:
        start = self.pos
        self.pos += 3  # "[?("
        try:
            close = self.scan_to(")", 'filter: missing ")"')
        except ParseError as e:
            raise self.error(e.message, start) from None
        if close + 1 >= len(self.text) or self.text[close + 1] != "]":
            raise self.error('unclosed filter: expected "]" after ")"', close + 1)
        expr = self.text[self.pos : close]
        expr_base = self.base + self.pos
        self.pos = close + 2
        op_at = _find_operator(expr)
        if op_at is None:
            if not expr.strip():
                raise ParseError("empty filter expression", self.base + start)
            return Filter(_parse_operand(expr, expr_base), "exists", ())
        op_start, op_end = op_at
        operator = expr[op_start:op_end]
        if operator not in _OPERATORS:
            raise ParseError(f"unrecognized filter operator {operator!r}", expr_base + op_start)
        if not expr[:op_start].strip() or not expr[op_end:].strip():
            raise ParseError(
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
            raise ParseError(f"{token!r} is not allowed inside a filter", base)
    return tuple(t for t in tokens if not isinstance(t, str))


@dataclass
class _Frame:
    nodes: list[Node] = field(default_factory=list)
    range_steps: tuple[Step, ...] = ()
    range_position: int = 0


def parse_nodes(template: str) -> tuple[Node, ...]:
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
                raise ParseError("range needs a path: {range .items[*]}", brace)
            stack.append(_Frame(range_steps=tuple(_only_steps(steps)), range_position=brace))
        elif tokens == ["end"]:
            if len(stack) == 1:
                raise ParseError("not in range, nothing to end", brace)
            frame = stack.pop()
            stack[-1].nodes.append(RangeNode(frame.range_steps, tuple(frame.nodes)))
        elif any(isinstance(t, str) for t in tokens):
            raise ParseError('"range" and "end" must stand at the start of an action', brace)
        else:
            stack[-1].nodes.append(ActionNode(tuple(_only_steps(tokens))))
    if len(stack) > 1:
        raise ParseError("range without a matching {end}", stack[-1].range_position)
    return tuple(stack[0].nodes)


def _only_steps(tokens: Sequence[str | Step]) -> Iterator[Step]:
    for token in tokens:
        assert not isinstance(token, str)
        yield token
