"""convergence.py: the decisions of pre-copy as pure functions of measured rates and a
clock reading (no guest, no network)."""

from __future__ import annotations

import pytest

from handler.migration import convergence
from handler.migration.convergence import Next, Round, TimeoutWatch, Verdict
from tests.support.fake_api import FakeClock
from vmferry.migration_state import MigrationConfig

MiB = 1 << 20
GiB = 1 << 30


def config(**values: object) -> MigrationConfig:
    return MigrationConfig.from_dict(values)


def test_a_round_that_fits_the_budget_switches_over() -> None:
    # 100 MiB/s; 10 MiB left: 100 ms of pause, within the 300 ms default budget; the
    # round sent 100 MiB and left 10: shrinking, but 100 ms > 2% of the budget... so
    # one more round pays.
    shrinking = Round(3, sent_bytes=100 * MiB, seconds=1.0, dirty_bytes=10 * MiB)
    assert convergence.decide_after_round(shrinking, 100 * MiB, config(), postcopy_due=False) is (
        Next.ANOTHER_ROUND
    )
    # It no longer halves what is left: switch over now.
    steady = Round(4, sent_bytes=10 * MiB, seconds=0.1, dirty_bytes=8 * MiB)
    assert convergence.decide_after_round(steady, 100 * MiB, config(), postcopy_due=False) is (
        Next.SWITCH_OVER
    )
    # Tiny enough (within 2% of the budget): switch over even while shrinking.
    tiny = Round(5, sent_bytes=8 * MiB, seconds=0.08, dirty_bytes=MiB // 2)
    assert convergence.decide_after_round(tiny, 100 * MiB, config(), postcopy_due=False) is (
        Next.SWITCH_OVER
    )


def test_a_round_over_the_budget_goes_on() -> None:
    over = Round(1, sent_bytes=100 * MiB, seconds=1.0, dirty_bytes=60 * MiB)
    assert convergence.decide_after_round(over, 100 * MiB, config(), postcopy_due=False) is (
        Next.ANOTHER_ROUND
    )
    # a larger budget takes it
    roomy = config(downtimeBudgetMilliseconds=1000)
    assert convergence.decide_after_round(over, 100 * MiB, roomy, postcopy_due=False) is (
        Next.SWITCH_OVER
    )


def test_auto_converge_throttles_only_when_allowed_and_not_converging() -> None:
    hot = Round(1, sent_bytes=100 * MiB, seconds=1.0, dirty_bytes=60 * MiB)  # 60% > 50%
    allowed = config(allowAutoConverge=True)
    assert convergence.decide_after_round(hot, 100 * MiB, allowed, postcopy_due=False) is (
        Next.THROTTLE_MORE
    )
    assert convergence.decide_after_round(hot, 100 * MiB, config(), postcopy_due=False) is (
        Next.ANOTHER_ROUND
    )
    mild = Round(1, sent_bytes=100 * MiB, seconds=1.0, dirty_bytes=40 * MiB)  # 40%
    assert convergence.decide_after_round(mild, 100 * MiB, allowed, postcopy_due=False) is (
        Next.ANOTHER_ROUND
    )


def test_auto_converge_steps_20_then_10_more_up_to_99() -> None:
    steps = [0]
    for _ in range(11):
        steps.append(convergence.next_throttle(steps[-1]))
    assert steps[1:] == [20, 30, 40, 50, 60, 70, 80, 90, 99, 99, 99]


def test_post_copy_wins_once_due_and_the_round_limit_ends_a_hopeless_migration() -> None:
    fits = Round(2, sent_bytes=10 * MiB, seconds=0.1, dirty_bytes=MiB)
    assert convergence.decide_after_round(fits, 100 * MiB, config(), postcopy_due=True) is (
        Next.POST_COPY
    )
    last = Round(convergence.MAX_ROUNDS - 1, 100 * MiB, 1.0, 90 * MiB)
    assert convergence.decide_after_round(last, 100 * MiB, config(), postcopy_due=False) is (
        Next.GIVE_UP
    )


def test_a_round_too_short_to_measure_keeps_the_previous_rate() -> None:
    short = Round(3, sent_bytes=MiB, seconds=0.001, dirty_bytes=0)
    assert convergence.round_transfer_rate(50 * MiB, short) == 50 * MiB
    assert convergence.round_transfer_rate(0, short) == pytest.approx(MiB / 0.001)
    long = Round(0, sent_bytes=100 * MiB, seconds=2.0, dirty_bytes=0)
    assert convergence.round_transfer_rate(50 * MiB, long) == 50 * MiB
    assert long.dirty_rate == 0


def test_progress_timeout_counts_from_the_last_new_low() -> None:
    clock = FakeClock()
    watch = TimeoutWatch(config(progressTimeout=10), GiB, clock())
    assert watch.check(clock(), 100 * MiB) is Verdict.CONTINUE
    clock.advance(8)
    assert watch.check(clock(), 90 * MiB) is Verdict.CONTINUE  # a new low: progress
    clock.advance(8)
    assert watch.check(clock(), 95 * MiB) is Verdict.CONTINUE  # 8 s without progress
    clock.advance(2.5)
    assert watch.check(clock(), 95 * MiB) is Verdict.STUCK
    message = watch.message(Verdict.STUCK, clock(), 95 * MiB)
    assert message.startswith("Live migration stuck for 10 sec and has been aborted")
    assert "(progressTimeout 10): 95.0 MiB remain" in message


def test_a_reading_that_does_not_count_is_not_progress() -> None:
    clock = FakeClock()
    watch = TimeoutWatch(config(progressTimeout=5), GiB, clock())
    clock.advance(6)
    assert watch.check(clock(), 0, counts=False) is Verdict.STUCK


def test_completion_timeout_scales_with_memory_and_allows_post_copy() -> None:
    clock = FakeClock()
    two_gib = TimeoutWatch(config(completionTimeoutPerGiB=100), 2 * GiB, clock())
    clock.advance(199)
    assert two_gib.check(clock(), clock.now) is Verdict.CONTINUE  # always progressing
    clock.advance(2)
    assert two_gib.check(clock(), 0) is Verdict.TOO_LONG
    assert "completionTimeoutPerGiB 100 x 2.00 GiB = 200 sec" in two_gib.message(
        Verdict.TOO_LONG, clock(), 0
    )
    start = clock()
    post = TimeoutWatch(config(completionTimeoutPerGiB=100, allowPostCopy=True), GiB, start)
    clock.advance(101)
    assert post.check(clock(), 0) is Verdict.POST_COPY
    # the engine may refuse post-copy (QEMU: multifd) whatever the configuration says
    no_post = TimeoutWatch(config(allowPostCopy=True), GiB, start, allow_postcopy=False)
    clock.advance(100)
    assert no_post.check(clock(), 0) is Verdict.TOO_LONG
