"""handler/drivers/scope.py: the D-Bus call that puts a guest in its own scope under
machine.slice, and what happens when it cannot (a fake runner stands in for busctl)."""

from __future__ import annotations

import asyncio

import pytest

from handler.drivers.scope import NO_SCOPES, GuestScopes, scope_name


def test_scope_name_is_a_valid_unique_unit_name() -> None:
    assert scope_name("default/vm1@x", 4242) == "vmferry-default_vm1_x-4242.scope"
    assert scope_name("abc-incoming", 7) == "vmferry-abc-incoming-7.scope"


def test_a_guest_is_placed_in_machine_slice() -> None:
    calls: list[list[str]] = []

    async def runner(argv: list[str]) -> tuple[int, str, str]:
        calls.append(argv)
        return 0, "o /org/freedesktop/systemd1/job/7\n", ""

    scopes = GuestScopes(enabled=True, run=runner)
    assert asyncio.run(scopes.place("uid-1", 4242)) == "vmferry-uid-1-4242.scope"
    (argv,) = calls
    assert argv[:8] == [
        "busctl",
        "call",
        "--system",
        "--quiet",
        "org.freedesktop.systemd1",
        "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager",
        "StartTransientUnit",
    ]
    assert argv[8:12] == ["ssa(sv)a(sa(sv))", "vmferry-uid-1-4242.scope", "fail", "4"]
    assert argv[12:16] == ["PIDs", "au", "1", "4242"]
    assert argv[16:19] == ["Slice", "s", "machine.slice"]
    assert argv[-1] == "0"  # no auxiliary units


def test_a_refused_scope_leaves_the_guest_running_and_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def runner(argv: list[str]) -> tuple[int, str, str]:
        return 1, "", "Call failed: Access denied\n"

    assert asyncio.run(GuestScopes(enabled=True, run=runner).place("uid-1", 9)) is None
    assert "guest uid-1 (pid 9) stays in the handler's cgroup" in caplog.text
    assert "Access denied" in caplog.text


def test_busctl_missing(caplog: pytest.LogCaptureFixture) -> None:
    async def runner(argv: list[str]) -> tuple[int, str, str]:
        raise FileNotFoundError("No such file or directory: 'busctl'")

    assert asyncio.run(GuestScopes(enabled=True, run=runner).place("uid-1", 9)) is None
    assert "'busctl'" in caplog.text


def test_without_systemd_nothing_runs() -> None:
    assert asyncio.run(NO_SCOPES.place("uid-1", 9)) is None
