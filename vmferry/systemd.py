"""Running as a systemd service: readiness, status, watchdog and reload (``sd_notify``).

systemd starts a ``Type=notify`` unit with ``$NOTIFY_SOCKET`` naming an ``AF_UNIX``
datagram socket (a path, or an abstract name written ``@name``); the daemon sends it
newline-separated ``KEY=VALUE`` assignments (sd_notify(3)). No library is needed: it is
one ``sendto`` per message. Outside systemd (``$NOTIFY_SOCKET`` unset: the lab, tests)
every call here does nothing.

What the vmferry daemons send:

1. ``STATUS=...`` at each start-up step, shown by ``systemctl status``;
2. ``READY=1`` once the daemon serves (its listeners are bound and, for the handler,
   its guests re-adopted): systemd holds units ordered ``After=`` it until then;
3. ``WATCHDOG=1`` every half of ``$WATCHDOG_USEC`` from a task on the event loop
   (:meth:`Notifier.run_watchdog`): a loop that stops turning stops the pings, and
   systemd kills and restarts the daemon after ``WatchdogSec=``;
4. ``RELOADING=1`` / ``READY=1`` around a reload (SIGHUP, the units' ``ExecReload=``):
   :class:`ConfigReloader` reads the configuration again and applies the keys that can
   change without a restart (each daemon lists them; ``log_level`` in all three); a
   changed key that cannot is named in a warning, and an invalid file leaves the running
   configuration as it is;
5. ``STOPPING=1`` when a stop signal arrives.

:func:`booted` says whether the host itself runs systemd (the handler then starts each
guest in a transient scope of its own: handler/drivers/scope.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmferry import logs
from vmferry.config import ConfigError

log = logging.getLogger("vmferry.systemd")

NOTIFY_SOCKET = "NOTIFY_SOCKET"
WATCHDOG_USEC = "WATCHDOG_USEC"
WATCHDOG_PID = "WATCHDOG_PID"
# sd_booted(3): systemd creates this directory when it is the init of the host.
BOOTED_MARKER = Path("/run/systemd/system")


def booted(marker: Path = BOOTED_MARKER) -> bool:
    """True when the host runs systemd as its init (sd_booted(3))."""
    return marker.is_dir()


def socket_address(value: str) -> str | bytes:
    """The ``sendto`` address of a ``$NOTIFY_SOCKET`` value: a path, or ``@name`` for
    an abstract socket (a leading NUL byte). Raises ValueError for anything else."""
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    raise ValueError(f"${NOTIFY_SOCKET} {value!r}: expected an absolute path or @abstract-name")


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between two ``WATCHDOG=1`` (half of ``$WATCHDOG_USEC``), or None when
    systemd asks for none, or asks another process (``$WATCHDOG_PID``)."""
    usec = env.get(WATCHDOG_USEC, "")
    if not usec:
        return None
    owner = env.get(WATCHDOG_PID, "")
    if owner and owner != str(pid):
        return None
    if not usec.isdigit() or int(usec) == 0:
        raise ValueError(f"${WATCHDOG_USEC} {usec!r}: expected a positive integer")
    return int(usec) / 1e6 / 2


@dataclass
class Notifier:
    """The daemon's side of sd_notify. ``address`` None: not under systemd, every call
    is a no-op. Sending never blocks (a datagram to a local socket; a full or vanished
    socket is logged once per message and dropped: systemd's state is advisory for us)."""

    address: str | bytes | None
    watchdog_seconds: float | None = None
    clock: Callable[[], float] = time.monotonic
    sent_status: str = field(default="", init=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, pid: int | None = None) -> Notifier:
        """From ``$NOTIFY_SOCKET`` / ``$WATCHDOG_USEC`` (default: this process's
        environment); unset variables give a notifier that does nothing. Raises
        ConfigError for a value that is neither."""
        env = os.environ if env is None else env
        raw = env.get(NOTIFY_SOCKET, "")
        try:
            return cls(
                socket_address(raw) if raw else None,
                watchdog_interval(env, os.getpid() if pid is None else pid),
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None

    @property
    def active(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; True when sent."""
        if self.address is None:
            return False
        message = "\n".join(a.replace("\n", " ") for a in assignments).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            try:
                sock.sendto(message, self.address)
            except OSError as e:
                log.warning("sd_notify %s: %s", assignments[0].split("=")[0], e)
                return False
        return True

    def status(self, text: str) -> None:
        """``STATUS=text`` (shown by ``systemctl status``); repeated text is not resent."""
        if text != self.sent_status and self.send(f"STATUS={text}"):
            self.sent_status = text

    def ready(self, status: str) -> None:
        """The daemon serves: ``READY=1`` with its status."""
        self.sent_status = status
        self.send("READY=1", f"STATUS={status}")

    def stopping(self, status: str = "stopping") -> None:
        self.sent_status = status
        self.send("STOPPING=1", f"STATUS={status}")

    def reloading(self) -> None:
        usec = int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6)
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading the configuration")

    async def run_watchdog(self, status: Callable[[], str] | None = None) -> None:
        """Ping the watchdog every ``watchdog_seconds`` from the event loop, and send
        ``status()`` when it changed; returns at once when systemd asked for no
        watchdog and there is no status to follow. Runs until cancelled."""
        if self.address is None or (self.watchdog_seconds is None and status is None):
            return
        period = self.watchdog_seconds or STATUS_PERIOD
        while True:
            if self.watchdog_seconds is not None:
                self.send("WATCHDOG=1")
            if status is not None:
                self.status(status())
            await asyncio.sleep(period)


STATUS_PERIOD = 5.0  # s; how often a changing status is re-read without a watchdog


Applier = Callable[[Any], None]


@dataclass
class ConfigReloader:
    """SIGHUP: read the configuration again (``load``: the daemon's own parser, so a
    reload validates exactly like a start) and apply what can change live.

    ``live`` maps each key that can change without a restart to the function applying
    its new value; every other changed key is named in a warning (it takes effect at
    the next restart). A file that no longer parses is logged as an error and the
    running configuration is kept."""

    load: Callable[[], dict[str, Any]]
    current: dict[str, Any]
    live: dict[str, Applier]

    def reload(self) -> list[str]:
        """Apply a new configuration; returns the keys applied live."""
        try:
            new = self.load()
        except (ConfigError, SystemExit) as e:  # argparse exits on a bad flag
            log.error("reload: configuration not applied, keeping the running one: %s", e)
            return []
        changed = sorted(
            k for k in set(new) | set(self.current) if new.get(k) != self.current.get(k)
        )
        applied = []
        for key in (k for k in changed if k in self.live):
            try:
                self.live[key](new[key])
            except ValueError as e:
                log.error("reload: %s not applied, keeping %r: %s", key, self.current.get(key), e)
                continue
            self.current[key] = new[key]
            applied.append(key)
        pending = [k for k in changed if k not in self.live]
        if pending:
            log.warning(
                "reload: %s changed but take effect only at the next restart (live: %s)",
                ", ".join(pending),
                ", ".join(sorted(self.live)),
            )
        log.info("reload: applied %s", ", ".join(f"{k}={new[k]}" for k in applied) or "nothing")
        return applied


def live_log_level(value: Any) -> None:
    """The applier of ``log_level`` (every daemon's)."""
    logs.set_level(str(value))


def install_signals(
    loop: asyncio.AbstractEventLoop,
    notifier: Notifier,
    stop: asyncio.Event,
    reloader: ConfigReloader | None = None,
) -> None:
    """SIGTERM/SIGINT: ``STOPPING=1`` and set ``stop``; SIGHUP (with a reloader):
    ``RELOADING=1``, reload, ``READY=1``."""

    def on_stop() -> None:
        notifier.stopping()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop)
    if reloader is None:
        return

    def on_reload() -> None:
        notifier.reloading()
        reloader.reload()
        notifier.ready(notifier.sent_status or "serving")

    loop.add_signal_handler(signal.SIGHUP, on_reload)
