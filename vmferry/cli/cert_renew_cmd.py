"""``vmferry certificate renew``: a new key and certificate for the CLI's own identity.

A CertificateSigningRequest (signer ``vmferry.io/self``) for exactly the identity of the
client certificate the CLI config names, authenticated by that certificate while it is
still valid. As in Kubernetes, which approves no user's client certificate by itself, an
administrator approves it (``vmferry certificate approve NAME``); the command waits for
that, then writes the new key and certificate over the files the config names (key
first, each atomically). The old certificate stays valid until it expires.
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime

from cryptography import x509

from vmferry.cert_request import CsrIssue
from vmferry.cli.common import error, run_with_client
from vmferry.client import ApiClient
from vmferry.config import ClientConfig
from vmferry.pki.renewal import RenewalError, Renewer

DEFAULT_TIMEOUT_S = 600.0


def cmd_certificate_renew(args: argparse.Namespace) -> int:
    async def run(api: ApiClient, config: ClientConfig) -> int:
        if config.tls is None:
            return error("the CLI config has no client certificate (cert/key): nothing to renew")
        tls = config.tls

        def created(name: str) -> None:
            print(
                f"certificatesigningrequest/{name} created; waiting up to "
                f"{args.timeout:.0f}s for an administrator: vmferry certificate approve {name}",
                flush=True,
            )

        issue = CsrIssue(api, timeout=args.timeout, on_created=created, clock=time.monotonic)
        renewer = Renewer(f"certificate {tls.cert}", tls, issue)
        try:
            await renewer.renew()
        except RenewalError as e:
            return error(f"{e} (the certificate {tls.cert} is unchanged)")
        new = x509.load_pem_x509_certificate(tls.cert.read_bytes())
        left = new.not_valid_after_utc - datetime.now(UTC)
        print(
            f"{tls.cert} and {tls.key} renewed: valid until "
            f"{new.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ} ({left.days}d)"
        )
        return 0

    return run_with_client(args, run)


def add_parser(
    certificate_sub: argparse._SubParsersAction, common: argparse.ArgumentParser
) -> None:
    p = certificate_sub.add_parser(
        "renew",
        parents=[common],
        help="renew your own client certificate (an administrator approves the request)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="seconds to wait for the approval (default %(default).0f)",
    )
    p.set_defaults(func=cmd_certificate_renew)
