"""``vmferry-sync-controller``: the synchronization controller of cross-cluster
("decentralized") live migration (reference 12.4-12.6; ``virt-synchronization-controller``).

One or more per cluster. It connects to its own cluster's API with its certificate
(``vmferry pki issue sync NAME``: user ``system:vmferry:sync-controller``, ClusterRole
``vmferry:sync-controller``), announces itself with a Lease and keeps the HyperConverged's
``status.synchronizationAddresses`` (sync_controller/lease.py), serves and dials the peer
clusters' sync controllers over mTLS gRPC trusting only the CAs registered in the ConfigMap
``openshift-cnv/vmferry-peer-clusters`` (sync_controller/peer_cas.py), and runs the sending and
receiving reconcilers of its cluster's decentralized VMIMs (sync_controller/sender.py,
receiver.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sync_controller.lease import SyncAnnouncer, default_id
from sync_controller.link import SyncLink
from sync_controller.peer import PeerError
from sync_controller.peer_cas import PeerCAs
from sync_controller.receiver import ReceiverReconciler
from sync_controller.sender import SenderReconciler
from vmferry import httpserve, logs, metrics_http, pki, systemd
from vmferry.cert_request import CsrIssue
from vmferry.client import ApiClient
from vmferry.config import ClientConfig, ConfigError, daemon_config
from vmferry.decentralized import PEERS_CONFIGMAP, PEERS_NAMESPACE, Role
from vmferry.informer import Informer, Key
from vmferry.pki.renewal import Renewer

log = logging.getLogger("vmferry.sync")

CONFIG_KEYS: dict[str, type | tuple[type, ...]] = {
    "cluster_name": str,
    "id": str,
    "api_server": str,
    "ca": str,
    "cert": str,
    "key": str,
    "listen": str,
    "advertise": str,
    "log_level": str,
    "insecure_plaintext": bool,
    **metrics_http.CONFIG_KEYS,
}
DEFAULTS: dict[str, Any] = {
    "api_server": "127.0.0.1:7443",
    "listen": "0.0.0.0:7445",
    "log_level": "info",
    "insecure_plaintext": False,
    **metrics_http.DEFAULTS,
}
METRICS_AUTH_MODES = (metrics_http.MetricsAuth.NONE, metrics_http.MetricsAuth.ALLOWLIST)


def _host_port(key: str, value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key} {value!r}: expected HOST:PORT")
    return value


def parse_args(argv: list[str] | None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        prog="vmferry-sync-controller",
        description="vmferry synchronization controller: cross-cluster live migration.",
    )
    p.add_argument("--config", type=Path, help="TOML configuration file")
    p.add_argument("--cluster-name", help="this cluster's name (as its peers register it)")
    p.add_argument("--id", help="the id in the lease name (default: derived from advertise)")
    p.add_argument(
        "--api-server",
        help="this cluster's controller host:port (replicas: several, comma-separated IP:port)",
    )
    p.add_argument("--ca", help="this cluster's CA certificate")
    p.add_argument("--cert", help="sync controller certificate ('vmferry pki issue sync NAME')")
    p.add_argument("--key", help="its private key")
    p.add_argument(
        "--listen", help="host:port the peers' sync controllers dial (default 0.0.0.0:7445)"
    )
    p.add_argument(
        "--advertise",
        metavar="HOST:PORT",
        help="the address published in synchronizationAddresses (default: listen)",
    )
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    metrics_http.add_flags(p, METRICS_AUTH_MODES)
    p.add_argument(
        "--insecure-plaintext",
        action="store_true",
        default=None,
        help="no TLS anywhere (tests only; never in production)",
    )
    args = p.parse_args(argv)
    config = daemon_config(args, DEFAULTS, CONFIG_KEYS, tls_what="the sync controller certificate")
    if not config.get("cluster_name"):
        raise ConfigError(
            "cluster_name is required (--cluster-name or cluster_name in the config file)"
        )
    config["listen"] = _host_port("listen", config["listen"])
    config["advertise"] = _host_port("advertise", config.get("advertise") or config["listen"])
    if config["advertise"].rpartition(":")[0].strip("[]") in ("0.0.0.0", "::", ""):
        raise ConfigError(
            f"advertise {config['advertise']!r}: peers cannot dial an unspecified address; "
            "set advertise (HOST:PORT peers reach this sync controller at) when listen is "
            "0.0.0.0"
        )
    if not config.get("id"):
        config["id"] = default_id(config["cluster_name"], config["advertise"])
    config["metrics"] = metrics_http.settings(config, METRICS_AUTH_MODES)
    return config


class _ReadyCollector(Collector):
    def __init__(self, ready: Callable[[], bool]) -> None:
        self.ready = ready

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "vmferry_sync_controller_ready_status",
            "1 when this sync controller serves its peers and has listed the peer clusters.",
        )
        family.add_metric([], 1.0 if self.ready() else 0.0)
        yield family


def sync_registry(ready: Callable[[], bool]) -> CollectorRegistry:
    """The sync controller's /metrics: readiness and the process/runtime collectors."""
    registry = metrics_http.daemon_registry()
    registry.register(_ReadyCollector(ready))
    return registry


def make_reconcilers(
    api: ApiClient, link: SyncLink, cluster_name: str
) -> tuple[SenderReconciler, ReceiverReconciler]:
    """The sending and the receiving reconciler; each gets its own view of the link (its
    own ``on_peer_update``, hearing only the migrations where this cluster holds that half)."""
    return (
        SenderReconciler(api, link.view(Role.SENDER), time.time, cluster_name=cluster_name),
        ReceiverReconciler(api, link.view(Role.RECEIVER), time.time, cluster_name=cluster_name),
    )


def watch_peers(configmaps: Informer, peers: PeerCAs) -> None:
    """Keep ``peers`` = the data of the peers ConfigMap (none when it is deleted)."""

    def on_change(key: Key, old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
        if key[-1] != PEERS_CONFIGMAP:
            return
        peers.update((new or {}).get("data") or {})

    configmaps.add_handler(on_change)


async def serve(config: dict[str, Any], argv: list[str] | None = None) -> None:
    """Serve until SIGTERM/SIGINT; SIGHUP re-reads the configuration (``argv``: the
    command line it came from) and applies ``log_level`` live."""
    sd = systemd.Notifier.from_env()
    sd.status("starting the peer link")
    tls = (
        None
        if config["insecure_plaintext"]
        else pki.TlsFiles(Path(config["ca"]), Path(config["cert"]), Path(config["key"]))
    )
    api = ApiClient(
        ClientConfig(
            server=config["api_server"], tls=tls, insecure_plaintext=config["insecure_plaintext"]
        ),
        timeout=10.0,
    )
    peers = PeerCAs()
    configmaps = Informer(api, "ConfigMap", namespace=PEERS_NAMESPACE)
    watch_peers(configmaps, peers)
    link = SyncLink(config["cluster_name"], tls, peers, listen=config["listen"])
    announcer = SyncAnnouncer(api, config["id"], config["advertise"])
    linked = asyncio.Event()

    def not_ready() -> str | None:
        if not linked.is_set():
            return "the peer link is not serving yet"
        return None if configmaps.synced.is_set() else "the peer clusters are not listed yet"

    metrics_server: httpserve.Served | None = None
    try:
        if config["metrics"] is not None:  # first: /readyz says why until all is up
            metrics_server = await metrics_http.start(
                f"sync controller {config['id']}",
                config["metrics"],
                sync_registry(lambda: not_ready() is None),
                tls=tls,
                ready=not_ready,
            )
        try:
            await link.start()
        except PeerError as e:
            raise ConfigError(str(e)) from None
        linked.set()
        reconcilers = make_reconcilers(api, link, config["cluster_name"])
        stop = asyncio.Event()
        reloader = systemd.ConfigReloader(
            lambda: parse_args(argv), config, {"log_level": systemd.live_log_level}
        )
        systemd.install_signals(asyncio.get_running_loop(), sd, stop, reloader)
        log.info(
            "sync controller %s of cluster %s: listening on %s, advertised as %s",
            announcer.name,
            config["cluster_name"],
            config["listen"],
            config["advertise"],
        )
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(configmaps.run()),
                tg.create_task(announcer.run()),
                *(tg.create_task(r.run()) for r in reconcilers),
                tg.create_task(sd.run_watchdog()),
            ]
            if tls is not None:  # its own certificate, by CSR at 2/3 of its lifetime
                renewer = Renewer(f"sync controller {config['id']}", tls, CsrIssue(api))
                tasks.append(tg.create_task(renewer.run()))
            sd.ready(
                f"sync controller {announcer.name} of cluster {config['cluster_name']}: "
                f"peers dial {config['advertise']}"
            )
            await stop.wait()
            log.info("sync controller %s: shutting down", announcer.name)
            for task in tasks:
                task.cancel()
    finally:
        if metrics_server is not None:
            await metrics_server.close()
        await link.close()
        await api.close()


def main(argv: list[str] | None = None) -> None:
    try:
        config = parse_args(argv)
    except ConfigError as e:
        print(f"vmferry-sync-controller: error: {e}", file=sys.stderr)
        sys.exit(2)
    logs.setup(f"sync/{config['cluster_name']}", config["log_level"])
    try:
        asyncio.run(serve(config, sys.argv[1:] if argv is None else argv))
    except (ConfigError, pki.CertificateExpired) as e:
        log.error("%s", e)
        sys.exit(2)


if __name__ == "__main__":
    main()
