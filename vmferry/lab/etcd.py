"""Local etcd clusters for the lab and the tests: Debian's ``etcd`` binary
(``etcd-server``), one process per member, on 127.0.0.1 with free ports, optionally
with the project CA's TLS for clients and peers.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vmferry.lab.ports import free_port
from vmferry.pki import TlsFiles

ETCD_PACKAGE = "etcd-server"


def etcd_binary() -> str | None:
    """The etcd server on PATH (or in /usr/bin, Debian's place), or None."""
    return shutil.which("etcd") or (
        "/usr/bin/etcd" if os.access("/usr/bin/etcd", os.X_OK) else None
    )


def missing_reason() -> str:
    return f"no etcd binary (install Debian's {ETCD_PACKAGE}: make test-deps does as root)"


@dataclass(frozen=True, slots=True)
class EtcdMember:
    """One member: its name, its client and peer ports, its data directory."""

    name: str
    host: str
    client_port: int
    peer_port: int
    data_dir: Path

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    def args(self, cluster: Sequence[EtcdMember], tls: TlsFiles | None, token: str) -> list[str]:
        """The command line of this member in ``cluster``."""
        scheme = "http" if tls is None else "https"
        binary = etcd_binary() or "etcd"
        client_url = f"{scheme}://{self.host}:{self.client_port}"
        peer_url = f"{scheme}://{self.host}:{self.peer_port}"
        initial = ",".join(f"{m.name}={scheme}://{m.host}:{m.peer_port}" for m in cluster)
        args = [
            binary,
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster={initial}",
            f"--initial-cluster-token={token}",
            "--initial-cluster-state=new",
            "--logger=zap",
            "--log-level=error",
            # Short raft timings: a lab member's loss is noticed in about a second.
            "--heartbeat-interval=100",
            "--election-timeout=1000",
        ]
        if tls is not None:
            for prefix in ("", "peer-"):
                args += [
                    f"--{prefix}cert-file={tls.cert}",
                    f"--{prefix}key-file={tls.key}",
                    f"--{prefix}trusted-ca-file={tls.ca}",
                    f"--{prefix}client-cert-auth",
                ]
        return args


@dataclass
class EtcdCluster:
    """A running (or stopped) local cluster. ``start()``; ``stop()``; ``kill(name)``."""

    members: list[EtcdMember]
    tls: TlsFiles | None = None
    log_dir: Path | None = None
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @classmethod
    def plan(
        cls, base: Path, size: int = 1, *, tls: TlsFiles | None = None, host: str = "127.0.0.1"
    ) -> EtcdCluster:
        """Members ``etcd-1`` .. ``etcd-<size>`` under ``base`` with free ports."""

        if size < 1:
            raise ValueError(f"an etcd cluster needs at least one member, not {size}")
        members = [
            EtcdMember(f"etcd-{i}", host, free_port(host), free_port(host), base / f"etcd-{i}")
            for i in range(1, size + 1)
        ]
        return cls(members, tls, base)

    @property
    def endpoints(self) -> tuple[str, ...]:
        return tuple(m.endpoint for m in self.members)

    def start(self, timeout: float = 30.0) -> None:
        """Start every member; return once each accepts client connections. Raises
        RuntimeError (with the log's tail) when one exits or does not come up."""
        if etcd_binary() is None:
            raise RuntimeError(missing_reason())
        token = f"vmferry-{os.getpid()}-{time.monotonic_ns()}"
        for member in self.members:
            self.start_member(member, token)
        deadline = time.monotonic() + timeout
        for member in self.members:
            while not accepts(member.host, member.client_port):
                proc = self.procs[member.name]
                if proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"etcd member {member.name} did not start: {self.tail(member)}"
                    )
                time.sleep(0.05)

    def start_member(self, member: EtcdMember, token: str = "vmferry") -> None:
        member.data_dir.mkdir(parents=True, exist_ok=True)
        log = (self.log_dir or member.data_dir.parent) / f"{member.name}.log"
        with open(log, "ab") as out:
            self.procs[member.name] = subprocess.Popen(
                member.args(self.members, self.tls, token),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def tail(self, member: EtcdMember) -> str:
        log = (self.log_dir or member.data_dir.parent) / f"{member.name}.log"
        try:
            return log.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill one member (SIGKILL by default) and reap it."""
        proc = self.procs.pop(name)
        proc.send_signal(sig)
        proc.wait(10)

    def stop(self) -> None:
        for name in list(self.procs):
            self.kill(name, signal.SIGTERM)


def accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False
