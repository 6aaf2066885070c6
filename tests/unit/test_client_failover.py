"""ApiClient with several controller replicas (``server: a,b``): calls go to one that
answers, and move to another when it stops; bad address lists are named."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from vmferry.client import ApiClient
from vmferry.config import ClientConfig
from vmferry.lab.cluster import free_port
from vmferry.rpc import api_pb2, api_pb2_grpc

pytestmark = pytest.mark.timeout(30)


class Replica(api_pb2_grpc.ApiServicer):
    def __init__(self, name: str) -> None:
        self.name = name

    async def WhoAmI(self, request: object, context: object) -> api_pb2.WhoAmIReply:
        return api_pb2.WhoAmIReply(user=self.name)


async def serve(name: str, port: int) -> grpc.aio.Server:
    server = grpc.aio.server()
    api_pb2_grpc.add_ApiServicer_to_server(Replica(name), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


def test_calls_fail_over_to_the_next_replica() -> None:
    async def main() -> None:
        ports = [free_port("127.0.0.1") for _ in range(3)]
        # The first replica is down from the start; the second then stops too.
        second = await serve("second", ports[1])
        third = await serve("third", ports[2])
        server = ",".join(f"127.0.0.1:{p}" for p in ports)
        async with ApiClient(
            ClientConfig(server=server, tls=None, insecure_plaintext=True), timeout=5
        ) as api:
            assert (await api.whoami())[0] == "second"
            await second.stop(grace=None)
            users = set()
            for _ in range(3):
                try:
                    users.add((await api.whoami())[0])
                except Exception:  # the call in flight when it stopped may fail once
                    await asyncio.sleep(0.1)
            assert users == {"third"}
        await third.stop(grace=None)

    asyncio.run(main())


@pytest.mark.parametrize(
    ("server", "message"),
    [
        ("ctl-1:7443,ctl-2:7443", "must be IP addresses"),
        ("127.0.0.1:7443,[::1]:7443", "mix IPv4 and IPv6"),
        ("127.0.0.1:7443,127.0.0.1", "is not host:port"),
    ],
)
def test_bad_replica_lists_are_named(server: str, message: str) -> None:
    async def main() -> None:
        with pytest.raises(ValueError, match=message):
            ApiClient(ClientConfig(server=server, tls=None, insecure_plaintext=True))

    asyncio.run(main())
