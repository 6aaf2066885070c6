"""A source migration's figures (``Stats``), their status form, and live rate measures.

``Stats`` is what both source engines keep while they run: the metrics collector
(handler/metrics.py) reads it on every scrape through ``VMManager.progress``, and
``as_status()`` is what goes into ``migrationState.transfer``.

Rates are live from the first batch, as libvirt's job info is: ``RateWindow`` measures
the transfer rate over the last ``RATE_WINDOW_SECONDS`` of batches (a round-long average
read 0 for the whole first round: a 512 MiB guest capped at 24 MiB/s showed 0 in 19
scrapes). Like libvirt's memory bandwidth (QEMU's ``mbps``, which the QEMU engine
reports), it counts bytes on the wire: zero pages travel as indices, and counting the
memory they cover read 833 MiB/s under a 16 MiB/s cap. (Convergence estimates with its
own per-round memory rate, convergence.round_transfer_rate.) The average wire rate is
published only once it spans
``MIN_AVERAGE_SECONDS`` (over the first two batches it read 1.9e11 B/s under a 1 MiB/s
cap: the first batch leaves before pacing has anything to wait for).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from handler.net_counters import NetworkFigures

Obj = dict[str, Any]

RATE_WINDOW_SECONDS = 1.0  # s of recent batches the live transfer rate averages over
# The shortest interval a rate is taken over: every channel's first batch leaves at once
# (pacing sleeps after a write), and two 4 MiB batches a few microseconds apart read
# 124 MiB/s under a 16 MiB/s cap.
MIN_RATE_SECONDS = 0.5
MIN_AVERAGE_SECONDS = 1.0  # s of sending before averageWireRateBytes means something


class RateWindow:
    """Bytes per second over a sliding window of samples (``add(now, n)``).

    The rate is the bytes of every sample but the oldest one in the window, over the time
    from the oldest to the newest (at least ``min_span``): each sample's bytes left during
    the interval that ends at it. One sample alone gives no rate (0); a window with no
    sample younger than ``window`` s reads 0 too (a stalled stream has no transfer rate)."""

    def __init__(
        self, window: float = RATE_WINDOW_SECONDS, min_span: float = MIN_RATE_SECONDS
    ) -> None:
        self.window = window
        self.min_span = min_span
        self._samples: deque[tuple[float, int]] = deque()
        self._bytes = 0  # sum over _samples

    def add(self, now: float, n: int) -> None:
        self._samples.append((now, n))
        self._bytes += n
        self._trim(now)

    def _trim(self, now: float) -> None:
        # Keep one sample older than the window: it opens the interval the rest fill.
        samples = self._samples
        while len(samples) > 1 and samples[1][0] < now - self.window:
            _, n = samples.popleft()
            self._bytes -= n

    def rate(self, now: float) -> float:
        self._trim(now)
        samples = self._samples
        if len(samples) < 2 or samples[-1][0] < now - self.window:
            return 0.0
        span = max(samples[-1][0] - samples[0][0], self.min_span)
        return (self._bytes - samples[0][1]) / span


@dataclass
class Stats:
    """One source migration's figures. Written by its engine only (on the event loop);
    read by the metrics collector and the progress writes."""

    total_bytes: int = 0
    processed_bytes: int = 0
    remaining_bytes: int = 0
    wire_bytes: int = 0
    rounds: int = 0
    dirty_rate: float = 0.0  # bytes/s the guest dirties (live within a round, see DirtyMeter)
    transfer_rate: float = 0.0  # bytes/s on the wire, live (see RateWindow)
    downtime_parts: dict[str, float] = field(default_factory=dict)
    # steps inside the downtime parts (the QEMU verify's digests, compare, repair): s
    switchover_steps: dict[str, float] = field(default_factory=dict)
    guest_downtime_ms: float | None = None
    first_byte_at: float = 0.0  # the engine's clock at the first and the latest batch sent
    last_byte_at: float = 0.0
    throttle_percent: int = 0  # the highest auto-converge throttle applied
    postcopy_stall_ms: float | None = None
    postcopy_faults: int = 0
    postcopy_interruptions: int = 0
    digest: str = ""
    target_digest: str = ""
    digest_verified: bool = False
    network: NetworkFigures | None = None  # the interfaces' counters (net_counters.py)
    wire_rate: RateWindow = field(default_factory=RateWindow, repr=False, compare=False)

    def record_batch(self, now: float, wire_bytes: int, memory_bytes: int) -> None:
        """One batch sent: ``wire_bytes`` on the network covering ``memory_bytes`` of guest
        memory (zero pages included). Updates the live transfer rate."""
        self.wire_bytes += wire_bytes
        self.processed_bytes += memory_bytes
        self.remaining_bytes = max(0, self.remaining_bytes - memory_bytes)
        self.first_byte_at = self.first_byte_at or now
        self.last_byte_at = now
        self.wire_rate.add(now, wire_bytes)
        self.transfer_rate = self.wire_rate.rate(now)

    @property
    def average_wire_rate(self) -> float | None:
        """The whole run's average on the wire (what bandwidthPerMigration caps), or None
        while it spans less than MIN_AVERAGE_SECONDS."""
        span = self.last_byte_at - self.first_byte_at
        if self.first_byte_at == 0 or span < MIN_AVERAGE_SECONDS:
            return None
        return self.wire_bytes / span

    def as_status(self) -> Obj:
        """The ``migrationState.transfer`` form."""
        out: Obj = {
            "dataTotalBytes": self.total_bytes,
            "dataProcessedBytes": self.processed_bytes,
            "dataRemainingBytes": self.remaining_bytes,
            "wireBytes": self.wire_bytes,
            "rounds": self.rounds,
            "dirtyRateBytes": int(self.dirty_rate),
            "transferRateBytes": int(self.transfer_rate),
        }
        average = self.average_wire_rate
        if average is not None:
            out["averageWireRateBytes"] = int(average)
        if self.downtime_parts:
            out["downtimeMilliseconds"] = round(sum(self.downtime_parts.values()) * 1000, 3)
            out["downtimePartsMilliseconds"] = {
                part: round(seconds * 1000, 3) for part, seconds in self.downtime_parts.items()
            }
        if self.switchover_steps:
            out["switchoverStepsMilliseconds"] = {
                step: round(seconds * 1000, 3) for step, seconds in self.switchover_steps.items()
            }
        if self.guest_downtime_ms is not None:
            out["guestDowntimeMilliseconds"] = round(self.guest_downtime_ms, 3)
        if self.throttle_percent:
            out["throttlePercent"] = self.throttle_percent
        if self.postcopy_stall_ms is not None:
            out["postCopyStallMilliseconds"] = round(self.postcopy_stall_ms, 3)
            out["postCopyFaults"] = self.postcopy_faults
        if self.postcopy_interruptions:
            out["postCopyInterruptions"] = self.postcopy_interruptions
        if self.digest:
            out["digest"] = self.digest
            out["targetDigest"] = self.target_digest
            out["digestVerified"] = self.digest_verified
        if self.network is not None:
            out.update(self.network.as_status())
        return out
