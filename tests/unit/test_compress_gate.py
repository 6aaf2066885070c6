"""The compression break-even (handler/migration/compress_gate.py)."""

from __future__ import annotations

from handler.migration.compress_gate import PROBE_EVERY, CompressGate
from handler.stream import CompressProbe

MiB = 1 << 20


def text_probe(speed_mib: float = 400) -> CompressProbe:
    """32 KiB compressing to 30% at speed_mib MiB/s."""
    raw = 32 * 1024
    return CompressProbe(raw, int(raw * 0.3), raw / (speed_mib * MiB))


def feed_link(gate: CompressGate, rate_mib: float, waited_share: float) -> None:
    """Raw 4 MiB batches over 2 s at rate_mib, each after waiting waited_share of its time."""
    per = 4 * MiB / (rate_mib * MiB)
    now = 0.0
    for _ in range(int(2 / per) + 2):
        now += per
        gate.observe_send(now, 4 * MiB, per * waited_share, compressed=False)


def test_disabled_never_compresses_nor_probes() -> None:
    gate = CompressGate(enabled=False)
    gate.observe_probe(text_probe())
    d = gate.decide()
    assert not d.compress and not d.probe


def test_unknown_link_sends_raw_and_probes_now_and_then() -> None:
    gate = CompressGate(enabled=True)
    assert gate.decide().probe  # the first batch learns the ratio
    gate.observe_probe(text_probe())
    assert not gate.decide().compress  # never limited downstream: the link is fast
    probes = 0
    for i in range(2 * PROBE_EVERY):
        probes += gate.decide().probe
        gate.observe_send(float(i), MiB, 0.0, compressed=False)
    assert probes == 2


def test_slow_link_compresses_when_it_pays_fast_link_does_not() -> None:
    slow = CompressGate(enabled=True)
    slow.observe_probe(text_probe(400))  # pays below 400 * 0.7 = 280 MiB/s
    feed_link(slow, 110, waited_share=0.8)  # a 1 Gbit/s link, the sender waits for it
    assert slow.link is not None and abs(slow.link / MiB - 110) < 10
    assert slow.decide().compress
    fast = CompressGate(enabled=True)
    fast.observe_probe(text_probe(400))
    feed_link(fast, 900, waited_share=0.8)
    assert not fast.decide().compress


def test_a_sender_that_never_waits_measures_no_link() -> None:
    gate = CompressGate(enabled=True)
    gate.observe_probe(text_probe())
    feed_link(gate, 100, waited_share=0.0)  # the sender is the limit, not the link
    assert gate.link is None and not gate.decide().compress


def test_incompressible_memory_goes_raw_even_on_a_slow_link() -> None:
    gate = CompressGate(enabled=True, cap=10 * MiB)
    gate.observe_probe(CompressProbe(32 * 1024, 32 * 1024 + 20, 1e-4))
    assert not gate.decide().compress
    text = CompressGate(enabled=True, cap=10 * MiB)  # the cap is the link
    text.observe_probe(text_probe())
    assert text.decide().compress


def test_compressed_batches_do_not_measure_the_link() -> None:
    gate = CompressGate(enabled=True)
    for i in range(50):
        gate.observe_send(i * 0.05, 1 * MiB, 0.05, compressed=True)
    assert gate.link is None
