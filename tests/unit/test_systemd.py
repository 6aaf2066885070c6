"""vmferry/systemd.py and the journald side of vmferry/logs.py, against a real AF_UNIX
datagram socket standing in for systemd's notification socket."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmferry import logs, systemd
from vmferry.config import ConfigError


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.setblocking(False)
    yield sock, path
    sock.close()


def drain(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


def test_socket_address_path_and_abstract() -> None:
    assert systemd.socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert systemd.socket_address("@vmferry/x") == b"\0vmferry/x"
    with pytest.raises(ValueError, match="expected an absolute path or @abstract-name"):
        systemd.socket_address("relative/notify")


def test_from_env_rejects_bad_values_with_the_variable_named() -> None:
    with pytest.raises(ConfigError, match=r"\$NOTIFY_SOCKET 'x'"):
        systemd.Notifier.from_env({"NOTIFY_SOCKET": "x"})
    with pytest.raises(ConfigError, match=r"\$WATCHDOG_USEC 'soon'"):
        systemd.Notifier.from_env({"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "soon"})


def test_watchdog_interval_is_half_and_only_for_this_pid() -> None:
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000"}, 7) == 15.0
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, 7) == 15.0
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "8"}, 7) is None
    assert systemd.watchdog_interval({}, 7) is None


def test_without_systemd_nothing_is_sent() -> None:
    sd = systemd.Notifier.from_env({})
    assert not sd.active
    assert sd.send("READY=1") is False
    sd.ready("serving")  # no error


def test_ready_status_and_stopping(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    sd = systemd.Notifier.from_env({"NOTIFY_SOCKET": path})
    sd.status("opening the store")
    sd.status("opening the store")  # unchanged: not resent
    sd.ready("serving the API on 192.0.2.1:7443")
    sd.stopping()
    assert drain(sock) == [
        "STATUS=opening the store",
        "READY=1\nSTATUS=serving the API on 192.0.2.1:7443",
        "STOPPING=1\nSTATUS=stopping",
    ]


def test_abstract_socket() -> None:
    name = f"vmferry-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        systemd.Notifier.from_env({"NOTIFY_SOCKET": "@" + name}).ready("up")
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"


def test_a_vanished_socket_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sd = systemd.Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert sd.send("READY=1") is False
    assert "sd_notify READY" in caplog.text


def test_watchdog_pings_from_the_event_loop_and_a_stuck_loop_stops_them(
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    # 20 ms watchdog: a ping every 10 ms
    sd = systemd.Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000"})
    assert sd.watchdog_seconds == 0.01

    async def scenario() -> tuple[int, int]:
        task = asyncio.create_task(sd.run_watchdog())
        await asyncio.sleep(0.1)
        turning = drain(sock)
        time.sleep(0.2)  # noqa: ASYNC251 - the loop is stuck on purpose: no ping meanwhile
        stuck = drain(sock)
        task.cancel()
        return len(turning), len(stuck)

    turning, stuck = asyncio.run(scenario())
    assert turning >= 3
    assert stuck == 0


def test_watchdog_follows_a_status(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    sd = systemd.Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000"})
    guests = [0]

    async def scenario() -> None:
        task = asyncio.create_task(sd.run_watchdog(lambda: f"{guests[0]} guest(s)"))
        await asyncio.sleep(0.05)
        guests[0] = 2
        await asyncio.sleep(0.05)
        task.cancel()

    asyncio.run(scenario())
    statuses = [m for m in drain(sock) if m.startswith("STATUS=")]
    assert statuses == ["STATUS=0 guest(s)", "STATUS=2 guest(s)"]


def make_reloader(files: list[dict[str, Any] | Exception]) -> tuple[systemd.ConfigReloader, list]:
    applied: list[tuple[str, Any]] = []

    def load() -> dict[str, Any]:
        item = files.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    def grace(v: Any) -> None:
        if v < 0:
            raise ValueError("node_grace_seconds must be positive")
        applied.append(("node_grace_seconds", v))

    reloader = systemd.ConfigReloader(
        load,
        {"log_level": "info", "node_grace_seconds": 10, "listen": "192.0.2.1:7443"},
        {"log_level": lambda v: applied.append(("log_level", v)), "node_grace_seconds": grace},
    )
    return reloader, applied


def test_reload_applies_live_keys_and_names_the_others(caplog: pytest.LogCaptureFixture) -> None:
    new = {"log_level": "debug", "node_grace_seconds": 10, "listen": "192.0.2.2:7443"}
    reloader, applied = make_reloader([new])
    with caplog.at_level(logging.INFO, "vmferry.systemd"):
        assert reloader.reload() == ["log_level"]
    assert applied == [("log_level", "debug")]
    assert reloader.current["log_level"] == "debug"
    assert reloader.current["listen"] == "192.0.2.1:7443"  # still the running one
    assert "listen changed but take effect only at the next restart" in caplog.text


def test_reload_of_a_bad_file_keeps_the_running_configuration(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bad_value = {"log_level": "info", "node_grace_seconds": -1, "listen": "192.0.2.1:7443"}
    reloader, applied = make_reloader([ConfigError("x.toml: not valid TOML"), bad_value])
    assert reloader.reload() == []
    assert "configuration not applied, keeping the running one: x.toml: not valid TOML" in (
        caplog.text
    )
    assert reloader.reload() == []
    assert "node_grace_seconds not applied, keeping 10: node_grace_seconds must be" in caplog.text
    assert applied == []
    assert reloader.current["node_grace_seconds"] == 10


def test_sighup_reloads_between_reloading_and_ready(
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    sd = systemd.Notifier.from_env({"NOTIFY_SOCKET": path})
    new = {"log_level": "debug", "node_grace_seconds": 10, "listen": "192.0.2.1:7443"}
    reloader, applied = make_reloader([new])

    async def scenario() -> bool:
        stop = asyncio.Event()
        systemd.install_signals(asyncio.get_running_loop(), sd, stop, reloader)
        sd.ready("serving")
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(100):
            if applied:
                break
            await asyncio.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(stop.wait(), 5)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        return stop.is_set()

    assert asyncio.run(scenario())
    assert applied == [("log_level", "debug")]
    messages = [m.split("\n")[0] for m in drain(sock)]
    assert messages == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]


def test_journal_priorities() -> None:
    assert [logs.priority(lv) for lv in (10, 20, 30, 40, 50)] == [7, 6, 4, 3, 2]
    assert logs.priority(25) == 4  # a custom level between INFO and WARNING
    record = logging.LogRecord("vmferry.x", logging.ERROR, "f", 1, "migration failed", (), None)
    line = logs.LogfmtFormatter("handler/n1", journal=True).format(record)
    assert line.startswith("<3>ts=")
    assert 'msg="migration failed"' in line
    assert not logs.LogfmtFormatter("handler/n1").format(record).startswith("<")


def test_journal_stream_matches_the_device_and_inode(tmp_path: Path) -> None:
    with (tmp_path / "stderr").open("w") as stream:
        st = os.fstat(stream.fileno())
        assert logs.journal_stream(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not logs.journal_stream(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not logs.journal_stream(stream, {"JOURNAL_STREAM": "garbage"})
        assert not logs.journal_stream(stream, {})
    assert not logs.journal_stream(io.StringIO(), {"JOURNAL_STREAM": "1:2"})


def test_set_level_rejects_an_unknown_level() -> None:
    with pytest.raises(ValueError, match="log level 'loud': expected one of debug, info"):
        logs.set_level("loud")
