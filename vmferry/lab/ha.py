"""The replicated control plane of ``vmferry lab up --ha``: a 3-member etcd cluster
(``etcd-1`` .. ``etcd-3``, mTLS with the lab's CA) and 3 controller replicas
(``controller-1`` .. ``controller-3``) on it, one of which leads. Each is a lab
component like the others: ``vmferry lab kill controller-1`` / ``lab start etcd-2``.

Loopback mode only. The handlers and the client configuration list every replica's API
address and fail over between them; the replicas share one token signing key (a token
one issues is valid at all).
"""

from __future__ import annotations

import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from vmferry import pki
from vmferry.lab.etcd import EtcdMember, accepts, etcd_binary, missing_reason
from vmferry.lab.ports import free_port

REPLICAS = 3
HOST = "127.0.0.1"
LEASE_SECONDS = 3  # lab: a killed leader is replaced within about this
RENEW_SECONDS = 1
ETCD_TIMEOUT = 30.0


def etcd_names() -> list[str]:
    return [f"etcd-{i}" for i in range(1, REPLICAS + 1)]


def controller_names() -> list[str]:
    return [f"controller-{i}" for i in range(1, REPLICAS + 1)]


def components(ha: dict[str, Any]) -> list[str]:
    """The replicated control plane's components, in start order."""
    return [m["name"] for m in ha["etcd"]] + list(ha["controllers"])


def _members(lab_dir: Path, ha: dict[str, Any]) -> list[EtcdMember]:
    return [
        EtcdMember(m["name"], HOST, m["clientPort"], m["peerPort"], lab_dir / "etcd" / m["name"])
        for m in ha["etcd"]
    ]


def argv(lab_dir: Path, ha: dict[str, Any] | None, name: str) -> list[str] | None:
    """The command line of ``name`` if it is one of the replicated control plane's."""
    if not ha:
        return None
    if name in ha["controllers"]:
        return [sys.executable, "-m", "controller.main", "--config", str(lab_dir / f"{name}.toml")]
    members = _members(lab_dir, ha)
    tls = pki.TlsFiles(*(Path(ha["etcdTls"][k]) for k in ("ca", "cert", "key")))
    for member in members:
        if member.name == name:
            (lab_dir / "etcd").mkdir(exist_ok=True)
            return member.args(members, tls, "vmferry-lab")
    return None


def write(
    lab_dir: Path, pki_dir: Path, server: pki.TlsFiles, node_grace_seconds: int
) -> tuple[dict[str, Any], list[str]]:
    """The etcd members' certificate and layout, the replicas' TOML files and their
    shared signing key; returns (lab.json's "ha", the replicas' API addresses).
    Raises RuntimeError without the etcd binary."""
    from controller.authn import SIGNING_KEY_FILE

    if etcd_binary() is None:
        raise RuntimeError(f"--ha needs etcd: {missing_reason()}")
    etcd_tls = pki.issue_server(pki_dir, "etcd", ips=[HOST], dns=["localhost"])

    members = [
        {"name": n, "clientPort": free_port(HOST), "peerPort": free_port(HOST)}
        for n in etcd_names()
    ]
    endpoints = ",".join(f"{HOST}:{m['clientPort']}" for m in members)
    signing_key = secrets.token_bytes(32)
    controllers: dict[str, int] = {}
    for name in controller_names():
        port = controllers[name] = free_port(HOST)
        data_dir = lab_dir / name
        data_dir.mkdir(parents=True)
        fd = os.open(data_dir / SIGNING_KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(signing_key)
        (lab_dir / f"{name}.toml").write_text(
            f'listen = "{HOST}:{port}"\n'
            f'data_dir = "{data_dir}"\n'
            f'ca = "{server.ca}"\ncert = "{server.cert}"\nkey = "{server.key}"\n'
            f"node_grace_seconds = {node_grace_seconds}\n"
            'store = "etcd"\n'
            f'etcd_endpoints = "{endpoints}"\n'
            f'replica_id = "{name}"\n'
            f"leader_lease_seconds = {LEASE_SECONDS}\n"
            f"leader_renew_seconds = {RENEW_SECONDS}\n"
        )
    ha = {
        "etcd": members,
        "controllers": controllers,
        "etcdTls": {"ca": str(etcd_tls.ca), "cert": str(etcd_tls.cert), "key": str(etcd_tls.key)},
    }
    return ha, [f"{HOST}:{port}" for port in controllers.values()]


def wait_etcd(ha: dict[str, Any], alive: Any, timeout: float = ETCD_TIMEOUT) -> None:
    """Until every member accepts connections; RuntimeError when one exits (``alive``
    tells by name) or the time is up."""
    deadline = time.monotonic() + timeout
    for member in ha["etcd"]:
        while not accepts(HOST, member["clientPort"]):
            if not alive(member["name"]):
                raise RuntimeError(f"{member['name']} exited during start-up")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{member['name']} did not listen within {timeout:.0f}s")
            time.sleep(0.05)
