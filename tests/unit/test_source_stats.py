"""Stats and the live measures: the transfer rate from the first batches, the average
wire rate only once it means something, the dirty rate within a round."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from handler.migration.sender import DirtyMeter
from handler.migration.stats import MIN_AVERAGE_SECONDS, RateWindow, Stats
from tests.support.fake_api import FakeClock
from tests.support.fake_guest import FakeGuest, MiB


def test_the_rate_window_is_live_from_the_second_sample_and_forgets_a_stall() -> None:
    clock = FakeClock()
    window = RateWindow(1.0)
    window.add(clock(), MiB)
    assert window.rate(clock()) == 0  # one sample: no interval yet
    window.add(clock(), MiB)  # a second channel's first batch, at the same moment
    assert window.rate(clock()) == 2 * MiB  # over MIN_RATE_SECONDS (0.5), not over 0 s
    window = RateWindow(1.0)
    window.add(clock(), MiB)
    for n in range(10):  # 1 MiB every 0.25 s: 4 MiB/s, once half a second has passed
        clock.advance(0.25)
        window.add(clock(), MiB)
        assert window.rate(clock()) == pytest.approx(2 * MiB if n == 0 else 4 * MiB)
    clock.advance(1.5)  # nothing sent for longer than the window
    assert window.rate(clock()) == 0


def test_stats_record_batches_and_publish_the_average_only_when_it_means_something() -> None:
    clock = FakeClock()
    stats = Stats(total_bytes=64 * MiB, remaining_bytes=64 * MiB)
    # A 1 MiB/s cap: the first batch leaves at once, then pacing spaces them.
    stats.record_batch(clock(), MiB, MiB)
    clock.advance(0.001)
    stats.record_batch(clock(), MiB // 1024, MiB // 1024)
    status = stats.as_status()
    assert "averageWireRateBytes" not in status  # 1 MiB over 1 ms would read 1 GiB/s
    for _ in range(4):  # zero pages: each batch covers more memory than it puts on the wire
        clock.advance(0.5)
        stats.record_batch(clock(), MiB // 2, 8 * MiB)
    status = stats.as_status()
    assert stats.last_byte_at - stats.first_byte_at >= MIN_AVERAGE_SECONDS
    assert status["averageWireRateBytes"] == int(stats.wire_bytes / 2.001)
    assert status["transferRateBytes"] == pytest.approx(MiB, rel=0.01)  # the wire's 1 MiB/s
    assert status["dataRemainingBytes"] == 64 * MiB - stats.processed_bytes


def test_the_dirty_meter_is_live_within_a_round_and_loses_no_page(tmp_path: Path) -> None:
    clock = FakeClock()
    guest = FakeGuest(tmp_path, "g", MiB)
    invalidated: list[np.ndarray] = []
    meter = DirtyMeter(guest, clock, invalidated.append)  # type: ignore[arg-type]
    guest.write(np.arange(10, dtype=np.int64))
    assert meter.sample() is None  # no time has passed: no rate yet
    clock.advance(0.5)
    guest.write(np.arange(5, 20, dtype=np.int64))  # 10 more distinct pages, 5 again
    assert meter.sample() == pytest.approx(20 * 4096 / 0.5)
    guest.write(np.array([100], dtype=np.int64))
    taken = meter.take()  # everything since the last take, the pages sampled included
    assert taken.tolist() == [*range(20), 100]
    assert sorted(np.concatenate(invalidated).tolist()) == sorted([*range(10), *range(5, 20), 100])
    assert meter.take().size == 0
