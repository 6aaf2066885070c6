"""The controller as systemd runs it: READY=1 once it serves, watchdog pings, SIGHUP
re-reads its TOML file between RELOADING=1 and READY=1, STOPPING=1 on SIGTERM, and
journald priorities on its log lines (a real process; a socket stands in for systemd's)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmferry.lab.ports import free_port

WAIT = 30.0  # s; the controller's start-up on a loaded 2-core machine stays well under it


def receive_until(sock: socket.socket, wanted: str, seen: list[str]) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        message = sock.recv(4096).decode()
        seen.append(message)
        if message.split("\n")[0] == wanted:
            return
    raise AssertionError(f"no {wanted} within {WAIT}s; received {seen}")


@pytest.mark.timeout(90)
def test_controller_speaks_sd_notify(tmp_path: Path) -> None:
    config = tmp_path / "controller.toml"
    toml = (
        f'listen = "127.0.0.1:{free_port("127.0.0.1")}"\n'
        f'data_dir = "{tmp_path / "data"}"\n'
        "insecure_plaintext = true\n"
        'log_level = "info"\n'
    )
    config.write_text(toml)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    stderr_path = tmp_path / "stderr"
    with stderr_path.open("w") as stderr:
        st = os.fstat(stderr.fileno())
        env = dict(
            os.environ,
            NOTIFY_SOCKET=str(tmp_path / "notify"),
            WATCHDOG_USEC="1000000",
            JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}",
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "controller.main", "--config", str(config)],
            env=env,
            stderr=stderr,
            stdout=subprocess.DEVNULL,
        )
    seen: list[str] = []
    try:
        receive_until(notify, "READY=1", seen)
        assert seen[-1].startswith("READY=1\nSTATUS=serving the API on 127.0.0.1:")
        assert any(m.startswith("STATUS=opening the store") for m in seen)
        receive_until(notify, "WATCHDOG=1", seen)

        config.write_text(toml.replace('"info"', '"debug"') + "node_grace_seconds = 20\n")
        proc.send_signal(signal.SIGHUP)
        receive_until(notify, "RELOADING=1", seen)
        receive_until(notify, "READY=1", seen)

        proc.send_signal(signal.SIGTERM)
        receive_until(notify, "STOPPING=1", seen)
        assert proc.wait(WAIT) == 0
    finally:
        notify.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = stderr_path.read_text()
    assert "<6>ts=" in log
    assert "reload: applied log_level=debug, node_grace_seconds=20" in log
    lines = log.splitlines()
    assert all(line.startswith("<") for line in lines), lines[:3]
