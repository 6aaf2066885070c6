"""When pre-copy ends, and how: pure decisions from measured rates and a clock reading.

Nothing here touches a guest, a network or the real clock: the engines measure (bytes
sent, seconds, pages dirtied, the clock they were given) and ask. So every decision --
another round, switch over, post-copy, throttle more, fail on ``progressTimeout`` or
``completionTimeoutPerGiB`` -- is tested in tests/unit/test_convergence.py without a
guest.

- ``decide_after_round``: after each pre-copy round (memvm engine).
- ``next_throttle``: auto-converge's steps (QEMU's: 20%, then +10% a round, up to 99%).
- ``TimeoutWatch``: KubeVirt's migration monitor (both engines): no progress for
  ``progressTimeout`` s, or more than ``completionTimeoutPerGiB`` x GiB in total, ends
  pre-copy -- in post-copy when allowed, else in failure.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from vmferry.migration_state import MigrationConfig

GiB = 1 << 30
MIN_ROUND_SECONDS = 0.02  # a round shorter than this gives no useful rate sample
MAX_ROUNDS = 10_000  # a hard stop; the timeouts end a hopeless migration long before
AUTO_CONVERGE_INITIAL = 20  # % CPU throttle at the first non-converging round (QEMU's default)
AUTO_CONVERGE_STEP = 10  # % more at each further non-converging round
AUTO_CONVERGE_MAX = 99
NOT_CONVERGING = 0.5  # a round is not converging when the guest dirtied > 50% of what was sent
SHRINKING = 0.5  # a round left less than half of what it sent: another round pays
TIGHT_BUDGET = 0.02  # ... until the estimated pause is this fraction of the budget


class Next(Enum):
    """What pre-copy does after a round."""

    ANOTHER_ROUND = 1
    THROTTLE_MORE = 2  # another round, the guest slowed down (auto-converge)
    SWITCH_OVER = 3  # stop-and-copy now
    POST_COPY = 4  # the completion timeout elapsed and post-copy is allowed
    GIVE_UP = 5  # MAX_ROUNDS rounds and still not converged


@dataclass(frozen=True)
class Round:
    """What one pre-copy round measured."""

    number: int  # 0-based
    sent_bytes: int  # guest memory the round sent (zero pages included)
    seconds: float
    dirty_bytes: int  # guest memory dirtied meanwhile: the next round's work

    @property
    def dirty_rate(self) -> float:
        return self.dirty_bytes / max(self.seconds, 1e-3)


def round_transfer_rate(previous: float, measured: Round) -> float:
    """The transfer rate convergence estimates with: the round's own, unless the round
    was too short to measure (then the previous estimate stands, if there is one)."""
    if measured.seconds >= MIN_ROUND_SECONDS or previous == 0:
        return measured.sent_bytes / max(measured.seconds, 1e-3)
    return previous


def converged(remaining: int, sent: int, transfer_rate: float, budget_s: float) -> bool:
    """Stop-and-copy now? When the remaining dirty memory fits the downtime budget at
    the measured rate -- unless the last round more than halved what is left, in which
    case one more round is cheap and cuts the pause (the budget is a ceiling, not a
    target), until the estimate is TIGHT_BUDGET of the budget."""
    estimate = remaining / max(transfer_rate, 1)
    if estimate > budget_s:
        return False
    shrinking = remaining < SHRINKING * sent
    return not shrinking or estimate <= budget_s * TIGHT_BUDGET


def decide_after_round(
    measured: Round,
    transfer_rate: float,
    config: MigrationConfig,
    *,
    postcopy_due: bool,
) -> Next:
    """The decision after one round, ``transfer_rate`` being round_transfer_rate()'s."""
    if postcopy_due:
        return Next.POST_COPY
    if converged(
        measured.dirty_bytes, measured.sent_bytes, transfer_rate, config.downtime_budget_ms / 1000
    ):
        return Next.SWITCH_OVER
    if measured.number + 1 >= MAX_ROUNDS:
        return Next.GIVE_UP
    if config.allow_auto_converge and measured.dirty_rate > NOT_CONVERGING * transfer_rate:
        return Next.THROTTLE_MORE
    return Next.ANOTHER_ROUND


def next_throttle(current: int) -> int:
    """Auto-converge's next CPU throttle, in percent."""
    if current == 0:
        return AUTO_CONVERGE_INITIAL
    return min(AUTO_CONVERGE_MAX, current + AUTO_CONVERGE_STEP)


# -- the timeout monitor ---------------------------------------------------------------------


class Verdict(Enum):
    CONTINUE = 1
    POST_COPY = 2  # the completion timeout elapsed, post-copy allowed: switch
    STUCK = 3  # progressTimeout: fail
    TOO_LONG = 4  # completionTimeoutPerGiB: fail


class TimeoutWatch:
    """KubeVirt's migration monitor, fed the engine's clock readings.

    Progress is the remaining data going below its lowest value so far; ``check`` at
    each look says whether pre-copy may go on. ``message`` words a failing verdict."""

    def __init__(
        self,
        config: MigrationConfig,
        memory_bytes: int,
        started: float,
        *,
        allow_postcopy: bool | None = None,
    ) -> None:
        self.config = config
        self.gib = memory_bytes / GiB
        self.progress_timeout = float(config.progress_timeout)
        self.completion_timeout = float(config.completion_timeout_per_gib) * self.gib
        self.allow_postcopy = config.allow_post_copy if allow_postcopy is None else allow_postcopy
        self.started = started
        self.watermark = float("inf")
        self.last_progress = started

    def check(self, now: float, remaining: int, *, counts: bool = True) -> Verdict:
        """``counts``: this reading may count as progress (QEMU: only while active)."""
        if counts and remaining < self.watermark:
            self.watermark, self.last_progress = remaining, now
        if now - self.last_progress > self.progress_timeout:
            return Verdict.STUCK
        if now - self.started > self.completion_timeout:
            return Verdict.POST_COPY if self.allow_postcopy else Verdict.TOO_LONG
        return Verdict.CONTINUE

    def message(self, verdict: Verdict, now: float, remaining: int, detail: str = "") -> str:
        """The failureReason of a STUCK or TOO_LONG verdict (KubeVirt's wording)."""
        if verdict is Verdict.STUCK:
            return (
                f"Live migration stuck for {now - self.last_progress:.0f} sec and has been "
                f"aborted (progressTimeout {self.progress_timeout:.0f}): "
                f"{remaining / 2**20:.1f} MiB remain{detail}"
            )
        return (
            f"Live migration is not completed after {now - self.started:.0f} sec and has been "
            f"aborted (completionTimeoutPerGiB {self.config.completion_timeout_per_gib:.0f} x "
            f"{self.gib:.2f} GiB = {self.completion_timeout:.0f} sec)"
        )
