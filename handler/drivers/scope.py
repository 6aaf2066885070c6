"""Each guest in a transient systemd scope of its own under ``machine.slice`` (as libvirt
does), when the handler runs as a systemd service.

A scope groups processes that something else started: the handler asks the system
manager (D-Bus ``org.freedesktop.systemd1.Manager.StartTransientUnit``, through
``busctl``, which every systemd host has) to make ``vmferry-<vm id>-<pid>.scope`` in
``machine.slice`` holding the guest's pid. From then on the guest is out of the
handler's cgroup: stopping or restarting ``vmferry-handler`` never kills it (the
restarted handler re-adopts it from its runtime files, as without systemd), and
``systemd-cgtop`` / ``systemctl status`` account each guest's CPU and memory apart.

Without systemd (the lab, tests, a handler started by hand) guests stay where they are
started, in sessions of their own, as before. A scope that cannot be made is logged and
the guest runs on in the handler's cgroup (the unit's ``KillMode=process`` still keeps
a handler restart from killing it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from vmferry import systemd

log = logging.getLogger("vmferry.handler.scope")

SLICE = "machine.slice"
BUSCTL_TIMEOUT_S = 10.0  # a job start is milliseconds; a hung bus must not hold a guest start
_UNIT_UNSAFE = re.compile(r"[^A-Za-z0-9_.:-]")

# Runs an argv; returns (exit code, stdout, stderr).
Runner = Callable[[list[str]], Awaitable[tuple[int, str, str]]]


def scope_name(vm_id: str, pid: int) -> str:
    """``vmferry-<vm id>-<pid>.scope`` (characters a unit name cannot hold become ``_``;
    the pid keeps it unique while an earlier guest of the same id still exits)."""
    return f"vmferry-{_UNIT_UNSAFE.sub('_', vm_id)}-{pid}.scope"


def start_transient_scope_argv(name: str, pid: int, description: str) -> list[str]:
    """The ``busctl`` call making scope ``name`` of ``pid`` in machine.slice."""
    return [
        "busctl",
        "call",
        "--system",
        "--quiet",
        "org.freedesktop.systemd1",
        "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager",
        "StartTransientUnit",
        "ssa(sv)a(sa(sv))",
        name,
        "fail",
        "4",
        "PIDs",
        "au",
        "1",
        str(pid),
        "Slice",
        "s",
        SLICE,
        "Description",
        "s",
        description,
        "CollectMode",
        "s",
        "inactive-or-failed",
        "0",
    ]


async def run_argv(argv: list[str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(BUSCTL_TIMEOUT_S):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return -1, "", f"no answer within {BUSCTL_TIMEOUT_S:.0f}s"
    return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


@dataclass
class GuestScopes:
    """Places guests in scopes (``enabled``) or does nothing."""

    enabled: bool
    run: Runner = run_argv

    @classmethod
    def detect(cls) -> GuestScopes:
        """Enabled when this handler is a systemd service (``$NOTIFY_SOCKET``) of a host
        that runs systemd, as root (the system manager's D-Bus API needs it)."""
        enabled = systemd.booted() and systemd.Notifier.from_env().active and os.geteuid() == 0
        if enabled:
            log.info("guests run in scopes of their own under %s", SLICE)
        return cls(enabled)

    async def place(self, vm_id: str, pid: int) -> str | None:
        """Move guest ``pid`` into a new scope; returns the scope's name, or None when
        disabled or when it failed (logged: the guest runs on where it is)."""
        if not self.enabled:
            return None
        name = scope_name(vm_id, pid)
        argv = start_transient_scope_argv(name, pid, f"vmferry guest {vm_id}")
        try:
            code, _, err = await self.run(argv)
        except OSError as e:  # busctl missing
            code, err = -1, str(e)
        if code != 0:
            log.warning(
                "guest %s (pid %d) stays in the handler's cgroup: scope %s not created: %s",
                vm_id,
                pid,
                name,
                err.strip() or f"busctl exit code {code}",
            )
            return None
        log.info("guest %s (pid %d) in %s/%s", vm_id, pid, SLICE, name)
        return name


NO_SCOPES = GuestScopes(enabled=False)
