"""``vmferry-controller``: the API server, the state store and the cluster reconcilers.

Configuration comes from a TOML file (``deploy/examples/controller.toml``); command-line
flags override it. The daemon serves the object API over mTLS only, unless
``--insecure-plaintext`` asks otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket
import sys
from pathlib import Path
from typing import Any

import grpc

from controller import ha
from controller.admission import Admission
from controller.api import ApiService
from controller.audit import AuditLog
from controller.authn import Authenticator, TokenSigner, load_signing_key
from controller.cert_rotation import self_renewal
from controller.console import Console
from controller.csr_signer import KIND as CSR_KIND
from controller.csr_signer import CsrSigner, load_ca
from controller.events import DEFAULT_EVENT_TTL, EventExpiry
from controller.forklift.cluster import bootstrap_forklift
from controller.forklift.run import run_forklift
from controller.ha import Replication
from controller.metrics import ControllerMetrics, rbac_authorizer
from controller.migration_controller import MigrationController
from controller.network_controller import NetworkController
from controller.node_monitor import NodeMonitor
from controller.objects import StoreSource
from controller.rbac import load_policy
from controller.rbac_builtin import bootstrap_rbac
from controller.rbac_controller import run_rbac_reconcilers
from controller.storage_controller import StorageController
from controller.store import Store
from controller.vm_controller import VMController
from controller.vmi_controller import VMIController
from vmferry import grpc_options, httpserve, logs, metrics_http, pki, systemd
from vmferry.config import ConfigError, daemon_config
from vmferry.errors import AlreadyExists
from vmferry.informer import Informer
from vmferry.migration_network import NAD_KIND, NAD_NAMESPACE
from vmferry.objects import kinds, schema
from vmferry.rpc import api_pb2_grpc

log = logging.getLogger("vmferry.controller")

CONFIG_KEYS: dict[str, type | tuple[type, ...]] = {
    "listen": str,
    "data_dir": str,
    "ca": str,
    "cert": str,
    "key": str,
    "node_grace_seconds": (int, float),
    "event_ttl_seconds": (int, float),
    "log_level": str,
    "insecure_plaintext": bool,
    "audit_log": str,
    "token_listen": str,
    "console_listen": str,
    **ha.CONFIG_KEYS,
    **metrics_http.CONFIG_KEYS,
    "ca_key": str,
}
DEFAULTS: dict[str, Any] = {
    "listen": "127.0.0.1:7443",
    "data_dir": "/var/lib/vmferry/controller",
    "node_grace_seconds": 10.0,
    "event_ttl_seconds": DEFAULT_EVENT_TTL,  # kube-apiserver's --event-ttl (1h)
    "log_level": "info",
    "insecure_plaintext": False,
    "console_listen": "",  # host:port of the web console (HTTPS); empty: no console
    **ha.DEFAULTS,
    **metrics_http.DEFAULTS,
}
METRICS_AUTH_MODES = tuple(metrics_http.MetricsAuth)  # none, allowlist, rbac
BOOTSTRAP_NAMESPACES = ("default", kinds.SYSTEM_NAMESPACE, "kube-system")


def parse_args(argv: list[str] | None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        prog="vmferry-controller",
        description="vmferry controller: object API (gRPC, mTLS), store and reconcilers.",
    )
    p.add_argument("--config", type=Path, help="TOML configuration file")
    p.add_argument("--listen", help=f"host:port of the API (default {DEFAULTS['listen']})")
    p.add_argument("--data-dir", help=f"state directory (default {DEFAULTS['data_dir']})")
    p.add_argument("--ca", help="cluster CA certificate")
    p.add_argument("--cert", help="server certificate (from 'vmferry pki issue server')")
    p.add_argument("--key", help="server private key")
    p.add_argument(
        "--ca-key",
        help="the CA's private key: sign approved node certificate requests (vmferry join); "
        "default: none, requests wait unsigned",
    )
    p.add_argument(
        "--node-grace-seconds",
        type=float,
        help="a node silent this long goes NotReady (default 10)",
    )
    p.add_argument(
        "--event-ttl-seconds",
        type=float,
        help="delete Events not seen for this long (default 3600, kube-apiserver's --event-ttl)",
    )
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    metrics_http.add_flags(p, METRICS_AUTH_MODES)
    p.add_argument("--console-listen", help="host:port for the web console (empty: off)")
    p.add_argument(
        "--audit-log",
        help="file of the audit log, one JSON line per decision (default <data-dir>/audit.log)",
    )
    p.add_argument(
        "--token-listen",
        help="host:port of an extra TLS listener for bearer-token clients without a "
        "client certificate (default: none; tokens are always accepted on --listen too)",
    )
    p.add_argument(
        "--insecure-plaintext",
        action="store_true",
        default=None,
        help="serve without TLS (tests only; never in production)",
    )
    ha.add_arguments(p)
    args = p.parse_args(argv)
    config = daemon_config(args, DEFAULTS, CONFIG_KEYS, tls_what="a server certificate")
    if float(config["event_ttl_seconds"]) <= 0:
        p.error(f"event_ttl_seconds must be positive, not {config['event_ttl_seconds']}")
    config["metrics"] = metrics_http.settings(config, METRICS_AUTH_MODES)
    return config


async def bootstrap(store: Store) -> None:
    """Create the objects every cluster has: namespaces and the HyperConverged singleton."""
    for ns in BOOTSTRAP_NAMESPACES:
        with contextlib.suppress(AlreadyExists):
            await store.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    hco = schema.apply_defaults(
        {
            "apiVersion": kinds.by_kind("HyperConverged").api_version,
            "kind": "HyperConverged",
            "metadata": {"name": kinds.HYPERCONVERGED_NAME, "namespace": kinds.SYSTEM_NAMESPACE},
            "spec": {},
        }
    )
    try:
        await store.create(hco)
    except AlreadyExists:  # a store from before: fill in what defaulting added since
        existing = await store.get(
            "HyperConverged", kinds.SYSTEM_NAMESPACE, hco["metadata"]["name"]
        )
        upgraded = schema.apply_defaults(existing)
        if upgraded != existing:
            await store.update(upgraded)
    await bootstrap_rbac(store)
    await bootstrap_forklift(store)  # openshift-mtv and ForkliftController/forklift-controller


async def serve(config: dict[str, Any], argv: list[str] | None = None) -> None:
    """Serve until SIGTERM/SIGINT; SIGHUP re-reads the configuration (``argv``: the
    command line it came from) and applies ``log_level`` and ``node_grace_seconds`` live."""
    sd = systemd.Notifier.from_env()
    sd.status("opening the store")
    data_dir = Path(config["data_dir"])
    data_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before serving
    replication = await Replication.open(config, data_dir)
    store = replication.store
    try:
        if replication.elector is None:  # on etcd the leader bootstraps (no racing replicas)
            await bootstrap(store)
        server = grpc.aio.server(options=grpc_options.api_server_options())
        signer = TokenSigner(load_signing_key(data_dir))
        audit = AuditLog(Path(config.get("audit_log") or data_dir / "audit.log"))
        api = ApiService(
            store, Admission(store), authenticator=Authenticator(store, signer), audit=audit
        )
        api_pb2_grpc.add_ApiServicer_to_server(api, server)
        if config["insecure_plaintext"]:
            log.warning(
                "serving the API WITHOUT TLS on %s (--insecure-plaintext)", config["listen"]
            )
            port = server.add_insecure_port(config["listen"])
            tls = None
        else:
            tls = pki.TlsFiles(Path(config["ca"]), Path(config["cert"]), Path(config["key"]))
            port = server.add_secure_port(config["listen"], pki.server_credentials(tls))
            if config.get("token_listen"):
                token_port = server.add_secure_port(
                    config["token_listen"], pki.server_credentials(tls, require_client_cert=False)
                )
                if token_port == 0:
                    raise ConfigError(f"cannot listen on {config['token_listen']}")
                log.info("bearer-token clients served on %s", config["token_listen"])
        if port == 0:
            raise ConfigError(f"cannot listen on {config['listen']}")
        await server.start()
        log.info("api serving on %s (data in %s)", config["listen"], data_dir)
        try:  # from here a failure (a port taken, say) stops the server: never a hang
            await _serve_started(config, replication, signer, api, tls, sd, argv)
        finally:
            await server.stop(grace=2)
    finally:
        await store.close()


async def _serve_started(
    config: dict[str, Any],
    replication: Replication,
    signer: TokenSigner,
    api: ApiService,
    tls: pki.TlsFiles | None,
    sd: systemd.Notifier,
    argv: list[str] | None = None,
) -> None:
    """Everything that runs once the API server is up, until a stop signal. The
    reconcilers run only while this replica leads (always, on SQLite)."""
    store = replication.store
    source = StoreSource(store)
    vms = Informer(source, "VirtualMachine")
    vmis = Informer(source, "VirtualMachineInstance")
    vmims = Informer(source, "VirtualMachineInstanceMigration")
    nodes = Informer(source, "Node")
    hcos = Informer(source, "HyperConverged")
    nads = Informer(source, NAD_KIND, namespace=NAD_NAMESPACE)
    pvcs = Informer(source, "PersistentVolumeClaim")
    storage_classes = Informer(source, "StorageClass")
    informers = (vms, vmis, vmims, nodes, hcos, nads, pvcs, storage_classes)

    def synced() -> bool:
        return all(inf.synced.is_set() for inf in informers)

    metrics = ControllerMetrics(
        vmims, vmis, instance=socket.gethostname(), ready=synced, leading=replication.leading
    )
    http_servers: list[httpserve.Served] = []
    try:  # the HTTP servers started so far stop with the daemon, however it ends
        if config["metrics"] is not None:
            http_servers.append(
                await metrics_http.start(
                    "controller",
                    config["metrics"],
                    metrics.registry,
                    tls=tls,
                    ready=lambda: (
                        None if synced() else "the informers have not listed the store yet"
                    ),
                    rbac=rbac_authorizer(
                        api.authenticator.authenticate_token, lambda: load_policy(store)
                    ),
                )
            )
        console = None
        if config["console_listen"]:
            console_tls = None if config["insecure_plaintext"] else tls
            console = Console(api, vmims=vmims, vmis=vmis, tls=console_tls)
            listen = config["console_listen"]
            http_servers.append(
                await httpserve.listening("the web console", listen, console.serve(listen))
            )
        csrs = _csr_signer(config, store)
        stop = asyncio.Event()
        monitor = NodeMonitor(store, grace_seconds=float(config["node_grace_seconds"]))
        reloader = systemd.ConfigReloader(
            lambda: parse_args(argv),
            config,
            {
                "log_level": systemd.live_log_level,
                "node_grace_seconds": lambda v: setattr(monitor, "grace", float(v)),
            },
        )
        systemd.install_signals(asyncio.get_running_loop(), sd, stop, reloader)
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(inf.run()) for inf in informers]
            tasks.append(tg.create_task(sd.run_watchdog()))
            rotation = self_renewal(tls, (csrs.ca_cert, csrs.ca_key) if csrs else None)
            if rotation is not None:  # every replica renews its own server certificate
                tasks.append(tg.create_task(rotation))
            sd.status("listing the store (informers)")
            for inf in informers:
                await inf.synced.wait()

            async def reconcile() -> None:
                if replication.elector is not None:
                    await bootstrap(store)
                # This term's reconcilers see every cached object (the informers replay
                # it to a new handler) and stop being fed when the term ends.
                with contextlib.ExitStack() as term:
                    for inf in informers:
                        term.enter_context(inf.handler_scope())
                    await run_reconcilers()

            async def run_reconcilers() -> None:
                async with asyncio.TaskGroup() as work:
                    for reconciler in (
                        VMController(store, vms, vmis, vmims).run(),
                        VMIController(store, vmis, nodes).run(),
                        MigrationController(store, vmims, vmis, nodes, hcos).run(),
                        NetworkController(store, hcos, nads, nodes).run(),
                        StorageController(store, pvcs, storage_classes).run(),
                        monitor.run(),
                        run_rbac_reconcilers(store, signer, _ca_pem(config)),
                        run_forklift(store, Path(config["data_dir"])),
                        EventExpiry(store, float(config["event_ttl_seconds"])).run(),
                        *((csrs.csrs.run(), csrs.run()) if csrs is not None else ()),
                    ):
                        work.create_task(reconciler)

            tasks.append(tg.create_task(replication.lead(reconcile)))
            if console is not None:
                tasks.append(tg.create_task(console.run()))
            log.info("reconcilers running" if replication.elector is None else "campaigning")
            sd.ready(
                f"serving the API on {config['listen']}; "
                + ("reconcilers running" if replication.elector is None else "campaigning")
            )
            await stop.wait()
            log.info("shutting down")
            for task in tasks:
                task.cancel()
    finally:
        for http_server in http_servers:
            await http_server.close()


def _csr_signer(config: dict[str, Any], store: Store) -> CsrSigner | None:
    """The signer of node certificate requests, with the CA of ``ca``/``ca_key``
    (None without ``ca_key``: requests then wait unsigned)."""
    if not config.get("ca_key"):
        return None
    try:
        ca = load_ca(Path(config["ca"]), Path(config["ca_key"]))
    except (OSError, ValueError) as e:
        raise ConfigError(f"ca_key: {e}") from None
    csrs = Informer(StoreSource(store), CSR_KIND)
    log.info("signing approved node certificate requests with %s", config["ca_key"])
    return CsrSigner(store, csrs, ca)


def _ca_pem(config: dict[str, Any]) -> bytes:
    """The cluster CA certificate published in every namespace (empty without TLS)."""
    return Path(config["ca"]).read_bytes() if config.get("ca") else b""


def main(argv: list[str] | None = None) -> None:
    try:
        config = parse_args(argv)
    except ConfigError as e:
        print(f"vmferry-controller: error: {e}", file=sys.stderr)
        sys.exit(2)
    logs.setup("controller", config["log_level"])
    try:
        asyncio.run(serve(config, sys.argv[1:] if argv is None else argv))
    except (ConfigError, pki.CertificateExpired) as e:
        log.error("%s", e)
        sys.exit(2)


if __name__ == "__main__":
    main()
