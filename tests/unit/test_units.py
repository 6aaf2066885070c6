"""The systemd units of deploy/systemd: Type=notify with a watchdog and a reload, and
their ``systemd-analyze security`` exposure (offline: no running systemd needed)."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
# exposure ceilings (README "Install on hosts"); the handler keeps root and CAP_NET_ADMIN
MAX_EXPOSURE = {
    "vmferry-controller.service": 2.0,
    "vmferry-sync-controller.service": 2.0,
    "vmferry-handler.service": 2.5,
}


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNITS / name)
    return parser


@pytest.mark.parametrize("name", sorted(MAX_EXPOSURE))
def test_unit_is_notify_with_watchdog_and_reload(name: str) -> None:
    service = unit(name)["Service"]
    assert service["Type"] == "notify"
    assert service["WatchdogSec"]
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert int(service["LimitNOFILE"]) >= 65536
    assert service["ExecStart"].startswith("/opt/vmferry/venv/bin/vmferry-")


@pytest.mark.parametrize("name", ["vmferry-controller.service", "vmferry-sync-controller.service"])
def test_control_plane_runs_as_vmferry_without_capabilities(name: str) -> None:
    service = unit(name)["Service"]
    assert service["User"] == "vmferry"
    assert service["CapabilityBoundingSet"] == ""


def test_handler_keeps_its_guests_and_one_capability() -> None:
    service = unit("vmferry-handler.service")["Service"]
    assert service["KillMode"] == "process"
    assert service["CapabilityBoundingSet"] == "CAP_NET_ADMIN"
    assert "PrivateTmp" not in service  # re-adopted guests' QMP sockets stay reachable


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(MAX_EXPOSURE))
def test_security_exposure(name: str) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(UNITS / name)],
        capture_output=True,
        text=True,
        timeout=50,
        check=True,
    ).stdout
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
    assert match, out[-500:]
    assert float(match.group(1)) <= MAX_EXPOSURE[name]
