"""The console's calls of the object API as the logged-in user (``controller.console``).

Every read and every action is a call of the API's own servicer
(:class:`controller.api.ApiService`) with a call context that carries exactly what a gRPC
call of that user would carry: the client certificate in the auth context, or the token in
the ``authorization`` metadata. Authentication, authorization (RBAC), admission and audit
therefore apply unchanged, and a refused action shows the API's own message.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import grpc

from controller.api import ApiService
from vmferry.client import REASON_KEY
from vmferry.errors import ApiError, error_from_reason
from vmferry.rpc import api_pb2

Obj = dict[str, Any]


# -- acting as the user ---------------------------------------------------------------------


class Credential(NamedTuple):
    """What a user authenticated with: a verified client certificate or a bearer token."""

    cert_pem: bytes | None = None
    token: str | None = None


class _Metadatum(NamedTuple):
    key: str
    value: str


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str, trailing: Any) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.trailing = tuple(trailing or ())


class UserCallContext:
    """A ``grpc.aio.ServicerContext`` stand-in for an in-process call as one user.

    It presents the credential the way gRPC presents it to a servicer: the PEM of the
    verified client certificate under ``x509_pem_cert`` in ``auth_context()``, a token as
    ``authorization: Bearer …`` in ``invocation_metadata()``. ``abort`` raises, as it
    does in gRPC, and :meth:`ConsoleApi.call` turns that into the API's ApiError.
    """

    def __init__(self, credential: Credential, peer: str) -> None:
        self._credential = credential
        self._peer = peer
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.trailing: tuple[Any, ...] = ()

    def auth_context(self) -> dict[str, list[bytes]]:
        if self._credential.cert_pem is None:
            return {}
        return {
            "x509_pem_cert": [self._credential.cert_pem],
            "transport_security_type": [b"ssl"],
        }

    def invocation_metadata(self) -> tuple[_Metadatum, ...]:
        if not self._credential.token:
            return ()
        return (_Metadatum("authorization", f"Bearer {self._credential.token}"),)

    def peer(self) -> str:
        return self._peer

    def peer_identities(self) -> list[bytes] | None:
        return None

    def time_remaining(self) -> float | None:
        return None

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return False

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> None:
        raise _Aborted(code, details, trailing_metadata)

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def set_trailing_metadata(self, trailing_metadata: Any) -> None:
        self.trailing = tuple(trailing_metadata)

    async def send_initial_metadata(self, initial_metadata: Any) -> None:
        return None


class ConsoleApi:
    """The object API as one user: the same calls the CLI makes, without a socket."""

    def __init__(self, service: ApiService, credential: Credential, peer: str) -> None:
        self.service = service
        self.credential = credential
        self.peer = peer

    async def call(self, method: str, request: Any) -> Any:
        ctx = UserCallContext(self.credential, self.peer)
        try:
            reply = await getattr(self.service, method)(request, ctx)
        except _Aborted as e:
            for key, value in e.trailing:
                if key == REASON_KEY:
                    raise error_from_reason(str(value), e.details) from None
            raise ApiError(f"{e.code.name}: {e.details}") from None
        if ctx.code not in (None, grpc.StatusCode.OK):
            raise ApiError(f"{ctx.code.name}: {ctx.details}")
        return reply

    async def whoami(self) -> tuple[str, list[str]]:
        reply = await self.call("WhoAmI", api_pb2.WhoAmIRequest())
        return reply.user, list(reply.groups)

    async def list(self, kind: str, namespace: str = "") -> list[Obj]:
        reply = await self.call("List", api_pb2.ListRequest(kind=kind, namespace=namespace))
        return [json.loads(item) for item in reply.items_json]

    async def create(self, obj: Obj) -> Obj:
        reply = await self.call(
            "Create", api_pb2.CreateRequest(object_json=json.dumps(obj).encode())
        )
        result: Obj = json.loads(reply.object_json)
        return result

    async def delete(self, kind: str, namespace: str, name: str) -> None:
        ref = api_pb2.ObjectRef(kind=kind, namespace=namespace, name=name)
        await self.call("Delete", api_pb2.DeleteRequest(ref=ref))

    async def get(self, kind: str, namespace: str, name: str) -> Obj:
        ref = api_pb2.ObjectRef(kind=kind, namespace=namespace, name=name)
        reply = await self.call("Get", api_pb2.GetRequest(ref=ref))
        result: Obj = json.loads(reply.object_json)
        return result
