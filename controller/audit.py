"""The audit log: one JSON object per line for every API request, with its final decision.

Fields: ``time`` (RFC 3339, UTC, microseconds), ``user``, ``groups``, ``verb``,
``apiGroup``, ``resource`` (``plural`` or ``plural/subresource``), ``namespace``,
``name``, ``allowed``, ``reason`` (the grant that allowed it, or what refused it),
``stage`` and ``peer`` (the caller's address, as gRPC gives it: ``ipv4:127.0.0.1:40312``).

``stage`` is the stage that decided (``STAGES``, in the order a request meets them):
``authentication`` (no, a bad, a rejected or a revoked credential: ``user`` is empty),
``validation`` (the request or object is malformed or invalid, or a node's write names
an object that does not exist: any other caller is authorized first), ``rbac`` (the
authorizer: RBAC, or the node authorizer for node identities), ``escalation`` (writing a
role or binding that would grant more than the writer holds) and ``admission``. A denied
request names the stage that refused it; an allowed one the last stage it passed. Each
request is logged once, with its final decision: an RBAC grant later refused by the
escalation check is logged ``allowed: false, stage: escalation``. A request allowed
through every stage that then fails in the store (a stale resourceVersion: Conflict; a
missing object) stays ``allowed: true``: that is its outcome, not a decision.

The file is ``<data_dir>/audit.log`` unless the controller's ``audit_log`` setting
(``--audit-log``) names another; lines are appended and flushed one by one, so ``tail -f``
and a crash both see whole lines.
"""

from __future__ import annotations

import json
import logging
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from controller.rbac import Request

log = logging.getLogger(__name__)


STAGES = ("authentication", "validation", "rbac", "escalation", "admission")


class AuditLog:
    """Appends decisions to a file; without a path, to the logger ``vmferry.audit``."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._file: IO[str] | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8", buffering=1)
        self._logger = logging.getLogger("vmferry.audit")

    def record(
        self, request: Request, allowed: bool, reason: str, *, stage: str = "rbac", peer: str = ""
    ) -> None:
        assert stage in STAGES, stage
        entry = {
            "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "user": request.user,
            "groups": list(request.groups),
            "verb": request.verb,
            "apiGroup": request.api_group,
            "resource": request.full_resource,
            "namespace": request.namespace,
            "name": request.name,
            "allowed": allowed,
            "reason": reason,
            "stage": stage,
            "peer": peer,
        }
        line = json.dumps(entry, separators=(",", ":"))
        if self._file is None:
            self._logger.info("%s", line)
            return
        with self._lock:
            try:
                self._file.write(line + "\n")
            except OSError:
                log.exception("cannot write the audit log %s", self.path)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
