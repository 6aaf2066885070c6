"""``vmferry console-log``: where it looks for a QEMU guest's console log. In a
multi-cluster lab the node names repeat across clusters (both have node1), so it reads
the runtime directory of the cluster whose controller the command's context talks to."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmferry.cli.console_cmd import DEFAULT_RUNTIME_DIR, _candidates
from vmferry.config import ClientConfig
from vmferry.lab import LAB_ENV, Lab
from vmferry.lab.multi import MULTI_FILE


def _cluster(directory: Path, server: str) -> Lab:
    directory.mkdir(parents=True)
    (directory / "lab.json").write_text(json.dumps({"nodes": ["node1", "node2"]}))
    config = ClientConfig(server=server, tls=None, insecure_plaintext=True)
    (directory / "client.yaml").write_text(config.to_yaml(relative_to=directory))
    return Lab(directory)


@pytest.mark.timeout(10)
def test_multi_cluster_lab_reads_the_contexts_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / MULTI_FILE).write_text(json.dumps({"clusters": ["cluster1", "cluster2"]}))
    _cluster(tmp_path / "cluster1", "127.0.0.1:1001")
    second = _cluster(tmp_path / "cluster2", "127.0.0.1:2002")
    monkeypatch.setenv(LAB_ENV, str(tmp_path))
    assert _candidates("node1", None, "127.0.0.1:2002") == [
        second.runtime_dir("node1"),
        DEFAULT_RUNTIME_DIR,
    ]
    # a controller of no lab cluster: only the handler's default
    assert _candidates("node1", None, "127.0.0.1:3003") == [DEFAULT_RUNTIME_DIR]


@pytest.mark.timeout(10)
def test_one_cluster_lab_and_runtime_dir_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab = _cluster(tmp_path / "lab", "127.0.0.1:1001")
    monkeypatch.setenv(LAB_ENV, str(lab.dir))
    assert _candidates("node2", None, "anything") == [lab.runtime_dir("node2"), DEFAULT_RUNTIME_DIR]
    assert _candidates("node3", None, "anything") == [DEFAULT_RUNTIME_DIR]
    assert _candidates("node2", "/elsewhere", "anything") == [Path("/elsewhere")]
