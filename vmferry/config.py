"""Client configuration (the kubeconfig of vmferry) and daemon TOML configuration.

A client config is a small YAML file::

    apiVersion: vmferry.io/v1
    kind: Config
    server: 127.0.0.1:7443
    certificateAuthority: pki/ca.crt      # relative paths are relative to this file
    clientCertificate: pki/users/admin.crt
    clientKey: pki/users/admin.key
    token: ""                             # optional bearer token instead of a client cert
    namespace: default

``server`` may list several controller replicas (store = "etcd"), comma-separated IP
addresses: ``server: 192.0.2.10:7443,192.0.2.11:7443,192.0.2.12:7443``; the client uses
one that answers and moves to another when it fails (``vmferry.client``).

With only ``certificateAuthority`` and ``token`` (no client certificate and key) the
client presents no certificate and authenticates with the bearer token; ``server`` must
then be the controller's ``token_listen`` address (see ``controller.authn``).

It is found, in order, at ``--config``, ``$VMFERRY_CONFIG``, ``~/.vmferry/config.yaml``.

Several clusters (kubeconfig-style contexts): instead of the top-level connection keys,
the file lists ``clusters`` (where and which CA), ``users`` (a client certificate or a
token) and ``contexts`` (a cluster, a user and a namespace), and names the one used by
default in ``current-context``::

    apiVersion: vmferry.io/v1
    kind: Config
    clusters:
    - name: cluster1
      cluster: {server: 127.0.0.1:7443, certificateAuthority: cluster1/pki/ca.crt}
    users:
    - name: cluster1-admin
      user: {clientCertificate: cluster1/pki/users/admin.crt, clientKey: cluster1/pki/users/admin.key}
    contexts:
    - name: cluster1
      context: {cluster: cluster1, user: cluster1-admin, namespace: default}
    current-context: cluster1

``vmferry --context NAME`` picks another context for one command; ``vmferry config
use-context NAME`` changes ``current-context`` (see :class:`ClientConfigFile`). A file
without ``contexts`` is the single-cluster form above, read as before.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vmferry.pki import TlsFiles

CONFIG_ENV = "VMFERRY_CONFIG"
DEFAULT_CONFIG = Path.home() / ".vmferry" / "config.yaml"
_CONFIG_KEYS = {
    "apiVersion",
    "kind",
    "server",
    "certificateAuthority",
    "clientCertificate",
    "clientKey",
    "token",
    "namespace",
    "insecurePlaintext",
}


# The multi-cluster (contexts) form: top-level keys, and the keys of each entry.
CLUSTERS, USERS, CONTEXTS, CURRENT_CONTEXT = "clusters", "users", "contexts", "current-context"
_CONTEXTS_FILE_KEYS = {"apiVersion", "kind", CLUSTERS, USERS, CONTEXTS, CURRENT_CONTEXT}
_CLUSTER_KEYS = {"server", "certificateAuthority", "insecurePlaintext"}
_USER_KEYS = {"clientCertificate", "clientKey", "token"}
_CONTEXT_KEYS = {"cluster", "user", "namespace"}


def default_config_path() -> Path:
    """``$VMFERRY_CONFIG`` or ``~/.vmferry/config.yaml``."""
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


Obj = dict[str, Any]


class ConfigError(Exception):
    """A configuration file is missing or wrong; the message says which and why."""


@dataclass(frozen=True)
class ClientConfig:
    server: str
    tls: TlsFiles | None
    token: str = ""
    namespace: str = "default"
    insecure_plaintext: bool = False

    @classmethod
    def load(cls, path: Path | None = None, context: str | None = None) -> ClientConfig:
        """Load from ``path`` or the default locations; raise ConfigError if absent/invalid.

        A file with contexts gives the one named ``context`` (default: its
        ``current-context``); a single-cluster file accepts no ``context``."""
        return ClientConfigFile.load(path).select(context)

    @classmethod
    def from_doc(cls, doc: dict[str, Any], base: Path, where: str) -> ClientConfig:
        """The connection described by the single-cluster keys of ``doc`` (paths relative
        to ``base``; ``where`` names the file or entry in errors)."""
        if not doc.get("server"):
            raise ConfigError(f"{where}: 'server' is required (host:port of the controller)")

        def rel(key: str) -> Path | None:
            v = doc.get(key)
            return (base / v) if v else None

        ca, cert, key = rel("certificateAuthority"), rel("clientCertificate"), rel("clientKey")
        plaintext = bool(doc.get("insecurePlaintext", False))
        tls: TlsFiles | None = None
        if not plaintext:
            if ca is None:
                raise ConfigError(f"{where}: 'certificateAuthority' is required for mTLS")
            if (cert is None) != (key is None):
                raise ConfigError(f"{where}: set both clientCertificate and clientKey, or neither")
            tls = TlsFiles(ca=ca, cert=cert or Path(), key=key or Path())
        return cls(
            server=str(doc["server"]),
            tls=tls,
            token=str(doc.get("token") or ""),
            namespace=str(doc.get("namespace") or "default"),
            insecure_plaintext=plaintext,
        )

    def fields(self, relative_to: Path | None = None) -> dict[str, Any]:
        """The single-cluster keys of this connection (paths relative to ``relative_to``
        when they are inside it)."""

        def p(x: Path) -> str:
            if relative_to is not None:
                try:
                    return str(x.resolve().relative_to(relative_to.resolve()))
                except ValueError:
                    pass
            return str(x.resolve())

        doc: dict[str, Any] = {"server": self.server}
        if self.tls is not None:
            doc["certificateAuthority"] = p(self.tls.ca)
            if self.tls.cert != Path():
                doc["clientCertificate"] = p(self.tls.cert)
                doc["clientKey"] = p(self.tls.key)
        if self.token:
            doc["token"] = self.token
        doc["namespace"] = self.namespace
        if self.insecure_plaintext:
            doc["insecurePlaintext"] = True
        return doc

    def to_yaml(self, relative_to: Path | None = None) -> str:
        doc: dict[str, Any] = {"apiVersion": "vmferry.io/v1", "kind": "Config"}
        doc.update(self.fields(relative_to))
        return yaml.safe_dump(doc, sort_keys=False)


def _entries(doc: dict[str, Any], key: str, body: str, allowed: set[str], where: str) -> Obj:
    """``doc[key]`` (a list of ``{name, <body>: {...}}``) as {name: body}, checked."""
    items = doc.get(key) or []
    if not isinstance(items, list):
        raise ConfigError(f"{where}: '{key}' must be a list")
    out: Obj = {}
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            raise ConfigError(f"{where}: {key}[{i}] needs a 'name'")
        name = item["name"]
        if name in out:
            raise ConfigError(f"{where}: {key}: {name!r} is listed twice")
        extra = sorted(set(item) - {"name", body})
        if extra:
            raise ConfigError(f"{where}: {key}[{name}]: unknown field(s) {', '.join(extra)}")
        entry = item.get(body) or {}
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: {key}[{name}].{body} must be a mapping")
        unknown = sorted(set(entry) - allowed)
        if unknown:
            raise ConfigError(
                f"{where}: {key}[{name}].{body}: unknown field(s) {', '.join(unknown)}"
            )
        out[name] = entry
    return out


@dataclass
class ClientConfigFile:
    """A client configuration file: one connection (the single-cluster form, ``contexts``
    empty) or named contexts with a current one."""

    path: Path
    single: ClientConfig | None = None  # the single-cluster form
    contexts: dict[str, ClientConfig] = field(default_factory=dict)
    # context name -> (cluster name, user name), as listed (for get-contexts)
    refs: dict[str, tuple[str, str]] = field(default_factory=dict)
    current: str = ""

    @classmethod
    def load(cls, path: Path | None = None) -> ClientConfigFile:
        path = path or default_config_path()
        try:
            doc = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(
                f"no client configuration at {path}: run 'vmferry lab up' or pass --config"
            ) from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        if CONTEXTS not in doc:
            unknown = sorted(set(doc) - _CONFIG_KEYS)
            if unknown:
                raise ConfigError(f"{path}: unknown field(s) {', '.join(unknown)}")
            return cls(path, single=ClientConfig.from_doc(doc, path.parent, str(path)))
        return cls._load_contexts(path, doc)

    @classmethod
    def _load_contexts(cls, path: Path, doc: dict[str, Any]) -> ClientConfigFile:
        unknown = sorted(set(doc) - _CONTEXTS_FILE_KEYS)
        if unknown:
            raise ConfigError(
                f"{path}: unknown field(s) {', '.join(unknown)} (a file with 'contexts' "
                f"keeps connections in '{CLUSTERS}' and '{USERS}')"
            )
        where = str(path)
        clusters = _entries(doc, CLUSTERS, "cluster", _CLUSTER_KEYS, where)
        users = _entries(doc, USERS, "user", _USER_KEYS, where)
        entries = _entries(doc, CONTEXTS, "context", _CONTEXT_KEYS, where)
        if not entries:
            raise ConfigError(f"{where}: '{CONTEXTS}' is empty")
        out = cls(path)
        for name, ctx in entries.items():
            cluster, user = ctx.get("cluster"), ctx.get("user")
            if cluster not in clusters:
                raise ConfigError(
                    f"{where}: context {name!r} names cluster {cluster!r}, which is not in "
                    f"'{CLUSTERS}' ({', '.join(clusters) or 'none'})"
                )
            if user is not None and user not in users:
                raise ConfigError(
                    f"{where}: context {name!r} names user {user!r}, which is not in "
                    f"'{USERS}' ({', '.join(users) or 'none'})"
                )
            merged = {**clusters[cluster], **(users[user] if user else {})}
            if ctx.get("namespace"):
                merged["namespace"] = ctx["namespace"]
            out.contexts[name] = ClientConfig.from_doc(
                merged, path.parent, f"{where}: context {name!r}"
            )
            out.refs[name] = (str(cluster), str(user or ""))
        current = doc.get(CURRENT_CONTEXT) or ""
        if current and current not in out.contexts:
            raise ConfigError(
                f"{where}: {CURRENT_CONTEXT} {current!r} is not one of the contexts "
                f"({', '.join(out.contexts)})"
            )
        out.current = str(current)
        return out

    def select(self, context: str | None = None) -> ClientConfig:
        """The connection of ``context`` (default: the current context)."""
        if self.single is not None:
            if context:
                raise ConfigError(
                    f"--context {context}: {self.path} is a single-cluster configuration "
                    f"without contexts"
                )
            return self.single
        name = context or self.current
        if not name:
            raise ConfigError(
                f"{self.path} has no {CURRENT_CONTEXT}: pass --context "
                f"({', '.join(self.contexts)}) or run 'vmferry config use-context NAME'"
            )
        if name not in self.contexts:
            raise ConfigError(
                f"context {name!r} is not in {self.path} (contexts: {', '.join(self.contexts)})"
            )
        return self.contexts[name]

    def use(self, context: str) -> None:
        """Make ``context`` the current one, in the file (every other line kept)."""
        if self.single is not None:
            raise ConfigError(f"{self.path} is a single-cluster configuration without contexts")
        if context not in self.contexts:
            raise ConfigError(
                f"context {context!r} is not in {self.path} (contexts: {', '.join(self.contexts)})"
            )
        doc = yaml.safe_load(self.path.read_text())
        doc[CURRENT_CONTEXT] = context
        _write_atomic(self.path, yaml.safe_dump(doc, sort_keys=False))
        self.current = context


def contexts_yaml(
    contexts: dict[str, ClientConfig], current: str, relative_to: Path | None = None
) -> str:
    """A configuration file with one context per entry (the cluster and the user named
    after it: ``<name>`` and ``<name>-admin``), ``current`` the current context."""
    if current not in contexts:
        raise ValueError(f"current context {current!r} is not one of {', '.join(contexts)}")
    clusters, users, entries = [], [], []
    for name, config in contexts.items():
        keys = config.fields(relative_to)
        clusters.append(
            {"name": name, "cluster": {k: v for k, v in keys.items() if k in _CLUSTER_KEYS}}
        )
        user = {k: v for k, v in keys.items() if k in _USER_KEYS}
        context: dict[str, Any] = {"cluster": name}
        if user:
            users.append({"name": f"{name}-admin", "user": user})
            context["user"] = f"{name}-admin"
        context["namespace"] = config.namespace
        entries.append({"name": name, "context": context})
    doc = {
        "apiVersion": "vmferry.io/v1",
        "kind": "Config",
        CLUSTERS: clusters,
        USERS: users,
        CONTEXTS: entries,
        CURRENT_CONTEXT: current,
    }
    return yaml.safe_dump(doc, sort_keys=False)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_toml(path: Path, allowed: dict[str, type | tuple[type, ...]]) -> dict[str, Any]:
    """Read a daemon's TOML file and check keys and types against ``allowed``.

    Raises ConfigError naming the file and the key for an unknown key or a wrong type.
    """
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    for key, value in doc.items():
        if key not in allowed:
            raise ConfigError(f"{path}: unknown key {key!r} (known: {', '.join(sorted(allowed))})")
        if not isinstance(value, allowed[key]) or isinstance(value, bool) != (allowed[key] is bool):
            raise ConfigError(f"{path}: {key} has the wrong type ({type(value).__name__})")
    return doc


def daemon_config(
    args: Any,
    defaults: dict[str, Any],
    keys: dict[str, type | tuple[type, ...]],
    *,
    tls_what: str,
    flag_skip: tuple[str, ...] = (),
) -> dict[str, Any]:
    """A daemon's configuration: ``defaults``, then the TOML file ``args.config``, then
    every command-line flag that was given (``keys`` named as flags, minus ``flag_skip``).

    Unless ``insecure_plaintext`` is set, the CA, certificate and key must be present
    (``tls_what`` names the certificate in the error)."""
    config = dict(defaults)
    if getattr(args, "config", None):
        config.update(load_toml(args.config, keys))
    for key in keys:
        value = getattr(args, key, None)
        if value is not None and key not in flag_skip:
            config[key] = value
    if not config.get("insecure_plaintext"):
        missing = [k for k in ("ca", "cert", "key") if not config.get(k)]
        if missing:
            raise ConfigError(
                f"missing {', '.join(missing)}: mTLS needs the CA, {tls_what} and its key "
                "(or --insecure-plaintext for tests)"
            )
    return config
