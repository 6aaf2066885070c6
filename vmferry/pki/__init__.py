"""The cluster CA and the TLS credentials of every vmferry identity (DESIGN.md section 4).

One CA per cluster signs short-lived leaf certificates. Everything is EC P-256 with
SHA-256 signatures, made with the ``cryptography`` package. A PKI directory looks like::

    <pki_dir>/ca.crt  ca.key                (key mode 0600)
    <pki_dir>/nodes/<name>.crt  .key        CN=system:node:<name>, O=system:nodes
    <pki_dir>/users/<name>.crt  .key        CN=<name>, O=<group> per group
    <pki_dir>/servers/<name>.crt  .key      CN=<name> (the controller)
    <pki_dir>/sync/<name>.crt  .key         CN=system:vmferry:sync-controller

Identities follow Kubernetes: the user is the subject CN, the groups are the subject O
attributes, and a node is the user ``system:node:<name>`` in the group ``system:nodes``.

Renewal: each daemon renews its own certificate at 2/3 of its lifetime (``renewal.py``:
the controller with the CA key, nodes and sync controllers by CertificateSigningRequest),
users with ``vmferry certificate renew``; ``issue_*`` re-issues (overwrites the
identity's files atomically). A server built with :func:`server_credentials` picks up
new files on its next TLS handshake, without a restart and without touching established
connections. Clients reload by building a new channel with :func:`channel_credentials`;
existing channels keep their credentials.
"""

from vmferry.pki.credentials import (
    CertificateExpired,
    FilesStamp,
    ca_only_channel_credentials,
    channel_credentials,
    files_stamp,
    server_credentials,
)
from vmferry.pki.identity import (
    NODE_USER_PREFIX,
    NODES_GROUP,
    Identity,
    identity_from_pem,
    peer_identity,
)
from vmferry.pki.issuing import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    TlsFiles,
    cert_not_after,
    init_ca,
    issue_node,
    issue_server,
    issue_sync,
    issue_user,
    load_ca_pem,
)

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "NODES_GROUP",
    "NODE_USER_PREFIX",
    "CertificateExpired",
    "FilesStamp",
    "Identity",
    "TlsFiles",
    "ca_only_channel_credentials",
    "cert_not_after",
    "channel_credentials",
    "files_stamp",
    "identity_from_pem",
    "init_ca",
    "issue_node",
    "issue_server",
    "issue_sync",
    "issue_user",
    "load_ca_pem",
    "peer_identity",
    "server_credentials",
]
