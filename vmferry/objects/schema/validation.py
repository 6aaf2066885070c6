"""``validate``: check a whole manifest against its kind's schema, then its identity.

Beyond the fields (:data:`~vmferry.objects.schema.registry.SCHEMAS`), a manifest's
identity is checked here: ``apiVersion`` must be its kind's, ``metadata.name`` (or the
``generateName`` prefix) must follow the kind's naming rule, ``metadata.namespace`` is
a DNS-1123 label and only allowed on namespaced kinds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vmferry.errors import Invalid
from vmferry.objects import limits
from vmferry.objects.kinds import by_kind
from vmferry.objects.names import dns1123_label_problem
from vmferry.objects.schema.dsl import Errors, expected_type, quote
from vmferry.objects.schema.registry import SCHEMAS, top_level


def validate(obj: object, *, server_managed: bool = False) -> dict[str, Any]:
    """Check a manifest of any registered kind; return a normalized deep copy.

    ``server_managed=False`` (a user's manifest): ``status`` may be present and is
    type-checked (the API ignores it later); ``metadata.name`` may be left to
    ``metadata.generateName``. ``server_managed=True`` (an object as the server stores
    it, e.g. a status update): ``metadata.name`` is required.

    Defaults are not applied; see :func:`apply_defaults`.

    Raises BadRequest when ``kind`` names no registered kind, and Invalid listing every
    problem (``Kind "name": path: problem; path: problem``) otherwise.
    """
    if not isinstance(obj, Mapping):
        raise Invalid(f"manifest: {expected_type('object', obj)}")
    kind = obj.get("kind")
    if kind is None or kind == "":
        raise Invalid(
            'kind: required field is missing (every manifest names its kind, e.g. "kind: VirtualMachine")'
        )
    if not isinstance(kind, str):
        raise Invalid(f"kind: {expected_type('string', kind)}")
    kind_info = by_kind(kind)
    schema = top_level(kind)
    limits.check_object(obj, _subject(kind, obj))  # depth, Unicode, size: before the rest

    errors = Errors()
    out = schema.check(obj, "", errors)
    assert isinstance(out, dict)

    api_version = out.get("apiVersion")
    expected = kind_info.api_version
    if api_version is None:
        errors.add(
            "apiVersion", f'required field is missing (expected "{expected}" for kind {kind})'
        )
    elif isinstance(api_version, str) and api_version != expected:
        errors.add("apiVersion", f'expected "{expected}" for kind {kind}, got {quote(api_version)}')

    metadata = out.get("metadata")
    if metadata is None:
        metadata = {}
    if isinstance(metadata, dict):
        _check_metadata(metadata, kind, kind_info.namespaced, server_managed, errors)

    if errors:
        # Identity problems (apiVersion, kind, metadata) first, then the body in order.
        head = ("apiVersion", "kind", "metadata")
        lines = sorted(errors.lines, key=lambda line: not line.startswith(head))
        if len(lines) > limits.MAX_PROBLEMS:
            more = len(lines) - limits.MAX_PROBLEMS
            lines = [*lines[: limits.MAX_PROBLEMS], f"and {more} more problems"]
        raise Invalid(f"{_subject(kind, obj)}: " + "; ".join(lines))
    return out


def _check_metadata(
    metadata: dict[str, Any],
    kind: str,
    namespaced: bool,
    server_managed: bool,
    errors: Errors,
) -> None:
    name_problem = SCHEMAS[kind].name_problem
    name = metadata.get("name")
    generate_name = metadata.get("generateName")
    if isinstance(name, str) and name:
        problem = name_problem(name)
        if problem:
            errors.add("metadata.name", f"invalid value {quote(name)}: {problem}")
    elif name is None or name == "":
        if server_managed:
            errors.add("metadata.name", "required field is missing")
        elif not generate_name:
            errors.add("metadata.name", "required field is missing (or set metadata.generateName)")
    if isinstance(generate_name, str) and generate_name:
        # As Kubernetes does: a trailing '-' is fine in a prefix.
        masked = generate_name[:-1] + "a" if generate_name.endswith("-") else generate_name
        problem = name_problem(masked)
        if problem:
            errors.add("metadata.generateName", f"invalid value {quote(generate_name)}: {problem}")

    namespace = metadata.get("namespace")
    if namespace is not None:
        if not namespaced:
            errors.add(
                "metadata.namespace",
                f"not allowed: {kind} is cluster-scoped (remove metadata.namespace)",
            )
        elif isinstance(namespace, str):
            problem = dns1123_label_problem(namespace)
            if problem:
                errors.add("metadata.namespace", f"invalid value {quote(namespace)}: {problem}")


def _subject(kind: str, obj: Mapping[str, Any]) -> str:
    metadata = obj.get("metadata")
    if isinstance(metadata, Mapping):
        name = metadata.get("name")
        if isinstance(name, str) and name:
            return f"{kind} {quote(name)}"
        generate_name = metadata.get("generateName")
        if isinstance(generate_name, str) and generate_name:
            return f"{kind} (generateName {quote(generate_name)})"
    return kind
