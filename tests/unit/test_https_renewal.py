"""The HTTPS listeners (metrics, web console: vmferry/metrics_http.py ssl_context) serve
a renewed certificate from the next handshake, with or without SNI; a half-written pair
keeps the current one."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from cryptography import x509

from vmferry import pki
from vmferry.metrics_http import ssl_context


def served_serial(server_ctx: ssl.SSLContext, sni: str | None) -> int:
    """A TLS handshake in memory; the serial of the certificate the server presented."""
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=sni)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = [False, False]
    for _ in range(10):
        for i, end in enumerate((client, server)):
            if not done[i]:
                try:
                    end.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done):
            break
    der = client.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


@pytest.mark.parametrize("sni", [None, "ctl"])
def test_a_renewed_certificate_is_served_from_the_next_handshake(
    tmp_path: Path, sni: str | None
) -> None:
    pki.init_ca(tmp_path, "test")
    tls = pki.issue_server(tmp_path, "ctl", ips=["192.0.2.1"])
    ctx = ssl_context(tls)

    def serial_on_disk() -> int:
        return x509.load_pem_x509_certificate(tls.cert.read_bytes()).serial_number

    first = serial_on_disk()
    assert served_serial(ctx, sni) == first
    old_key = tls.key.read_bytes()
    pki.issue_server(tmp_path, "ctl", ips=["192.0.2.1"])  # renewed
    new_key = tls.key.read_bytes()
    tls.key.write_bytes(old_key)  # half-written: the new cert with the old key
    assert served_serial(ctx, sni) == first  # the current pair stays
    tls.key.write_bytes(new_key)
    assert served_serial(ctx, sni) == serial_on_disk() != first
