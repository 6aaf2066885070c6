"""The naming rules of the object model, in one place (Kubernetes' own rules).

- Object names: a DNS-1123 subdomain (:func:`dns1123_subdomain_problem`); namespaces
  (and so ``metadata.namespace``): a DNS-1123 label (:func:`dns1123_label_problem`);
  RBAC objects: any path segment (:func:`rbac_name_problem`, ``kubevirt.io:migrate``).
- Label keys ``[prefix/]name`` (the prefix a DNS-1123 subdomain) and label values
  (:func:`validate_label_key`, :func:`validate_label_value`); annotation keys follow the
  label-key rule.

The ``*_problem`` functions return why a name is not acceptable (a phrase that completes
``invalid value "x": ...``), or None; the label checks raise ValueError naming the key or
value. The schema (:mod:`vmferry.objects.schema`) and the label selectors
(:mod:`vmferry.objects.labels`) both use these.
"""

from __future__ import annotations

import json
import re

from vmferry.objects.limits import echo

__all__ = [
    "DNS1123_LABEL",
    "DNS1123_LABEL_MAX",
    "DNS1123_SUBDOMAIN",
    "DNS1123_SUBDOMAIN_MAX",
    "LABEL_NAME_MAX",
    "dns1123_label_problem",
    "dns1123_subdomain_problem",
    "rbac_name_problem",
    "validate_label_key",
    "validate_label_value",
]

DNS1123_LABEL_MAX = 63
DNS1123_SUBDOMAIN_MAX = 253
_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS1123_LABEL = re.compile(_LABEL)
"""A DNS-1123 label: lowercase alphanumerics and '-', alphanumeric at both ends."""
DNS1123_SUBDOMAIN = re.compile(rf"{_LABEL}(\.{_LABEL})*")
"""A DNS-1123 subdomain: DNS-1123 labels joined by '.'."""

LABEL_NAME_MAX = 63  # characters of a label key's name part and of a label value
_LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_LABEL_NAME_RULES = (
    "must consist of alphanumeric characters, '-', '_' or '.', and must start and end "
    "with an alphanumeric character (e.g. 'MyName', 'my.name' or '123-abc')"
)


def dns1123_subdomain_problem(name: str) -> str | None:
    """Why ``name`` is not a DNS-1123 subdomain (a valid object name), or None."""
    if len(name) > DNS1123_SUBDOMAIN_MAX:
        return f"must be no more than {DNS1123_SUBDOMAIN_MAX} characters"
    if not DNS1123_SUBDOMAIN.fullmatch(name):
        return (
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric "
            "characters, '-' or '.', and must start and end with an alphanumeric character "
            "(e.g. 'example.com')"
        )
    return None


def dns1123_label_problem(name: str) -> str | None:
    """Why ``name`` is not a DNS-1123 label (a valid namespace name), or None."""
    if len(name) > DNS1123_LABEL_MAX:
        return f"must be no more than {DNS1123_LABEL_MAX} characters"
    if not DNS1123_LABEL.fullmatch(name):
        return (
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters "
            "or '-', and must start and end with an alphanumeric character (e.g. 'my-name')"
        )
    return None


def rbac_name_problem(name: str) -> str | None:
    """Why ``name`` is not a valid RBAC object name (a path segment: ``kubevirt.io:migrate``
    and ``system:masters`` are fine; ``/`` and ``%`` are not), or None."""
    if name in (".", ".."):
        return f"may not be {json.dumps(name)}"
    for bad in ("/", "%"):
        if bad in name:
            return f"may not contain {json.dumps(bad)}"
    return None


def validate_label_key(key: str) -> None:
    """Check a label key (``[prefix/]name``) against the Kubernetes rules.

    The optional prefix is a lowercase DNS subdomain of at most 253 characters; the name
    is 1-63 characters of ``[A-Za-z0-9_.-]`` beginning and ending with an alphanumeric.
    Raises ValueError naming the key and the broken rule.
    """
    if not isinstance(key, str):
        raise ValueError(f"invalid label key {key!r}: must be a string")
    prefix, slash, name = key.rpartition("/")
    if slash and "/" in prefix:
        raise ValueError(
            f"invalid label key {echo(key)}: a label key is a name with an optional DNS "
            f"subdomain prefix and one '/' (e.g. 'example.com/my-name')"
        )
    if slash:
        if not prefix:
            raise ValueError(f"invalid label key {echo(key)}: prefix part must not be empty")
        if len(prefix) > DNS1123_SUBDOMAIN_MAX:
            raise ValueError(
                f"invalid label key {echo(key)}: prefix part must be no more than "
                f"{DNS1123_SUBDOMAIN_MAX} characters"
            )
        if not DNS1123_SUBDOMAIN.fullmatch(prefix):
            raise ValueError(
                f"invalid label key {echo(key)}: prefix part must be a lowercase DNS subdomain: "
                f"lowercase alphanumeric characters, '-' or '.', starting and ending with "
                f"an alphanumeric character (e.g. 'example.com')"
            )
    if not name:
        raise ValueError(f"invalid label key {echo(key)}: name part must not be empty")
    if len(name) > LABEL_NAME_MAX:
        raise ValueError(
            f"invalid label key {echo(key)}: name part must be no more than {LABEL_NAME_MAX} characters"
        )
    if not _LABEL_NAME.fullmatch(name):
        raise ValueError(f"invalid label key {echo(key)}: name part {_LABEL_NAME_RULES}")


def validate_label_value(value: str) -> None:
    """Check a label value: empty, or 1-63 characters of ``[A-Za-z0-9_.-]`` beginning and
    ending with an alphanumeric. Raises ValueError naming the value and the broken rule."""
    if not isinstance(value, str):
        raise ValueError(f"invalid label value {value!r}: must be a string")
    if value == "":
        return
    if len(value) > LABEL_NAME_MAX:
        raise ValueError(
            f"invalid label value {echo(value)}: must be no more than {LABEL_NAME_MAX} characters"
        )
    if not _LABEL_NAME.fullmatch(value):
        raise ValueError(f"invalid label value {echo(value)}: {_LABEL_NAME_RULES}")
