"""Progress for long CLI waits: a live bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

Obj = dict[str, Any]
BAR_WIDTH = 28


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


class MigrationProgress:
    """Render a VMIM's state; call ``update(vmim)`` on every change, ``close()`` at the end."""

    def __init__(self, out: TextIO | None = None, *, tty: bool | None = None) -> None:
        self.out = out or sys.stderr
        self.tty = self.out.isatty() if tty is None else tty
        self.started = time.monotonic()
        self.last_line = ""
        self.last_plain = 0.0
        self.last_phase = ""

    def line(self, vmim: Obj) -> str:
        status = vmim.get("status") or {}
        phase = status.get("phase") or "Pending"
        ms = status.get("migrationState") or {}
        t = ms.get("transfer") or {}
        total = float(t.get("dataTotalBytes") or 0)
        done = float(t.get("dataProcessedBytes") or 0)
        remaining = float(t.get("dataRemainingBytes") or 0)
        rate = float(t.get("transferRateBytes") or 0)
        elapsed = time.monotonic() - self.started
        parts = [f"{phase:<15}"]
        if total:
            frac = min(1.0, done / total) if phase != "Succeeded" else 1.0
            filled = int(frac * BAR_WIDTH)
            parts.append(
                "["
                + "=" * filled
                + ">" * (filled < BAR_WIDTH)
                + " " * (BAR_WIDTH - filled - 1)
                + "]"
            )
            parts.append(f"{_mib(done)} sent")
            if rate:
                parts.append(f"{rate / 2**20:.0f} MiB/s")
            if t.get("rounds"):
                parts.append(f"round {t['rounds']}")
            if remaining and rate and phase == "Running":
                parts.append(f"ETA {remaining / rate:.1f}s")
        parts.append(f"{elapsed:.1f}s")
        return "  ".join(parts)

    def update(self, vmim: Obj) -> None:
        line = self.line(vmim)
        phase = (vmim.get("status") or {}).get("phase") or "Pending"
        if self.tty:
            if line != self.last_line:
                self.out.write("\r\033[K" + line)
                self.out.flush()
        else:
            now = time.monotonic()
            if phase != self.last_phase or now - self.last_plain >= 1.0:
                self.out.write(line + "\n")
                self.out.flush()
                self.last_plain = now
        self.last_line = line
        self.last_phase = phase

    def close(self) -> None:
        if self.tty and self.last_line:
            self.out.write("\n")
            self.out.flush()
