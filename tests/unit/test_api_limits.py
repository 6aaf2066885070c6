"""Issue 26, items 2-4: a running VMI's spec is immutable, the API's request limits, and
error messages that always fit on the wire.

The checks are unit-tested where they live (``vmferry.objects.limits``, the schema,
``controller.admission``) and once through the real API: a gRPC server with the
controller's options, mTLS certificates of a fresh CA and a real Store.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from controller.admission import Admission
from controller.api import ApiService
from controller.main import bootstrap
from controller.store import Store
from vmferry import grpc_options, pki
from vmferry.cli import manifests
from vmferry.client import ApiClient
from vmferry.config import ClientConfig
from vmferry.errors import ApiError, BadRequest, Invalid, RequestEntityTooLarge
from vmferry.objects import limits, schema
from vmferry.objects.patch import parse_patch
from vmferry.rpc import api_pb2

Obj = dict[str, Any]


def deep_json(levels: int) -> str:
    return '{"a":' * levels + "1" + "}" * levels


def configmap(name: str, data: dict[str, str] | None = None, **meta: Any) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": "default", **meta},
        "data": data or {"k": "v"},
    }


def vmi(name: str = "vm-a", **spec: Any) -> Obj:
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"domain": {"memory": {"guest": "64Mi"}, "cpu": {"cores": 1}}, **spec},
    }


def refusal(obj: Obj) -> str:
    with pytest.raises(Invalid) as e:
        schema.validate(obj)
    return e.value.message


# -- item 3: limits in validation ----------------------------------------------------------


@pytest.mark.timeout(10)
def test_memory_of_an_exabyte_is_refused_naming_the_limit() -> None:
    obj = vmi()
    obj["spec"]["domain"]["memory"]["guest"] = "1Ei"
    assert 'spec.domain.memory.guest: must be at most 16Ti (the limit), got "1Ei"' in refusal(obj)
    obj = vmi()
    obj["spec"]["domain"]["resources"] = {"requests": {"memory": "1Ei"}}
    assert "spec.domain.resources.requests.memory: must be at most 16Ti" in refusal(obj)


@pytest.mark.timeout(10)
def test_a_billion_cores_are_refused_naming_the_limit() -> None:
    obj = vmi()
    obj["spec"]["domain"]["cpu"]["cores"] = 1e9
    message = refusal(obj)
    assert "spec.domain.cpu.cores: must be between 1 and 512, got 1000000000" in message
    obj["spec"]["domain"]["cpu"]["cores"] = limits.MAX_CPUS
    schema.validate(obj)


@pytest.mark.timeout(10)
def test_ten_thousand_labels_are_refused() -> None:
    labels = {f"k{i}": "v" for i in range(10_000)}
    message = refusal(configmap("c", labels=labels))
    assert "metadata.labels: 10000 labels, more than the 256 allowed" in message
    schema.validate(configmap("c", labels=dict(list(labels.items())[: limits.MAX_LABELS])))


@pytest.mark.timeout(10)
def test_an_object_over_one_and_a_half_mebibytes_is_refused() -> None:
    message = refusal(configmap("c", {"big": "x" * (limits.MAX_OBJECT_BYTES + 1)}))
    assert "more than the maximum object size of 1572864 bytes (1.5 MiB)" in message
    assert len(message) < 400
    schema.validate(configmap("c", {"big": "x" * (limits.MAX_OBJECT_BYTES - 200)}))


@pytest.mark.timeout(10)
def test_a_lone_surrogate_is_refused_with_its_field_path() -> None:
    message = refusal(configmap("c", {"key": "ok \ud800"}))
    assert 'ConfigMap "c": data.key: invalid Unicode: lone surrogate U+D800' in message
    message = refusal(configmap("c", labels={"app": "a"}, annotations={"note": "\udfff"}))
    assert "metadata.annotations.note: invalid Unicode: lone surrogate U+DFFF" in message


@pytest.mark.timeout(10)
def test_an_object_nested_deeper_than_the_limit_is_refused_without_recursion() -> None:
    value: Any = 1
    for _ in range(100_000):
        value = {"a": value}
    obj = vmi(affinity=value)
    message = refusal(obj)
    assert "spec.affinity.a.a.a.a.a.a...: nesting deeper than 100 levels" in message
    shallow: Any = 1
    for _ in range(limits.MAX_DEPTH - 3):  # the object, spec and affinity are 3 levels
        shallow = {"a": shallow}
    schema.validate(vmi(affinity=shallow))


@pytest.mark.timeout(10)
def test_json_documents_nested_too_deep_are_refused_before_parsing() -> None:
    with pytest.raises(BadRequest, match="object: nesting deeper than 100 levels"):
        limits.loads_json(deep_json(100_000).encode(), "object")
    with pytest.raises(BadRequest, match="the patch: nesting deeper than 100 levels"):
        parse_patch("merge", deep_json(100_000))
    assert limits.loads_json(deep_json(limits.MAX_DEPTH - 1), "object")
    # Brackets inside strings do not count.
    text = '{"a": "' + "[" * 500 + '", "b": ["\\"[[[["]}'
    assert limits.loads_json(text, "object")["a"] == "[" * 500


@pytest.mark.timeout(10)
def test_the_cli_refuses_deep_yaml_and_json_files_with_the_limit() -> None:
    deep_yaml = "a:\n" + "".join(f"{'  ' * i}a:\n" for i in range(1, 2000)) + "  " * 2000 + "1\n"
    with pytest.raises(BadRequest, match="nesting deeper than 100 levels"):
        manifests.parse_documents(deep_yaml, "deep.yaml")
    flow_yaml = "kind: ConfigMap\ndata: " + "[" * 100_000 + "]" * 100_000 + "\n"
    with pytest.raises(BadRequest, match="nesting deeper than 100 levels"):
        manifests.parse_documents(flow_yaml, "flow.yaml")
    with pytest.raises(BadRequest, match=r"deep\.json: nesting deeper than 100 levels"):
        manifests.parse_documents(deep_json(100_000), "deep.json")
    with pytest.raises(BadRequest, match="nesting deeper than 100 levels"):
        parse_patch("merge", "spec: " + "[" * 100_000)


# -- item 4: messages that fit ---------------------------------------------------------------


@pytest.mark.timeout(10)
def test_a_huge_label_value_is_echoed_cut_and_the_reason_kept() -> None:
    message = refusal(configmap("c", labels={"app": "v" * 100_000}))
    assert "… (99744 more characters): must be no more than 63 characters" in message
    assert len(message) < 600


@pytest.mark.timeout(10)
def test_a_huge_unknown_field_name_is_cut_in_the_path_and_the_message() -> None:
    obj = configmap("c")
    obj["x" * 100_000] = 1
    message = refusal(obj)
    assert "… (99936 more characters)" in message  # the path: 64 characters kept
    assert message.endswith("… (99920 more characters)")  # the echoed name: 80 kept
    assert len(message) < 400


@pytest.mark.timeout(10)
def test_many_problems_are_listed_up_to_a_count() -> None:
    bad = {f"bad key {i}": "v" for i in range(100)}
    message = refusal(configmap("c", labels=bad))
    assert message.count("invalid label key") == limits.MAX_PROBLEMS
    assert message.endswith("and 80 more problems")


@pytest.mark.timeout(10)
def test_fit_message_cuts_to_the_wire_limit_counting_percent_encoding() -> None:
    assert limits.fit_message("short") == "short"
    for char in ("x", "é", "\u2603"):
        cut = limits.fit_message(char * 100_000)
        wire = sum(1 if c.isascii() and c.isprintable() else 3 * len(c.encode()) for c in cut)
        assert wire <= limits.MAX_MESSAGE_BYTES
        assert "more characters)" in cut


@pytest.mark.timeout(10)
def test_shorten_names_what_was_cut() -> None:
    assert limits.shorten("abc", 5) == "abc"
    assert limits.shorten("abcdefgh", 5) == "abcde… (3 more characters)"
    assert limits.echo("abcdefgh", 5) == '"abcde"… (3 more characters)'


# -- item 2: a VMI's spec is immutable ---------------------------------------------------------


def running_vmi() -> Obj:
    obj = vmi()
    obj["metadata"].update(
        uid="u1",
        resourceVersion="5",
        labels={"app": "a"},
        ownerReferences=[{"kind": "VirtualMachine", "name": "vm-a", "uid": "v1"}],
    )
    obj["status"] = {"phase": "Running", "nodeName": "node1"}
    return schema.apply_defaults(obj)  # as the API stores it and hands it to admission


async def admit_update(current: Obj, new: Obj, subresource: str = "") -> None:
    await Admission(None).admit_update(current, new, subresource)  # type: ignore[arg-type]


@pytest.mark.timeout(10)
def test_a_vmi_spec_change_is_refused_naming_the_field_and_what_to_do() -> None:
    current = running_vmi()
    new = copy.deepcopy(current)
    new["spec"]["domain"]["memory"]["guest"] = "128Mi"
    with pytest.raises(Invalid) as e:
        asyncio.run(admit_update(current, new))
    assert e.value.message == (
        'VirtualMachineInstance "vm-a": spec.domain.memory.guest: a VirtualMachineInstance\'s '
        "spec cannot change once created; edit the VirtualMachine (vmferry edit vm vm-a -n "
        "default) and restart it (vmferry delete vmi vm-a -n default: the VM starts a new one "
        "from its template), or migrate"
    )
    added = copy.deepcopy(current)
    added["spec"]["nodeSelector"] = {"kubernetes.io/hostname": "node2"}
    with pytest.raises(Invalid, match=r"spec\.nodeSelector: a VirtualMachineInstance's spec"):
        asyncio.run(admit_update(current, added))
    orphan = copy.deepcopy(current)
    del orphan["metadata"]["ownerReferences"]
    changed = copy.deepcopy(orphan)
    changed["spec"]["domain"]["cpu"]["cores"] = 2
    with pytest.raises(Invalid, match="delete the VMI and create it again"):
        asyncio.run(admit_update(orphan, changed))


@pytest.mark.timeout(10)
def test_a_vmi_metadata_and_status_may_still_change() -> None:
    current = running_vmi()
    new = copy.deepcopy(current)
    new["metadata"]["labels"]["team"] = "x"  # the VM controller copies template labels
    new["metadata"]["annotations"] = {"note": "y"}
    new["metadata"]["finalizers"] = ["vmferry.io/handler"]  # the handler's finalizer
    asyncio.run(admit_update(current, new))
    # The VM controller stores its template's spec as it is; an update carries the defaults.
    bare = copy.deepcopy(current)
    del bare["spec"]["domain"]["cpu"]
    asyncio.run(admit_update(bare, schema.apply_defaults(bare)))
    status = copy.deepcopy(current)
    status["status"]["phase"] = "Succeeded"
    status["spec"]["domain"]["memory"]["guest"] = "128Mi"  # the status subresource ignores it
    asyncio.run(admit_update(current, status, "status"))


# -- through the API: gRPC server with the controller's options --------------------------------


@asynccontextmanager
async def serving_api(tmp_path: Path) -> AsyncIterator[tuple[ApiClient, Store]]:
    pki_dir = tmp_path / "pki"
    pki.init_ca(pki_dir, "limits")
    server_tls = pki.issue_server(pki_dir, "controller", ips=["127.0.0.1"])
    admin = pki.issue_user(pki_dir, "admin", groups=["system:masters"])
    store = await Store.open(tmp_path / "state.db")
    await bootstrap(store)
    server = grpc.aio.server(options=grpc_options.api_server_options())
    from vmferry.rpc import api_pb2_grpc

    api_pb2_grpc.add_ApiServicer_to_server(ApiService(store, Admission(store)), server)
    port = server.add_secure_port("127.0.0.1:0", pki.server_credentials(server_tls))
    await server.start()
    client = ApiClient(ClientConfig(server=f"127.0.0.1:{port}", tls=admin), timeout=30)
    try:
        yield client, store
    finally:
        await client.close()
        await server.stop(None)
        await store.close()


def run_api(tmp_path: Path, body: Callable[[ApiClient, Store], Awaitable[None]]) -> None:
    async def main() -> None:
        async with serving_api(tmp_path) as (api, store):
            await body(api, store)

    asyncio.run(main())


async def raw_call(api: ApiClient, method: str, request: Any) -> Any:
    return await api._call(getattr(api._stub, method), request)


@pytest.mark.timeout(60)
def test_api_refuses_a_request_body_over_the_limit_naming_it(tmp_path: Path) -> None:
    async def body(api: ApiClient, store: Store) -> None:
        with pytest.raises(RequestEntityTooLarge) as e:
            await api.create(configmap("huge", {"big": "x" * (4 << 20)}))
        assert "maximum request body size of 3145728 bytes (3 MiB)" in e.value.message
        with pytest.raises(Invalid, match="maximum object size of 1572864 bytes"):
            await api.create(configmap("big", {"big": "x" * (2 << 20)}))
        with pytest.raises(Invalid, match="maximum object size"):  # grown by a patch
            await api.create(configmap("grows", {"a": "x" * (1 << 20)}))
            await api.patch("ConfigMap", "default", "grows", {"data": {"b": "y" * (1 << 20)}})
        assert len((await store.get("ConfigMap", "default", "grows"))["data"]) == 1

    run_api(tmp_path, body)


@pytest.mark.timeout(120)
def test_api_lists_many_objects_of_the_maximum_size(tmp_path: Path) -> None:
    """50 objects of ~1.4 MiB are a 70 MiB list: more than gRPC's default maximum message."""

    async def body(api: ApiClient, store: Store) -> None:
        payload = "x" * (limits.MAX_OBJECT_BYTES - 100_000)
        for i in range(50):
            await store.create(configmap(f"cm{i}", {"big": payload}))
        items, _ = await api.list("ConfigMap", "default")
        assert len(items) == 50
        items, _ = await api.list("ConfigMap")
        assert len(items) >= 50

    run_api(tmp_path, body)


@pytest.mark.timeout(60)
def test_api_refuses_deep_bodies_and_patches_with_the_limit(tmp_path: Path) -> None:
    async def body(api: ApiClient, store: Store) -> None:
        with pytest.raises(BadRequest, match="object: nesting deeper than 100 levels"):
            await raw_call(
                api, "Create", api_pb2.CreateRequest(object_json=deep_json(100_000).encode())
            )
        await api.create(configmap("c"))
        request = api_pb2.PatchRequest(
            ref=api_pb2.ObjectRef(kind="ConfigMap", namespace="default", name="c"),
            type=api_pb2.PATCH_TYPE_MERGE,
            patch_json=deep_json(100_000).encode(),
        )
        with pytest.raises(BadRequest, match="patch: nesting deeper than 100 levels"):
            await raw_call(api, "Patch", request)

    run_api(tmp_path, body)


@pytest.mark.timeout(60)
def test_api_refuses_invalid_unicode_and_huge_messages_fit(tmp_path: Path) -> None:
    async def body(api: ApiClient, store: Store) -> None:
        with pytest.raises(Invalid, match=r"data.key: invalid Unicode: lone surrogate U\+D800"):
            await api.create(configmap("c", {"key": "\ud800"}))
        with pytest.raises(Invalid, match=r"more characters\): must be no more than 63"):
            await api.create(configmap("c", labels={"app": "v" * 100_000}))
        # Many long bad keys: a message that would be far longer than gRPC's 8 KiB.
        bad = {f"{'K' * 300}{i}": "v" for i in range(200)}
        with pytest.raises(Invalid) as e:
            await api.create(configmap("c", labels=bad))
        assert "invalid label key" in e.value.message
        assert len(e.value.message.encode()) <= limits.MAX_MESSAGE_BYTES

    run_api(tmp_path, body)


@pytest.mark.timeout(60)
def test_api_refuses_a_vmi_spec_patch_but_not_its_labels(tmp_path: Path) -> None:
    async def body(api: ApiClient, store: Store) -> None:
        created = await api.create(vmi())
        with pytest.raises(Invalid, match=r"spec\.domain\.memory\.guest: a VirtualMachineInstance"):
            await api.patch(
                "VirtualMachineInstance",
                "default",
                "vm-a",
                {"spec": {"domain": {"memory": {"guest": "128Mi"}}}},
            )
        patched = await api.patch(
            "VirtualMachineInstance", "default", "vm-a", {"metadata": {"labels": {"a": "b"}}}
        )
        assert patched["spec"] == created["spec"]
        assert patched["metadata"]["labels"] == {"a": "b"}

    run_api(tmp_path, body)


@pytest.mark.timeout(10)
def test_errors_keep_their_type_over_the_wire() -> None:
    assert issubclass(RequestEntityTooLarge, ApiError)
    assert RequestEntityTooLarge("x").code == 413
