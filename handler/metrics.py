"""The handler's Prometheus metrics: progress of the migrations this node sends.

KubeVirt's virt-handler reports the libvirt job info of each migrating VMI; we report
the source migration's ``Stats`` (handler/migration/stats.py, via
``VMManager.progress``, updated on every batch). Its rates are live from the first
batches, as libvirt's are: the transfer rate over the last second on the wire, the
memvm dirty rate from the dirty log sampled while a round runs.
Names, types and labels from kubevirt/kubevirt
``pkg/monitoring/metrics/virt-handler/migrationdomainstats/migrationstats_collector.go``
(labels ``namespace, name, node``; ``name`` is the VMI):

====================================================  =========  =====================
``kubevirt_vmi_migration_data_processed_bytes``        gauge      Stats.processed_bytes
``kubevirt_vmi_migration_data_remaining_bytes``        gauge      Stats.remaining_bytes
``kubevirt_vmi_migration_data_bytes_total``            counter    Stats.total_bytes
``kubevirt_vmi_migration_dirty_memory_rate_bytes``     gauge      Stats.dirty_rate
``kubevirt_vmi_migration_memory_transfer_rate_bytes``  gauge      Stats.transfer_rate
``kubevirt_vmi_migration_last_downtime_seconds``       gauge      switchover pause, s
``kubevirt_vmi_migration_downtime_seconds{node}``      histogram  one per success
====================================================  =========  =====================

``kubevirt_vmi_migration_data_total_bytes`` (the name before KubeVirt renamed it to
``…_data_bytes_total``; KubeVirt now serves it as a recording rule) is exported too,
as a gauge, so dashboards of either age work.

Our own, same labels: ``vmferry_migration_rounds``, ``vmferry_migration_wire_bytes``
(bytes sent on the migration network, after zero-page elision and compression),
``vmferry_migration_postcopy_stall_seconds`` (time the target's guest waited for
demand-fetched pages; 0 until post-copy exists), and the histograms
``vmferry_migration_downtime_seconds{node}`` (the whole switchover pause of each
successful migration) and ``vmferry_migration_downtime_part_seconds{node, part}`` (its
named parts: pause, final_pass, state_transfer, verify, resume), and
``vmferry_handler_ready_status{node}``. The registry also has prometheus_client's
process, platform and GC collectors (``vmferry.metrics_http.daemon_registry``).

A migration's series are exported while it runs and for ``FINISHED_RETENTION`` seconds
after it ended (so that a scrape after the end sees the final figures). Everything runs
in the event loop, where ``VMManager`` changes its dictionaries.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from vmferry import metrics_http

if TYPE_CHECKING:
    from handler.migration.stats import Stats
    from handler.vm_manager import VMManager

Obj = dict[str, Any]

FINISHED_RETENTION = 300.0  # s a finished migration's series stay (several scrape periods)
REFRESH_PERIOD = 0.25  # s between looks at VMManager for migrations that ended
# KubeVirt's buckets for kubevirt_vmi_migration_downtime_seconds.
DOWNTIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32)
LABELS = ["namespace", "name", "node"]


@dataclass
class _Tracked:
    vmi: Obj
    stats: Stats
    migration: Any  # the source engine while it runs (for ``committed``), else None
    ended_at: float | None = None


class HandlerMetrics(Collector):
    """Registry and collector over ``manager.progress``; run :meth:`run` in a task."""

    def __init__(
        self,
        manager: VMManager,
        node: str,
        *,
        ready: Callable[[], bool] = lambda: True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.manager = manager
        self.node = node
        self.clock = clock
        self.ready = ready
        self.tracked: dict[str, _Tracked] = {}  # migration uid -> what we export for it
        self._expired: set[str] = set()  # uids past retention (VMManager keeps them)
        disable_created_metrics()  # KubeVirt (Go client) exports no *_created series
        self.registry = metrics_http.daemon_registry()
        self.downtime = Histogram(
            "kubevirt_vmi_migration_downtime_seconds",
            "Histogram of the time, in seconds, a guest was paused during successful live "
            "migration cut-over.",
            ["node"],
            buckets=DOWNTIME_BUCKETS,
            registry=self.registry,
        )
        self.vmferry_downtime = Histogram(
            "vmferry_migration_downtime_seconds",
            "Switchover pause of each successful outgoing migration (all parts), in seconds.",
            ["node"],
            buckets=DOWNTIME_BUCKETS,
            registry=self.registry,
        )
        self.downtime_parts = Histogram(
            "vmferry_migration_downtime_part_seconds",
            "Named parts of the switchover pause of each successful outgoing migration.",
            ["node", "part"],
            buckets=DOWNTIME_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(self)

    # -- bookkeeping ------------------------------------------------------------------------

    def refresh(self) -> None:
        """Fold VMManager's state in: new migrations, ended ones, expired ones."""
        now = self.clock()
        for uid, (vmi, stats) in list(self.manager.progress.items()):
            source = self.manager.sources.get(uid)
            entry = self.tracked.get(uid)
            if entry is None:
                if source is None and uid in self._expired:
                    continue
                entry = self.tracked[uid] = _Tracked(vmi, stats, source[0] if source else None)
            entry.vmi, entry.stats = vmi, stats
            if source is not None and entry.migration is None:
                entry.migration = source[0]
            if source is None and entry.ended_at is None:
                entry.ended_at = now
                self._ended(entry)
        for uid, entry in list(self.tracked.items()):
            if entry.ended_at is not None and now - entry.ended_at > FINISHED_RETENTION:
                del self.tracked[uid]
                self._expired.add(uid)

    def _ended(self, entry: _Tracked) -> None:
        """Observe the downtime histograms for a migration that just succeeded."""
        stats = entry.stats
        if entry.migration is not None:
            succeeded = bool(getattr(entry.migration, "committed", False))
        else:  # it ran entirely between two refreshes: judge by its figures
            succeeded = bool(stats.downtime_parts) and stats.remaining_bytes == 0
        if not succeeded or not stats.downtime_parts:
            return
        total = sum(stats.downtime_parts.values())
        self.downtime.labels(self.node).observe(total)
        self.vmferry_downtime.labels(self.node).observe(total)
        for part, seconds in stats.downtime_parts.items():
            self.downtime_parts.labels(self.node, part).observe(seconds)

    async def run(self) -> None:
        """Refresh forever (cancel to stop), so that no migration's end goes unseen."""
        while True:
            self.refresh()
            await asyncio.sleep(REFRESH_PERIOD)

    # -- collection -------------------------------------------------------------------------

    def _latest_per_vmi(self) -> list[_Tracked]:
        """One entry per VMI (series are keyed by VMI): the running one, else the latest."""
        best: dict[tuple[str, str], _Tracked] = {}
        for entry in self.tracked.values():
            meta = entry.vmi.get("metadata") or {}
            key = (meta.get("namespace", ""), meta.get("name", ""))
            other = best.get(key)
            if (
                other is None
                or entry.ended_at is None
                or (other.ended_at is not None and entry.ended_at > other.ended_at)
            ):
                best[key] = entry
        return list(best.values())

    def collect(self) -> Iterator[Metric]:
        self.refresh()

        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=LABELS)

        processed = gauge(
            "kubevirt_vmi_migration_data_processed_bytes",
            "The total Guest OS data processed and migrated to the new VM.",
        )
        remaining = gauge(
            "kubevirt_vmi_migration_data_remaining_bytes",
            "The remaining guest OS data to be migrated to the new VM.",
        )
        total = CounterMetricFamily(
            "kubevirt_vmi_migration_data_bytes",
            "The total Guest OS data to be migrated to the new VM.",
            labels=LABELS,
        )
        total_old = gauge(
            "kubevirt_vmi_migration_data_total_bytes",
            "[Deprecated] Replaced by kubevirt_vmi_migration_data_bytes_total.",
        )
        dirty = gauge(
            "kubevirt_vmi_migration_dirty_memory_rate_bytes",
            "The rate of memory being dirty in the Guest OS.",
        )
        rate = gauge(
            "kubevirt_vmi_migration_memory_transfer_rate_bytes",
            "The rate at which the memory is being transferred.",
        )
        last_downtime = gauge(
            "kubevirt_vmi_migration_last_downtime_seconds",
            "Time, in seconds, the guest was paused during the cut-over of its last "
            "successful live migration.",
        )
        rounds = gauge("vmferry_migration_rounds", "Pre-copy rounds of the migration so far.")
        wire = gauge(
            "vmferry_migration_wire_bytes",
            "Bytes the migration sent on the migration network (after zero-page elision "
            "and compression).",
        )
        stall = gauge(
            "vmferry_migration_postcopy_stall_seconds",
            "Time the guest waited on the target for post-copy page requests (0 without "
            "post-copy).",
        )
        for entry in self._latest_per_vmi():
            meta = entry.vmi.get("metadata") or {}
            labels = [meta.get("namespace", ""), meta.get("name", ""), self.node]
            s = entry.stats
            processed.add_metric(labels, s.processed_bytes)
            remaining.add_metric(labels, s.remaining_bytes)
            total.add_metric(labels, s.total_bytes)
            total_old.add_metric(labels, s.total_bytes)
            dirty.add_metric(labels, s.dirty_rate)
            rate.add_metric(labels, s.transfer_rate)
            rounds.add_metric(labels, s.rounds)
            wire.add_metric(labels, s.wire_bytes)
            stall.add_metric(labels, 0.0)
            if entry.ended_at is not None and s.downtime_parts:
                last_downtime.add_metric(labels, sum(s.downtime_parts.values()))
        yield from (processed, remaining, total, total_old, dirty, rate, last_downtime)
        yield from (rounds, wire, stall)
        ready = GaugeMetricFamily(
            "vmferry_handler_ready_status",
            "1 when this handler is registered and has listed what it works from (KubeVirt "
            "has no virt-handler counterpart: its alerts use up{}).",
            labels=["node"],
        )
        ready.add_metric([self.node], 1.0 if self.ready() else 0.0)
        yield ready
