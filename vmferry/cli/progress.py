"""Progress for long CLI waits: a live bar on a terminal, plain lines otherwise.

- :class:`MigrationProgress` follows one VMIM (``vmferry migrate VM --wait``).
- :class:`MultiMigrationProgress` follows several at once (``vmferry adm drain NODE``):
  one bar per migration plus a summary line, redrawn in place on a terminal.

Both are fed VMIM objects as the watch delivers them (``update(vmim)``) and write to
stderr by default. A line shows the phase, a bar of data processed against the guest's
memory, bytes sent, the transfer rate, the pre-copy round and an ETA. The source reports
its rates once per round; between those reports the rate is estimated here from how fast
``dataProcessedBytes`` grows, so the first round has a rate and an ETA too.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from vmferry.migration_state import Field, MigrationPhase, MigrationState, raw

Obj = dict[str, Any]
BAR_WIDTH = 28
PLAIN_PERIOD = 1.0  # s between plain lines of a migration whose phase did not change


def _phase(vmim: Obj) -> MigrationPhase:
    """The VMIM's phase; Pending until the controller has recorded one."""
    return MigrationPhase.of(vmim) or MigrationPhase.PENDING


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def _key(vmim: Obj) -> str:
    meta = vmim.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


class _RateEstimate:
    """Bytes per second from successive (time, processed bytes) observations."""

    def __init__(self) -> None:
        self.last: tuple[float, float] | None = None
        self.rate = 0.0

    def observe(self, now: float, processed: float) -> float:
        if self.last is not None and processed > self.last[1] and now > self.last[0]:
            instant = (processed - self.last[1]) / (now - self.last[0])
            self.rate = instant if not self.rate else 0.5 * self.rate + 0.5 * instant
        if self.last is None or processed != self.last[1]:
            self.last = (now, processed)
        return self.rate


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """``[=====>    ]`` for a fraction in [0, 1]."""
    fraction = min(1.0, max(0.0, fraction))
    filled = int(fraction * width)
    return "[" + "=" * filled + ">" * (filled < width) + " " * (width - filled - 1) + "]"


def migration_line(vmim: Obj, elapsed: float, estimated_rate: float = 0.0) -> str:
    """One progress line for a VMIM (phase, bar, bytes, rate, round, ETA, elapsed)."""
    phase = _phase(vmim)
    ms = MigrationState.of(vmim)
    t = ms.transfer
    total = float(t.get("dataTotalBytes") or 0)
    done = float(t.get("dataProcessedBytes") or 0)
    remaining = float(t.get("dataRemainingBytes") or 0)
    rate = float(t.get("transferRateBytes") or 0) or estimated_rate
    parts = [f"{phase:<15}"]
    if total:
        parts.append(bar(1.0 if phase == MigrationPhase.SUCCEEDED else done / total))
        parts.append(f"{_mib(done)} sent")
        if rate:
            parts.append(f"{rate / 2**20:.0f} MiB/s")
        if t.get("rounds"):
            parts.append(f"round {t['rounds']}")
        if remaining and rate and phase == MigrationPhase.RUNNING:
            parts.append(f"ETA {remaining / rate:.1f}s")
    if phase == MigrationPhase.FAILED and ms.failure_reason:
        parts.append(ms.failure_reason)
    parts.append(f"{elapsed:.1f}s")
    return "  ".join(parts)


class MigrationProgress:
    """Render one VMIM; call ``update(vmim)`` on every change, ``close()`` at the end."""

    def __init__(
        self,
        out: TextIO | None = None,
        *,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.out = out or sys.stderr
        self.tty = self.out.isatty() if tty is None else tty
        self.clock = clock
        self.started = clock()
        self.last_line = ""
        self.last_plain = float("-inf")
        self.last_phase = ""
        self._rate = _RateEstimate()

    def line(self, vmim: Obj) -> str:
        now = self.clock()
        t = raw(vmim).get(Field.TRANSFER) or {}
        rate = self._rate.observe(now, float(t.get("dataProcessedBytes") or 0))
        return migration_line(vmim, now - self.started, rate)

    def update(self, vmim: Obj) -> None:
        line = self.line(vmim)
        phase = _phase(vmim)
        if self.tty:
            if line != self.last_line:
                self.out.write("\r\033[K" + line)
                self.out.flush()
        else:
            now = self.clock()
            if phase != self.last_phase or now - self.last_plain >= PLAIN_PERIOD:
                self.out.write(line + "\n")
                self.out.flush()
                self.last_plain = now
        self.last_line = line
        self.last_phase = phase

    def close(self) -> None:
        if self.tty and self.last_line:
            self.out.write("\n")
            self.out.flush()
        self.last_line = ""


class MultiMigrationProgress:
    """Several VMIMs at once: a bar per migration and a summary line.

    On a terminal the block of lines is redrawn in place (cursor up, clear line); when
    not on a terminal each migration prints a plain line when its phase changes and at
    most every ``PLAIN_PERIOD`` s otherwise, prefixed with its name. ``title`` heads the
    summary line (e.g. ``"draining node1"``).
    """

    def __init__(
        self,
        out: TextIO | None = None,
        *,
        tty: bool | None = None,
        title: str = "migrations",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.out = out or sys.stderr
        self.tty = self.out.isatty() if tty is None else tty
        self.title = title
        self.clock = clock
        self.started = clock()
        self.vmims: dict[str, Obj] = {}
        self._rates: dict[str, _RateEstimate] = {}
        self._first_seen: dict[str, float] = {}
        self._plain: dict[str, tuple[str, float]] = {}  # key -> (phase, time) last printed
        self._drawn = 0  # lines of the block currently on the terminal

    def summary(self) -> str:
        phases = [_phase(v) for v in self.vmims.values()]
        done = sum(p == MigrationPhase.SUCCEEDED for p in phases)
        failed = sum(p == MigrationPhase.FAILED for p in phases)
        text = f"{self.title}: {done}/{len(phases)} succeeded"
        if failed:
            text += f", {failed} failed"
        return f"{text}  {self.clock() - self.started:.1f}s"

    def lines(self) -> list[str]:
        now = self.clock()
        width = max((len(k.split("/", 1)[1]) for k in self.vmims), default=0)
        out = []
        for key, vmim in self.vmims.items():
            t = raw(vmim).get(Field.TRANSFER) or {}
            rate = self._rates[key].observe(now, float(t.get("dataProcessedBytes") or 0))
            line = migration_line(vmim, now - self._first_seen[key], rate)
            out.append(f"{key.split('/', 1)[1]:<{width}}  {line}")
        return out

    def names(self) -> set[str]:
        """Names of the migrations shown so far."""
        return {key.split("/", 1)[1] for key in self.vmims}

    def update(self, vmim: Obj) -> None:
        """Fold in one VMIM (new or changed) and redraw."""
        key = _key(vmim)
        if key not in self.vmims:
            self._rates[key] = _RateEstimate()
            self._first_seen[key] = self.clock()
        self.vmims[key] = vmim
        if self.tty:
            self._redraw()
        else:
            self._print_plain(key)

    def _redraw(self) -> None:
        block = [*self.lines(), self.summary()]
        up = f"\033[{self._drawn - 1}A" if self._drawn > 1 else ""
        self.out.write("\r" + up + "".join(f"\033[K{line}\n" for line in block[:-1]))
        self.out.write("\033[K" + block[-1])
        self.out.flush()
        self._drawn = len(block)

    def _print_plain(self, key: str) -> None:
        now = self.clock()
        phase = _phase(self.vmims[key])
        last = self._plain.get(key)
        if last is not None and last[0] == phase and now - last[1] < PLAIN_PERIOD:
            return
        self._plain[key] = (phase, now)
        index = list(self.vmims).index(key)
        self.out.write(self.lines()[index] + "\n")
        self.out.flush()

    def close(self) -> None:
        """Finish the block (a summary line when not on a terminal)."""
        if self.tty and self._drawn:
            self.out.write("\n")
        elif not self.tty and self.vmims:
            self.out.write(self.summary() + "\n")
        self.out.flush()
        self._drawn = 0
