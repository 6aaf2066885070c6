"""mTLS refuses strangers; invalid manifests are refused with the field path."""

from __future__ import annotations

import grpc
import pytest

from handler import stream
from tests.support.lab import LabHarness
from vmferry import pki
from vmferry.config import ClientConfig


@pytest.mark.timeout(60)
def test_client_certificate_from_another_ca_is_refused(lab: LabHarness) -> None:
    other = lab.root / "other-pki"
    lab.cli("pki", "init", "--pki-dir", str(other))
    lab.cli("pki", "issue", "user", "mallory", "--group", "system:masters", "--pki-dir", str(other))
    server = ClientConfig.load(lab.root / "client.yaml").server
    config = lab.root / "mallory.yaml"
    config.write_text(
        f"server: {server}\ncertificateAuthority: {lab.lab.pki_dir / 'ca.crt'}\n"
        f"clientCertificate: {other / 'users' / 'mallory.crt'}\n"
        f"clientKey: {other / 'users' / 'mallory.key'}\n"
    )
    out = lab.cli("get", "nodes", "--config", str(config), check=False)
    assert out.returncode == 1
    assert "unavailable" in out.stderr.lower()
    ok = lab.cli("get", "nodes")
    assert "node1" in ok.stdout


@pytest.mark.timeout(60)
def test_migration_endpoint_refuses_a_user_certificate(lab: LabHarness) -> None:
    """A user certificate of the cluster's own CA is not a node: no migration stream."""
    import asyncio

    from vmferry.rpc import migration_pb2 as pb
    from vmferry.rpc import migration_pb2_grpc

    node = lab.get("no", "node1")
    endpoint = node["status"]["migrationEndpoint"]
    user = pki.issue_user(lab.lab.pki_dir, "eve")

    async def attempt() -> grpc.StatusCode:
        async with grpc.aio.secure_channel(
            f"{endpoint['address']}:{endpoint['port']}", pki.channel_credentials(user)
        ) as channel:
            call = migration_pb2_grpc.MigrationStub(channel).Transfer()
            await call.write(
                pb.SourceFrame(
                    hello=pb.Hello(protocol_version=stream.PROTOCOL_VERSION, migration_uid="x")
                )
            )
            try:
                await call.read()
            except grpc.aio.AioRpcError as e:
                return e.code()
            return grpc.StatusCode.OK

    assert asyncio.run(attempt()) in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED)


@pytest.mark.timeout(60)
def test_malformed_bytes_on_the_migration_stream_are_refused(lab: LabHarness) -> None:
    """Frames travel as raw bytes parsed by the handler: garbage is INVALID_ARGUMENT with a
    message, and the handler goes on serving."""
    import asyncio

    from handler import stream
    from vmferry.rpc import migration_pb2 as pb

    node = lab.get("no", "node1")
    endpoint = node["status"]["migrationEndpoint"]
    tls = pki.issue_node(lab.lab.pki_dir, "node2")  # a node of this cluster

    async def attempt(raw: bytes) -> tuple[grpc.StatusCode, str]:
        async with grpc.aio.secure_channel(
            f"{endpoint['address']}:{endpoint['port']}",
            pki.channel_credentials(tls),
            options=[("grpc.ssl_target_name_override", "node1")],
        ) as channel:
            call = stream.open_transfer(channel)
            await call.write(raw)
            try:
                await call.read()
            except grpc.aio.AioRpcError as e:
                return e.code(), e.details() or ""
            return grpc.StatusCode.OK, ""

    for raw in (b"\x0a\xff\xff\xff", b"\x12\x05\x0a"):
        code, details = asyncio.run(attempt(raw))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (raw, code, details)
        assert "malformed frame" in details
    hello = pb.SourceFrame(
        hello=pb.Hello(protocol_version=stream.PROTOCOL_VERSION, migration_uid="nope")
    )
    code, details = asyncio.run(attempt(hello.SerializeToString()))  # still serving
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in details


@pytest.mark.timeout(60)
def test_invalid_manifests_name_the_field(lab: LabHarness) -> None:
    bad_field = """
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata: {name: typo}
spec:
  runStrategy: Always
  template:
    spec:
      domain:
        memroy: {guest: 64Mi}
"""
    out = lab.cli("create", "-f", "-", input=bad_field, check=False)
    assert out.returncode == 1
    assert "spec.template.spec.domain.memroy" in out.stderr
    assert 'unknown field "memroy"' in out.stderr

    bad_quantity = bad_field.replace("memroy", "memory").replace("64Mi", "12Zi")
    out = lab.cli("create", "-f", "-", input=bad_quantity, check=False)
    assert out.returncode == 1
    assert "spec.template.spec.domain.memory.guest" in out.stderr and "12Zi" in out.stderr

    wrong_type = bad_field.replace("memroy: {guest: 64Mi}", "memory: {guest: 64Mi}").replace(
        "runStrategy: Always", "runStrategy: 7"
    )
    out = lab.cli("create", "-f", "-", input=wrong_type, check=False)
    assert out.returncode == 1 and "spec.runStrategy" in out.stderr

    assert lab.try_get("vm", "typo") is None, "nothing was stored"

    bad_vmim = "apiVersion: kubevirt.io/v1\nkind: VirtualMachineInstanceMigration\nmetadata: {name: m}\nspec: {}\n"
    out = lab.cli("create", "-f", "-", input=bad_vmim, check=False)
    assert out.returncode == 1 and "spec.vmiName" in out.stderr
