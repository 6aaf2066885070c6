"""A multi-cluster lab (``vmferry lab up --clusters 2``): the clusters of cross-cluster
live migration on one machine.

Each cluster is a :class:`~vmferry.lab.cluster.Lab` of its own in a subdirectory of the
lab directory (``cluster1/``, ``cluster2/``): its own CA, controller, sync controller
(component ``sync``) and handlers, logs and pidfiles. :class:`MultiLab` is the small
coordinator on top:

- ``multi.json`` in the lab directory lists the clusters (and marks the directory as a
  multi-cluster lab for ``lab down|status|start|kill``);
- components are named ``<cluster>/<component>`` (``cluster2/node1``, ``cluster1/sync``);
- each cluster registers every other cluster's CA as a peer (the ConfigMap
  ``vmferry-peer-clusters``, exactly as ``vmferry adm peer add`` does), reading the CA
  from the peer's ``kube-root-ca.crt`` as an administrator would;
- ``client.yaml`` in the lab directory has one context per cluster (current: the first),
  and it becomes the default client configuration (``$VMFERRY_CONFIG`` or
  ``~/.vmferry/config.yaml``) unless asked not to.

Addresses. Loopback mode: every controller, sync controller and handler listens on the
host's 127.0.0.1 (random ports); cluster K's handlers' migration addresses are
127.0.K.I, so the clusters' migration addresses never collide (cluster1 127.0.1.I, as a
one-cluster lab's).

Netns mode: cluster1's main network is 192.0.2.0/24, cluster2's 203.0.113.0/24 (each
with its own lab namespace, bridge br-main and gateway at .1); they share ONE migration
bridge (cluster2's nodes' eth1 join cluster1's br-mig), 198.51.100.0/24, one L2 segment
as the reference requires. The two clusters' migration NADs must hand out disjoint
addresses of that one subnet: :func:`migration_nad` gives each cluster the same
``range`` (198.51.100.0/24, so every node's eth1 sees every other one on-link) with
disjoint ``range_start``/``range_end`` (cluster1 .10-.127, cluster2 .138-.254) --
not two /25 ranges, whose nodes would be on different subnets without a router. The
sync controllers run on the host's 127.0.0.1 next to their controllers (the simplest
correct choice: the lab's controllers are on the host already, and the clusters' main
networks are apart); the sync traffic therefore does not cross the lab's bridges, and
taking the shared br-mig down cuts the migration streams, not the sync link.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmferry import pki
from vmferry.cli.peer_cmd import add_peer
from vmferry.client import ApiClient
from vmferry.config import ClientConfig, contexts_yaml, default_config_path
from vmferry.errors import ApiError, NotFound
from vmferry.lab import netns
from vmferry.lab.cluster import (
    ClusterSpec,
    Lab,
    LabError,
    default_dir,
    sync_unavailable_reason,
)
from vmferry.migration_network import NAD_API_VERSION, NAD_KIND, NAD_NAMESPACE
from vmferry.objects.kinds import SYSTEM_NAMESPACE

MULTI_FILE = "multi.json"
CLUSTER_PREFIX = "cluster"  # cluster1, cluster2, ...
MAX_CLUSTERS = 2  # the addresses below are laid out for two
SEPARATOR = "/"  # <cluster>/<component>
ROOT_CA_TIMEOUT = 30.0  # s for a cluster to publish kube-root-ca.crt in openshift-cnv
# Netns mode: each cluster's main network; one shared migration network.
MAIN_NETWORKS = (netns.MAIN_NETWORK, netns.SECOND_MAIN_NETWORK)
MIGRATION_RANGES = (("198.51.100.10", "198.51.100.127"), ("198.51.100.138", "198.51.100.254"))
MIGRATION_NAD_NAME = "lab-migration-network"


def cluster_names(count: int) -> list[str]:
    if not 2 <= count <= MAX_CLUSTERS:
        raise LabError(
            f"--clusters {count}: a multi-cluster lab holds 2 to {MAX_CLUSTERS} clusters "
            "(1 is the one-cluster lab)"
        )
    return [f"{CLUSTER_PREFIX}{k}" for k in range(1, count + 1)]


def split_component(component: str) -> tuple[str, str]:
    """``cluster2/node1`` → (``cluster2``, ``node1``); LabError for an unqualified name."""
    cluster, sep, name = component.partition(SEPARATOR)
    if not sep or not cluster or not name:
        raise LabError(
            f"{component!r}: in a multi-cluster lab, name a component as CLUSTER/COMPONENT "
            "(e.g. cluster2/node1, cluster1/sync; 'vmferry lab status' lists them)"
        )
    return cluster, name


def migration_nad(cluster: str, index: int) -> dict[str, Any]:
    """The migration network's NAD for ``cluster`` of a netns multi-cluster lab: eth1,
    whereabouts over the one shared 198.51.100.0/24, this cluster's part of it."""
    start, end = MIGRATION_RANGES[index - 1]
    config = {
        "cniVersion": "0.3.1",
        "name": f"{cluster}-migration",
        "type": "macvlan",
        "master": netns.MIGRATION_NIC,
        "mode": "bridge",
        "ipam": {
            "type": "whereabouts",
            "range": str(netns.MIGRATION_NETWORK),
            "range_start": start,
            "range_end": end,
        },
    }
    return {
        "apiVersion": NAD_API_VERSION,
        "kind": NAD_KIND,
        "metadata": {"name": MIGRATION_NAD_NAME, "namespace": NAD_NAMESPACE},
        "spec": {"config": json.dumps(config)},
    }


@dataclass(frozen=True)
class ClusterUp:
    """What ``up`` made of one cluster."""

    name: str
    lab: Lab
    config: ClientConfig


class MultiLab:
    def __init__(self, directory: Path | None = None) -> None:
        self.dir = (directory or default_dir()).resolve()
        self.warnings: list[str] = []

    # -- layout -----------------------------------------------------------------------------

    @staticmethod
    def is_multi(directory: Path) -> bool:
        return (directory / MULTI_FILE).exists()

    @property
    def client_config_path(self) -> Path:
        return self.dir / "client.yaml"

    def info(self) -> dict[str, Any]:
        try:
            info: dict[str, Any] = json.loads((self.dir / MULTI_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return info

    def clusters(self) -> list[str]:
        """The clusters of this lab (from multi.json, else the cluster directories there)."""
        names = list(self.info().get("clusters") or [])
        if names:
            return names
        if not self.dir.is_dir():
            return []
        return sorted(
            p.name
            for p in self.dir.iterdir()
            if p.is_dir()
            and p.name.startswith(CLUSTER_PREFIX)
            and p.name[len(CLUSTER_PREFIX) :].isdigit()
        )

    def lab(self, cluster: str) -> Lab:
        if cluster not in self.clusters():
            raise LabError(
                f"no cluster {cluster!r} in the lab in {self.dir} "
                f"(clusters: {', '.join(self.clusters()) or 'none'})"
            )
        return Lab(self.dir / cluster)

    def components(self) -> list[str]:
        return [
            f"{c}{SEPARATOR}{comp}" for c in self.clusters() for comp in self.lab(c).components()
        ]

    def pid(self, component: str) -> int | None:
        cluster, name = split_component(component)
        return self.lab(cluster).pid(name)

    def start(self, component: str) -> int:
        cluster, name = split_component(component)
        return self.lab(cluster).start(name)

    def kill(self, component: str, sig: int = signal.SIGKILL) -> int:
        cluster, name = split_component(component)
        return self.lab(cluster).kill(name, sig)

    def migration_bridge(self) -> dict[str, str]:
        """Netns mode: where the shared migration bridge is (``ip -n NS link set BRIDGE
        down`` cuts the link between the clusters' migration networks); {} in loopback."""
        bridge: dict[str, str] = self.info().get("migrationBridge") or {}
        return bridge

    # -- up ---------------------------------------------------------------------------------

    def _specs(self, names: list[str], sync: bool) -> list[ClusterSpec]:
        first_lab_ns = f"{netns.prefix_for(self.dir / names[0])}-lab"
        return [
            ClusterSpec(
                name=name,
                index=k,
                sync=sync,
                main_network=MAIN_NETWORKS[k - 1],
                migration_ns="" if k == 1 else first_lab_ns,
                extra={"index": k, "peers": [n for n in names if n != name]},
            )
            for k, name in enumerate(names, start=1)
        ]

    def up(
        self,
        clusters: int = 2,
        nodes: int = 2,
        memory: str = "4Gi",
        *,
        set_default: bool = True,
        netns_mode: bool = False,
        main_link: netns.LinkSpec | None = None,
        migration_link: netns.LinkSpec | None = None,
    ) -> list[ClusterUp]:
        """Bring up every cluster (one after the other), register them as each other's
        peers, write the contexts. Any failure takes down what was started."""
        self.warnings = []
        names = cluster_names(clusters)
        running = [c for c in (*self.components(), *Lab(self.dir).components()) if self._alive(c)]
        if running:
            raise LabError(f"a lab is already running in {self.dir}: run 'vmferry lab down' first")
        reason = sync_unavailable_reason()
        if reason is not None:
            self.warnings.append(f"no sync controllers ({reason}): the clusters run without them")
        if self.dir.exists():
            self.down()
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        info: dict[str, Any] = {"clusters": names}
        (self.dir / MULTI_FILE).write_text(json.dumps(info))
        made: list[ClusterUp] = []
        try:
            for spec in self._specs(names, sync=reason is None):
                lab = Lab(self.dir / spec.name, spec)
                try:
                    config = lab.up(
                        nodes,
                        memory,
                        set_default=False,
                        netns_mode=netns_mode,
                        main_link=main_link,
                        migration_link=migration_link,
                    )
                finally:
                    self.warnings += [f"{spec.name}: {w}" for w in lab.warnings]
                if (
                    netns_mode
                    and made
                    and bool(made[0].lab.info().get("netns")) != bool(lab.info().get("netns"))
                ):
                    raise LabError(
                        f"{made[0].name} and {spec.name} came up in different modes (one in "
                        "network namespaces, one on loopback): see the warnings"
                    )
                made.append(ClusterUp(spec.name, lab, config))
            if made[0].lab.info().get("netns"):
                info["migrationBridge"] = {
                    "namespace": f"{made[0].lab.netns_prefix}-lab",
                    "bridge": netns.MIGRATION_BRIDGE,
                }
                (self.dir / MULTI_FILE).write_text(json.dumps(info))
            asyncio.run(self._connect(made, netns_mode=bool(info.get("migrationBridge"))))
        except BaseException:
            self.down()
            raise
        contexts = {c.name: c.config for c in made}
        self.client_config_path.write_text(contexts_yaml(contexts, names[0], relative_to=self.dir))
        if set_default:
            target = default_config_path()
            if target.resolve() != self.client_config_path:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(contexts_yaml(contexts, names[0]))
        return made

    async def _connect(self, made: list[ClusterUp], *, netns_mode: bool) -> None:
        """Every cluster registers every other's CA (as published in its kube-root-ca.crt)
        as a peer; in netns mode each gets its migration NAD (see :func:`migration_nad`)."""
        cas = {c.name: await self._published_ca(c) for c in made}
        for c in made:
            async with ApiClient(c.config, timeout=10) as api:
                for peer, ca in cas.items():
                    if peer != c.name:
                        await add_peer(api, peer, ca)
                if netns_mode:
                    await self._configure_migration_network(api, c)

    async def _published_ca(self, c: ClusterUp) -> str:
        from controller.rbac_controller import ROOT_CA_CONFIGMAP, ROOT_CA_KEY

        deadline = time.monotonic() + ROOT_CA_TIMEOUT
        async with ApiClient(c.config, timeout=5) as api:
            while True:
                try:
                    cm = await api.get("ConfigMap", SYSTEM_NAMESPACE, ROOT_CA_CONFIGMAP)
                    pem = str((cm.get("data") or {}).get(ROOT_CA_KEY) or "")
                    if pem:
                        own = pki.load_ca_pem(c.lab.pki_dir).decode()
                        if pem.strip() != own.strip():
                            raise LabError(
                                f"{c.name} publishes a CA in {ROOT_CA_CONFIGMAP} that is not "
                                f"its lab CA ({c.lab.pki_dir})"
                            )
                        return pem
                except (NotFound, ApiError):
                    pass
                if time.monotonic() > deadline:
                    raise LabError(
                        f"{c.name} did not publish {SYSTEM_NAMESPACE}/{ROOT_CA_CONFIGMAP} within "
                        f"{ROOT_CA_TIMEOUT:.0f}s; see {c.lab.log_dir}"
                    )
                await asyncio.sleep(0.2)

    @staticmethod
    async def _configure_migration_network(api: ApiClient, c: ClusterUp) -> None:
        index = int((c.lab.info().get("cluster") or {}).get("index") or 1)
        await api.create(migration_nad(c.name, index))
        await api.patch(
            "HyperConverged",
            SYSTEM_NAMESPACE,
            "kubevirt-hyperconverged",
            {"spec": {"liveMigrationConfig": {"network": MIGRATION_NAD_NAME}}},
        )

    def _alive(self, component: str) -> bool:
        try:
            return (
                self.pid(component) is not None
                if SEPARATOR in component
                else Lab(self.dir).pid(component) is not None
            )
        except LabError:
            return False

    # -- down -------------------------------------------------------------------------------

    def down(self) -> list[str]:
        """Stop every cluster (the last first: in netns mode its eth1 links hang on the
        first cluster's bridge), and a one-cluster lab left in the directory itself."""
        stopped: list[str] = []
        for cluster in reversed(self.clusters()):
            stopped += [f"{cluster}/{s}" for s in Lab(self.dir / cluster).down()]
        if (self.dir / "run").is_dir():
            stopped += Lab(self.dir).down()
        return stopped


def open_lab(directory: Path | None = None) -> Lab | MultiLab:
    """The lab in ``directory`` (default: $VMFERRY_LAB_DIR or ~/.vmferry/lab): a
    multi-cluster lab when it has multi.json, else a one-cluster lab."""
    path = (directory or default_dir()).resolve()
    return MultiLab(path) if MultiLab.is_multi(path) else Lab(path)


def running_anywhere(lab: Lab | MultiLab) -> list[str]:
    """The running components of ``lab``."""
    return [c for c in lab.components() if lab.pid(c) is not None]


__all__ = [
    "MIGRATION_NAD_NAME",
    "ClusterUp",
    "MultiLab",
    "cluster_names",
    "migration_nad",
    "open_lab",
    "running_anywhere",
    "split_component",
]
