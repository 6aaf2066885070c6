"""Unit tests for vmferry.objects.names: the one place of the naming rules."""

from __future__ import annotations

import pytest

from vmferry.objects.names import (
    dns1123_label_problem,
    dns1123_subdomain_problem,
    rbac_name_problem,
    validate_label_key,
)


@pytest.mark.parametrize("name", ["a", "vm-1", "0abc", "a" * 63])
def test_dns1123_labels(name: str) -> None:
    assert dns1123_label_problem(name) is None
    assert dns1123_subdomain_problem(name) is None


@pytest.mark.parametrize("name", ["example.com", "a.b-c.d", "a" * 253])
def test_subdomains_that_are_not_labels(name: str) -> None:
    assert dns1123_subdomain_problem(name) is None
    assert dns1123_label_problem(name) is not None


@pytest.mark.parametrize("name", ["My-VM", "vm_1", "-vm", "vm-", "vm..1", "", " vm"])
def test_invalid_dns1123_names(name: str) -> None:
    problem = dns1123_subdomain_problem(name)
    assert problem is not None and "RFC 1123 subdomain" in problem
    label_problem = dns1123_label_problem(name)
    assert label_problem is not None and "RFC 1123 label" in label_problem


def test_length_limits() -> None:
    assert dns1123_label_problem("a" * 64) == "must be no more than 63 characters"
    assert dns1123_subdomain_problem("a" * 254) == "must be no more than 253 characters"


@pytest.mark.parametrize("name", ["kubevirt.io:migrate", "system:masters", "Admin_1"])
def test_rbac_names_are_path_segments(name: str) -> None:
    assert rbac_name_problem(name) is None


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        (".", 'may not be "."'),
        ("..", 'may not be ".."'),
        ("a/b", 'may not contain "/"'),
        ("a%b", 'may not contain "%"'),
    ],
)
def test_invalid_rbac_names(name: str, problem: str) -> None:
    assert rbac_name_problem(name) == problem


def test_label_key_prefix_follows_the_subdomain_rule() -> None:
    """A label key's prefix and an object name obey the same DNS-1123 subdomain rule."""
    for prefix in ("example.com", "Example.com", "a_b.io", "a" * 254):
        key = f"{prefix}/name"
        if dns1123_subdomain_problem(prefix) is None:
            validate_label_key(key)
        else:
            with pytest.raises(ValueError, match="prefix part"):
                validate_label_key(key)
