"""Client configuration contexts (kubeconfig-style): parsing, selection, use-context, the
single-cluster file read as before, and ``--context`` before or after the verb."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vmferry.cli.common import client_config
from vmferry.cli.main import build_parser
from vmferry.config import (
    CURRENT_CONTEXT,
    ClientConfig,
    ClientConfigFile,
    ConfigError,
    contexts_yaml,
)
from vmferry.pki import TlsFiles


def _tls(base: Path, name: str) -> TlsFiles:
    return TlsFiles(
        ca=base / name / "ca.crt", cert=base / name / "admin.crt", key=base / name / "admin.key"
    )


def _two(tmp_path: Path) -> Path:
    contexts = {
        "cluster1": ClientConfig(server="127.0.0.1:1001", tls=_tls(tmp_path, "c1")),
        "cluster2": ClientConfig(
            server="127.0.0.1:2002", tls=_tls(tmp_path, "c2"), namespace="prod"
        ),
    }
    path = tmp_path / "client.yaml"
    path.write_text(contexts_yaml(contexts, "cluster1", relative_to=tmp_path))
    return path


@pytest.mark.timeout(10)
def test_contexts_round_trip_and_select(tmp_path: Path) -> None:
    path = _two(tmp_path)
    doc = yaml.safe_load(path.read_text())
    assert [c["name"] for c in doc["contexts"]] == ["cluster1", "cluster2"]
    assert doc[CURRENT_CONTEXT] == "cluster1"
    # paths inside the file's directory are written relative to it
    assert doc["clusters"][0]["cluster"]["certificateAuthority"] == "c1/ca.crt"
    f = ClientConfigFile.load(path)
    assert f.single is None and f.current == "cluster1"
    assert f.refs["cluster2"] == ("cluster2", "cluster2-admin")
    c1 = ClientConfig.load(path)
    assert c1.server == "127.0.0.1:1001" and c1.tls is not None
    assert c1.tls.cert == tmp_path / "c1" / "admin.crt"
    c2 = ClientConfig.load(path, "cluster2")
    assert (c2.server, c2.namespace) == ("127.0.0.1:2002", "prod")
    with pytest.raises(ConfigError, match=r"context 'nope' is not in .*cluster1, cluster2"):
        ClientConfig.load(path, "nope")


@pytest.mark.timeout(10)
def test_use_context_rewrites_only_current_context(tmp_path: Path) -> None:
    path = _two(tmp_path)
    before = yaml.safe_load(path.read_text())
    ClientConfigFile.load(path).use("cluster2")
    after = yaml.safe_load(path.read_text())
    assert after[CURRENT_CONTEXT] == "cluster2"
    assert {k: v for k, v in after.items() if k != CURRENT_CONTEXT} == {
        k: v for k, v in before.items() if k != CURRENT_CONTEXT
    }
    assert ClientConfig.load(path).server == "127.0.0.1:2002"
    with pytest.raises(ConfigError, match="'cluster3' is not in"):
        ClientConfigFile.load(path).use("cluster3")


@pytest.mark.timeout(10)
def test_single_cluster_file_reads_as_before(tmp_path: Path) -> None:
    path = tmp_path / "client.yaml"
    config = ClientConfig(server="127.0.0.1:7443", tls=_tls(tmp_path, "x"), namespace="ns1")
    path.write_text(config.to_yaml(relative_to=tmp_path))
    doc = yaml.safe_load(path.read_text())
    assert doc["server"] == "127.0.0.1:7443" and "contexts" not in doc
    assert ClientConfig.load(path) == config
    f = ClientConfigFile.load(path)
    assert f.single == config and f.contexts == {}
    with pytest.raises(ConfigError, match="single-cluster configuration without contexts"):
        ClientConfig.load(path, "cluster2")
    with pytest.raises(ConfigError, match="single-cluster configuration"):
        f.use("cluster1")


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            {"contexts": [{"name": "a", "context": {"cluster": "x"}}], "clusters": []},
            "context 'a' names cluster 'x', which is not in 'clusters'",
        ),
        (
            {
                "clusters": [
                    {"name": "x", "cluster": {"server": "h:1", "insecurePlaintext": True}}
                ],
                "contexts": [{"name": "a", "context": {"cluster": "x", "user": "u"}}],
            },
            "context 'a' names user 'u', which is not in 'users'",
        ),
        (
            {
                "clusters": [
                    {"name": "x", "cluster": {"server": "h:1", "insecurePlaintext": True}}
                ],
                "contexts": [{"name": "a", "context": {"cluster": "x"}}],
                "current-context": "b",
            },
            "current-context 'b' is not one of the contexts (a)",
        ),
        (
            {
                "clusters": [{"name": "x", "cluster": {"server": "h:1", "token": "t"}}],
                "contexts": [{"name": "a", "context": {"cluster": "x"}}],
            },
            "clusters[x].cluster: unknown field(s) token",
        ),
        (
            {
                "server": "h:1",
                "contexts": [{"name": "a", "context": {"cluster": "x"}}],
            },
            "unknown field(s) server",
        ),
        ({"contexts": []}, "'contexts' is empty"),
        (
            {
                "clusters": [{"name": "x", "cluster": {"certificateAuthority": "ca.crt"}}],
                "contexts": [{"name": "a", "context": {"cluster": "x"}}],
            },
            "context 'a': 'server' is required",
        ),
        (
            {
                "clusters": [{"name": "x", "cluster": {"server": "h:1"}}, {"name": "x"}],
                "contexts": [{"name": "a", "context": {"cluster": "x"}}],
            },
            "clusters: 'x' is listed twice",
        ),
    ],
)
def test_bad_contexts_say_which_rule(tmp_path: Path, doc: dict[str, object], message: str) -> None:
    path = tmp_path / "client.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as e:
        ClientConfigFile.load(path)
    assert message in str(e.value)


@pytest.mark.timeout(10)
def test_no_current_context_needs_context(tmp_path: Path) -> None:
    path = tmp_path / "client.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "clusters": [
                    {"name": "x", "cluster": {"server": "h:1", "insecurePlaintext": True}}
                ],
                "contexts": [{"name": "a", "context": {"cluster": "x", "namespace": "n"}}],
            }
        )
    )
    with pytest.raises(ConfigError, match="has no current-context: pass --context"):
        ClientConfig.load(path)
    config = ClientConfig.load(path, "a")
    assert (config.server, config.tls, config.namespace) == ("h:1", None, "n")


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "argv",
    [
        ["--context", "cluster2", "get", "vmi"],
        ["get", "vmi", "--context", "cluster2"],
        ["--context", "cluster1", "get", "vmi", "--context", "cluster2"],  # the verb's wins
    ],
)
def test_context_flag_before_and_after_the_verb(tmp_path: Path, argv: list[str]) -> None:
    path = _two(tmp_path)
    args = build_parser().parse_args(argv)
    args.config = str(path)
    assert args.context == "cluster2"
    assert client_config(args).server == "127.0.0.1:2002"


@pytest.mark.timeout(10)
def test_no_context_flag_uses_the_current_one(tmp_path: Path) -> None:
    path = _two(tmp_path)
    args = build_parser().parse_args(["get", "vmi", "--config", str(path)])
    assert args.context is None
    assert client_config(args).server == "127.0.0.1:1001"


@pytest.mark.timeout(10)
def test_config_verbs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _two(tmp_path)
    parser = build_parser()

    def run(*argv: str) -> int:
        args = parser.parse_args(["config", *argv, "--config", str(path)])
        code: int = args.func(args)
        return code

    assert run("get-contexts") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["CURRENT", "NAME", "CLUSTER", "SERVER", "AUTHINFO", "NAMESPACE"]
    assert out[1].split() == [
        "*",
        "cluster1",
        "cluster1",
        "127.0.0.1:1001",
        "cluster1-admin",
        "default",
    ]
    assert out[2].split() == ["cluster2", "cluster2", "127.0.0.1:2002", "cluster2-admin", "prod"]
    assert run("use-context", "cluster2") == 0
    assert capsys.readouterr().out.strip() == 'Switched to context "cluster2".'
    assert run("current-context") == 0
    assert capsys.readouterr().out.strip() == "cluster2"
    assert run("use-context", "nope") == 1
    assert "'nope' is not in" in capsys.readouterr().err
