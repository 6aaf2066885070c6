"""Unit tests for vmferry.objects.patch (RFC 6902 JSON patch, RFC 7386 merge patch, parsing)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from vmferry.errors import BadRequest, Invalid
from vmferry.objects.patch import (
    Patch,
    apply_json_patch,
    apply_merge_patch,
    json_equal,
    parse_patch,
    parse_pointer,
)

pytestmark = pytest.mark.timeout(30)


def doc() -> dict[str, Any]:
    return {
        "metadata": {"name": "vm1", "labels": {"app": "web"}},
        "spec": {"list": [1, 2, 3], "map": {"a/b": 1, "c~d": 2}, "s": "x"},
    }


# --- JSON pointers --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pointer", "tokens"),
    [
        ("", []),
        ("/", [""]),
        ("/a/b", ["a", "b"]),
        ("/a~1b", ["a/b"]),
        ("/c~0d", ["c~d"]),
        ("/~01", ["~1"]),  # ~0 then 1, not ~1
        ("/a//b", ["a", "", "b"]),
    ],
)
def test_parse_pointer(pointer: str, tokens: list[str]) -> None:
    assert parse_pointer(pointer) == tokens


@pytest.mark.parametrize("pointer", ["a", "/a~2", "/a~", "#/a"])
def test_parse_pointer_errors(pointer: str) -> None:
    with pytest.raises(ValueError):
        parse_pointer(pointer)


# --- JSON patch: the RFC 6902 operations -----------------------------------------------


def test_add() -> None:
    original = doc()
    out = apply_json_patch(
        original,
        [
            {"op": "add", "path": "/spec/new", "value": {"x": 1}},
            {"op": "add", "path": "/spec/list/-", "value": 4},
            {"op": "add", "path": "/spec/list/0", "value": 0},
            {"op": "add", "path": "/spec/list/5", "value": 5},  # == len: append
            {"op": "add", "path": "/spec/s", "value": "replaced by add"},
            {"op": "add", "path": "/metadata/labels/tier", "value": "front"},
        ],
    )
    assert out["spec"]["new"] == {"x": 1}
    assert out["spec"]["list"] == [0, 1, 2, 3, 4, 5]
    assert out["spec"]["s"] == "replaced by add"
    assert out["metadata"]["labels"] == {"app": "web", "tier": "front"}
    assert original == doc()  # untouched


def test_remove_replace_with_escapes() -> None:
    out = apply_json_patch(
        doc(),
        [
            {"op": "remove", "path": "/spec/map/a~1b"},
            {"op": "replace", "path": "/spec/map/c~0d", "value": 20},
            {"op": "remove", "path": "/spec/list/1"},
            {"op": "replace", "path": "/spec/list/0", "value": "first"},
        ],
    )
    assert out["spec"]["map"] == {"c~d": 20}
    assert out["spec"]["list"] == ["first", 3]


def test_move_and_copy() -> None:
    out = apply_json_patch(
        doc(),
        [
            {"op": "copy", "from": "/spec/list", "path": "/spec/copied"},
            {"op": "move", "from": "/spec/s", "path": "/metadata/s"},
            {"op": "move", "from": "/spec/list/0", "path": "/spec/list/-"},
            {"op": "move", "from": "/spec/map", "path": "/spec/map"},  # no-op
        ],
    )
    assert out["spec"]["copied"] == [1, 2, 3]
    assert out["spec"]["list"] == [2, 3, 1]
    assert out["metadata"]["s"] == "x"
    assert "s" not in out["spec"]
    # copies are independent values
    out["spec"]["copied"].append(99)
    assert out["spec"]["list"] == [2, 3, 1]


def test_test_op() -> None:
    ops: list[dict[str, Any]] = [
        {"op": "test", "path": "/spec/list", "value": [1, 2, 3]},
        {"op": "test", "path": "/metadata/labels", "value": {"app": "web"}},
        {"op": "test", "path": "/spec/map/a~1b", "value": 1.0},
    ]
    assert apply_json_patch(doc(), ops) == doc()


def test_replace_root_and_add_root() -> None:
    assert apply_json_patch(doc(), [{"op": "replace", "path": "", "value": {"a": 1}}]) == {"a": 1}
    assert apply_json_patch(doc(), [{"op": "add", "path": "", "value": {}}]) == {}


def test_values_are_copied_from_the_patch() -> None:
    value = {"nested": [1]}
    ops = [{"op": "add", "path": "/spec/v", "value": value}]
    out = apply_json_patch(doc(), ops)
    out["spec"]["v"]["nested"].append(2)
    assert value == {"nested": [1]}


def test_atomic_on_failure() -> None:
    original = doc()
    snapshot = copy.deepcopy(original)
    with pytest.raises(Invalid):
        apply_json_patch(
            original,
            [
                {"op": "replace", "path": "/spec/s", "value": "changed"},
                {"op": "remove", "path": "/spec/missing"},
            ],
        )
    assert original == snapshot


@pytest.mark.parametrize(
    ("ops", "message"),
    [
        (
            [
                {"op": "add", "path": "/a", "value": 1},
                {"op": "replace", "path": "/spec/foo", "value": 1},
            ],
            "json patch op 1 (replace /spec/foo): path not found",
        ),
        ([{"op": "remove", "path": "/nope"}], "json patch op 0 (remove /nope): path not found"),
        (
            [{"op": "add", "path": "/spec/x/y", "value": 1}],
            "json patch op 0 (add /spec/x/y): path not found: /spec/x does not exist",
        ),
        (
            [{"op": "add", "path": "/spec/list/9", "value": 1}],
            "json patch op 0 (add /spec/list/9): path not found: array index 9 is out of range "
            "(the array at /spec/list has 3 elements)",
        ),
        (
            [{"op": "replace", "path": "/spec/list/3", "value": 1}],
            "array index 3 is out of range",
        ),
        ([{"op": "remove", "path": "/spec/list/01"}], '"01" is not an array index'),
        ([{"op": "remove", "path": "/spec/list/x"}], '"x" is not an array index'),
        ([{"op": "remove", "path": "/spec/list/-1"}], '"-1" is not an array index'),
        ([{"op": "remove", "path": "/spec/list/-"}], 'path not found: "-" (past the end'),
        (
            [{"op": "add", "path": "/spec/s/x", "value": 1}],
            "the value at /spec/s is a string, not an object or array",
        ),
        (
            [{"op": "test", "path": "/spec/s", "value": "y"}],
            'json patch op 0 (test /spec/s): test failed: the value is "x", expected "y"',
        ),
        ([{"op": "test", "path": "/spec/list/0", "value": True}], "test failed"),
        ([{"op": "add", "path": "/a"}], 'json patch op 0 (add /a): missing "value"'),
        ([{"op": "replace", "path": "/spec/s"}], 'missing "value"'),
        ([{"op": "add", "value": 1}], 'json patch op 0 (add): missing "path"'),
        ([{"op": "move", "path": "/a"}], 'json patch op 0 (move /a): missing "from"'),
        ([{"op": "add", "path": 5, "value": 1}], '"path" must be a string'),
        (
            [{"op": "add", "path": "spec", "value": 1}],
            'JSON pointer "spec" must be empty or start with "/"',
        ),
        ([{"op": "add", "path": "/a~2", "value": 1}], '"~" must be escaped as "~0"'),
        (
            [{"op": "copy", "from": "/nope", "path": "/x"}],
            "json patch op 0 (copy /x): from /nope: path not found",
        ),
        (
            [{"op": "move", "from": "/spec", "path": "/spec/map/inner"}],
            "cannot move /spec into its own child",
        ),
        ([{"op": "remove", "path": ""}], "cannot remove the whole document"),
        (
            [{"op": "bogus", "path": "/a"}],
            'json patch op 0 (bogus /a): unknown op "bogus" (use one of',
        ),
        ([{"path": "/a"}], "unknown op null"),
        ([1], "json patch op 0: must be an object, not a number"),
        ([{"op": "replace", "path": "", "value": [1]}], "json patch result must be an object"),
    ],
)
def test_json_patch_errors(ops: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(Invalid) as info:
        apply_json_patch(doc(), ops)
    assert message in str(info.value)


def test_json_patch_must_be_a_list() -> None:
    with pytest.raises(Invalid, match="must be a list of operations"):
        apply_json_patch(doc(), {"op": "add"})  # type: ignore[arg-type]


def test_empty_patch_is_identity() -> None:
    assert apply_json_patch(doc(), []) == doc()


def test_json_equal() -> None:
    assert json_equal({"a": [1, {"b": 2.0}]}, {"a": [1, {"b": 2}]})
    assert not json_equal(1, True)
    assert not json_equal(0, False)
    assert json_equal(True, True)
    assert not json_equal([1], [1, 2])
    assert not json_equal({"a": 1}, {"b": 1})
    assert not json_equal("1", 1)
    assert json_equal(None, None)
    assert not json_equal(None, {})


# --- merge patch ----------------------------------------------------------------------

# The examples of RFC 7386, appendix A (those with an object target and patch).
RFC7386 = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]


@pytest.mark.parametrize(("target", "patch", "expected"), RFC7386)
def test_merge_patch_rfc_examples(target: dict, patch: dict, expected: dict) -> None:
    before = copy.deepcopy(target)
    assert apply_merge_patch(target, patch) == expected
    assert target == before


def test_merge_patch_does_not_alias() -> None:
    patch = {"spec": {"list": [1, 2]}}
    out = apply_merge_patch(doc(), patch)
    out["spec"]["list"].append(3)
    assert patch == {"spec": {"list": [1, 2]}}
    assert out["spec"]["map"] == doc()["spec"]["map"]
    out["spec"]["map"]["new"] = 1
    assert "new" not in doc()["spec"]["map"]


def test_merge_patch_must_be_an_object() -> None:
    with pytest.raises(Invalid, match="merge patch must be an object"):
        apply_merge_patch(doc(), [1])  # type: ignore[arg-type]


# --- parse_patch ----------------------------------------------------------------------


def test_parse_json_patch_json_and_yaml() -> None:
    text = '[{"op": "replace", "path": "/spec/s", "value": "y"}]'
    patch = parse_patch("json", text)
    assert patch == Patch("json", [{"op": "replace", "path": "/spec/s", "value": "y"}])
    assert patch.apply(doc())["spec"]["s"] == "y"
    yaml_text = "- op: add\n  path: /spec/n\n  value: 3\n"
    assert parse_patch("json", yaml_text).apply(doc())["spec"]["n"] == 3


@pytest.mark.parametrize("kind", ["merge", "strategic"])
def test_parse_merge_and_strategic(kind: str) -> None:
    patch = parse_patch(kind, '{"spec": {"s": null, "t": 1}}')
    assert patch.type == "merge"
    out = patch.apply(doc())
    assert "s" not in out["spec"] and out["spec"]["t"] == 1
    from_yaml = parse_patch(kind, "spec:\n  s: null\n  t: 1\n")
    assert from_yaml == patch


def test_yaml_scalars_stay_json() -> None:
    patch = parse_patch(
        "merge", "a: 2026-01-01T00:00:00Z\nb: 2026-01-01\nc: {1: x}\nd: {true: y}\n"
    )
    assert patch.body == {
        "a": "2026-01-01T00:00:00Z",
        "b": "2026-01-01",
        "c": {"1": "x"},
        "d": {"true": "y"},
    }


@pytest.mark.parametrize(
    ("kind", "text", "message"),
    [
        ("apply", "{}", 'unknown patch type "apply" (use json, merge or strategic)'),
        ("merge", "", "the patch is empty"),
        ("json", "  \n", "the patch is empty"),
        ("merge", "a: [\n", "unable to parse the patch as JSON or YAML"),
        ("merge", "{", "unable to parse the patch as JSON or YAML"),
        ("merge", "[1]", 'a merge patch must be an object, e.g. {"spec": {"x": 1}}; got an array'),
        ("strategic", "3", "a strategic merge patch must be an object"),
        ("json", '{"op": "add"}', "a json patch must be a list of operations"),
        ("json", "[1]", "json patch op 0 must be an object"),
        ("merge", "a: !!binary aGk=", "which JSON cannot hold"),
        ("merge", "a: !!python/object:os.system x", "unable to parse the patch"),
    ],
)
def test_parse_errors(kind: str, text: str, message: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_patch(kind, text)
    assert message in str(info.value)


def test_parse_error_message_is_one_line() -> None:
    with pytest.raises(BadRequest) as info:
        parse_patch("merge", "a: [\n  b\n")
    assert "\n" not in str(info.value)
