"""A local lab: a controller and N handlers as real processes on loopback, with their
own certificates (a fresh cluster CA), data, runtime and RAM directories.

Node ``nodeI`` has its main address on 127.0.0.1 and its migration address on
127.0.1.I (a separate loopback address stands for the dedicated migration network),
and a certificate whose SANs name both. Processes run in their own sessions, write
logs to ``<dir>/logs`` and pidfiles to ``<dir>/run``; ``down`` stops them and every
guest they started.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from vmferry import pki
from vmferry.client import ApiClient
from vmferry.config import CONFIG_ENV, DEFAULT_CONFIG, ClientConfig
from vmferry.errors import ApiError
from vmferry.objects import conditions

LAB_ENV = "VMFERRY_LAB_DIR"
DEFAULT_LAB_DIR = Path.home() / ".vmferry" / "lab"
READY_TIMEOUT = 60.0  # s for the controller and every node to come up
STOP_TIMEOUT = 10.0  # s between SIGTERM and SIGKILL


class LabError(Exception):
    """The lab cannot do what was asked; the message says why and what to do."""


def default_dir() -> Path:
    return Path(os.environ.get(LAB_ENV) or DEFAULT_LAB_DIR)


EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LAB_PORTS = (10000, 32767)  # below Linux's default ephemeral range (32768-60999)


@functools.cache
def _lab_port_range() -> tuple[int, int]:
    """LAB_PORTS, or a range clear of this machine's ephemeral range if that differs."""
    low, high = LAB_PORTS
    try:
        eph_low, eph_high = (int(v) for v in EPHEMERAL_RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return low, high
    if low <= eph_high and eph_low <= high:  # overlapping: stay below or above it
        return (1024, eph_low - 1) if eph_low - 1024 > 4096 else (eph_high + 1, 65535)
    return low, high


def free_port(address: str) -> int:
    """A TCP port on ``address`` that nothing holds now, for a component to listen on later.

    Chosen outside the kernel's ephemeral range: a port from that range (what bind to
    port 0 hands out) can become the local port of any outgoing connection between now
    and the moment the component binds it -- seen here: a handler's metrics port taken
    that way, and the handler failing to start."""
    low, high = _lab_port_range()
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randint(low, high)
        with socket.socket() as s:
            try:
                s.bind((address, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # everything tried is taken: let the kernel choose
        s.bind((address, 0))
        chosen: int = s.getsockname()[1]
        return chosen


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass(frozen=True)
class Component:
    name: str  # "controller" or a node name
    argv: list[str]


class Lab:
    def __init__(self, directory: Path | None = None) -> None:
        self.dir = (directory or default_dir()).resolve()
        self.pki_dir = self.dir / "pki"
        self.run_dir = self.dir / "run"
        self.log_dir = self.dir / "logs"

    # -- layout -----------------------------------------------------------------------------

    @property
    def client_config_path(self) -> Path:
        return self.dir / "client.yaml"

    def node_names(self) -> list[str]:
        try:
            return list(json.loads((self.dir / "lab.json").read_text())["nodes"])
        except (OSError, ValueError, KeyError):
            return []

    def ram_dir(self, node: str) -> Path:
        return (
            Path("/dev/shm/vmferry-lab")
            / hashlib.sha1(str(self.dir).encode()).hexdigest()[:12]
            / node
        )

    def runtime_dir(self, node: str) -> Path:
        return self.dir / "nodes" / node / "runtime"

    def pid(self, component: str) -> int | None:
        try:
            pid = int((self.run_dir / f"{component}.pid").read_text())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    def _component(self, name: str) -> Component:
        py = sys.executable
        if name == "controller":
            return Component(
                name, [py, "-m", "controller.main", "--config", str(self.dir / "controller.toml")]
            )
        if name not in self.node_names():
            raise LabError(
                f"no component {name!r} in this lab (controller, {', '.join(self.node_names())})"
            )
        return Component(
            name,
            [py, "-m", "handler.main", "--config", str(self.dir / "nodes" / name / "handler.toml")],
        )

    # -- up ---------------------------------------------------------------------------------

    def write(self, nodes: int, memory: str) -> ClientConfig:
        """Create the CA, certificates and configuration files of a fresh lab."""
        if nodes < 1:
            raise LabError("a lab needs at least one node (two to migrate)")
        if self.dir.exists():
            shutil.rmtree(self.dir)
        for d in (self.pki_dir, self.run_dir, self.log_dir):
            d.mkdir(parents=True)
        pki.init_ca(self.pki_dir, "vmferry-lab")
        server = pki.issue_server(
            self.pki_dir, "vmferry-controller", ips=["127.0.0.1"], dns=["localhost"]
        )
        admin = pki.issue_user(self.pki_dir, "admin", groups=["system:masters"])
        api_port = free_port("127.0.0.1")
        console_port = free_port("127.0.0.1")  # the web console (HTTPS)
        metrics_ports = {"controller": free_port("127.0.0.1")}  # component -> /metrics port
        token_port = free_port("127.0.0.1")  # TLS without client certs: bearer-token clients
        (self.dir / "controller.toml").write_text(
            f'listen = "127.0.0.1:{api_port}"\n'
            f'token_listen = "127.0.0.1:{token_port}"\n'
            f'data_dir = "{self.dir / "controller"}"\n'
            f'ca = "{server.ca}"\ncert = "{server.cert}"\nkey = "{server.key}"\n'
            "node_grace_seconds = 8\n"
            f'metrics_listen = "127.0.0.1:{metrics_ports["controller"]}"\n'
            f'console_listen = "127.0.0.1:{console_port}"\n'
        )
        names = [f"node{i}" for i in range(1, nodes + 1)]
        for i, name in enumerate(names, start=1):
            migration_ip = f"127.0.1.{i}"
            tls = pki.issue_node(
                self.pki_dir, name, ips=["127.0.0.1", migration_ip], dns=["localhost"]
            )
            node_dir = self.dir / "nodes" / name
            node_dir.mkdir(parents=True)
            metrics_ports[name] = free_port("127.0.0.1")
            (node_dir / "handler.toml").write_text(
                f'node_name = "{name}"\n'
                f'api_server = "127.0.0.1:{api_port}"\n'
                f'ca = "{tls.ca}"\ncert = "{tls.cert}"\nkey = "{tls.key}"\n'
                'main_address = "127.0.0.1"\n'
                f'migration_address = "{migration_ip}"\n'
                f"migration_port = {free_port(migration_ip)}\n"
                f'runtime_dir = "{self.runtime_dir(name)}"\n'
                f'ram_dir = "{self.ram_dir(name)}"\n'
                f'memory = "{memory}"\n'
                'cpu_model = "vmferry-lab-cpu"\n'
                "heartbeat_seconds = 1\n"
                f'metrics_listen = "127.0.0.1:{metrics_ports[name]}"\n'
                f'[labels]\n"vmferry.io/lab-node" = "{i}"\n'
            )
        (self.dir / "lab.json").write_text(
            json.dumps(
                {
                    "nodes": names,
                    "apiPort": api_port,
                    "consolePort": console_port,
                    "metricsPorts": metrics_ports,
                    "tokenPort": token_port,
                }
            )
        )
        config = ClientConfig(server=f"127.0.0.1:{api_port}", tls=admin)
        self.client_config_path.write_text(config.to_yaml(relative_to=self.dir))
        return config

    def start(self, component: str) -> int:
        """Start one component as a detached process; returns its pid."""
        if self.pid(component):
            raise LabError(f"{component} is already running (pid {self.pid(component)})")
        comp = self._component(component)
        log = open(self.log_dir / f"{component}.log", "ab")
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        proc = subprocess.Popen(
            comp.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
            cwd=str(self.dir),
        )
        log.close()
        (self.run_dir / f"{component}.pid").write_text(str(proc.pid))
        return proc.pid

    def kill(self, component: str, sig: int = signal.SIGKILL) -> int:
        pid = self.pid(component)
        if pid is None:
            raise LabError(f"{component} is not running")
        os.kill(pid, sig)
        if sig == signal.SIGKILL:
            deadline = time.monotonic() + 5
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
        return pid

    async def wait_ready(self, config: ClientConfig, timeout: float = READY_TIMEOUT) -> None:
        names = set(self.node_names())
        deadline = time.monotonic() + timeout
        async with ApiClient(config, timeout=3) as api:
            while True:
                try:
                    nodes, _ = await api.list("Node")
                    ready = {n["metadata"]["name"] for n in nodes if conditions.is_true(n, "Ready")}
                    if names <= ready:
                        return
                    waiting = f"nodes not Ready yet: {', '.join(sorted(names - ready))}"
                except ApiError as e:
                    waiting = f"controller not answering: {e}"
                if time.monotonic() > deadline:
                    raise LabError(
                        f"the lab did not come up within {timeout:.0f}s ({waiting}); see {self.log_dir}"
                    )
                for comp in ["controller", *sorted(names)]:
                    if self.pid(comp) is None:
                        tail = (self.log_dir / f"{comp}.log").read_text()[-2000:]
                        raise LabError(f"{comp} exited during start-up; its log ends with:\n{tail}")
                await asyncio.sleep(0.2)

    def up(self, nodes: int = 3, memory: str = "4Gi", *, set_default: bool = True) -> ClientConfig:
        """Write a fresh lab, start everything and wait until every node is Ready."""
        if any(self.pid(c) for c in ["controller", *self.node_names()]):
            raise LabError(f"a lab is already running in {self.dir}: run 'vmferry lab down' first")
        config = self.write(nodes, memory)
        self.start("controller")
        for name in self.node_names():
            self.start(name)
        asyncio.run(self.wait_ready(config))
        if set_default:
            target = Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)
            if target.resolve() != self.client_config_path:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(config.to_yaml())
        return config

    # -- down -------------------------------------------------------------------------------

    def guest_pids(self) -> list[int]:
        """Live guest processes of every node: memvm (``guests/``) and QEMU (``qemu/``)."""
        pids = []
        for name in self.node_names():
            runtime = self.runtime_dir(name)
            for vm_json in [*runtime.glob("guests/*/vm.json"), *runtime.glob("qemu/*/vm.json")]:
                try:
                    pid = int(json.loads(vm_json.read_text())["pid"])
                except (OSError, ValueError, KeyError):
                    continue
                if _alive(pid):
                    pids.append(pid)
        return pids

    def down(self) -> list[str]:
        """Stop every process of the lab (guests included) and remove its RAM files."""
        stopped = []
        components = [*self.node_names(), "controller"]
        for comp in components:
            pid = self.pid(comp)
            if pid:
                os.kill(pid, signal.SIGTERM)
                stopped.append(comp)
        deadline = time.monotonic() + STOP_TIMEOUT
        for comp in components:
            pid = self.pid(comp)
            while pid and _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if pid and _alive(pid):
                os.kill(pid, signal.SIGKILL)
        for pid in self.guest_pids():
            os.kill(pid, signal.SIGKILL)
            stopped.append(f"guest {pid}")
        for name in self.node_names():
            shutil.rmtree(self.ram_dir(name), ignore_errors=True)
        return stopped
