"""gRPC channel and server options: one place for every daemon and client.

The keepalive numbers must agree across processes: a client that pings more often than
the server's ``min_ping_interval_without_data_ms`` gets GOAWAY(too_many_pings) and its
calls fail. So the server's floor is below every client's keepalive time here.
"""

from __future__ import annotations

import ipaddress

from vmferry.objects.limits import MAX_REQUEST_BYTES

MAX_MESSAGE_BYTES = 64 << 20  # a page batch (4 MiB) plus headroom; API lists of many objects
SERVER_MIN_PING_INTERVAL_MS = 4_000  # below both keepalive times below
API_KEEPALIVE_MS = 10_000  # CLI / handlers -> controller: detects a dead controller in ~15 s
MIGRATION_KEEPALIVE_MS = 5_000  # handler -> handler: a broken migration link shows in ~10 s
KEEPALIVE_TIMEOUT_MS = 5_000

Options = list[tuple[str, int]]


def server_options() -> Options:
    """Options of every gRPC server (the controller's API, the handlers' migration port)."""
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", SERVER_MIN_PING_INTERVAL_MS),
    ]


def api_server_options() -> Options:
    """Options of the controller's API server: a request body is at most
    ``limits.MAX_REQUEST_BYTES`` (gRPC refuses a larger one before it is parsed; the client
    names the limit). Replies are not capped: a list of many objects (each at most
    ``limits.MAX_OBJECT_BYTES``) must never fail for its size (see :func:`api_channel_options`)."""
    options = dict(server_options())
    options["grpc.max_receive_message_length"] = MAX_REQUEST_BYTES
    options["grpc.max_send_message_length"] = -1
    return list(options.items())


def api_channel_options() -> Options:
    """Options of an API client's channel (CLI, handlers, lab): it receives replies of any
    size (up to protobuf's 2 GiB), so listing many large objects never fails with
    RESOURCE_EXHAUSTED; it sends what the server then refuses with a clear error."""
    options = dict(channel_options(API_KEEPALIVE_MS))
    options["grpc.max_receive_message_length"] = -1
    return list(options.items())


def channel_options(keepalive_ms: int) -> Options:
    """Options of a client channel that pings every ``keepalive_ms`` while idle."""
    assert keepalive_ms >= SERVER_MIN_PING_INTERVAL_MS
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def split_addresses(value: str) -> list[str]:
    """``"a:1, b:2"`` -> ``["a:1", "b:2"]`` (the comma-separated form of several servers)."""
    return [part.strip() for part in value.split(",") if part.strip()]


def host_of(address: str, what: str) -> str:
    """The host of ``host:port`` (IPv6 without brackets); ValueError naming ``what``."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{what}: {address!r} is not host:port")
    return host.strip("[]")


def host_port(host: str, port: int) -> str:
    """``host:port`` as gRPC dials it (an IPv6 host in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def multi_target(addresses: list[str] | tuple[str, ...], what: str) -> str:
    """The gRPC target of one server or several replicas: the address itself, or
    ``ipv4:``/``ipv6:`` and every address (the channel moves to the next one that
    answers when one fails). Raises ValueError (naming ``what``) for none, a malformed
    address, host names among several, or mixed IPv4 and IPv6."""
    if not addresses:
        raise ValueError(f"{what}: no address (host:port)")
    if len(addresses) == 1:
        return addresses[0]  # any gRPC target, as before
    hosts = [host_of(address, what) for address in addresses]
    try:
        versions = {ipaddress.ip_address(host).version for host in hosts}
    except ValueError:
        raise ValueError(
            f"{what}: several addresses must be IP addresses (one channel fails over "
            f"between them), not host names: {', '.join(addresses)}"
        ) from None
    if len(versions) > 1:
        raise ValueError(f"{what}: the addresses mix IPv4 and IPv6")
    return f"ipv{versions.pop()}:" + ",".join(addresses)


def multi_target_options(addresses: list[str] | tuple[str, ...]) -> Options:
    """With several addresses, TLS checks the first one's host against every replica's
    certificate (give each replica a certificate naming all of their addresses, or a
    shared DNS name)."""
    if len(addresses) < 2:
        return []
    return [("grpc.default_authority", addresses[0])]  # type: ignore[list-item]
