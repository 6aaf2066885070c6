"""Issue 26 through the CLI: a running VMI's spec cannot change, the API's request limits
are refused with errors that name them, and listing many large objects still works."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tests.support.lab import LabHarness, vm_manifest
from vmferry.client import ApiClient
from vmferry.config import ClientConfig
from vmferry.objects import limits


def configmap(name: str, data: dict[str, str], labels: dict[str, str] | None = None) -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name, "labels": labels or {}},
            "data": data,
        }
    )


@pytest.mark.timeout(240)
def test_a_running_vmi_spec_patch_is_refused_and_it_still_migrates(lab: LabHarness) -> None:
    lab.apply(vm_manifest("vm-a", memory="64Mi", dirty_rate="2Mi", hot_set="8Mi"))
    before = lab.wait_vmi_running("vm-a", timeout=90)
    out = lab.cli(
        "patch",
        "vmi",
        "vm-a",
        "--type",
        "merge",
        "-p",
        '{"spec":{"domain":{"memory":{"guest":"128Mi"}}}}',
        check=False,
    )
    assert out.returncode == 1
    assert "Error from server (Invalid)" in out.stderr
    assert (
        "spec.domain.memory.guest: a VirtualMachineInstance's spec cannot change once "
        "created; edit the VirtualMachine (vmferry edit vm vm-a -n default) and restart it"
    ) in out.stderr
    after = lab.get("vmi", "vm-a")
    assert after["spec"] == before["spec"]
    # Labels are metadata: still allowed.
    lab.cli("label", "vmi", "vm-a", "probe=yes")
    assert lab.get("vmi", "vm-a")["metadata"]["labels"]["probe"] == "yes"
    lab.cli("migrate", "vm-a", "--wait", timeout=150)
    moved = lab.get("vmi", "vm-a")
    assert moved["status"]["nodeName"] != before["status"]["nodeName"]
    assert moved["spec"]["domain"]["memory"]["guest"] == "64Mi"


@pytest.mark.timeout(120)
def test_request_limits_are_refused_naming_the_limit(lab: LabHarness, tmp_path: Path) -> None:
    def create(manifest: str, name: str) -> str:
        path = tmp_path / name
        path.write_text(manifest)
        out = lab.cli("create", "-f", str(path), check=False)
        assert out.returncode == 1, out.stdout
        return out.stderr

    err = create(configmap("huge", {"big": "x" * (4 << 20)}), "huge.json")
    assert "Error from server (RequestEntityTooLarge)" in err
    assert "maximum request body size of 3145728 bytes" in err
    err = create(configmap("big", {"big": "x" * (2 << 20)}), "big.json")
    assert "Error from server (Invalid)" in err
    assert "more than the maximum object size of 1572864 bytes (1.5 MiB)" in err
    labels = {f"k{i}": "v" for i in range(10_000)}
    err = create(configmap("labels", {"a": "b"}, labels), "labels.json")
    assert "metadata.labels: 10000 labels, more than the 256 allowed" in err
    err = create(configmap("value", {"a": "b"}, {"app": "v" * 100_000}), "value.json")
    assert "Error from server (Invalid)" in err
    assert "(99744 more characters): must be no more than 63 characters" in err
    assert "RESOURCE_EXHAUSTED" not in err
    vm = json.loads(vm_manifest("huge-vm"))
    domain = vm["spec"]["template"]["spec"]["domain"]
    domain["memory"]["guest"] = "1Ei"
    domain["cpu"] = {"cores": 1e9}
    err = create(json.dumps(vm), "vm.json")
    assert 'domain.memory.guest: must be at most 16Ti (the limit), got "1Ei"' in err
    assert "domain.cpu.cores: must be between 1 and 512, got 1000000000" in err
    err = create(configmap("bad-unicode", {"key": "\ud800"}), "unicode.json")
    assert "data.key: invalid Unicode: lone surrogate U+D800" in err
    deep = '{"a":' * 100_000 + "1" + "}" * 100_000
    err = create(deep, "deep.json")
    assert "nesting deeper than 100 levels" in err
    assert "RecursionError" not in err
    lab.cli("create", "-f", "-", input=configmap("target", {"a": "b"}))
    deep_patch = '{"data":' * 10_000 + "1" + "}" * 10_000  # argv: < 128 KiB
    out = lab.cli("patch", "cm", "target", "--type", "merge", "-p", deep_patch, check=False)
    assert out.returncode == 1
    assert "nesting deeper than 100 levels" in out.stderr
    assert lab.cli("get", "cm", "-A").returncode == 0


@pytest.mark.timeout(240)
def test_listing_many_objects_of_the_maximum_size(lab: LabHarness) -> None:
    """45 ConfigMaps of ~1.4 MiB: a list of ~63 MiB and more, past gRPC's 64 MiB default."""
    lab.apply(json.dumps({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "big"}}))
    payload = "x" * (limits.MAX_OBJECT_BYTES - 100_000)

    async def fill() -> None:
        async with ApiClient(ClientConfig.load(lab.root / "client.yaml"), timeout=30) as api:
            for i in range(48):
                cm = json.loads(configmap(f"cm{i}", {"big": payload}))
                cm["metadata"]["namespace"] = "big"
                await api.create(cm)

    asyncio.run(fill())
    out = lab.cli("get", "cm", "-n", "big")
    assert out.stdout.count("cm") >= 48
    out = lab.cli("get", "cm", "-A", "-o", "name")
    assert out.stdout.count("configmap/cm") >= 48
