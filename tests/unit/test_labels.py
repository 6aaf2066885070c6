"""Unit tests for vmferry.objects.labels."""

from __future__ import annotations

import pytest

from vmferry.errors import BadRequest
from vmferry.objects.labels import Requirement, Selector, parse_selector
from vmferry.objects.names import validate_label_key, validate_label_value

pytestmark = pytest.mark.timeout(30)


# --- keys and values ------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "a",
        "app",
        "A_b-c.d",
        "kubevirt.io/schedulable",
        "node-role.kubernetes.io/worker",
        "cpu-model.node.kubevirt.io/Skylake-Client",
        "x" * 63,
        ("a" * 63 + ".") * 3 + "a" * 61 + "/name",  # prefix of exactly 253 characters
        "1abc",
    ],
)
def test_valid_keys(key: str) -> None:
    assert validate_label_key(key) is None  # raises ValueError when invalid
    assert Selector.from_match_labels({key: "v"}).matches({key: "v"})


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("", "name part must not be empty"),
        ("a/", "name part must not be empty"),
        ("/a", "prefix part must not be empty"),
        ("x" * 64, "name part must be no more than 63 characters"),
        ("-a", "must start and end with an alphanumeric character"),
        ("a-", "must start and end with an alphanumeric character"),
        ("a b", "name part must consist of alphanumeric characters"),
        ("a/b/c", "one '/'"),
        ("Example.com/a", "prefix part must be a lowercase DNS subdomain"),
        ("ex_ample.com/a", "prefix part must be a lowercase DNS subdomain"),
        ("-x.com/a", "prefix part must be a lowercase DNS subdomain"),
        ("a..b/c", "prefix part must be a lowercase DNS subdomain"),
        ("p" * 254 + "/a", "prefix part must be no more than 253 characters"),
    ],
)
def test_invalid_keys(key: str, message: str) -> None:
    with pytest.raises(ValueError, match="invalid label key") as info:
        validate_label_key(key)
    assert message in str(info.value)
    assert f'"{key}"' in str(info.value)


@pytest.mark.parametrize("value", ["", "a", "v1.2_3-x", "Z" * 63, "1"])
def test_valid_values(value: str) -> None:
    assert validate_label_value(value) is None  # raises ValueError when invalid
    assert Selector.from_match_labels({"k": value}).matches({"k": value})


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("x" * 64, "no more than 63 characters"),
        ("-a", "must start and end with an alphanumeric"),
        ("a.", "must start and end with an alphanumeric"),
        ("a/b", "must consist of alphanumeric characters"),
        ("a b", "must consist of alphanumeric characters"),
    ],
)
def test_invalid_values(value: str, message: str) -> None:
    with pytest.raises(ValueError, match="invalid label value") as info:
        validate_label_value(value)
    assert message in str(info.value)


def test_non_string_key_and_value() -> None:
    with pytest.raises(ValueError):
        validate_label_key(1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        validate_label_value(None)  # type: ignore[arg-type]


# --- parsing --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "requirements"),
    [
        ("a=b", [Requirement("a", "=", ("b",))]),
        ("a==b", [Requirement("a", "=", ("b",))]),
        ("a!=b", [Requirement("a", "!=", ("b",))]),
        ("a", [Requirement("a", "exists")]),
        ("!a", [Requirement("a", "!")]),
        ("a in (y,x)", [Requirement("a", "in", ("x", "y"))]),
        ("a notin (x)", [Requirement("a", "notin", ("x",))]),
        ("a=", [Requirement("a", "=", ("",))]),
        ("a in ()", [Requirement("a", "in", ("",))]),
        (
            "  app = web ,  tier in ( a , b ) , ! canary,x!=  y  ",
            [
                Requirement("app", "=", ("web",)),
                Requirement("tier", "in", ("a", "b")),
                Requirement("canary", "!"),
                Requirement("x", "!=", ("y",)),
            ],
        ),
        ("kubevirt.io/schedulable=true", [Requirement("kubevirt.io/schedulable", "=", ("true",))]),
        ("in=notin", [Requirement("in", "=", ("notin",))]),  # keywords only in operator position
    ],
)
def test_parse(text: str, requirements: list[Requirement]) -> None:
    assert parse_selector(text) == Selector(tuple(requirements))


@pytest.mark.parametrize("text", ["", "   "])
def test_empty_selector_matches_everything(text: str) -> None:
    selector = parse_selector(text)
    assert selector.empty()
    assert selector.matches({}) and selector.matches({"a": "b"}) and selector.matches(None)
    assert str(selector) == ""


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("a=b", "a=b"),
        ("a==b", "a=b"),
        (" a , !b ", "a,!b"),
        ("x in (b, a, a)", "x in (a,b)"),
        ("x notin (a)", "x notin (a)"),
        ("a=,b!=c", "a=,b!=c"),
        ("x in (a,)", "x in (,a)"),
        ("example.com/role in (db,web),tier", "example.com/role in (db,web),tier"),
    ],
)
def test_str_round_trips(text: str, canonical: str) -> None:
    selector = parse_selector(text)
    assert str(selector) == canonical
    assert parse_selector(str(selector)) == selector


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("a=b=c", 'expected "," or the end after "a=b", found "=" at position 3'),
        ("a in b", 'expected "(" after "a in", found "b" at position 5'),
        ("a in (b", 'expected "," or ")" in the values of "a in", found end of input'),
        ("a in (b c)", 'found "c" at position 8'),
        ("a in (=)", 'expected a value or ")" in "a in"'),
        ("!", "expected a label key, found end of input at position 1"),
        ("a,,b", 'expected a requirement after ",", found "," at position 2'),
        ("a,", 'expected a requirement after ","'),
        (",a", 'expected a label key, found ","'),
        ("=b", 'expected a label key, found "="'),
        ("a b", 'found "b" at position 2'),
        ("a!b", 'found "!" at position 1'),
        ("a=(b)", 'expected a value after "a="'),
        ("a/b/c=d", 'invalid label key "a/b/c"'),
        ("a=-b", 'invalid label value "-b"'),
        ("x in (ok,-bad)", 'invalid label value "-bad"'),
        ("x" * 64, "no more than 63 characters"),
    ],
)
def test_bad_selectors_name_the_problem(text: str, fragment: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_selector(text)
    message = str(info.value)
    assert message.startswith(f'invalid label selector "{text}": ')
    assert fragment in message


# --- matching -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "labels", "expected"),
    [
        ("a=b", {"a": "b"}, True),
        ("a=b", {"a": "c"}, False),
        ("a=b", {}, False),
        ("a==b", {"a": "b", "x": "y"}, True),
        ("a!=b", {"a": "c"}, True),
        ("a!=b", {}, True),  # absent keys satisfy !=
        ("a!=b", {"a": "b"}, False),
        ("a", {"a": ""}, True),
        ("a", {"b": "a"}, False),
        ("!a", {}, True),
        ("!a", {"a": "x"}, False),
        ("a in (x,y)", {"a": "y"}, True),
        ("a in (x,y)", {"a": "z"}, False),
        ("a in (x,y)", {}, False),
        ("a notin (x)", {"a": "y"}, True),
        ("a notin (x)", {}, True),
        ("a notin (x)", {"a": "x"}, False),
        ("a=", {"a": ""}, True),
        ("a=", {}, False),
        ("a=b,c=d", {"a": "b", "c": "d"}, True),
        ("a=b,c=d", {"a": "b"}, False),
    ],
)
def test_matches(text: str, labels: dict[str, str], expected: bool) -> None:
    assert parse_selector(text).matches(labels) is expected


def test_from_match_labels() -> None:
    selector = Selector.from_match_labels({"tier": "front", "app": "web"})
    assert str(selector) == "app=web,tier=front"
    assert selector.matches({"app": "web", "tier": "front", "x": "y"})
    assert not selector.matches({"app": "web"})
    assert Selector.from_match_labels({}).empty()
    assert Selector.from_match_labels(None).empty()
    with pytest.raises(BadRequest, match='invalid label value "-x"'):
        Selector.from_match_labels({"a": "-x"})


def test_from_label_selector() -> None:
    selector = Selector.from_label_selector(
        {
            "matchLabels": {"app": "web"},
            "matchExpressions": [
                {"key": "zone", "operator": "In", "values": ["b", "a"]},
                {"key": "canary", "operator": "DoesNotExist"},
                {"key": "tier", "operator": "Exists"},
                {"key": "os", "operator": "NotIn", "values": ["windows"]},
            ],
        }
    )
    assert str(selector) == "app=web,zone in (a,b),!canary,tier,os notin (windows)"
    assert parse_selector(str(selector)) == selector
    assert selector.matches({"app": "web", "zone": "a", "tier": "x"})
    assert not selector.matches({"app": "web", "zone": "a", "tier": "x", "os": "windows"})
    assert Selector.from_label_selector(None).empty()
    assert Selector.from_label_selector({}).empty()


@pytest.mark.parametrize(
    ("expression", "fragment"),
    [
        ({"key": "a", "operator": "Equals", "values": ["b"]}, "matchExpressions[0].operator"),
        ({"key": "a", "operator": "In", "values": []}, "must be non-empty for In"),
        ({"key": "a", "operator": "Exists", "values": ["b"]}, "must be empty for Exists"),
        ({"key": "-a", "operator": "Exists"}, 'invalid label key "-a"'),
        ({"key": "a", "operator": "In", "values": [1]}, "must be a string"),
        ("nope", "must be an object"),
    ],
)
def test_from_label_selector_errors(expression: object, fragment: str) -> None:
    with pytest.raises(BadRequest) as info:
        Selector.from_label_selector({"matchExpressions": [expression]})
    assert fragment in str(info.value)
