"""``vmferry join``: a node gets its certificate by CSR with a bootstrap token, the key
made where it runs; administrators approve or deny; a wrong CA pin or an expired token
is refused; a handler runs with the certificate it got."""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support.lab import LabHarness
from vmferry import bootstrap_token, pki
from vmferry.config import CONFIG_ENV, ClientConfig
from vmferry.lab.ports import free_port
from vmferry.pki import issuing


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabHarness]:
    harness = LabHarness(Path(tmp_path_factory.mktemp("join")))
    harness.up(nodes=1, memory="2Gi")
    try:
        yield harness
    finally:
        harness.down()


def token(lab: LabHarness, *flags: str) -> tuple[str, str]:
    out = lab.cli("token", "create", *flags).stdout.splitlines()
    return out[0], out[1].split()[2]  # the token; "ca hash: sha256:... (expires ...)"


def join_argv(lab: LabHarness, tok: str, pin: str, node: str, pki_dir: Path) -> list[str]:
    server = f"127.0.0.1:{lab.info()['tokenPort']}"
    return [
        *("join", "--server", server, "--token", tok, "--ca-hash", pin),
        *("--node-name", node, "--ip", "127.0.0.1", "--pki-dir", str(pki_dir)),
        *("--timeout", "60"),
    ]


def start_join(lab: LabHarness, argv: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "vmferry.cli.main", *argv],
        env=lab.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def pending_csr(lab: LabHarness, node: str) -> str:
    def find() -> str | None:
        items = json.loads(lab.cli("get", "csr", "-o", "json").stdout)["items"]
        mine = [c for c in items if c["metadata"]["name"].startswith(f"node-csr-{node}-")]
        return mine[0]["metadata"]["name"] if mine else None

    return lab.wait_for(f"the CSR of {node}", find, timeout=30)


@pytest.mark.timeout(120)
def test_join_then_run_a_handler_with_the_certificate(lab: LabHarness, tmp_path: Path) -> None:
    tok, pin = token(lab)
    lab.cli(*join_argv(lab, tok, pin, "joined1", tmp_path), timeout=90)
    cert = tmp_path / "nodes/joined1.crt"
    assert pki.identity_from_pem(cert.read_bytes()).node_name == "joined1"
    assert (tmp_path / "nodes/joined1.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "ca.crt").read_bytes() == (lab.lab.dir / "pki/ca.crt").read_bytes()
    row = lab.cli("get", "csr").stdout
    assert "Approved,Issued" in row and f"system:bootstrap:{tok[:6]}" in row

    info = lab.info()
    handler = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "handler.main",
            *("--node-name", "joined1", "--api-server", f"127.0.0.1:{info['apiPort']}"),
            *("--ca", str(tmp_path / "ca.crt"), "--cert", str(cert)),
            *("--key", str(tmp_path / "nodes/joined1.key")),
            *(
                "--migration-port",
                str(free_port("127.0.0.1")),
                "--runtime-dir",
                str(tmp_path / "run"),
            ),
            *("--ram-dir", str(tmp_path / "ram"), "--memory", "1Gi"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "handler.log").open("w"),
    )
    try:

        def ready() -> bool:
            node = lab.try_get("node", "joined1")
            conds = ((node or {}).get("status") or {}).get("conditions") or []
            return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)

        lab.wait_for("node joined1 Ready", ready, timeout=45)
    except AssertionError:
        raise AssertionError((tmp_path / "handler.log").read_text()[-3000:]) from None
    finally:
        handler.terminate()
        handler.wait(20)
    lab.cli("delete", "node", "joined1")


@pytest.mark.timeout(120)
def test_manual_approval_and_denial(lab: LabHarness, tmp_path: Path) -> None:
    tok, pin = token(lab, "--no-auto-approve")
    waiting = start_join(lab, join_argv(lab, tok, pin, "manual1", tmp_path / "a"))
    name = pending_csr(lab, "manual1")
    assert f"{name}" in lab.cli("get", "csr").stdout
    assert "Pending" in lab.cli("get", "csr", name).stdout
    lab.cli("certificate", "approve", name)
    out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, err
    assert "node manual1 joined" in out

    refused = start_join(lab, join_argv(lab, tok, pin, "manual2", tmp_path / "b"))
    name = pending_csr(lab, "manual2")
    lab.cli("certificate", "deny", name, "--reason", "not one of our hosts")
    out, err = refused.communicate(timeout=60)
    assert refused.returncode == 1
    assert f"certificatesigningrequest/{name} denied: not one of our hosts" in err
    assert not (tmp_path / "b/nodes/manual2.key").exists()
    again = lab.cli("certificate", "approve", name, check=False)
    assert again.returncode == 1 and "decided already" in again.stderr


@pytest.mark.timeout(60)
def test_wrong_pin_and_expired_token_are_refused(lab: LabHarness, tmp_path: Path) -> None:
    tok, pin = token(lab)
    wrong = "sha256:" + "0" * 64
    out = lab.cli(*join_argv(lab, tok, wrong, "pinned", tmp_path), check=False)
    assert out.returncode == 1
    assert f"has the hash {wrong} (presented: " in out.stderr and pin in out.stderr
    assert "node-csr-pinned" not in lab.cli("get", "csr").stdout

    old = bootstrap_token.new_token(
        timedelta(minutes=1), now=datetime.now(UTC) - timedelta(hours=1)
    )
    lab.apply(json.dumps(bootstrap_token.to_secret(old)))
    out = lab.cli(*join_argv(lab, old.token, pin, "late", tmp_path), check=False)
    assert out.returncode == 1
    assert f'bootstrap token "{old.id}" expired at' in out.stderr


@pytest.mark.timeout(90)
def test_a_user_renews_their_certificate_once_an_administrator_approves(
    lab: LabHarness, tmp_path: Path
) -> None:
    admin = ClientConfig.load(Path(lab.env[CONFIG_ENV]))
    assert admin.tls is not None
    files = pki.issue_user(lab.lab.dir / "pki", "carol", groups=["dev"], days=1)
    mine = tmp_path / "pki"
    mine.mkdir()
    tls = pki.TlsFiles(admin.tls.ca, mine / "carol.crt", mine / "carol.key")
    tls.cert.write_bytes(files.cert.read_bytes())
    tls.key.write_bytes(files.key.read_bytes())
    tls.key.chmod(0o600)
    config = tmp_path / "carol.yaml"
    config.write_text(dataclasses.replace(admin, tls=tls).to_yaml())
    old = x509.load_pem_x509_certificate(tls.cert.read_bytes())
    renew = start_join(lab, ["certificate", "renew", "--config", str(config), "--timeout", "60"])

    def pending() -> str | None:
        items = json.loads(lab.cli("get", "csr", "-o", "json").stdout)["items"]
        mine = [c for c in items if c["metadata"]["name"].startswith("csr-carol-")]
        return mine[0]["metadata"]["name"] if mine else None

    name = lab.wait_for("carol's CSR", pending, timeout=30)
    row = lab.cli("get", "csr", name).stdout
    assert "Pending" in row and "carol" in row  # never approved by itself
    lab.cli("certificate", "approve", name)
    out, err = renew.communicate(timeout=60)
    assert renew.returncode == 0, err
    assert f"certificatesigningrequest/{name} created" in out and "renewed: valid until" in out
    new = x509.load_pem_x509_certificate(tls.cert.read_bytes())
    assert new.serial_number != old.serial_number and new.subject == old.subject
    assert tls.key.stat().st_mode & 0o777 == 0o600
    who = lab.cli("whoami", "--config", str(config)).stdout  # the new pair works
    assert "carol" in who


def served_serial(port: int, client: pki.TlsFiles) -> int:
    """The serial of the certificate the server on ``port`` presents now."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # only its serial is read
    ctx.load_cert_chain(client.cert, client.key)
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), 5) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


@pytest.mark.timeout(90)
def test_the_controller_renews_its_own_certificate_without_a_restart(
    lab: LabHarness, tmp_path: Path
) -> None:
    """A controller whose server certificate is due 4 s after it starts (3-minute
    lifetime, mostly spent) renews it with its CA key; clients keep calling."""
    pki_dir = tmp_path / "pki"
    pki_dir.mkdir()
    for f in (pki.CA_CERT_FILE, pki.CA_KEY_FILE):
        shutil.copy2(lab.lab.dir / "pki" / f, pki_dir / f)
    now = datetime.now(UTC)
    lifetime, spent = 180, 116  # due at 2/3 of 180 s = 120 s from issuance: in 4 s
    files = issuing._issue(
        pki_dir,
        issuing.SERVERS_DIR,
        "ctl",
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ctl")]),
        san=issuing._san(["127.0.0.1"], [], "ctl"),
        usages=(ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
        days=1,
        validity=(
            now - issuing.CLOCK_SKEW - timedelta(seconds=spent),
            now + timedelta(seconds=lifetime - spent),
        ),
    )
    old = x509.load_pem_x509_certificate(files.cert.read_bytes())
    port = free_port("127.0.0.1")
    controller = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "controller.main",
            *("--listen", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "data")),
            *("--ca", str(files.ca), "--cert", str(files.cert), "--key", str(files.key)),
            *("--ca-key", str(pki_dir / pki.CA_KEY_FILE)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "controller.log").open("w"),
    )
    admin = ClientConfig.load(Path(lab.env[CONFIG_ENV]))
    assert admin.tls is not None
    config = tmp_path / "admin.yaml"
    config.write_text(dataclasses.replace(admin, server=f"127.0.0.1:{port}").to_yaml())
    try:
        calls = 0

        def renewed() -> bool:
            nonlocal calls
            assert controller.poll() is None, "the controller exited"
            assert "admin" in lab.cli("whoami", "--config", str(config)).stdout
            calls += 1
            return served_serial(port, admin.tls) != old.serial_number  # type: ignore[arg-type]

        lab.wait_for("the controller serving a renewed certificate", renewed, timeout=45)
    except AssertionError:
        raise AssertionError((tmp_path / "controller.log").read_text()[-3000:]) from None
    finally:
        controller.terminate()
        controller.wait(20)
    new = x509.load_pem_x509_certificate(files.cert.read_bytes())
    assert new.subject == old.subject and new.serial_number != old.serial_number
    assert (new.not_valid_after_utc - now).total_seconds() > lifetime - 10  # a full lifetime
    assert calls >= 1
    log_text = (tmp_path / "controller.log").read_text()
    renewals = log_text.count(f"controller: certificate renewed ({files.cert}: serial")
    assert renewals == 1, log_text[-2000:]
