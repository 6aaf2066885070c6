"""The asynchronous API client every component uses (CLI, handlers, lab, tests).

Objects are plain dicts. Errors from the server come back as the same
``vmferry.errors.ApiError`` subclasses the controller raised (reason travels in the
trailing metadata ``vmferry-reason``); a controller that cannot be reached raises
``Unavailable``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import grpc

from vmferry import grpc_options, pki
from vmferry.config import ClientConfig
from vmferry.errors import ApiError, RequestEntityTooLarge, Unavailable, error_from_reason
from vmferry.objects.limits import MAX_REQUEST_BYTES
from vmferry.rpc import api_pb2, api_pb2_grpc
from vmferry.version import BuildInfo

log = logging.getLogger(__name__)

REASON_KEY = "vmferry-reason"
_CHANNEL_OPTIONS = grpc_options.api_channel_options()
PATCH_TYPES = {"json": api_pb2.PATCH_TYPE_JSON, "merge": api_pb2.PATCH_TYPE_MERGE}


def translate_rpc_error(e: grpc.aio.AioRpcError) -> ApiError:
    """Turn a gRPC failure into the ApiError the server meant."""
    for key, value in e.trailing_metadata() or ():
        if key == REASON_KEY:
            error = error_from_reason(str(value), e.details() or "")
            error.from_server = True
            return error
    if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return Unavailable(f"the controller is unavailable: {e.details()}")
    if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in (e.details() or ""):
        # gRPC's own refusal of a message over the server's (or our) receive limit.
        too_large = RequestEntityTooLarge(
            f"the request is larger than the maximum request body size of {MAX_REQUEST_BYTES} "
            f"bytes (3 MiB) ({e.details()})"
        )
        too_large.from_server = True  # the server's gRPC layer refused it
        return too_large
    if e.code() == grpc.StatusCode.CANCELLED:
        return Unavailable(f"the call was cancelled: {e.details()}")
    return ApiError(f"{e.code().name}: {e.details()}")


def _dump(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _load(data: bytes) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(data)
    return result


RETIRED_CHANNEL_GRACE_S = 60.0  # s a replaced channel's calls and watches may still run


def _files_stamp(config: ClientConfig) -> pki.FilesStamp:
    """The client certificate and key's stamp; () without them."""
    if config.tls is None or config.tls.cert == Path():
        return ()
    try:
        return pki.files_stamp(config.tls.cert, config.tls.key)
    except OSError:
        return ()


class ApiClient:
    """One gRPC channel to the controller. Use as ``async with ApiClient(cfg) as api``.

    ``timeout`` bounds each unary call (seconds); watches are unbounded. When the client
    certificate or key files change (a renewal, handler/cert_renewer.py), the next call
    opens a new channel with them; the old one is closed after
    :data:`RETIRED_CHANNEL_GRACE_S` (a watch on it then ends and its informer reconnects).
    A half-written pair (key and certificate not matching yet) keeps the current channel.
    """

    def __init__(self, config: ClientConfig, *, timeout: float = 30.0) -> None:
        self.config = config
        self.timeout = timeout
        # Several controller replicas (``server: a:7443,b:7443``): one channel that moves
        # to the next replica when the one it uses fails.
        addresses = grpc_options.split_addresses(config.server)
        target = grpc_options.multi_target(addresses, "server")
        options = _CHANNEL_OPTIONS + grpc_options.multi_target_options(addresses)
        if config.tls is None:
            if not config.insecure_plaintext:
                raise ValueError("a client without TLS needs insecure_plaintext=True")
            self._channel = grpc.aio.insecure_channel(target, options=options)
        else:
            if config.tls.cert == Path():
                if not config.token:
                    raise ValueError(
                        "the client configuration has neither a client certificate nor a "
                        "token: set clientCertificate/clientKey or token"
                    )
                creds = pki.ca_only_channel_credentials(config.tls.ca)
            else:
                creds = pki.channel_credentials(config.tls)
            self._channel = grpc.aio.secure_channel(target, creds, options=options)
        self._target, self._options = target, options
        self._api = api_pb2_grpc.ApiStub(self._channel)
        self._stamp = _files_stamp(config)
        self._retiring: dict[asyncio.Task[None], grpc.aio.Channel] = {}
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {config.token}"),) if config.token else ()
        )

    async def __aenter__(self) -> ApiClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        retiring, self._retiring = self._retiring, {}
        for task in retiring:
            task.cancel()
        await asyncio.gather(*retiring, return_exceptions=True)
        for channel in retiring.values():
            await channel.close()
        await self._channel.close()

    @property
    def _stub(self) -> api_pb2_grpc.ApiStub:
        """The stub of the current channel (a new one after the files changed)."""
        if self._stamp:
            stamp = _files_stamp(self.config)
            if stamp and stamp != self._stamp:
                self._reopen(stamp)
        return self._api

    def _reopen(self, stamp: tuple[tuple[int, int, int], ...]) -> None:
        assert self.config.tls is not None
        try:
            creds = pki.channel_credentials(self.config.tls)
        except (OSError, ValueError) as e:  # mid-renewal: the pair does not match yet
            log.debug("client certificate files changed but not usable yet: %s", e)
            return
        old = self._channel
        self._channel = grpc.aio.secure_channel(self._target, creds, options=self._options)
        self._api = api_pb2_grpc.ApiStub(self._channel)
        self._stamp = stamp
        log.info("client certificate %s changed: new connections use it", self.config.tls.cert)
        task = asyncio.get_running_loop().create_task(old.close(grace=RETIRED_CHANNEL_GRACE_S))
        self._retiring[task] = old
        task.add_done_callback(lambda t: self._retiring.pop(t, None))

    async def _call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        try:
            return await method(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            raise translate_rpc_error(e) from None

    @staticmethod
    def _ref(kind: str, namespace: str | None, name: str) -> api_pb2.ObjectRef:
        return api_pb2.ObjectRef(kind=kind, namespace=namespace or "", name=name)

    async def version(self) -> BuildInfo:
        """The server's build (``vmferry version``)."""
        reply = await self._call(self._stub.Version, api_pb2.VersionRequest())
        return BuildInfo(reply.version, reply.python_version, reply.platform)

    async def whoami(self) -> tuple[str, list[str]]:
        reply = await self._call(self._stub.WhoAmI, api_pb2.WhoAmIRequest())
        return reply.user, list(reply.groups)

    async def create(self, obj: Mapping[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
        reply = await self._call(
            self._stub.Create, api_pb2.CreateRequest(object_json=_dump(obj), dry_run=dry_run)
        )
        return _load(reply.object_json)

    async def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any]:
        reply = await self._call(
            self._stub.Get, api_pb2.GetRequest(ref=self._ref(kind, namespace, name))
        )
        return _load(reply.object_json)

    async def list(
        self, kind: str, namespace: str | None = None, label_selector: str = ""
    ) -> tuple[list[dict[str, Any]], str]:
        """Return (items, resourceVersion of the list)."""
        reply = await self._call(
            self._stub.List,
            api_pb2.ListRequest(
                kind=kind, namespace=namespace or "", label_selector=label_selector
            ),
        )
        return [_load(b) for b in reply.items_json], reply.resource_version

    async def update(
        self, obj: Mapping[str, Any], *, subresource: str = "", dry_run: bool = False
    ) -> dict[str, Any]:
        reply = await self._call(
            self._stub.Update,
            api_pb2.UpdateRequest(object_json=_dump(obj), subresource=subresource, dry_run=dry_run),
        )
        return _load(reply.object_json)

    async def patch(
        self,
        kind: str,
        namespace: str | None,
        name: str,
        patch: Any,
        *,
        patch_type: str = "merge",
        subresource: str = "",
        resource_version: str = "",
        dry_run: bool = False,
    ) -> dict[str, Any]:
        """Apply a JSON (RFC 6902) or merge (RFC 7386) patch; ``patch`` is the decoded body."""
        if patch_type not in PATCH_TYPES:
            raise ValueError(f"patch type must be json or merge, not {patch_type!r}")
        reply = await self._call(
            self._stub.Patch,
            api_pb2.PatchRequest(
                ref=self._ref(kind, namespace, name),
                type=PATCH_TYPES[patch_type],
                patch_json=json.dumps(patch).encode(),
                subresource=subresource,
                resource_version=resource_version,
                dry_run=dry_run,
            ),
        )
        return _load(reply.object_json)

    async def delete(
        self,
        kind: str,
        namespace: str | None,
        name: str,
        *,
        resource_version: str = "",
        uid: str = "",
        dry_run: bool = False,
    ) -> dict[str, Any]:
        reply = await self._call(
            self._stub.Delete,
            api_pb2.DeleteRequest(
                ref=self._ref(kind, namespace, name),
                resource_version=resource_version,
                uid=uid,
                dry_run=dry_run,
            ),
        )
        return _load(reply.object_json)

    async def watch(
        self,
        kind: str = "",
        namespace: str | None = None,
        *,
        resource_version: str = "",
        label_selector: str = "",
        bookmark: bool = False,
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Yield (type, object) events; BOOKMARK events carry only metadata.resourceVersion.

        Raises ApiError (Gone: relist) when the stream fails; the caller reconnects.
        """
        call = self._stub.Watch(
            api_pb2.WatchRequest(
                kind=kind,
                namespace=namespace or "",
                label_selector=label_selector,
                resource_version=resource_version,
                send_initial_bookmark=bookmark,
            ),
            metadata=self._metadata,
        )
        try:
            async for event in call:
                yield event.type, _load(event.object_json)
        except grpc.aio.AioRpcError as e:
            raise translate_rpc_error(e) from None
        finally:
            call.cancel()
