"""``vmferry join``, ``vmferry token create`` and ``vmferry certificate approve|deny``:
a node gets its certificate without its key ever leaving it (Kubernetes' kubelet TLS
bootstrap; controller/csr_signer.py is the other side).

``join``:

1. reads the certificate chain the controller's token listener presents, without
   trusting it yet, and keeps the CA whose public-key hash is ``--ca-hash`` (nothing
   else is trusted: a different server is refused before any secret is sent);
2. makes the node's EC P-256 key locally (mode 0600) and a request for
   ``CN=system:node:<name>, O=system:nodes`` with its addresses;
3. submits a CertificateSigningRequest authenticated by the bootstrap token, over TLS
   verified against that CA;
4. waits for it to be approved and signed (or says it was denied, or why it failed)
   and writes ``ca.crt``, ``nodes/<name>.key`` and ``nodes/<name>.crt`` under
   ``--pki-dir`` (the paths handler.toml names).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import re
import secrets
import socket
import ssl
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from vmferry import bootstrap_token
from vmferry.cli import cert_renew_cmd
from vmferry.cli.common import error, run_with_client, server_error
from vmferry.client import ApiClient
from vmferry.config import ClientConfig
from vmferry.errors import ApiError
from vmferry.objects import kinds
from vmferry.pki import CA_CERT_FILE, TlsFiles, csr
from vmferry.pki.issuing import CERT_MODE, KEY_MODE, NODES_DIR, _write_atomic

CSR_KIND = "CertificateSigningRequest"
POLL_S = 0.5  # s between two looks at the request while it waits for approval
_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """Seconds of ``<n>s|m|h|d`` (``90s``, ``2m``, ``1h``, ``30d``); ValueError otherwise."""
    match = _DURATION.match(text.strip())
    if match is None or int(match.group(1)) == 0:
        raise ValueError(f"duration {text!r}: expected a positive <n>s, <n>m, <n>h or <n>d")
    return int(match.group(1)) * _UNIT_S[match.group(2)]


def fetch_pinned_ca(server: str, ca_hash: str, timeout: float = 10.0) -> bytes:
    """The PEM of the CA in ``server``'s TLS chain whose public-key hash is ``ca_hash``;
    ValueError naming what was presented when none matches."""
    host, sep, port = server.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--server {server!r}: expected HOST:PORT")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # nothing is trusted from this connection but the pin
    ctx.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((host.strip("[]"), int(port)), timeout) as raw,
            ctx.wrap_socket(raw, server_hostname=host.strip("[]")) as tls,
        ):
            # public as SSLSocket.get_unverified_chain() from Python 3.13
            chain = tls._sslobj.get_unverified_chain() or []  # type: ignore[attr-defined]
    except OSError as e:
        raise ValueError(f"cannot reach {server}: {e}") from None
    seen = []
    for cert in chain:
        pem = cert.public_bytes(ssl._ssl.ENCODING_PEM).encode()  # type: ignore[attr-defined]
        found = csr.ca_hash(pem)
        if secrets.compare_digest(found, ca_hash):
            return bytes(pem)
        seen.append(found)
    raise ValueError(
        f"no certificate presented by {server} has the hash {ca_hash} "
        f"(presented: {', '.join(seen) or 'none'}): wrong server, or wrong --ca-hash"
    )


def cmd_join(args: argparse.Namespace) -> int:
    if not args.ca_hash.startswith(csr.HASH_PREFIX):
        return error(f"--ca-hash {args.ca_hash!r}: expected {csr.HASH_PREFIX}<64 hex digits>")
    if not bootstrap_token.is_bootstrap_token(args.token):
        return error("--token: expected <6 chars>.<16 chars> of [a-z0-9] ('vmferry token create')")
    pki_dir = Path(args.pki_dir)
    try:
        ca_pem = fetch_pinned_ca(args.server, args.ca_hash)
        key_pem, request_pem = csr.make_node_request(args.node_name, args.ip, args.dns)
    except ValueError as e:
        return error(str(e))
    (pki_dir / NODES_DIR).mkdir(parents=True, exist_ok=True)
    _write_atomic(pki_dir / CA_CERT_FILE, ca_pem, CERT_MODE)
    key_path = pki_dir / NODES_DIR / f"{args.node_name}.key"
    cert_path = pki_dir / NODES_DIR / f"{args.node_name}.crt"
    config = ClientConfig(
        server=args.server,
        tls=TlsFiles(pki_dir / CA_CERT_FILE, Path(), Path()),
        token=args.token,
    )
    request: dict[str, Any] = {
        "apiVersion": kinds.by_kind(CSR_KIND).api_version,
        "kind": CSR_KIND,
        "metadata": {"name": f"node-csr-{args.node_name}-{secrets.token_hex(3)}"},
        "spec": {
            "request": base64.b64encode(request_pem).decode(),
            "signerName": csr.NODE_SIGNER,
            "usages": list(csr.NODE_USAGES),
        },
    }
    if args.expiration:
        try:
            request["spec"]["expirationSeconds"] = parse_duration(args.expiration)
        except ValueError as e:
            return error(f"--expiration: {e}")

    async def go() -> bytes:
        async with ApiClient(config) as api:
            created = await api.create(request)
            name = created["metadata"]["name"]
            print(f"certificatesigningrequest/{name} created; waiting for approval")
            deadline = time.monotonic() + args.timeout
            while time.monotonic() < deadline:
                obj = await api.get(CSR_KIND, "", name)
                status = obj.get("status") or {}
                if status.get("certificate"):
                    return base64.b64decode(status["certificate"])
                for c in status.get("conditions") or []:
                    if c.get("type") in ("Denied", "Failed") and c.get("status") == "True":
                        raise ValueError(
                            f"certificatesigningrequest/{name} {c['type'].lower()}: "
                            f"{c.get('message') or c.get('reason') or 'no reason given'}"
                        )
                await asyncio.sleep(POLL_S)
            raise ValueError(
                f"certificatesigningrequest/{name} not signed within {args.timeout:.0f}s: "
                f"approve it ('vmferry certificate approve {name}')"
            )

    try:
        cert_pem = asyncio.run(go())
    except ApiError as e:
        return server_error(e)
    except ValueError as e:
        return error(str(e))
    _write_atomic(key_path, key_pem, KEY_MODE)
    _write_atomic(cert_path, cert_pem, CERT_MODE)
    print(f"node {args.node_name} joined: {cert_path}, {key_path}, {pki_dir / CA_CERT_FILE}")
    return 0


def cmd_token_create(args: argparse.Namespace) -> int:
    try:
        ttl = timedelta(seconds=parse_duration(args.ttl))
        token = bootstrap_token.new_token(ttl, auto_approve=not args.no_auto_approve)
    except ValueError as e:
        return error(str(e))

    async def run(api: ApiClient, config: ClientConfig) -> int:
        await api.create(bootstrap_token.to_secret(token))
        ca = config.tls.ca.read_bytes() if config.tls is not None else b""
        print(token.token)
        if ca:
            print(f"ca hash: {csr.ca_hash(ca)}  (expires {token.expiration:%Y-%m-%dT%H:%M:%SZ})")
        return 0

    return run_with_client(args, run)


def _decide(args: argparse.Namespace, kind: str) -> int:
    async def run(api: ApiClient, config: ClientConfig) -> int:
        obj = await api.get(CSR_KIND, "", args.name)
        status = obj.setdefault("status", {})
        if status.get("certificate") or any(
            c.get("type") in ("Approved", "Denied") for c in status.get("conditions") or []
        ):
            return error(f"certificatesigningrequest/{args.name} is decided already")
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        status.setdefault("conditions", []).append(
            {
                "type": kind,
                "status": "True",
                "reason": f"{kind}ByAdministrator",
                "message": args.reason or f"{kind.lower()} by {(await api.whoami())[0]}",
                "lastUpdateTime": now,
                "lastTransitionTime": now,
            }
        )
        await api.update(obj, subresource="status")
        print(f"certificatesigningrequest/{args.name} {kind.lower()}")
        return 0

    return run_with_client(args, run)


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "join",
        help="get this node's certificate from the cluster with a bootstrap token",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--server", required=True, help="the controller's token listener HOST:PORT")
    p.add_argument("--token", required=True, help="a bootstrap token ('vmferry token create')")
    p.add_argument("--ca-hash", required=True, help="sha256:<hex> of the cluster CA's public key")
    p.add_argument("--node-name", required=True, help="this node's name (handler.toml node_name)")
    p.add_argument("--ip", action="append", default=[], help="an address of this node (repeatable)")
    p.add_argument(
        "--dns", action="append", default=[], help="a DNS name of this node (repeatable)"
    )
    p.add_argument(
        "--pki-dir", default="/etc/vmferry/pki", help="where to write (default %(default)s)"
    )
    p.add_argument(
        "--expiration", help="certificate lifetime, e.g. 720h, at least 2m (default 30d)"
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait (default 300)")
    p.set_defaults(func=cmd_join)

    t = sub.add_parser("token", help="bootstrap tokens for 'vmferry join'")
    tsub = t.add_subparsers(dest="token_command", required=True)
    p = tsub.add_parser("create", parents=[common], help="create a bootstrap token")
    p.add_argument("--ttl", default="1h", help="lifetime (default 1h)")
    p.add_argument(
        "--no-auto-approve",
        action="store_true",
        help="an administrator approves its requests (default: approved automatically)",
    )
    p.set_defaults(func=cmd_token_create)

    c = sub.add_parser(
        "certificate", help="approve or deny certificate signing requests, renew your own"
    )
    csub = c.add_subparsers(dest="certificate_command", required=True)
    for verb, kind in (("approve", "Approved"), ("deny", "Denied")):
        p = csub.add_parser(verb, parents=[common], help=f"{verb} a certificate signing request")
        p.add_argument("name")
        p.add_argument("--reason", default="", help="recorded in the condition's message")
        p.set_defaults(func=lambda a, k=kind: _decide(a, k))
    cert_renew_cmd.add_parser(csub, common)
