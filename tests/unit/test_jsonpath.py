"""vmferry.objects.jsonpath against what kubectl prints for the same templates.

The expected strings are kubectl's output (client-go's util/jsonpath, with
``--allow-missing-template-keys=false`` unless a test says otherwise); the first data set
is the one of kubectl's JSONPath documentation page.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from vmferry.objects.jsonpath import (
    JsonPathError,
    format_value,
    parse,
    render,
    to_compact_json,
    to_indented_json,
)

DOC_EXAMPLE: dict[str, Any] = {
    "kind": "List",
    "items": [
        {
            "kind": "None",
            "metadata": {
                "name": "127.0.0.1",
                "labels": {"kubernetes.io/hostname": "127.0.0.1"},
            },
            "status": {
                "capacity": {"cpu": "4"},
                "addresses": [{"type": "LegacyHostIP", "address": "127.0.0.1"}],
            },
        },
        {
            "kind": "None",
            "metadata": {"name": "127.0.0.2"},
            "status": {
                "capacity": {"cpu": "8"},
                "addresses": [
                    {"type": "LegacyHostIP", "address": "127.0.0.2"},
                    {"type": "another", "address": "127.0.0.3"},
                ],
            },
        },
    ],
    "users": [
        {"name": "myself", "user": {}},
        {"name": "e2e", "user": {"username": "admin", "password": "secret"}},
    ],
}


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{.kind}", "List"),
        ("{['kind']}", "List"),
        ("{$.kind}", "List"),
        ("{@.kind}", "List"),
        ("{..name}", "127.0.0.1 127.0.0.2 myself e2e"),
        ("{.items[*].metadata.name}", "127.0.0.1 127.0.0.2"),
        ("{.users[0].name}", "myself"),
        ("{.users[-1].name}", "e2e"),
        ("{.items[-1:].metadata.name}", "127.0.0.2"),
        ("{.items[0:1].metadata.name}", "127.0.0.1"),
        ('{.users[?(@.name=="e2e")].user.password}', "secret"),
        ("{.users[?(@.name=='e2e')].user.password}", "secret"),
        (
            "{range .items[*]}[{.metadata.name}, {.status.capacity}] {end}",
            '[127.0.0.1, {"cpu":"4"}] [127.0.0.2, {"cpu":"8"}] ',
        ),
        (
            "{.items[*]['metadata.name', 'status.capacity']}",
            '127.0.0.1 127.0.0.2 {"cpu":"4"} {"cpu":"8"}',
        ),
        ("{.items[0].metadata.labels.kubernetes\\.io/hostname}", "127.0.0.1"),
        ("{.items[0].metadata.labels['kubernetes\\.io/hostname']}", "127.0.0.1"),
        ('{.items[*].status.addresses[?(@.type=="another")].address}', "127.0.0.3"),
        ("{.items[*].status.addresses[*].address}", "127.0.0.1 127.0.0.2 127.0.0.3"),
        ("{.items[1].status.addresses[0,1].type}", "LegacyHostIP another"),
        ("{.users[*].user}", '{} {"password":"secret","username":"admin"}'),
        ("{.users[?(@.user.password)].name}", "e2e"),
        ("{.items[0].status.*}", '{"cpu":"4"} [{"address":"127.0.0.1","type":"LegacyHostIP"}]'),
    ],
)
def test_kubectl_documentation_examples(template: str, expected: str) -> None:
    assert render(template, DOC_EXAMPLE) == expected


VMI: dict[str, Any] = {
    "apiVersion": "kubevirt.io/v1",
    "kind": "VirtualMachineInstance",
    "metadata": {
        "name": "vm1",
        "namespace": "default",
        "generation": 4,
        "labels": {"app.kubernetes.io/name": "db", "kubevirt.io/vm": "vm1"},
    },
    "spec": {"domain": {"memory": {"guest": "1Gi"}}, "evictionStrategy": "LiveMigrate"},
    "status": {
        "phase": "Running",
        "nodeName": "node-a",
        "ready": True,
        "ratio": 0.5,
        "paused": False,
        "missing": None,
        "conditions": [
            {"type": "Ready", "status": "True"},
            {"type": "LiveMigratable", "status": "False", "reason": "DisksNotLiveMigratable"},
        ],
        "migrationState": {"targetNodeAddress": "10.0.0.2:49152", "completed": False},
        "phaseTransitionTimestamps": [
            {"phase": "Pending", "t": 1},
            {"phase": "Scheduling", "t": 2},
            {"phase": "Scheduled", "t": 3},
            {"phase": "Running", "t": 4},
        ],
    },
}


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{.status.phase}", "Running"),
        ("{.status.migrationState.targetNodeAddress}", "10.0.0.2:49152"),
        ("{.metadata.labels['app\\.kubernetes\\.io/name']}", "db"),
        ("{.metadata.labels.app\\.kubernetes\\.io/name}", "db"),
        ('{.status.conditions[?(@.type=="Ready")].status}', "True"),
        ('{.status.conditions[?(@.type == "Ready")].status}', "True"),
        ('{.status.conditions[?(@.type!="Ready")].type}', "LiveMigratable"),
        ("{.status.conditions[?(@.reason)].type}", "LiveMigratable"),
        ("{.status.phaseTransitionTimestamps[?(@.t>2)].phase}", "Scheduled Running"),
        ("{.status.phaseTransitionTimestamps[?(@.t>=2)].phase}", "Scheduling Scheduled Running"),
        ("{.status.phaseTransitionTimestamps[?(@.t<2)].phase}", "Pending"),
        ("{.status.phaseTransitionTimestamps[?(@.t<=2)].phase}", "Pending Scheduling"),
        ("{.status.phaseTransitionTimestamps[?(@.t==2.0)].phase}", "Scheduling"),
        (
            "{.status.phaseTransitionTimestamps[?(@.phase>'Run')].phase}",
            "Scheduling Scheduled Running",
        ),
        ("{.status.phaseTransitionTimestamps[1:3].phase}", "Scheduling Scheduled"),
        ("{.status.phaseTransitionTimestamps[::2].phase}", "Pending Scheduled"),
        ("{.status.phaseTransitionTimestamps[1::2].phase}", "Scheduling Running"),
        ("{.status.phaseTransitionTimestamps[-2:].phase}", "Scheduled Running"),
        ("{.status.phaseTransitionTimestamps[:-3].phase}", "Pending"),
        ("{.status.phaseTransitionTimestamps[-2].phase}", "Scheduled"),
        ("{.status.phaseTransitionTimestamps[0,3].phase}", "Pending Running"),
        ("{.status.phaseTransitionTimestamps[*]['phase']}", "Pending Scheduling Scheduled Running"),
        ("{.status.phaseTransitionTimestamps[2:2].phase}", ""),
        # output formatting
        ("{.metadata.generation}", "4"),
        ("{.status.ready}", "true"),
        ("{.status.paused}", "false"),
        ("{.status.ratio}", "0.5"),
        ("{.status.missing}", "null"),
        ("{.spec}", '{"domain":{"memory":{"guest":"1Gi"}},"evictionStrategy":"LiveMigrate"}'),
        ("{.status.phaseTransitionTimestamps[0]}", '{"phase":"Pending","t":1}'),
        ("{.metadata.name} {.metadata.namespace}", "vm1 default"),
        ("name={.metadata.name}", "name=vm1"),
        ("no braces at all", "no braces at all"),
        ("", ""),
        # literals, escapes, @
        ('{.metadata.name}{"\\n"}', "vm1\n"),
        ('{.metadata.name}{"\\t"}{.status.phase}', "vm1\tRunning"),
        ("{.metadata.name}\\n", "vm1\n"),
        ("{.metadata.name}\\t{.status.phase}\\n", "vm1\tRunning\n"),
        ("{'single quoted'}", "single quoted"),
        ("{@.metadata.namespace}", "default"),
        ("{.spec.domain.memory.guest}", "1Gi"),
    ],
)
def test_vmi_templates(template: str, expected: str) -> None:
    assert render(template, VMI) == expected


def test_at_prints_the_whole_object_as_json() -> None:
    assert render("{@}", {"b": 1, "a": [True, None]}) == '{"a":[true,null],"b":1}'
    assert render("{.}", {"b": 1}) == '{"b":1}'
    assert render("{@}", "plain") == "plain"


def test_range_over_items_with_tabs_and_newlines() -> None:
    data = {
        "items": [
            {"metadata": {"name": "m1"}, "status": {"phase": "Succeeded"}},
            {"metadata": {"name": "m2"}, "status": {"phase": "Running"}},
        ]
    }
    template = '{range .items[*]}{.metadata.name}{"\\t"}{.status.phase}{"\\n"}{end}'
    assert render(template, data) == "m1\tSucceeded\nm2\tRunning\n"
    assert render("{range .items[*]}{@.metadata.name},{end}", data) == "m1,m2,"
    assert render("before {range .items[*]}[{.metadata.name}]{end} after", data) == (
        "before [m1][m2] after"
    )


def test_nested_range() -> None:
    data = {
        "items": [
            {"name": "a", "tags": ["x", "y"]},
            {"name": "b", "tags": []},
            {"name": "c", "tags": ["z"]},
        ]
    }
    template = "{range .items[*]}{.name}:{range .tags[*]}<{@}>{end};{end}"
    assert render(template, data) == "a:<x><y>;b:;c:<z>;"


def test_range_over_nothing_prints_nothing() -> None:
    assert render("{range .items[*]}{.name}{end}done", {"items": []}) == "done"


def test_text_node_between_actions_is_kept_verbatim() -> None:
    assert render("[{.a}] ({.b})", {"a": 1, "b": "x"}) == "[1] (x)"


def test_secret_token_and_escaped_config_map_key() -> None:
    secret = {"data": {"token": "dG9rZW4=", "ca.crt": "LS0t"}}
    assert render("{.data.token}", secret) == "dG9rZW4="
    assert render("{.data.ca\\.crt}", secret) == "LS0t"
    assert render("{.data['ca\\.crt']}", secret) == "LS0t"


def test_quoted_key_with_unescaped_dot_is_a_path_as_in_kubectl() -> None:
    assert render("{['metadata.name']}", VMI) == "vm1"


def test_double_quoted_key() -> None:
    assert render('{.metadata["name"]}', VMI) == "vm1"


def test_recursive_descent_finds_nested_keys_in_document_order() -> None:
    data = {"a": {"name": "1", "b": [{"name": "2"}, {"c": {"name": "3"}}]}, "name": "0"}
    assert render("{..name}", data) == "0 1 2 3"
    assert render("{..c.name}", data) == "3"
    assert render("{.a..name}", data) == "1 2 3"


def test_recursive_then_index_skips_non_lists() -> None:
    data = {"a": [1, 2], "b": {"c": [3]}}
    assert render("{..[0]}", data) == "1 3"


def test_wildcard_field_on_object_and_list() -> None:
    assert render("{.a.*}", {"a": {"x": 1, "y": 2}}) == "1 2"
    assert render("{.a.*}", {"a": [3, 4]}) == "3 4"
    assert render("{.a[*]}", {"a": [3, 4]}) == "3 4"


def test_filter_comparing_with_numbers_and_booleans() -> None:
    data = {"b": [{"p": 8.95, "n": "x", "new": True}, {"p": 22.99, "n": "y", "new": False}]}
    assert render("{.b[?(@.p<10)].n}", data) == "x"
    assert render("{.b[?(@.p>10.5)].n}", data) == "y"
    assert render("{.b[?(@.new==true)].n}", data) == "x"
    assert render("{.b[?(@.new!=true)].n}", data) == "y"
    assert render("{.b[?(@.p==-1)].n}", data) == ""


def test_filter_comparing_two_fields_of_the_element() -> None:
    data = {"x": [{"a": 1, "b": 1, "n": "eq"}, {"a": 1, "b": 2, "n": "lt"}]}
    assert render("{.x[?(@.a==@.b)].n}", data) == "eq"
    assert render("{.x[?(@.a<@.b)].n}", data) == "lt"


def test_filter_on_a_list_of_scalars() -> None:
    assert render('{.x[?(@=="b")]}', {"x": ["a", "b", "c"]}) == "b"
    assert render("{.x[?(@>1)]}", {"x": [1, 2, 3]}) == "2 3"


def test_filter_with_quote_and_paren_in_string() -> None:
    data = {"x": [{"m": "a) b", "n": 1}, {"m": "c", "n": 2}]}
    assert render('{.x[?(@.m=="a) b")].n}', data) == "1"


def test_filter_skips_elements_without_the_key() -> None:
    data = {"c": [{"status": "True"}, {"type": "Ready", "status": "False"}]}
    assert render('{.c[?(@.type=="Ready")].status}', data) == "False"


def test_filter_on_a_missing_list_allowed_missing_keys() -> None:
    data: dict[str, Any] = {"status": {}}
    template = '{.status.conditions[?(@.type=="Ready")].status}'
    assert render(template, data, allow_missing_keys=True) == ""
    with pytest.raises(JsonPathError, match='key "conditions" not found'):
        render(template, data)


def test_ordering_a_string_with_a_number_is_an_error() -> None:
    with pytest.raises(JsonPathError, match="cannot compare"):
        render("{.x[?(@.a<1)]}", {"x": [{"a": "s"}]})
    # equality between different types is just false, as in kubectl's eq/ne on basic kinds
    assert render("{.x[?(@.a==1)]}", {"x": [{"a": "1"}]}) == ""


def test_number_formatting_follows_go() -> None:
    assert format_value(2.0) == "2"
    assert format_value(1.5) == "1.5"
    assert format_value(1e20) == "100000000000000000000"
    assert format_value(1e21) == "1e+21"
    assert format_value(0.00001) == "1e-05"
    assert format_value(0.0001) == "0.0001"
    assert format_value(-3) == "-3"
    assert format_value(10**20) == "100000000000000000000"
    assert to_compact_json([2.0, 1e-7, 1e21, 0.00001, -0.5]) == "[2,1e-7,1e+21,0.00001,-0.5]"


def test_compact_json_sorts_keys_and_keeps_unicode() -> None:
    assert to_compact_json({"b": "é", "a": {"d": None, "c": [True]}}) == (
        '{"a":{"c":[true],"d":null},"b":"é"}'
    )
    assert to_compact_json({"s": 'quote " and \n'}) == '{"s":"quote \\" and \\n"}'


def test_indented_json() -> None:
    assert to_indented_json({"b": [1, {}], "a": []}) == (
        '{\n    "a": [],\n    "b": [\n        1,\n        {}\n    ]\n}'
    )


def test_as_json_wraps_each_action_in_a_list() -> None:
    data = {"items": [{"n": "a"}, {"n": "b"}]}
    assert render("{.items[*].n}", data, as_json=True) == '[\n    "a",\n    "b"\n]\n'
    assert render("{.nothing}", data, as_json=True, allow_missing_keys=True) == "[]\n"


# --- errors -----------------------------------------------------------------------------


def test_missing_key_is_an_error_naming_template_and_key() -> None:
    with pytest.raises(JsonPathError) as info:
        render("{.status.phasee}", VMI)
    assert str(info.value) == 'error executing jsonpath "{.status.phasee}": key "phasee" not found'
    assert info.value.position is None
    assert isinstance(info.value, ValueError)


def test_missing_key_allowed_prints_nothing() -> None:
    assert render("{.status.migrationState.nope}", VMI, allow_missing_keys=True) == ""
    assert render("a{.x.y.z}b", {}, allow_missing_keys=True) == "ab"


def test_missing_key_in_some_items_only_is_not_an_error() -> None:
    data = {"items": [{"n": 1}, {}, {"n": 3}]}
    assert render("{.items[*].n}", data) == "1 3"


def test_field_of_empty_list_is_empty_not_an_error() -> None:
    assert render("{.items[*].metadata.name}", {"items": []}) == ""


def test_field_of_null_is_missing() -> None:
    with pytest.raises(JsonPathError, match='key "b" not found'):
        render("{.a.b}", {"a": None})


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{.items[5]}", "array index out of bounds: index 5, length 2"),
        ("{.items[-3]}", "array index out of bounds: index -1, length 2"),
        ("{.items[0:5]}", "array index out of bounds: index 4, length 2"),
        ("{.items[1:0]}", "starting index 1 is greater than ending index 0"),
        ("{.items[0:2:0]}", "step must be > 0"),
        ("{.kind[0]}", "string is not an array"),
        ("{.kind[?(@.a)]}", "string is not an array and cannot be filtered"),
    ],
)
def test_index_errors_like_kubectl(template: str, message: str) -> None:
    with pytest.raises(JsonPathError, match=message.replace("[", r"\[")):
        render(template, {"kind": "List", "items": [1, 2]}, allow_missing_keys=True)


def test_index_of_empty_list_is_an_error_even_allowing_missing_keys() -> None:
    # kubectl: "array index out of bounds: index 0, length 0"
    with pytest.raises(JsonPathError, match="index 0, length 0"):
        render("{.items[0]}", {"items": []}, allow_missing_keys=True)
    with pytest.raises(JsonPathError, match="index -1, length 0"):
        render("{.items[-1:]}", {"items": []}, allow_missing_keys=True)


def test_comparing_several_values_at_once_is_an_error() -> None:
    with pytest.raises(JsonPathError, match="one element at a time"):
        render("{.x[?(@.a[*]==1)]}", {"x": [{"a": [1, 2]}]})


@pytest.mark.parametrize(
    ("template", "message", "position"),
    [
        ("{.items[0}", 'unterminated array index: missing "]"', 7),
        ("{.a", 'unclosed action: missing "}"', 3),
        ("x{.a", 'unclosed action: missing "}"', 4),
        ("{end}", "not in range, nothing to end", 0),
        ("ok {range .items[*]}{.a}", "range without a matching {end}", 3),
        ('{.items[?(@.a=="x")}', 'unclosed filter: expected "]" after ")"', 19),
        ("{.items[?(@.a=='x']}", 'unterminated filter: missing ")"', 7),
        ("{foo}", "unrecognized identifier 'foo'", 1),
        ("{.a[x]}", "invalid array index [x]", 4),
        ("{.a[]}", "empty array index []", 4),
        ("{.a[1:2:3:4]}", "invalid array index [1:2:3:4]", 4),
        ('{"abc}', "unterminated quoted string", 1),
        ("{..  ..a}", "invalid multiple recursive descent", 5),
        ("{.a[?(@.b=~1)]}", "unrecognized filter operator '=~'", 9),
        ("{.a[?(==1)]}", "filter operator '==' needs an operand on each side", 6),
        ("{.a # b}", "unrecognized character in action: '#'", 4),
        ("{range}", "range needs a path", 0),
        ("{.a}{range .b[*]}{end}{end}", "not in range, nothing to end", 22),
        ("{.a end}", '"range" and "end" must stand at the start of an action', 0),
        ("{.a\n}", 'unclosed action: missing "}" before the end of the line', 3),
    ],
)
def test_parse_errors_say_what_and_where(template: str, message: str, position: int) -> None:
    with pytest.raises(JsonPathError) as info:
        parse(template)
    error = info.value
    assert str(error).startswith(f"error parsing jsonpath {_quoted(template)}: {message}")
    assert str(error).endswith(f"(at position {position + 1})")
    assert error.position == position


def _quoted(text: str) -> str:
    return json.dumps(text)


def test_trailing_recursive_descent_yields_every_container() -> None:
    assert render("{.a..}", {"a": {"b": [1]}}) == '{"b":[1]} [1]'


def test_filter_on_the_element_itself() -> None:
    assert render("{.x[?(@)]}", {"x": ["a", None, 0]}) == "a null 0"


def test_parse_is_separate_from_execution() -> None:
    template = parse("{.metadata.name}")
    assert template.source == "{.metadata.name}"
    assert template.execute({"metadata": {"name": "a"}}) == "a"
    assert template.execute({"metadata": {"name": "b"}}) == "b"
    assert template.find_results({"metadata": {"name": "a"}}) == [["a"]]


def test_find_results_groups_values_per_action() -> None:
    data = {"items": [{"n": 1}, {"n": 2}]}
    assert parse("x{.items[*].n}{range .items[*]}{.n}{end}").find_results(data) == [
        ["x"],
        [1, 2],
        [1],
        [2],
    ]
