"""A daemon whose HTTP port is taken exits at once with an error naming the port: it
does not hang half started (the gRPC server up, its tasks never stopped)."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest

from vmferry.lab import Lab

EXIT_TIMEOUT = 30.0


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("component", "port_key", "what"),
    [("node1", "metricsPorts", "metrics"), ("controller", "consolePort", "the web console")],
)
def test_a_taken_port_ends_the_daemon_with_a_clear_error(
    tmp_path: Path, component: str, port_key: str, what: str
) -> None:
    lab = Lab(tmp_path / "lab")
    lab.write(1, "4Gi")
    ports = json.loads((lab.dir / "lab.json").read_text())[port_key]
    port = ports["node1"] if isinstance(ports, dict) else ports
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        argv = lab._component(component).argv
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=EXIT_TIMEOUT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"cannot serve {what} on 127.0.0.1:{port}" in proc.stderr
