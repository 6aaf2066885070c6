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

With only ``certificateAuthority`` and ``token`` (no client certificate and key) the
client presents no certificate and authenticates with the bearer token; ``server`` must
then be the controller's ``token_listen`` address (see ``controller.authn``).

It is found, in order, at ``--config``, ``$VMFERRY_CONFIG``, ``~/.vmferry/config.yaml``.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
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
    def load(cls, path: Path | None = None) -> ClientConfig:
        """Load from ``path`` or the default locations; raise ConfigError if absent/invalid."""
        path = path or Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)
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
        unknown = sorted(set(doc) - _CONFIG_KEYS)
        if unknown:
            raise ConfigError(f"{path}: unknown field(s) {', '.join(unknown)}")
        if not doc.get("server"):
            raise ConfigError(f"{path}: 'server' is required (host:port of the controller)")
        base = path.parent

        def rel(key: str) -> Path | None:
            v = doc.get(key)
            return (base / v) if v else None

        ca, cert, key = rel("certificateAuthority"), rel("clientCertificate"), rel("clientKey")
        plaintext = bool(doc.get("insecurePlaintext", False))
        tls: TlsFiles | None = None
        if not plaintext:
            if ca is None:
                raise ConfigError(f"{path}: 'certificateAuthority' is required for mTLS")
            if (cert is None) != (key is None):
                raise ConfigError(f"{path}: set both clientCertificate and clientKey, or neither")
            tls = TlsFiles(ca=ca, cert=cert or Path(), key=key or Path())
        return cls(
            server=str(doc["server"]),
            tls=tls,
            token=str(doc.get("token") or ""),
            namespace=str(doc.get("namespace") or "default"),
            insecure_plaintext=plaintext,
        )

    def to_yaml(self, relative_to: Path | None = None) -> str:
        def p(x: Path) -> str:
            if relative_to is not None:
                try:
                    return str(x.resolve().relative_to(relative_to.resolve()))
                except ValueError:
                    pass
            return str(x.resolve())

        doc: dict[str, Any] = {
            "apiVersion": "vmferry.io/v1",
            "kind": "Config",
            "server": self.server,
        }
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
        return yaml.safe_dump(doc, sort_keys=False)


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
