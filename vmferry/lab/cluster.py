"""A local lab: a controller and N handlers as real processes, with their own
certificates (a fresh cluster CA), data, runtime and RAM directories.

Loopback mode (the default): node ``nodeI`` has its main address on 127.0.0.1 and its
migration address on 127.0.1.I (a separate loopback address stands for the dedicated
migration network), and a certificate whose SANs name both.

Netns mode (``up(netns=True)``, see :mod:`vmferry.lab.netns`): each handler and its
guests run in the node's own network namespace with ``eth0`` (main, 192.0.2.(10+I)) and
``eth1`` (migration); the controller stays on the host's 127.0.0.1 and the lab's
gateway process (:mod:`vmferry.lab.gateway`) carries the handlers' API connections from
192.0.2.1 to it. Without root or netns support the lab falls back to loopback mode and
says why (``Lab.warnings``).

One cluster of several (``ClusterSpec``, given by :mod:`vmferry.lab.multi`): the lab also
runs that cluster's sync controller (component ``sync``, ``sync.toml``, on the host's
127.0.0.1 next to its controller in both modes), its loopback migration addresses are
127.0.<index>.I, and in netns mode its main network and migration bridge are the
spec's.

Processes run in their own sessions, write logs to ``<dir>/logs`` and pidfiles to
``<dir>/run``; ``down`` stops them and every guest they started, and removes the lab's
namespaces (found from the directory's name alone, so a half-built lab goes too).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmferry import pki
from vmferry.client import ApiClient
from vmferry.config import CONFIG_ENV, DEFAULT_CONFIG, ClientConfig
from vmferry.errors import ApiError
from vmferry.lab import ha as lab_ha
from vmferry.lab import netns
from vmferry.lab.ports import free_port
from vmferry.objects import conditions

LAB_ENV = "VMFERRY_LAB_DIR"
DEFAULT_LAB_DIR = Path.home() / ".vmferry" / "lab"
READY_TIMEOUT = 60.0  # s for the controller and every node to come up
STOP_TIMEOUT = 10.0  # s between SIGTERM and SIGKILL
GATEWAY = "gateway"  # the netns lab's forwarding process (a component like the others)
GATEWAY_TIMEOUT = 15.0  # s for the gateway to listen
NETNS_MIGRATION_PORT = 7444  # every node has its own network stack: one port for all
CONTROLLER = "controller"
SYNC = "sync"  # a cluster's sync controller (only in a cluster of a multi-cluster lab)
SYNC_MODULE = "sync_controller.main"
SYNC_CERT_NAME = "sync-controller"  # its certificate's file name in the cluster's PKI


class LabError(Exception):
    """The lab cannot do what was asked; the message says why and what to do."""


def default_dir() -> Path:
    return Path(os.environ.get(LAB_ENV) or DEFAULT_LAB_DIR)


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


def sync_unavailable_reason() -> str | None:
    """Why this checkout cannot run a sync controller (None: it can)."""
    try:
        found = importlib.util.find_spec(SYNC_MODULE) is not None
    except ModuleNotFoundError:
        found = False
    return None if found else f"the module {SYNC_MODULE} is not installed"


@dataclass(frozen=True)
class ClusterSpec:
    """One cluster of a multi-cluster lab (:mod:`vmferry.lab.multi`)."""

    name: str  # the cluster's name: its sync controller's cluster_name, its context
    index: int  # 1-based; loopback migration addresses are 127.0.<index>.I
    sync: bool = True  # run a sync controller
    main_network: ipaddress.IPv4Network = netns.MAIN_NETWORK  # netns mode
    migration_ns: str = ""  # netns mode: the namespace whose br-mig eth1 joins ("" = own)
    extra: dict[str, Any] = field(default_factory=dict)  # more keys of lab.json's "cluster"


class Lab:
    def __init__(self, directory: Path | None = None, cluster: ClusterSpec | None = None) -> None:
        self.dir = (directory or default_dir()).resolve()
        self.cluster = cluster  # None: a lab of its own (no sync controller)
        self.pki_dir = self.dir / "pki"
        self.run_dir = self.dir / "run"
        self.log_dir = self.dir / "logs"
        self.warnings: list[str] = []  # what up() could not do as asked (netns fallback...)

    # -- layout -----------------------------------------------------------------------------

    @property
    def client_config_path(self) -> Path:
        return self.dir / "client.yaml"

    def info(self) -> dict[str, Any]:
        """lab.json ({} when there is none)."""
        try:
            info: dict[str, Any] = json.loads((self.dir / "lab.json").read_text())
        except (OSError, ValueError):
            return {}
        return info

    def node_names(self) -> list[str]:
        return list(self.info().get("nodes") or [])

    @property
    def netns_prefix(self) -> str:
        """``vmf<h>``: the prefix of every namespace this lab makes (from its directory)."""
        return netns.prefix_for(self.dir)

    def netns_of(self, node: str) -> str | None:
        """The network namespace ``node`` runs in; None in loopback mode."""
        name: str | None = ((self.info().get("netns") or {}).get("nodes") or {}).get(node)
        return name

    def netns_exec(self, node: str, argv: list[str]) -> list[str]:
        """``argv`` prefixed to run in ``node``'s network namespace (unchanged in loopback
        mode)."""
        ns = self.netns_of(node)
        return [*netns.exec_prefix(ns), *argv] if ns else list(argv)

    def ram_dir(self, node: str) -> Path:
        return Path("/dev/shm/vmferry-lab") / netns.dir_hash(self.dir)[:12] / node

    def runtime_dir(self, node: str) -> Path:
        return self.dir / "nodes" / node / "runtime"

    def pid(self, component: str) -> int | None:
        try:
            pid = int((self.run_dir / f"{component}.pid").read_text())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    @property
    def sync_config_path(self) -> Path:
        return self.dir / "sync.toml"

    def components(self) -> list[str]:
        """Every process of this lab, in start order."""
        info = self.info()
        gateway = [GATEWAY] if info.get("netns") else []
        sync = [SYNC] if info.get("sync") else []
        control = lab_ha.components(info["ha"]) if info.get("ha") else [CONTROLLER]
        return [*control, *gateway, *sync, *self.node_names()]

    def _component(self, name: str) -> Component:
        py = sys.executable
        ha_argv = lab_ha.argv(self.dir, self.info().get("ha"), name)
        if ha_argv is not None:
            return Component(name, ha_argv)
        if name == CONTROLLER:
            return Component(
                name, [py, "-m", "controller.main", "--config", str(self.dir / "controller.toml")]
            )
        if name not in self.components():
            raise LabError(f"no component {name!r} in this lab ({', '.join(self.components())})")
        if name == GATEWAY:
            return Component(name, [py, "-m", "vmferry.lab.gateway", "--dir", str(self.dir)])
        if name == SYNC:
            return Component(name, [py, "-m", SYNC_MODULE, "--config", str(self.sync_config_path)])
        argv = [
            py,
            "-m",
            "handler.main",
            "--config",
            str(self.dir / "nodes" / name / "handler.toml"),
        ]
        ns = self.netns_of(name)
        if ns is not None and not (netns.NETNS_RUN_DIR / ns).exists():
            raise LabError(
                f"{name}'s network namespace {ns} does not exist: run 'vmferry lab down' and "
                "'vmferry lab up --netns' again"
            )
        return Component(name, self.netns_exec(name, argv))

    # -- up ---------------------------------------------------------------------------------

    def write(
        self,
        nodes: int,
        memory: str,
        topology: netns.Topology | None = None,
        *,
        ha: bool = False,
        stream_workers: int | None = None,
    ) -> ClientConfig:
        """Create the CA, certificates and configuration files of a fresh lab (netns mode
        with ``topology``; ``ha``: 3 etcd members and 3 controller replicas;
        ``stream_workers``: each handler's, see vmferry-handler --stream-workers; None:
        the handler's default)."""
        if nodes < 1:
            raise LabError("a lab needs at least one node (two to migrate)")
        if ha and topology is not None:
            raise LabError("--ha runs on loopback only: drop --netns")
        if self.dir.exists():
            shutil.rmtree(self.dir)
        for d in (self.pki_dir, self.run_dir, self.log_dir):
            d.mkdir(parents=True)
        # CN=vmferry-lab-ca; a cluster of a multi-cluster lab: vmferry-lab-<cluster>-ca.
        pki.init_ca(
            self.pki_dir, f"vmferry-lab-{self.cluster.name}" if self.cluster else "vmferry-lab"
        )
        # In netns mode the handlers dial the API at the gateway's 192.0.2.1 and verify it.
        api_ips = ["127.0.0.1", topology.gateway] if topology else ["127.0.0.1"]
        server = pki.issue_server(
            self.pki_dir, "vmferry-controller", ips=api_ips, dns=["localhost"]
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
            f'ca_key = "{self.pki_dir / pki.CA_KEY_FILE}"\n'  # signs nodes' requests (join)
            "node_grace_seconds = 8\n"
            f'metrics_listen = "127.0.0.1:{metrics_ports["controller"]}"\n'
            f'console_listen = "127.0.0.1:{console_port}"\n'
        )
        names = [f"node{i}" for i in range(1, nodes + 1)]
        if topology is not None and list(topology.nodes) != names:
            raise LabError(f"netns topology nodes {topology.nodes} differ from {names}")
        api_server = f"{topology.gateway}:{api_port}" if topology else f"127.0.0.1:{api_port}"
        ha_info = None
        if ha:
            try:
                ha_info, replicas = lab_ha.write(self.dir, self.pki_dir, server, 8)
            except RuntimeError as e:
                raise LabError(str(e)) from None
            api_server = ",".join(replicas)
        migration_net = self.cluster.index if self.cluster else 1  # 127.0.<this>.I
        for i, name in enumerate(names, start=1):
            # The host's 127.0.0.1 serves each node's metrics (the gateway forwards them in
            # netns mode), so the port is chosen there in both modes.
            metrics_ports[name] = free_port("127.0.0.1")
            if topology is None:
                main_ip, migration_ip = "127.0.0.1", f"127.0.{migration_net}.{i}"
                migration_port = free_port(migration_ip)
                metrics_listen = f"127.0.0.1:{metrics_ports[name]}"
                ips = ["127.0.0.1", migration_ip]
            else:  # the main network until a NAD gives eth1 an address
                main_ip = migration_ip = topology.main_address(name)
                migration_port = NETNS_MIGRATION_PORT
                metrics_listen = f"{main_ip}:{metrics_ports[name]}"
                ips = [main_ip, "127.0.0.1"]
            tls = pki.issue_node(self.pki_dir, name, ips=ips, dns=["localhost"])
            node_dir = self.dir / "nodes" / name
            node_dir.mkdir(parents=True)
            (node_dir / "handler.toml").write_text(
                f'node_name = "{name}"\n'
                f'api_server = "{api_server}"\n'
                f'ca = "{tls.ca}"\ncert = "{tls.cert}"\nkey = "{tls.key}"\n'
                f'main_address = "{main_ip}"\n'
                f'migration_address = "{migration_ip}"\n'
                f"migration_port = {migration_port}\n"
                f'runtime_dir = "{self.runtime_dir(name)}"\n'
                f'ram_dir = "{self.ram_dir(name)}"\n'
                f'memory = "{memory}"\n'
                'cpu_model = "vmferry-lab-cpu"\n'
                "heartbeat_seconds = 1\n"
                + ("" if stream_workers is None else f"stream_workers = {stream_workers}\n")
                + f'metrics_listen = "{metrics_listen}"\n'
                # Loopback handlers share the host's network stack: a migration network
                # (NAD) must never make them add addresses to the host's NICs.
                f"configure_migration_network = {'true' if topology else 'false'}\n"
                f'[labels]\n"vmferry.io/lab-node" = "{i}"\n'
            )
        info: dict[str, Any] = {
            "nodes": names,
            "apiPort": api_port,
            "consolePort": console_port,
            "metricsPorts": metrics_ports,
            "tokenPort": token_port,
        }
        if topology is not None:
            info["netns"] = topology.as_dict()
        if ha_info is not None:
            info["ha"] = ha_info
        if self.cluster is not None:
            info["cluster"] = {"name": self.cluster.name, **self.cluster.extra}
            if self.cluster.sync:
                info["sync"] = self._write_sync(api_port)
        (self.dir / "lab.json").write_text(json.dumps(info))
        config = ClientConfig(server=api_server if ha else f"127.0.0.1:{api_port}", tls=admin)
        self.client_config_path.write_text(config.to_yaml(relative_to=self.dir))
        return config

    def _write_sync(self, api_port: int) -> dict[str, Any]:
        """The sync controller's certificate and sync.toml; returns lab.json's "sync".

        It runs on the host's 127.0.0.1 in both modes, next to its controller (in netns
        mode too: the clusters' main networks are apart, the host's loopback joins the two
        control planes, as the peer clusters' API endpoints are reachable in a real
        deployment); the peer dials ``advertise``."""
        assert self.cluster is not None
        port = free_port("127.0.0.1")
        address = f"127.0.0.1:{port}"
        metrics_port = free_port("127.0.0.1")  # its /metrics, /healthz, /readyz (HTTPS)
        issue_sync = getattr(pki, "issue_sync", None)
        if issue_sync is not None:
            tls = issue_sync(self.pki_dir, SYNC_CERT_NAME, ips=["127.0.0.1"], dns=["localhost"])
        else:  # until vmferry.pki has the sync controller's identity
            self.warnings.append(
                "vmferry.pki has no issue_sync: the sync controller got a server "
                "certificate (issue_server) as a stand-in"
            )
            tls = pki.issue_server(
                self.pki_dir, SYNC_CERT_NAME, ips=["127.0.0.1"], dns=["localhost"]
            )
        self.sync_config_path.write_text(
            f'cluster_name = "{self.cluster.name}"\n'
            f'api_server = "127.0.0.1:{api_port}"\n'
            f'ca = "{tls.ca}"\ncert = "{tls.cert}"\nkey = "{tls.key}"\n'
            f'listen = "{address}"\n'
            f'advertise = "{address}"\n'
            f'metrics_listen = "127.0.0.1:{metrics_port}"\n'
            'log_level = "info"\n'
        )
        return {
            "clusterName": self.cluster.name,
            "listen": address,
            "advertise": address,
            "metricsPort": metrics_port,
        }

    def start(self, component: str) -> int:
        """Start one component as a detached process; returns its pid."""
        if self.pid(component):
            raise LabError(f"{component} is already running (pid {self.pid(component)})")
        comp = self._component(component)
        if component == GATEWAY:
            (self.run_dir / netns.GATEWAY_READY_FILE).unlink(missing_ok=True)
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
        # `ip netns exec` execs the handler: proc.pid is the handler's own pid.
        (self.run_dir / f"{component}.pid").write_text(str(proc.pid))
        if component == GATEWAY:
            self._wait_gateway(proc.pid)
        return proc.pid

    def _wait_gateway(self, pid: int) -> None:
        deadline = time.monotonic() + GATEWAY_TIMEOUT
        while not (self.run_dir / netns.GATEWAY_READY_FILE).exists():
            log_file = self.log_dir / f"{GATEWAY}.log"
            if not _alive(pid):
                raise LabError(
                    f"the gateway exited during start-up:\n{log_file.read_text()[-2000:]}"
                )
            if time.monotonic() > deadline:
                raise LabError(
                    f"the gateway did not listen within {GATEWAY_TIMEOUT:.0f}s; see {log_file}"
                )
            time.sleep(0.05)

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
                        if await self.sync_listening():
                            return
                        waiting = "the sync controller does not listen yet"
                    else:
                        waiting = f"nodes not Ready yet: {', '.join(sorted(names - ready))}"
                except ApiError as e:
                    waiting = f"controller not answering: {e}"
                if time.monotonic() > deadline:
                    raise LabError(
                        f"the lab did not come up within {timeout:.0f}s ({waiting}); see {self.log_dir}"
                    )
                for comp in self.components():
                    if self.pid(comp) is None:
                        tail = (self.log_dir / f"{comp}.log").read_text()[-2000:]
                        raise LabError(f"{comp} exited during start-up; its log ends with:\n{tail}")
                await asyncio.sleep(0.2)

    async def sync_listening(self) -> bool:
        """The sync controller accepts connections on its address (True without one)."""
        sync = self.info().get("sync")
        if not sync:
            return True
        host, _, port = str(sync["listen"]).rpartition(":")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 2)
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    def _topology(self, nodes: int) -> netns.Topology:
        names = tuple(f"node{i}" for i in range(1, nodes + 1))
        if self.cluster is None:
            return netns.Topology(self.netns_prefix, names)
        return netns.Topology(
            self.netns_prefix,
            names,
            main_network=self.cluster.main_network,
            migration_ns=self.cluster.migration_ns,
            peer_tag=f"c{self.cluster.index}" if self.cluster.migration_ns else "",
        )

    def up(
        self,
        nodes: int = 3,
        memory: str = "4Gi",
        *,
        set_default: bool = True,
        netns_mode: bool = False,
        main_link: netns.LinkSpec | None = None,
        migration_link: netns.LinkSpec | None = None,
        ha: bool = False,
        stream_workers: int | None = None,
    ) -> ClientConfig:
        """Write a fresh lab, start everything and wait until every node is Ready.
        ``ha``: a replicated control plane (:mod:`vmferry.lab.ha`); ``stream_workers``:
        each handler's stream worker processes (0: streams in the handler; None: the
        handler's default).

        ``netns_mode``: nodes in their own network namespaces, links shaped as given; when
        this machine cannot, the lab comes up in loopback mode and ``self.warnings`` says
        why."""
        self.warnings = []
        if any(self.pid(c) for c in self.components()):
            raise LabError(f"a lab is already running in {self.dir}: run 'vmferry lab down' first")
        if (main_link or migration_link) and not netns_mode:
            raise LabError(
                "--main-link and --migration-link shape the netns lab's links: add --netns"
            )
        topology = None
        if netns_mode:
            reason = netns.unsupported_reason()
            if reason is None:
                try:
                    topology = self._topology(nodes)
                except ValueError as e:
                    raise LabError(str(e)) from None
                self._remove_namespaces()  # a previous lab's leftovers in this directory
                try:
                    netns.build(topology)
                except netns.NetnsError as e:
                    reason = str(e)
                    self._remove_namespaces()
                    topology = None
            if reason is not None:
                self.warnings.append(
                    f"cannot build the netns lab ({reason}): falling back to loopback mode"
                    + (", links NOT shaped" if main_link or migration_link else "")
                )
            else:
                assert topology is not None
                try:
                    for nic, spec in (
                        (netns.MAIN_NIC, main_link),
                        (netns.MIGRATION_NIC, migration_link),
                    ):
                        if spec is not None:
                            self.warnings += netns.shape(topology, nic, spec)
                except netns.NetnsError as e:
                    self._remove_namespaces()
                    raise LabError(str(e)) from None
        config = self.write(nodes, memory, topology, ha=ha, stream_workers=stream_workers)
        if topology is not None:
            links = {
                name: spec.as_dict()
                for name, spec in (("main", main_link), ("migration", migration_link))
                if spec is not None
            }
            info = self.info()
            info["netns"]["links"] = links
            info["netns"]["delayApplied"] = netns.delay_supported(self.warnings)
            (self.dir / "lab.json").write_text(json.dumps(info))
        ha_info = self.info().get("ha")
        for comp in self.components():
            self.start(comp)
            if ha_info and comp == ha_info["etcd"][-1]["name"]:
                try:
                    lab_ha.wait_etcd(ha_info, lambda name: self.pid(name) is not None)
                except RuntimeError as e:
                    raise LabError(f"{e}; see {self.log_dir}") from None
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

    def _pidfile_components(self) -> list[str]:
        """Components with a pidfile: also those of a lab whose lab.json is gone."""
        return sorted(p.stem for p in self.run_dir.glob("*.pid")) if self.run_dir.is_dir() else []

    def _remove_namespaces(self) -> list[str]:
        """Kill what still runs inside this lab's namespaces, then delete them."""
        removed = []
        for ns in netns.namespaces(self.netns_prefix):
            for pid in netns.pids_in(ns):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            try:
                netns.delete(ns)
            except netns.NetnsError:
                continue
            removed.append(f"namespace {ns}")
        return removed

    def down(self) -> list[str]:
        """Stop every process of the lab (guests included), remove its RAM files and its
        network namespaces (with their links and bridges)."""
        stopped = []
        nodes = self.node_names()
        ordered = [*nodes, SYNC, GATEWAY, CONTROLLER]
        components = ordered + [c for c in self._pidfile_components() if c not in ordered]
        # etcd members stop last: the controller replicas let go of their lease first.
        stores = [c for c in components if c in lab_ha.etcd_names()]
        for group in ([c for c in components if c not in stores], stores):
            stopped += self._stop(group)
        for pid in self.guest_pids():
            os.kill(pid, signal.SIGKILL)
            stopped.append(f"guest {pid}")
        for name in nodes:
            shutil.rmtree(self.ram_dir(name), ignore_errors=True)
        if netns.unsupported_reason() is None:
            stopped += self._remove_namespaces()
        return stopped

    def _stop(self, components: list[str]) -> list[str]:
        """SIGTERM ``components``, SIGKILL those still alive after STOP_TIMEOUT."""
        stopped = []
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
        return stopped
