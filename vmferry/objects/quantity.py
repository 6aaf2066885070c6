"""Kubernetes resource quantities (``2048Mi``, ``1Gi``, ``500M``, ``1.5Gi``, ``100m``, ``1e3``).

``parse_quantity`` turns a quantity into an exact integer (bytes, for memory), rounding a
fractional result up, away from zero, like ``resource.Quantity.Value()``.
``format_quantity`` renders an integer in the shortest exact binary form (``256Mi``).
Arithmetic is exact (``fractions.Fraction``): no float rounding surprises.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

__all__ = ["BINARY_SUFFIXES", "DECIMAL_SUFFIXES", "format_quantity", "parse_quantity"]

BINARY_SUFFIXES: dict[str, int] = {
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
    "Ti": 1024**4,
    "Pi": 1024**5,
    "Ei": 1024**6,
}

DECIMAL_SUFFIXES: dict[str, Fraction] = {
    "n": Fraction(1, 10**9),
    "u": Fraction(1, 10**6),
    "m": Fraction(1, 10**3),
    "": Fraction(1),
    "k": Fraction(10**3),
    "M": Fraction(10**6),
    "G": Fraction(10**9),
    "T": Fraction(10**12),
    "P": Fraction(10**15),
    "E": Fraction(10**18),
}

_SUFFIX_HELP = "use Ki, Mi, Gi, Ti, Pi, Ei, k, M, G, T, P, E"

# sign, then digits with at most one decimal point (at least one digit), then the rest.
_NUMBER = re.compile(r"([+-]?)([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(.*)", re.DOTALL)
_EXPONENT = re.compile(r"[eE]([+-]?[0-9]+)")
# Digits and an integer-valued suffix (or none): parsed without fractions, 10x faster
# (validating an object parses every quantity in it).
_INT_FACTORS: dict[str, int] = {
    **BINARY_SUFFIXES,
    **{s: int(f) for s, f in DECIMAL_SUFFIXES.items() if f.denominator == 1},
}
_PLAIN = re.compile(r"([0-9]+)(" + "|".join(sorted(_INT_FACTORS, key=len, reverse=True)) + ")")
# Bounds the exponent so that "1e999999999" cannot make us build a gigantic integer.
_MAX_EXPONENT = 100


def _exact(value: str | int | float, text: str) -> Fraction:
    """Return the exact value of ``text`` (the quantity as a string); raise ValueError."""
    if isinstance(value, int):
        return Fraction(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f'invalid quantity "{text}": must be a finite number')
        # repr() is the shortest string that round-trips, so 0.1 means 1/10, not the binary float.
        return Fraction(repr(value))
    if not text:
        raise ValueError('invalid quantity "": must not be empty (e.g. "512Mi", "1Gi", "2")')
    match = _NUMBER.fullmatch(text)
    if match is None:
        if re.match(r"[+-]?[0-9.]", text):
            raise ValueError(f'invalid quantity "{text}": malformed number')
        raise ValueError(
            f'invalid quantity "{text}": must start with a number (e.g. "512Mi", "1Gi", "2")'
        )
    sign, digits, suffix = match.groups()
    number = Fraction(digits if not digits.endswith(".") else digits[:-1])
    if sign == "-":
        number = -number
    if suffix in BINARY_SUFFIXES:
        return number * BINARY_SUFFIXES[suffix]
    if suffix in DECIMAL_SUFFIXES:
        return number * DECIMAL_SUFFIXES[suffix]
    exponent = _EXPONENT.fullmatch(suffix)
    if exponent is not None:
        power = int(exponent.group(1))
        if abs(power) > _MAX_EXPONENT:
            raise ValueError(
                f'invalid quantity "{text}": exponent {power} is out of range '
                f"(-{_MAX_EXPONENT}..{_MAX_EXPONENT})"
            )
        return number * Fraction(10) ** power
    if suffix[:1] in ".0123456789":
        raise ValueError(f'invalid quantity "{text}": malformed number')
    raise ValueError(f'invalid quantity "{text}": unknown suffix "{suffix}" ({_SUFFIX_HELP})')


def parse_quantity(value: str | int | float, *, allow_negative: bool = False) -> int:
    """Parse a Kubernetes quantity and return it as an integer, rounded up (away from zero).

    Accepts binary suffixes (Ki Mi Gi Ti Pi Ei), decimal suffixes (n u m k M G T P E),
    exponents (``1e3``, ``2E-1``), decimals (``1.5Gi``) and plain numbers; ints and
    floats are taken as plain numbers. Leading/trailing whitespace is ignored.

    Raises ValueError with a message naming the input and what was wrong (unknown suffix,
    malformed number, negative value when ``allow_negative`` is False, bool input).
    """
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(
            f"invalid quantity {value!r}: must be a string or a number, not {type(value).__name__}"
        )
    text = value.strip() if isinstance(value, str) else repr(value)
    plain = _PLAIN.fullmatch(text)
    if plain is not None:  # the usual "512Mi", "2", "1G": integers all the way
        return int(plain.group(1)) * _INT_FACTORS[plain.group(2)]
    exact = _exact(value, text)
    if exact < 0 and not allow_negative:
        raise ValueError(f'invalid quantity "{text}": must not be negative')
    # Round away from zero, as resource.Quantity.Value() does.
    return math.ceil(exact) if exact >= 0 else -math.ceil(-exact)


def format_quantity(value: int) -> str:
    """Render ``value`` in the shortest exact binary form: ``256Mi``, ``1Gi``, ``3Ki``.

    Values that are not a multiple of 1024 (and 0) are rendered as plain integers
    (``1500``). Negative values keep their sign (``-2Gi``). Raises TypeError for non-int.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"format_quantity needs an int, not {type(value).__name__}")
    if value == 0:
        return "0"
    for suffix, factor in reversed(BINARY_SUFFIXES.items()):
        if value % factor == 0:
            return f"{value // factor}{suffix}"
    return str(value)
