"""Kubernetes label selectors (the label key/value rules are in :mod:`vmferry.objects.names`).

``parse_selector("app=web,tier in (a,b),!canary")`` returns a ``Selector``: an AND of
``Requirement``s. Syntax (as ``kubectl -l``): ``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k``,
``k in (v1,v2)``, ``k notin (v1)``; commas separate requirements; whitespace between
tokens is ignored. ``str(selector)`` renders the canonical form, which parses back to an
equal selector (``==`` is rendered as ``=``, set values are sorted).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

from vmferry.errors import BadRequest
from vmferry.objects.names import validate_label_key, validate_label_value

__all__ = [
    "Operator",
    "Requirement",
    "Selector",
    "parse_selector",
]

Operator = Literal["=", "!=", "in", "notin", "exists", "!"]


@dataclass(frozen=True)
class Requirement:
    """One term of a selector. ``values`` is empty for ``exists`` and ``!``, one value
    for ``=``/``!=``, a sorted tuple of at least one value for ``in``/``notin``."""

    key: str
    operator: Operator
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Kubernetes semantics: ``!=`` and ``notin`` also match when the key is absent."""
        present = self.key in labels
        if self.operator == "exists":
            return present
        if self.operator == "!":
            return not present
        if self.operator in ("=", "in"):
            return present and labels[self.key] in self.values
        # "!=" and "notin"
        return not present or labels[self.key] not in self.values

    def __str__(self) -> str:
        if self.operator == "exists":
            return self.key
        if self.operator == "!":
            return f"!{self.key}"
        if self.operator in ("=", "!="):
            return f"{self.key}{self.operator}{self.values[0]}"
        return f"{self.key} {self.operator} ({','.join(self.values)})"


@dataclass(frozen=True)
class Selector:
    """An AND of requirements; the empty selector matches everything."""

    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        """True when every requirement holds for ``labels`` (None means no labels)."""
        labels = labels or {}
        return all(r.matches(labels) for r in self.requirements)

    def empty(self) -> bool:
        """True for the selector that matches everything."""
        return not self.requirements

    def __str__(self) -> str:
        return ",".join(str(r) for r in self.requirements)

    @classmethod
    def everything(cls) -> Selector:
        return cls(())

    @classmethod
    def from_match_labels(cls, match_labels: Mapping[str, str] | None) -> Selector:
        """The selector of a ``matchLabels`` map: ``k=v`` for each entry, sorted by key.

        Raises BadRequest when a key or value is not a valid label key/value.
        """
        reqs = []
        for key, value in sorted((match_labels or {}).items()):
            _check("matchLabels", key, (value,))
            reqs.append(Requirement(key, "=", (value,)))
        return cls(tuple(reqs))

    @classmethod
    def from_label_selector(cls, selector: Mapping[str, Any] | None) -> Selector:
        """Build from a Kubernetes ``LabelSelector`` object (``matchLabels`` plus
        ``matchExpressions`` with operators In, NotIn, Exists, DoesNotExist).

        Raises BadRequest naming the offending field.
        """
        if not selector:
            return cls.everything()
        reqs = list(cls.from_match_labels(selector.get("matchLabels")).requirements)
        ops: dict[str, Operator] = {
            "In": "in",
            "NotIn": "notin",
            "Exists": "exists",
            "DoesNotExist": "!",
        }
        for i, expr in enumerate(selector.get("matchExpressions") or ()):
            where = f"matchExpressions[{i}]"
            if not isinstance(expr, Mapping):
                raise BadRequest(f"invalid label selector: {where} must be an object")
            key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
            if op not in ops:
                raise BadRequest(
                    f"invalid label selector: {where}.operator {op!r} is not one of "
                    f"In, NotIn, Exists, DoesNotExist"
                )
            if not isinstance(key, str) or not isinstance(values, list):
                raise BadRequest(
                    f"invalid label selector: {where} needs a string key and a list of values"
                )
            operator = ops[op]
            if operator in ("in", "notin") and not values:
                raise BadRequest(
                    f"invalid label selector: {where}.values must be non-empty for {op}"
                )
            if operator in ("exists", "!") and values:
                raise BadRequest(f"invalid label selector: {where}.values must be empty for {op}")
            _check(where, key, tuple(values))
            reqs.append(Requirement(key, operator, tuple(sorted(set(values)))))
        return cls(tuple(reqs))


def _check(context: str, key: str, values: Iterable[object]) -> None:
    try:
        validate_label_key(key)
        for value in values:
            if not isinstance(value, str):
                raise ValueError(f"invalid label value {value!r}: must be a string")
            validate_label_value(value)
    except ValueError as exc:
        raise BadRequest(f"invalid label selector: {context}: {exc}") from None


# --- the selector string parser -------------------------------------------------------

_SPECIAL = "=!(),"


_TokenKind = Literal["ident", "=", "==", "!=", "!", "(", ")", ",", "end"]


@dataclass(frozen=True)
class _Token:
    kind: _TokenKind
    text: str
    pos: int


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
        elif text.startswith(("==", "!="), i):
            tokens.append(_Token(cast(_TokenKind, text[i : i + 2]), text[i : i + 2], i))
            i += 2
        elif ch in _SPECIAL:
            tokens.append(_Token(cast(_TokenKind, ch), ch, i))
            i += 1
        else:
            start = i
            while i < n and not text[i].isspace() and text[i] not in _SPECIAL:
                i += 1
            tokens.append(_Token("ident", text[start:i], start))
    tokens.append(_Token("end", "", n))
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0

    def fail(self, token: _Token, what: str) -> BadRequest:
        found = "end of input" if token.kind == "end" else f'"{token.text}"'
        return BadRequest(
            f'invalid label selector "{self.text}": {what}, found {found} at position {token.pos}'
        )

    def peek(self) -> _Token:
        return self.tokens[self.i]

    def take(self) -> _Token:
        token = self.tokens[self.i]
        self.i += 1
        return token

    def key(self, token: _Token) -> str:
        if token.kind != "ident":
            raise self.fail(token, "expected a label key")
        try:
            validate_label_key(token.text)
        except ValueError as exc:
            raise BadRequest(f'invalid label selector "{self.text}": {exc}') from None
        return token.text

    def value(self, token: _Token) -> str:
        try:
            validate_label_value(token.text)
        except ValueError as exc:
            raise BadRequest(f'invalid label selector "{self.text}": {exc}') from None
        return token.text

    def requirement(self) -> Requirement:
        token = self.take()
        if token.kind == "!":
            return Requirement(self.key(self.take()), "!")
        key = self.key(token)
        op = self.peek()
        if op.kind in ("end", ","):
            return Requirement(key, "exists")
        self.take()
        if op.kind in ("=", "==", "!="):
            nxt = self.peek()
            if nxt.kind in ("end", ","):
                value = ""  # "k=" selects the empty value, as in Kubernetes
            elif nxt.kind == "ident":
                value = self.value(self.take())
            else:
                raise self.fail(nxt, f'expected a value after "{key}{op.text}"')
            return Requirement(key, "!=" if op.kind == "!=" else "=", (value,))
        if op.kind == "ident" and op.text in ("in", "notin"):
            return Requirement(key, cast(Operator, op.text), self.values(key, op.text))
        raise self.fail(
            op, f'expected "=", "==", "!=", "in", "notin", "," or the end after "{key}"'
        )

    def values(self, key: str, operator: str) -> tuple[str, ...]:
        where = f'"{key} {operator}"'
        token = self.take()
        if token.kind != "(":
            raise self.fail(token, f'expected "(" after {where}')
        values: set[str] = set()
        while True:
            token = self.take()
            if token.kind == "ident":
                values.add(self.value(token))
                token = self.take()
            elif token.kind in (",", ")"):
                values.add("")  # an empty entry is the empty value, as in Kubernetes
            else:
                raise self.fail(token, f'expected a value or ")" in {where}')
            if token.kind == ")":
                return tuple(sorted(values))
            if token.kind != ",":
                raise self.fail(token, f'expected "," or ")" in the values of {where}')

    def parse(self) -> Selector:
        if self.peek().kind == "end":
            return Selector.everything()
        reqs = [self.requirement()]
        while True:
            token = self.take()
            if token.kind == "end":
                return Selector(tuple(reqs))
            if token.kind != ",":
                raise self.fail(token, f'expected "," or the end after "{reqs[-1]}"')
            if self.peek().kind in ("end", ","):
                raise self.fail(self.peek(), 'expected a requirement after ","')
            reqs.append(self.requirement())


def parse_selector(text: str) -> Selector:
    """Parse a label selector string; ``""`` (or whitespace) selects everything.

    Raises BadRequest naming the offending part and its position, or the invalid key/value.
    """
    return _Parser(text).parse()
