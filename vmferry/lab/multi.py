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
- each cluster enables the feature gates of cross-cluster migration:
  ``HyperConverged.spec.featureGates.decentralizedLiveMigration`` (12.4.1) and
  ``ForkliftController/forklift-controller`` ``spec.feature_ocp_live_migration`` (12.4.2);
- each cluster is a Provider in every other, as 12.6.1 / 12.6.1.1 make it: in the
  destination, the cluster role of ``deploy/examples/rbac/mtv-clusterrole.yaml``, the
  service account ``openshift-mtv/mtv-provider`` bound to it and its long-lived token
  Secret; in the source, a Secret {token, cacert = the destination's kube-root-ca.crt}
  and a Provider named after the destination (``type: openshift``, ``url`` = the
  destination controller's token listener), so ``vmferry migrate VM --to-cluster
  cluster2`` works at once;
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
import base64
import binascii
import json
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from controller.authn import SA_NAME_ANNOTATION, SERVICE_ACCOUNT_TOKEN_TYPE
from vmferry import pki
from vmferry.cli.peer_cmd import add_peer
from vmferry.client import ApiClient
from vmferry.config import ClientConfig, contexts_yaml, default_config_path
from vmferry.decentralized import FEATURE_GATE, SYNC_ADDRESSES_FIELD
from vmferry.errors import AlreadyExists, ApiError, NotFound
from vmferry.lab import netns
from vmferry.lab.cluster import (
    ClusterSpec,
    Lab,
    LabError,
    default_dir,
    sync_unavailable_reason,
)
from vmferry.migration_network import NAD_API_VERSION, NAD_KIND, NAD_NAMESPACE
from vmferry.objects import kinds
from vmferry.objects.kinds import SYSTEM_NAMESPACE
from vmferry.objects.schema.forklift import (
    FEATURE_OCP_LIVE_MIGRATION,
    SECRET_CACERT,
    SECRET_TOKEN,
    ProviderType,
)

MULTI_FILE = "multi.json"
CLUSTER_PREFIX = "cluster"  # cluster1, cluster2, ...
MAX_CLUSTERS = 2  # the addresses below are laid out for two
SEPARATOR = "/"  # <cluster>/<component>
ROOT_CA_TIMEOUT = 30.0  # s for a cluster to publish kube-root-ca.crt in openshift-cnv
# Netns mode: each cluster's main network; one shared migration network.
MAIN_NETWORKS = (netns.MAIN_NETWORK, netns.SECOND_MAIN_NETWORK)
MIGRATION_RANGES = (("198.51.100.10", "198.51.100.127"), ("198.51.100.138", "198.51.100.254"))
MIGRATION_NAD_NAME = "lab-migration-network"
# Providers (12.6.1.1): the destination's service account and its token Secret.
MTV_CLUSTERROLE_FILE = (
    Path(__file__).resolve().parents[2] / "deploy" / "examples" / "rbac" / "mtv-clusterrole.yaml"
)
PROVIDER_SERVICE_ACCOUNT = "mtv-provider"  # in openshift-mtv of every cluster
PROVIDER_TOKEN_SECRET = f"{PROVIDER_SERVICE_ACCOUNT}-token"
TOKEN_TIMEOUT = 30.0  # s for a cluster to fill a service-account token Secret
PUBLISH_TIMEOUT = 30.0  # s for a sync controller to publish its address in the HyperConverged


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


# -- gates and providers (what a cluster needs to move VMs to another) -----------------------

GATE_PATCHES: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
    # (kind, namespace, name, merge patch): 12.4.1 and 12.4.2
    (
        "HyperConverged",
        SYSTEM_NAMESPACE,
        kinds.HYPERCONVERGED_NAME,
        {"spec": {"featureGates": {FEATURE_GATE: True}}},
    ),
    (
        "ForkliftController",
        kinds.MTV_NAMESPACE,
        kinds.FORKLIFT_CONTROLLER_NAME,
        {"spec": {FEATURE_OCP_LIVE_MIGRATION: "true"}},
    ),
)
GATE_NAMES = (FEATURE_GATE, FEATURE_OCP_LIVE_MIGRATION)


def mtv_cluster_role() -> dict[str, Any]:
    """The provider's cluster role (12.6.1.1), as deploy/examples/rbac/mtv-clusterrole.yaml."""
    role: dict[str, Any] = yaml.safe_load(MTV_CLUSTERROLE_FILE.read_text())
    return role


def provider_account_manifests(role_name: str) -> list[dict[str, Any]]:
    """What 12.6.1.1 creates in a destination cluster, after the cluster role: the service
    account, its ClusterRoleBinding to ``role_name``, its long-lived token Secret."""
    ns, account = kinds.MTV_NAMESPACE, PROVIDER_SERVICE_ACCOUNT
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": account, "namespace": ns},
        },
        {
            "apiVersion": kinds.RBAC,
            "kind": "ClusterRoleBinding",
            "metadata": {"name": account},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": role_name,
            },
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": ns}],
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": SERVICE_ACCOUNT_TOKEN_TYPE,
            "metadata": {
                "name": PROVIDER_TOKEN_SECRET,
                "namespace": ns,
                "annotations": {SA_NAME_ANNOTATION: account},
            },
        },
    ]


def provider_secret_name(destination: str) -> str:
    return f"{destination}-provider"


def provider_manifests(destination: str, url: str, token: str, ca_pem: str) -> list[dict[str, Any]]:
    """What 12.6.1 / 12.6.1.1 produce in a source cluster for ``destination``: the Secret
    {token, cacert} and the ``openshift`` Provider named after the destination."""
    ns = kinds.MTV_NAMESPACE

    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    return [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {"name": provider_secret_name(destination), "namespace": ns},
            "data": {SECRET_TOKEN: b64(token), SECRET_CACERT: b64(ca_pem)},
        },
        {
            "apiVersion": kinds.FORKLIFT,
            "kind": "Provider",
            "metadata": {"name": destination, "namespace": ns},
            "spec": {
                "type": str(ProviderType.OPENSHIFT),
                "url": url,
                "secret": {"name": provider_secret_name(destination), "namespace": ns},
            },
        },
    ]


def token_url(lab: Lab) -> str:
    """A cluster's bearer-token listener (``token_listen``, lab.json ``tokenPort``): where
    a Provider for it connects."""
    port = lab.info().get("tokenPort")
    if not port:
        raise LabError(f"{lab.dir}: lab.json has no tokenPort (the controller's token listener)")
    return f"https://127.0.0.1:{port}"


@dataclass(frozen=True)
class ClusterLinks:
    """What ``up`` set up in one cluster for migrations to the others."""

    gates: tuple[str, ...]
    providers: dict[str, str]  # Provider name (the destination cluster) -> its url


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
        self.links: dict[str, ClusterLinks] = {}  # what up() enabled and registered, per cluster

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
        self.links = {}
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
        as a peer and enables the gates; in netns mode each gets its migration NAD (see
        :func:`migration_nad`). Then every cluster becomes a Provider in every other."""
        cas = {c.name: await self._published_ca(c) for c in made}
        tokens: dict[str, str] = {}
        for c in made:
            async with ApiClient(c.config, timeout=10) as api:
                for peer, ca in cas.items():
                    if peer != c.name:
                        await add_peer(api, peer, ca)
                if netns_mode:
                    await self._configure_migration_network(api, c)
                await self._enable_gates(api, c)
                tokens[c.name] = await self._provider_token(api, c)
        for c in made:
            providers: dict[str, str] = {}
            async with ApiClient(c.config, timeout=10) as api:
                for d in made:
                    if d.name != c.name:
                        url = token_url(d.lab)
                        for obj in provider_manifests(d.name, url, tokens[d.name], cas[d.name]):
                            await api.create(obj)
                        providers[d.name] = url
            self.links[c.name] = ClusterLinks(GATE_NAMES, providers)
        for c in made:
            await self._published_sync_address(c)

    @staticmethod
    async def _published_sync_address(c: ClusterUp) -> None:
        """Wait until ``c``'s sync controller (if it has one) is in its HyperConverged's
        ``status.synchronizationAddresses``: a sendTo VMIM's connectURL is read there, so
        the lab is up only once a peer can find it."""
        advertise = str((c.lab.info().get("sync") or {}).get("advertise") or "")
        if not advertise:
            return
        deadline = time.monotonic() + PUBLISH_TIMEOUT
        async with ApiClient(c.config, timeout=5) as api:
            while True:
                hco = await api.get("HyperConverged", SYSTEM_NAMESPACE, kinds.HYPERCONVERGED_NAME)
                if advertise in ((hco.get("status") or {}).get(SYNC_ADDRESSES_FIELD) or []):
                    return
                if time.monotonic() > deadline:
                    raise LabError(
                        f"{c.name}: its sync controller ({advertise}) is not in the "
                        f"HyperConverged's status.{SYNC_ADDRESSES_FIELD} after "
                        f"{PUBLISH_TIMEOUT:.0f}s; see {c.lab.log_dir}"
                    )
                await asyncio.sleep(0.2)

    @staticmethod
    async def _enable_gates(api: ApiClient, c: ClusterUp) -> None:
        """12.4.1 and 12.4.2 (the controller creates both objects when it starts)."""
        deadline = time.monotonic() + ROOT_CA_TIMEOUT
        for kind, ns, name, patch in GATE_PATCHES:
            while True:
                try:
                    await api.patch(kind, ns, name, patch)
                    break
                except NotFound:
                    if time.monotonic() > deadline:
                        raise LabError(
                            f"{c.name}: no {kind} {ns}/{name} to enable the gate in; see "
                            f"{c.lab.log_dir}"
                        ) from None
                    await asyncio.sleep(0.2)

    @staticmethod
    async def _provider_token(api: ApiClient, c: ClusterUp) -> str:
        """12.6.1.1 in ``c``: the cluster role, service account, binding and token Secret;
        returns the token once the cluster filled it in."""
        role = mtv_cluster_role()
        try:
            await api.create(role)
        except AlreadyExists:
            pass
        for obj in provider_account_manifests(role["metadata"]["name"]):
            await api.create(obj)
        deadline = time.monotonic() + TOKEN_TIMEOUT
        while True:
            secret = await api.get("Secret", kinds.MTV_NAMESPACE, PROVIDER_TOKEN_SECRET)
            try:
                token = base64.b64decode((secret.get("data") or {}).get(SECRET_TOKEN, "")).decode()
            except (binascii.Error, UnicodeDecodeError):
                token = ""
            if token:
                return token
            if time.monotonic() > deadline:
                raise LabError(
                    f"{c.name} did not fill the token of {kinds.MTV_NAMESPACE}/"
                    f"{PROVIDER_TOKEN_SECRET} within {TOKEN_TIMEOUT:.0f}s; see {c.lab.log_dir}"
                )
            await asyncio.sleep(0.2)

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
    "ClusterLinks",
    "ClusterUp",
    "MultiLab",
    "cluster_names",
    "migration_nad",
    "mtv_cluster_role",
    "open_lab",
    "provider_account_manifests",
    "provider_manifests",
    "running_anywhere",
    "split_component",
    "token_url",
]
