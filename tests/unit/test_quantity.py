"""Unit tests for vmferry.objects.quantity."""

from __future__ import annotations

import pytest

from vmferry.objects import quantity
from vmferry.objects.quantity import format_quantity, parse_quantity

pytestmark = pytest.mark.timeout(30)

KI, MI, GI = 1024, 1024**2, 1024**3


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("1", 1),
        ("+5", 5),
        ("2048Mi", 2048 * MI),
        ("1Gi", GI),
        ("1.5Gi", GI + GI // 2),
        (".5Ki", 512),
        ("1.Ki", KI),
        ("3Ki", 3 * KI),
        ("1Ti", 1024**4),
        ("1Pi", 1024**5),
        ("1Ei", 1024**6),
        ("500M", 500_000_000),
        ("1k", 1000),
        ("1G", 10**9),
        ("2T", 2 * 10**12),
        ("1P", 10**15),
        ("1E", 10**18),
        ("1e3", 1000),
        ("1E3", 1000),
        ("1e+3", 1000),
        ("15e-1", 2),
        ("1.5e1", 15),
        ("100m", 1),  # milli, rounded up
        ("1000m", 1),
        ("1001m", 2),
        ("1u", 1),
        ("1n", 1),
        ("0.1", 1),
        ("1.0000001", 2),
        (" 1Gi ", GI),
        ("1.1Ki", 1127),  # 1126.4 rounded up
    ],
)
def test_parse(text: str, expected: int) -> None:
    assert parse_quantity(text) == expected


def test_parse_numbers() -> None:
    assert parse_quantity(7) == 7
    assert parse_quantity(1.5) == 2
    assert parse_quantity(0.1) == 1
    assert parse_quantity(1e3) == 1000
    assert parse_quantity(2**70) == 2**70  # exact, no float rounding


def test_negative_values() -> None:
    with pytest.raises(ValueError, match=r'^invalid quantity "-1Gi": must not be negative$'):
        parse_quantity("-1Gi")
    with pytest.raises(ValueError, match="must not be negative"):
        parse_quantity(-3)
    assert parse_quantity("-1Gi", allow_negative=True) == -GI
    assert parse_quantity("-1.5", allow_negative=True) == -2  # away from zero
    assert parse_quantity("-0", allow_negative=False) == 0


def test_unknown_suffix_message() -> None:
    with pytest.raises(ValueError) as info:
        parse_quantity("12Zi")
    assert str(info.value) == (
        'invalid quantity "12Zi": unknown suffix "Zi" '
        "(use Ki, Mi, Gi, Ti, Pi, Ei, k, M, G, T, P, E)"
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "must not be empty"),
        ("   ", "must not be empty"),
        ("Gi", "must start with a number"),
        ("abc", "must start with a number"),
        ("-", "must start with a number"),
        ("1.2.3", "malformed number"),
        (".", "malformed number"),
        ("1e", 'unknown suffix "e"'),
        ("1K", 'unknown suffix "K"'),  # Kubernetes spells kilo "k"
        ("1gi", 'unknown suffix "gi"'),
        ("1 Gi", 'unknown suffix " Gi"'),
        ("1GiB", 'unknown suffix "GiB"'),
        ("1e999", "exponent 999 is out of range"),
        (float("nan"), "must be a finite number"),
        (float("inf"), "must be a finite number"),
        (True, "must be a string or a number, not bool"),
        (None, "must be a string or a number, not NoneType"),
    ],
)
def test_invalid(value: object, message: str) -> None:
    with pytest.raises(ValueError, match="invalid quantity") as info:
        parse_quantity(value)  # type: ignore[arg-type]
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0"),
        (1, "1"),
        (1500, "1500"),
        (1000, "1000"),
        (1024, "1Ki"),
        (1536, "1536"),  # 1.5Ki: not a whole number of Ki
        (256 * MI, "256Mi"),
        (1536 * MI, "1536Mi"),
        (GI, "1Gi"),
        (3 * GI, "3Gi"),
        (1024**4, "1Ti"),
        (1024**6, "1Ei"),
        (1024**7, "1024Ei"),
        (-2 * GI, "-2Gi"),
        (GI + 1, str(GI + 1)),
    ],
)
def test_format(value: int, text: str) -> None:
    assert format_quantity(value) == text


@pytest.mark.parametrize("value", [0, 1, 999, 1024, 1536, 5 * MI, 7 * GI + 3 * KI, 2**62, 10**18])
def test_format_round_trips(value: int) -> None:
    assert parse_quantity(format_quantity(value)) == value


def test_format_rejects_non_int() -> None:
    with pytest.raises(TypeError):
        format_quantity(1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        format_quantity(True)


@pytest.mark.parametrize(
    "text",
    ["0", "7", "007Ki", "512Mi", "3Gi", "2Ti", "1Pi", "1Ei", "1k", "5M", "9G", "4T", "2P", "3E"],
)
def test_integer_fast_path_agrees_with_exact_arithmetic(text: str) -> None:
    """Digits with an integer-valued suffix skip the fractions; the value is the same."""
    exact = quantity._exact(text, text)
    assert exact.denominator == 1
    assert parse_quantity(text) == int(exact)
    assert parse_quantity(f"  {text} ") == int(exact)
