"""The manifests in deploy/examples are valid as they stand (README and operators copy
them), and the example NAD's CNI configuration is one the migration network accepts."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmferry.cli.manifests import load
from vmferry.migration_network import NAD_KIND, parse_nad_config
from vmferry.objects.schema import validate

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "examples"
# token-client.yaml is a client configuration (kind Config, like a kubeconfig), not an object
MANIFESTS = sorted(p for p in EXAMPLES.rglob("*.yaml") if "kind: Config" not in p.read_text())


@pytest.mark.timeout(30)
@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_example_manifest_validates(path: Path) -> None:
    for obj in load([str(path)]):
        validate(obj)
        if obj["kind"] == NAD_KIND:
            nad = parse_nad_config(obj["spec"]["config"], ["10.0.0.21"])
            assert nad.master == "eth1"
