"""Reading manifests: YAML (multi-document) or JSON files, stdin, ``kind: List``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

from vmferry.errors import BadRequest
from vmferry.objects import limits

Obj = dict[str, Any]


def parse_documents(text: str, source: str) -> list[Obj]:
    """Every object in ``text``; ``List`` kinds are flattened. BadRequest names the source."""
    stripped = text.lstrip()
    try:
        if stripped.startswith(("{", "[")):
            docs: list[Any] = [limits.loads_json(text, source)]
        else:
            docs = [d for d in yaml.load_all(text, Loader=limits.YamlLoader) if d is not None]
    except (ValueError, yaml.YAMLError) as e:
        raise BadRequest(f"error parsing {source}: {e}") from None
    objects: list[Obj] = []
    for i, doc in enumerate(docs):
        if isinstance(doc, list):
            items = doc
        elif isinstance(doc, dict) and doc.get("kind") == "List":
            items = doc.get("items") or []
        else:
            items = [doc]
        for item in items:
            if not isinstance(item, dict):
                raise BadRequest(f"error parsing {source}: document {i + 1} is not an object")
            if not item.get("kind"):
                raise BadRequest(f"error validating {source}: document {i + 1}: kind not set")
            if not item.get("apiVersion"):
                raise BadRequest(f"error validating {source}: document {i + 1}: apiVersion not set")
            objects.append(json.loads(json.dumps(item, default=str)))
    return objects


def load(paths: list[str]) -> list[Obj]:
    """Objects from files, directories (``*.yaml``, ``*.yml``, ``*.json``) or ``-`` (stdin)."""
    objects: list[Obj] = []
    for p in paths:
        if p == "-":
            objects += parse_documents(sys.stdin.read(), "stdin")
            continue
        path = Path(p)
        if not path.exists():
            raise BadRequest(f'the path "{p}" does not exist')
        if path.is_dir():
            files = sorted(f for f in path.iterdir() if f.suffix in (".yaml", ".yml", ".json"))
        else:
            files = [path]
        for f in files:
            try:
                text = f.read_text()
            except OSError as e:
                raise BadRequest(f"the path {str(f)!r} cannot be read: {e.strerror}") from None
            objects += parse_documents(text, str(f))
    return objects
