"""Tests of vmferry.pki (CA, issuing, identities, gRPC mTLS with reload) and `vmferry pki`."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import ssl
import stat
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vmferry import pki
from vmferry.cli import pki_cmd
from vmferry.decentralized import SYNC_IDENTITY
from vmferry.pki.credentials import CertificateReloader

SERVICE = "vmferry.test.Echo"
METHOD = f"/{SERVICE}/Call"
RPC_TIMEOUT = 5.0  # s; a refused handshake must fail fast, not hang the test


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _eku(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _san(cert: x509.Certificate) -> tuple[list[Any], list[str]]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.IPAddress), san.get_values_for_type(x509.DNSName)


@pytest.fixture
def pki_dir(tmp_path: Path) -> Path:
    d = tmp_path / "pki"
    pki.init_ca(d, "lab")
    return d


# ---------------------------------------------------------------------------------------
# CA and issuing


def test_init_ca_writes_ca_with_private_key(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    ca_path = pki.init_ca(d, "lab", days=100)
    assert ca_path == d / "ca.crt"
    assert _mode(d / "ca.key") == 0o600
    ca = _cert(ca_path)
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "lab-ca"
    assert ca.issuer == ca.subject
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign is True
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    assert ca.signature_hash_algorithm is not None
    assert ca.signature_hash_algorithm.name == "sha256"
    ca.verify_directly_issued_by(ca)
    assert pki.load_ca_pem(d) == ca_path.read_bytes()
    remaining = pki.cert_not_after(ca_path) - datetime.now(UTC)
    assert timedelta(days=99) < remaining <= timedelta(days=100)
    assert not [p for p in d.iterdir() if p.name.endswith(".tmp")]


def test_init_ca_refuses_to_overwrite_unless_forced(pki_dir: Path) -> None:
    before = (pki_dir / "ca.crt").read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        pki.init_ca(pki_dir)
    assert (pki_dir / "ca.crt").read_bytes() == before
    pki.init_ca(pki_dir, force=True)
    assert (pki_dir / "ca.crt").read_bytes() != before
    assert _mode(pki_dir / "ca.key") == 0o600


def test_issue_before_init_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="pki init"):
        pki.issue_user(tmp_path, "alice")
    with pytest.raises(FileNotFoundError, match="pki init"):
        pki.load_ca_pem(tmp_path)


def test_issue_node(pki_dir: Path) -> None:
    files = pki.issue_node(
        pki_dir, "node1", ips=["10.0.0.11", "fd00::11"], dns=["node1.lab"], days=7
    )
    assert files == pki.TlsFiles(
        ca=pki_dir / "ca.crt", cert=pki_dir / "nodes/node1.crt", key=pki_dir / "nodes/node1.key"
    )
    assert _mode(files.key) == 0o600
    assert _mode(files.cert) == 0o644
    cert = _cert(files.cert)
    cert.verify_directly_issued_by(_cert(files.ca))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "system:node:node1"
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)] == [
        "system:nodes"
    ]
    ips, dns = _san(cert)
    assert ips == [ip_address("10.0.0.11"), ip_address("fd00::11")]
    assert dns == ["node1.lab", "node1"]
    assert _eku(cert) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    remaining = pki.cert_not_after(files.cert) - datetime.now(UTC)
    assert timedelta(days=6) < remaining <= timedelta(days=7)

    identity = pki.identity_from_pem(files.cert.read_bytes())
    assert identity == pki.Identity(user="system:node:node1", groups=("system:nodes",))
    assert identity.is_node
    assert identity.node_name == "node1"


def test_issue_user_with_groups(pki_dir: Path) -> None:
    files = pki.issue_user(pki_dir, "alice", groups=["admins", "system:masters", "admins", "dev"])
    assert files.cert == pki_dir / "users/alice.crt"
    assert _mode(files.key) == 0o600
    cert = _cert(files.cert)
    assert _eku(cert) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)

    identity = pki.identity_from_pem(files.cert.read_bytes())
    assert identity == pki.Identity(user="alice", groups=("admins", "system:masters", "dev"))
    assert not identity.is_node
    assert identity.node_name is None


def test_user_posing_as_node_needs_the_nodes_group(pki_dir: Path) -> None:
    plain = pki.identity_from_pem(pki.issue_user(pki_dir, "system:node:x").cert.read_bytes())
    assert not plain.is_node
    assert plain.node_name is None
    assert not pki.Identity("system:node:", ("system:nodes",)).is_node


def test_issue_server(pki_dir: Path) -> None:
    files = pki.issue_server(pki_dir, "controller", ips=["127.0.0.1"], dns=["localhost"])
    assert files.key == pki_dir / "servers/controller.key"
    assert _mode(files.key) == 0o600
    cert = _cert(files.cert)
    assert cert.subject.rfc4514_string() == "CN=controller"
    assert _san(cert) == ([ip_address("127.0.0.1")], ["localhost", "controller"])
    assert _eku(cert) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}


def test_issue_sync(pki_dir: Path) -> None:
    files = pki.issue_sync(pki_dir, "sync1", ips=["10.0.0.20"], dns=["sync.lab"])
    assert files.cert == pki_dir / "sync/sync1.crt"
    assert _mode(files.key) == 0o600
    cert = _cert(files.cert)
    assert cert.subject.rfc4514_string() == f"CN={SYNC_IDENTITY}"
    assert _san(cert) == ([ip_address("10.0.0.20")], ["sync.lab", "sync1"])
    assert _eku(cert) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    # the API sees the user system:vmferry:sync-controller, in no group
    assert pki.identity_from_pem(files.cert.read_bytes()) == pki.Identity(SYNC_IDENTITY, ())


def test_reissue_overwrites_with_a_new_key_and_serial(pki_dir: Path) -> None:
    first = pki.issue_node(pki_dir, "node1")
    cert1, key1 = first.cert.read_bytes(), first.key.read_bytes()
    second = pki.issue_node(pki_dir, "node1")
    assert second == first
    assert _cert(second.cert).serial_number != x509.load_pem_x509_certificate(cert1).serial_number
    assert second.key.read_bytes() != key1
    assert _mode(second.key) == 0o600
    assert sorted(p.name for p in (pki_dir / "nodes").iterdir()) == ["node1.crt", "node1.key"]


def test_leaf_never_outlives_the_ca(tmp_path: Path) -> None:
    pki.init_ca(tmp_path, days=3)
    files = pki.issue_user(tmp_path, "alice", days=30)
    assert pki.cert_not_after(files.cert) == pki.cert_not_after(files.ca)


@pytest.mark.parametrize("name", ["", "a/b", "a b", "a\tb", "..", "a\x00b"])
def test_bad_names_are_rejected(pki_dir: Path, name: str) -> None:
    for issue in (pki.issue_node, pki.issue_user, pki.issue_server):
        with pytest.raises(ValueError, match="name"):
            issue(pki_dir, name)
    assert not (pki_dir / "nodes").exists()


def test_bad_sans_groups_and_days_are_rejected(pki_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"invalid IP address '10\.0\.0\.256'"):
        pki.issue_node(pki_dir, "n1", ips=["10.0.0.256"])
    with pytest.raises(ValueError, match="invalid DNS name"):
        pki.issue_server(pki_dir, "s1", dns=["a b"])
    with pytest.raises(ValueError, match="ASCII"):
        pki.issue_node(pki_dir, "nöde")
    with pytest.raises(ValueError, match="invalid group"):
        pki.issue_user(pki_dir, "alice", groups=[""])
    with pytest.raises(ValueError, match="at least 1 day"):
        pki.issue_user(pki_dir, "alice", days=0)


def test_identity_from_pem_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        pki.identity_from_pem(b"not a certificate")


# ---------------------------------------------------------------------------------------
# gRPC mTLS


async def _start_server(
    tls: pki.TlsFiles, seen: list[pki.Identity | None]
) -> tuple[grpc.aio.Server, int]:
    async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        seen.append(pki.peer_identity(context))
        return b"echo:" + request

    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Call": grpc.unary_unary_rpc_method_handler(call)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port("127.0.0.1:0", pki.server_credentials(tls))
    assert port > 0
    await server.start()
    return server, port


async def _call(port: int, creds: grpc.ChannelCredentials, payload: bytes = b"hi") -> bytes:
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) as channel:
        reply: bytes = await channel.unary_unary(METHOD)(payload, timeout=RPC_TIMEOUT)
        return reply


def _server_cert_serial(port: int, client: pki.TlsFiles) -> int:
    """Open a fresh TLS connection (no gRPC) and return the serial of the server's cert."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(client.ca)
    ctx.load_cert_chain(client.cert, client.key)
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=RPC_TIMEOUT) as sock,
        ctx.wrap_socket(sock, server_hostname="127.0.0.1") as conn,
    ):
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


@pytest.mark.timeout(30)
def test_mtls_round_trip_and_peer_identity(pki_dir: Path) -> None:
    server_tls = pki.issue_server(pki_dir, "controller", ips=["127.0.0.1"])
    alice = pki.issue_user(pki_dir, "alice", groups=["admins", "dev"])
    node = pki.issue_node(pki_dir, "node1")
    seen: list[pki.Identity | None] = []

    async def main() -> None:
        server, port = await _start_server(server_tls, seen)
        try:
            assert await _call(port, pki.channel_credentials(alice)) == b"echo:hi"
            assert await _call(port, pki.channel_credentials(node), b"n") == b"echo:n"
        finally:
            await server.stop(None)

    asyncio.run(main())
    assert seen == [
        pki.Identity("alice", ("admins", "dev")),
        pki.Identity("system:node:node1", ("system:nodes",)),
    ]
    assert seen[1] is not None and seen[1].node_name == "node1"


@pytest.mark.timeout(30)
def test_mtls_refuses_clients_without_a_cert_from_the_cluster_ca(
    pki_dir: Path, tmp_path: Path
) -> None:
    server_tls = pki.issue_server(pki_dir, "controller", ips=["127.0.0.1"])
    other_dir = tmp_path / "other"
    pki.init_ca(other_dir, "other")
    mallory = pki.issue_user(other_dir, "mallory", groups=["admins"])
    # Trusts the real CA (so the server is accepted) but presents another CA's cert.
    foreign = pki.TlsFiles(ca=pki_dir / "ca.crt", cert=mallory.cert, key=mallory.key)
    no_client_cert = grpc.ssl_channel_credentials(root_certificates=pki.load_ca_pem(pki_dir))
    seen: list[pki.Identity | None] = []

    async def main() -> None:
        server, port = await _start_server(server_tls, seen)
        try:
            for creds in (pki.channel_credentials(foreign), no_client_cert):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await _call(port, creds)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await server.stop(None)

    asyncio.run(main())
    assert seen == []


@pytest.mark.timeout(30)
def test_client_refuses_a_server_from_another_ca(pki_dir: Path, tmp_path: Path) -> None:
    other_dir = tmp_path / "other"
    pki.init_ca(other_dir, "other")
    impostor = pki.issue_server(other_dir, "controller", ips=["127.0.0.1"])
    alice = pki.issue_user(pki_dir, "alice")
    # The impostor accepts clients of the real CA, but cannot prove it belongs to it.
    impostor_tls = pki.TlsFiles(ca=pki_dir / "ca.crt", cert=impostor.cert, key=impostor.key)
    seen: list[pki.Identity | None] = []

    async def main() -> None:
        server, port = await _start_server(impostor_tls, seen)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _call(port, pki.channel_credentials(alice))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await server.stop(None)

    asyncio.run(main())
    assert seen == []


@pytest.mark.timeout(30)
def test_server_picks_up_a_renewed_cert_without_restart(pki_dir: Path) -> None:
    server_tls = pki.issue_server(pki_dir, "controller", ips=["127.0.0.1"])
    alice = pki.issue_user(pki_dir, "alice")
    old_serial = _cert(server_tls.cert).serial_number
    seen: list[pki.Identity | None] = []

    async def main() -> None:
        server, port = await _start_server(server_tls, seen)
        try:
            assert await asyncio.to_thread(_server_cert_serial, port, alice) == old_serial
            async with grpc.aio.secure_channel(
                f"127.0.0.1:{port}", pki.channel_credentials(alice)
            ) as before:
                call = before.unary_unary(METHOD)
                assert await call(b"1", timeout=RPC_TIMEOUT) == b"echo:1"

                pki.issue_server(pki_dir, "controller", ips=["127.0.0.1"])  # renewal
                new_serial = _cert(server_tls.cert).serial_number
                assert new_serial != old_serial

                assert await asyncio.to_thread(_server_cert_serial, port, alice) == new_serial
                assert await _call(port, pki.channel_credentials(alice)) == b"echo:hi"
                # The connection made before the renewal still works.
                assert await call(b"2", timeout=RPC_TIMEOUT) == b"echo:2"
        finally:
            await server.stop(None)

    asyncio.run(main())
    assert seen == [pki.Identity("alice", ())] * 3


def test_reloader_waits_for_a_matching_key_and_cert(pki_dir: Path) -> None:
    tls = pki.issue_server(pki_dir, "controller")
    reloader = CertificateReloader(tls)
    assert reloader() is None  # nothing changed

    # Half-way through a renewal: a new key next to the old cert. Keep the old config.
    stray = pki.issue_server(pki_dir, "other")
    os.replace(stray.key, tls.key)
    assert reloader() is None
    assert reloader.reloads == 0

    pki.issue_server(pki_dir, "controller")
    assert reloader() is not None
    assert reloader.reloads == 1
    assert reloader() is None

    tls.cert.unlink()  # a vanished file keeps the current config too
    assert reloader() is None
    assert reloader.reloads == 1


def test_credentials_reject_a_key_that_does_not_match(pki_dir: Path) -> None:
    tls = pki.issue_server(pki_dir, "controller")
    other = pki.issue_server(pki_dir, "other")
    mixed = pki.TlsFiles(ca=tls.ca, cert=tls.cert, key=other.key)
    with pytest.raises(ValueError, match="does not belong"):
        pki.server_credentials(mixed)
    with pytest.raises(ValueError, match="does not belong"):
        pki.channel_credentials(mixed)


# ---------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmferry")
    subparsers = parser.add_subparsers(dest="command")
    pki_cmd.add_parser(subparsers)
    return parser


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    args = _parser().parse_args(argv)
    rc = args.func(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_cli_init_issue_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path / "pki")
    rc, out, err = _run(["pki", "init", "--pki-dir", d, "--cluster-name", "lab"], capsys)
    assert (rc, err) == (0, "")
    assert str(tmp_path / "pki" / "ca.crt") in out
    assert _cert(tmp_path / "pki" / "ca.crt").subject.rfc4514_string() == "CN=lab-ca"

    rc, out, err = _run(
        ["pki", "issue", "node", "n1", "--ip", "10.0.0.1", "--dns", "n1.lab", "--pki-dir", d],
        capsys,
    )
    assert (rc, err) == (0, "")
    assert str(tmp_path / "pki/nodes/n1.crt") in out
    assert str(tmp_path / "pki/nodes/n1.key") in out
    assert _mode(tmp_path / "pki/nodes/n1.key") == 0o600

    argv = ["pki", "issue", "user", "alice", "--group", "a", "--group", "b", "--days", "2"]
    rc, out, _ = _run([*argv, "--pki-dir", d], capsys)
    assert rc == 0
    identity = pki.identity_from_pem((tmp_path / "pki/users/alice.crt").read_bytes())
    assert identity == pki.Identity("alice", ("a", "b"))

    rc, out, _ = _run(
        ["pki", "issue", "server", "ctl", "--ip", "127.0.0.1", "--pki-dir", d], capsys
    )
    assert rc == 0
    assert str(tmp_path / "pki/servers/ctl.crt") in out

    rc, out, _ = _run(["pki", "issue", "sync", "s1", "--ip", "10.0.0.20", "--pki-dir", d], capsys)
    assert rc == 0
    assert str(tmp_path / "pki/sync/s1.crt") in out
    identity = pki.identity_from_pem((tmp_path / "pki/sync/s1.crt").read_bytes())
    assert identity.user == SYNC_IDENTITY

    rc, out, err = _run(["pki", "show", "--pki-dir", d, "nodes/n1.crt"], capsys)
    assert (rc, err) == (0, "")
    assert "CN=system:node:n1" in out
    assert "IP:10.0.0.1" in out
    assert "DNS:n1.lab" in out
    assert "not after:" in out
    assert "serverAuth" in out and "clientAuth" in out
    assert "node:        n1" in out
    assert "(ok)" in out


def test_cli_uses_env_pki_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMFERRY_PKI_DIR", str(tmp_path / "env-pki"))
    assert _run(["pki", "init"], capsys)[0] == 0
    assert (tmp_path / "env-pki" / "ca.key").exists()
    monkeypatch.delenv("VMFERRY_PKI_DIR")
    args = _parser().parse_args(["pki", "init"])
    assert pki_cmd._pki_dir(args) == Path("/etc/vmferry/pki")


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path / "pki")
    rc, _, err = _run(["pki", "issue", "user", "alice", "--pki-dir", d], capsys)
    assert rc == 1
    assert err.startswith("error: no CA in ")
    assert "vmferry pki init" in err

    assert _run(["pki", "init", "--pki-dir", d], capsys)[0] == 0
    rc, _, err = _run(["pki", "init", "--pki-dir", d], capsys)
    assert rc == 1
    assert err.startswith("error: a CA already exists")
    assert _run(["pki", "init", "--pki-dir", d, "--force"], capsys)[0] == 0

    rc, _, err = _run(["pki", "issue", "node", "a/b", "--pki-dir", d], capsys)
    assert (rc, err.startswith("error: invalid node name 'a/b'")) == (1, True)
    rc, _, err = _run(["pki", "issue", "server", "s", "--ip", "nope", "--pki-dir", d], capsys)
    assert (rc, err) == (1, "error: invalid IP address 'nope'\n")

    rc, _, err = _run(["pki", "show", "--pki-dir", d, "missing.crt"], capsys)
    assert rc == 1
    assert err.startswith("error: No such file or directory: missing.crt")
    rc, _, err = _run(["pki", "show", "--pki-dir", d, "ca.key"], capsys)
    assert rc == 1
    assert "is not a PEM certificate" in err
    assert "Traceback" not in err

    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args(["pki", "issue", "user", "alice", "--days", "0"])
    assert exit_.value.code == 2
    capsys.readouterr()


def test_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["pki"], ["pki", "issue"], ["pki", "issue", "node"], ["pki", "show"]):
        with pytest.raises(SystemExit) as exit_:
            _parser().parse_args([*argv, "--help"])
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: vmferry pki")
        if argv[-1] in ("node", "show"):
            assert "--pki-dir" in out and "VMFERRY_PKI_DIR" in out
