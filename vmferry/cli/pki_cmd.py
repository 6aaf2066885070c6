"""``vmferry pki ...``: create the cluster CA and issue node, user and server certificates.

Every command takes ``--pki-dir`` (default: ``$VMFERRY_PKI_DIR``, else ``/etc/vmferry/pki``)
and returns an exit code: 0 on success, 1 on an error, which is printed as
``error: <message>`` on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID

from vmferry import pki

PKI_DIR_ENV = "VMFERRY_PKI_DIR"
DEFAULT_PKI_DIR = Path("/etc/vmferry/pki")

_EKU_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
}

Handler = Callable[[argparse.Namespace], int]


def _pki_dir(args: argparse.Namespace) -> Path:
    if args.pki_dir is not None:
        return Path(args.pki_dir)
    env = os.environ.get(PKI_DIR_ENV)
    return Path(env) if env else DEFAULT_PKI_DIR


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _guarded(handler: Handler) -> Handler:
    """Turn the expected failures of ``handler`` into ``error: ...`` on stderr and exit 1."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except OSError as e:  # ours carry a message; the system's a strerror and a filename
            message = f"{e.strerror}: {e.filename}" if e.filename and e.strerror else str(e)
            print(f"error: {message}", file=sys.stderr)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
        return 1

    return run


def _print_files(files: pki.TlsFiles) -> None:
    print(f"certificate: {files.cert}")
    print(f"key:         {files.key}")
    print(f"ca:          {files.ca}")
    print(f"not after:   {pki.cert_not_after(files.cert).isoformat()}")


# ---------------------------------------------------------------------------------------
# Commands


def _cmd_init(args: argparse.Namespace) -> int:
    pki_dir = _pki_dir(args)
    ca = pki.init_ca(pki_dir, args.cluster_name, days=args.days, force=args.force)
    print(f"CA certificate: {ca}")
    print(f"CA key:         {pki_dir / pki.CA_KEY_FILE} (mode 0600; keep it secret)")
    print(f"not after:      {pki.cert_not_after(ca).isoformat()}")
    return 0


def _cmd_issue_node(args: argparse.Namespace) -> int:
    files = pki.issue_node(_pki_dir(args), args.name, ips=args.ip, dns=args.dns, days=args.days)
    _print_files(files)
    return 0


def _cmd_issue_user(args: argparse.Namespace) -> int:
    files = pki.issue_user(_pki_dir(args), args.name, groups=args.group, days=args.days)
    _print_files(files)
    return 0


def _cmd_issue_server(args: argparse.Namespace) -> int:
    files = pki.issue_server(_pki_dir(args), args.name, ips=args.ip, dns=args.dns, days=args.days)
    _print_files(files)
    return 0


def _cmd_issue_sync(args: argparse.Namespace) -> int:
    files = pki.issue_sync(_pki_dir(args), args.name, ips=args.ip, dns=args.dns, days=args.days)
    _print_files(files)
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    pki_dir = _pki_dir(args)
    path = Path(args.path)
    if not path.exists() and not path.is_absolute() and (pki_dir / path).exists():
        path = pki_dir / path  # e.g. "vmferry pki show nodes/node1.crt"
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError:
        raise ValueError(f"{path} is not a PEM certificate") from None

    print(f"file:        {path}")
    print(f"subject:     {cert.subject.rfc4514_string()}")
    print(f"issuer:      {cert.issuer.rfc4514_string()}")
    print(f"serial:      {cert.serial_number:x}")
    print(f"not before:  {cert.not_valid_before_utc.isoformat()}")
    print(f"not after:   {cert.not_valid_after_utc.isoformat()}")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [f"IP:{ip}" for ip in san.get_values_for_type(x509.IPAddress)]
        names += [f"DNS:{d}" for d in san.get_values_for_type(x509.DNSName)]
        print(f"SANs:        {', '.join(names) or '-'}")
    except x509.ExtensionNotFound:
        print("SANs:        -")
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        print(f"key usage:   {', '.join(_EKU_NAMES.get(o, o.dotted_string) for o in eku)}")
    except x509.ExtensionNotFound:
        pass
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        print(f"CA:          {'yes' if bc.ca else 'no'}")
    except x509.ExtensionNotFound:
        pass
    try:
        identity = pki.identity_from_pem(path.read_bytes())
        print(f"user:        {identity.user}")
        print(f"groups:      {', '.join(identity.groups) or '-'}")
        if identity.is_node:
            print(f"node:        {identity.node_name}")
    except ValueError:
        pass
    ca_path = pki_dir / pki.CA_CERT_FILE
    if ca_path.exists() and ca_path.resolve() != path.resolve():
        ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
        try:
            cert.verify_directly_issued_by(ca)
            print(f"signed by:   {ca_path} (ok)")
        except (ValueError, TypeError, InvalidSignature):
            print(f"signed by:   NOT by {ca_path}")
    return 0


# ---------------------------------------------------------------------------------------
# Parsers


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pki-dir",
        metavar="DIR",
        default=None,
        help=f"PKI directory (default: ${PKI_DIR_ENV}, else {DEFAULT_PKI_DIR})",
    )


def _days(parser: argparse.ArgumentParser, default: int) -> None:
    parser.add_argument(
        "--days",
        type=_positive_int,
        default=default,
        metavar="N",
        help=f"validity in days (default: {default}); never longer than the CA's",
    )


def _san_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ip",
        action="append",
        default=[],
        metavar="IP",
        help="IP address to put in the certificate's SANs (repeatable)",
    )
    parser.add_argument(
        "--dns",
        action="append",
        default=[],
        metavar="NAME",
        help="DNS name to put in the certificate's SANs (repeatable; NAME itself is always added)",
    )


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``pki`` command and its subcommands; each leaf sets ``func(args) -> int``."""
    formatter = argparse.RawDescriptionHelpFormatter
    pki_parser = subparsers.add_parser(
        "pki",
        help="manage the cluster CA and TLS certificates",
        description=(
            "Manage the cluster's certificate authority and the certificates of nodes,\n"
            "users and the controller. Renew a certificate by issuing it again: servers\n"
            "pick up the new files on their next connection, without a restart."
        ),
        epilog=(
            "example:\n"
            "  vmferry pki init --cluster-name lab\n"
            "  vmferry pki issue server controller --ip 10.0.0.1 --dns controller.lab\n"
            "  vmferry pki issue node node1 --ip 10.0.0.11\n"
            "  vmferry pki issue user alice --group admins\n"
            "  vmferry pki issue sync sync1 --ip 10.0.0.10\n"
            "  vmferry pki show users/alice.crt"
        ),
        formatter_class=formatter,
    )
    pki_sub = pki_parser.add_subparsers(dest="pki_command", metavar="COMMAND", required=True)

    init = pki_sub.add_parser(
        "init",
        help="create the cluster CA (ca.crt, ca.key)",
        description=(
            "Create the cluster CA: ca.crt and ca.key (mode 0600) in the PKI directory.\n"
            "Refuses to overwrite an existing CA unless --force is given; replacing the CA\n"
            "invalidates every certificate it issued."
        ),
        formatter_class=formatter,
    )
    _common(init)
    init.add_argument(
        "--cluster-name",
        default="vmferry",
        metavar="NAME",
        help="cluster name; the CA's subject is CN=NAME-ca (default: vmferry)",
    )
    init.add_argument("--force", action="store_true", help="replace an existing CA")
    _days(init, 3650)
    init.set_defaults(func=_guarded(_cmd_init))

    issue = pki_sub.add_parser(
        "issue",
        help="issue (or renew) a node, user, server or sync-controller certificate",
        description=(
            "Issue a certificate signed by the cluster CA. Issuing an existing name again\n"
            "replaces its files: that is how certificates are renewed."
        ),
        formatter_class=formatter,
    )
    issue_sub = issue.add_subparsers(dest="issue_kind", metavar="KIND", required=True)

    node = issue_sub.add_parser(
        "node",
        help="certificate of a node handler (nodes/NAME.crt)",
        description=(
            "Issue nodes/NAME.crt and nodes/NAME.key: subject CN=system:node:NAME,\n"
            "O=system:nodes, usable as server and client. List every address the node\n"
            "is reached by with --ip/--dns."
        ),
        formatter_class=formatter,
    )
    _common(node)
    node.add_argument("name", metavar="NAME", help="node name")
    _san_options(node)
    _days(node, 30)
    node.set_defaults(func=_guarded(_cmd_issue_node))

    user = issue_sub.add_parser(
        "user",
        help="client certificate of a user (users/NAME.crt)",
        description=(
            "Issue users/NAME.crt and users/NAME.key: subject CN=NAME with one O=GROUP\n"
            "per --group, usable as a client only. RBAC sees the user NAME in those groups."
        ),
        formatter_class=formatter,
    )
    _common(user)
    user.add_argument("name", metavar="NAME", help="user name")
    user.add_argument(
        "--group",
        action="append",
        default=[],
        metavar="G",
        help="group the user belongs to (repeatable)",
    )
    _days(user, 30)
    user.set_defaults(func=_guarded(_cmd_issue_user))

    server = issue_sub.add_parser(
        "server",
        help="certificate of the controller (servers/NAME.crt)",
        description=(
            "Issue servers/NAME.crt and servers/NAME.key: subject CN=NAME, usable as\n"
            "server and client. Clients check the address they dial against the SANs, so\n"
            "list every IP and DNS name the server is reached by."
        ),
        formatter_class=formatter,
    )
    _common(server)
    server.add_argument("name", metavar="NAME", help="server name (also added as a DNS SAN)")
    _san_options(server)
    _days(server, 30)
    server.set_defaults(func=_guarded(_cmd_issue_server))

    sync = issue_sub.add_parser(
        "sync",
        help="certificate of a sync controller (sync/NAME.crt; cross-cluster migration)",
        description=(
            "Issue sync/NAME.crt and sync/NAME.key for vmferry-sync-controller: subject\n"
            "CN=system:vmferry:sync-controller, usable as server and client. Peer clusters\n"
            "dial the address it advertises: list that IP or DNS name with --ip/--dns."
        ),
        formatter_class=formatter,
    )
    _common(sync)
    sync.add_argument("name", metavar="NAME", help="file name (also added as a DNS SAN)")
    _san_options(sync)
    _days(sync, 30)
    sync.set_defaults(func=_guarded(_cmd_issue_sync))

    show = pki_sub.add_parser(
        "show",
        help="print a certificate's subject, SANs and expiry",
        description=(
            "Print a certificate's subject, issuer, SANs, key usage, validity and the\n"
            "identity vmferry derives from it, and whether the cluster CA signed it.\n"
            "A relative PATH not found in the current directory is looked up in the\n"
            "PKI directory."
        ),
        formatter_class=formatter,
    )
    _common(show)
    show.add_argument("path", metavar="PATH", help="PEM certificate file")
    show.set_defaults(func=_guarded(_cmd_show))
