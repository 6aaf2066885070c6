"""Compression only where it pays: zstd's break-even against the link, batch by batch.

Sending ``raw`` bytes compressed costs their compression, ``raw / c`` seconds (``c``: the
compressor's measured throughput on one core), and saves ``(1 - r) * raw / L`` seconds
downstream (``r``: the measured compressed/raw ratio; ``L``: what the link -- and the
target applying the pages -- takes per second). It pays when ``L < c * (1 - r)``.

``r`` and ``c`` come from the zstd probe every batch with compression enabled carries
(``stream.CompressProbe``: a few of its pages, timed); a batch that sends raw probes
every ``PROBE_EVERY`` batches so the figures stay current. ``L`` is
``bandwidthPerMigration`` when set (the pace the sender keeps), otherwise measured: the
wire rate of raw batches over the last ``WINDOW`` seconds, taken only while the sender
waited for the target's credit for at least ``BOUND_SHARE`` of that time (the link or
the target is the limit; when it is not, the sender itself is, and compressing would
only slow it down). While unknown (never limited downstream) it is taken as fast: raw.
Compressed batches do not update ``L`` (their wire rate is what compression left of
it). So on a fast link, or on a machine whose CPU is the limit, text memory goes raw;
on a slow one it compresses once its sample shows it pays.

Ownership: one gate per source migration (the RoundSender's), used on its event loop.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from handler.stream import COMPRESS_MIN_GAIN, CompressProbe

PROBE_EVERY = 8  # batches sent raw between two probes
WINDOW = 1.0  # s of raw batches the link rate is measured over
BOUND_SHARE = 0.25  # share of that time spent waiting for credit: limited downstream
SMOOTHING = 0.3  # weight of a new probe in the ratio and speed averages


@dataclass(frozen=True)
class Decision:
    compress: bool  # compress this batch when its probe says it compresses
    probe: bool  # take a probe (always when compress)


@dataclass
class CompressGate:
    """``enabled``: the migration's compression setting (off: never, no probes);
    ``cap``: bandwidthPerMigration in bytes/s (0: none)."""

    enabled: bool
    cap: int = 0
    ratio: float | None = None  # compressed / raw, smoothed over the probes
    speed: float | None = None  # raw bytes/s zstd compresses on one core, smoothed
    link: float | None = None  # bytes/s downstream, from raw batches (see above)
    _raw_batches: int = 0
    _window: deque[tuple[float, int, float]] = field(default_factory=deque, repr=False)
    _bytes: int = 0  # sums over _window
    _waited: float = 0.0

    def decide(self) -> Decision:
        """Whether to compress (and probe) the next batch."""
        if not self.enabled:
            return Decision(False, False)
        if self.pays():
            return Decision(True, True)
        return Decision(False, self._raw_batches % PROBE_EVERY == 0)

    def pays(self) -> bool:
        """The break-even: compressing is worth it at the measured ratio, speed and link."""
        if self.ratio is None or self.speed is None or self.ratio >= COMPRESS_MIN_GAIN:
            return False
        link = self.link_rate()
        return link is not None and link < self.speed * (1 - self.ratio)

    def link_rate(self) -> float | None:
        if self.cap and self.link:
            return min(float(self.cap), self.link)
        return float(self.cap) if self.cap else self.link

    def observe_probe(self, probe: CompressProbe) -> None:
        if not probe.raw_bytes or probe.seconds <= 0:
            return
        speed = probe.raw_bytes / probe.seconds
        self.ratio = _smooth(self.ratio, probe.ratio)
        self.speed = _smooth(self.speed, speed)

    def observe_send(self, now: float, wire_bytes: int, waited: float, compressed: bool) -> None:
        """A batch was written: ``waited`` s for credit first."""
        if compressed:
            return
        self._raw_batches += 1
        window = self._window
        window.append((now, wire_bytes, waited))
        self._bytes += wire_bytes
        self._waited += waited
        while window[0][0] < now - WINDOW:
            _, b, w = window.popleft()
            self._bytes -= b
            self._waited -= w
        span = now - window[0][0]
        if len(window) < 2 or span < WINDOW / 2:
            return
        if self._waited >= BOUND_SHARE * span:
            self.link = (self._bytes - window[0][1]) / span  # what left after the first one


def _smooth(old: float | None, new: float) -> float:
    return new if old is None else (1 - SMOOTHING) * old + SMOOTHING * new
