"""QEMU's migration settings, derived from the effective migration configuration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from handler.migration.tunnel import MAX_CHANNELS
from vmferry.migration_state import MigrationConfig

Obj = dict[str, Any]

GiB = 1 << 30
UNLIMITED_BANDWIDTH = 64 * GiB  # QEMU's default max-bandwidth is 128 MiB/s: always set it


@dataclass(frozen=True)
class QemuPlan:
    """What the source QEMU is told (``migrate-set-capabilities`` and
    ``migrate-set-parameters``), and how many tunnel channels it opens."""

    bandwidth: int
    downtime_ms: int
    auto_converge: bool
    postcopy: bool
    multifd_channels: int  # 0 = no multifd

    @classmethod
    def from_config(cls, config: MigrationConfig) -> QemuPlan:
        streams = max(1, config.parallel_streams)
        # multifd and post-copy cannot be combined in QEMU 7.x; post-copy wins.
        multifd = 0 if config.allow_post_copy or streams <= 1 else min(streams, MAX_CHANNELS - 1)
        return cls(
            bandwidth=config.bandwidth_bytes or UNLIMITED_BANDWIDTH,
            downtime_ms=config.downtime_budget_ms,
            auto_converge=config.allow_auto_converge,
            postcopy=config.allow_post_copy,
            multifd_channels=multifd,
        )

    @property
    def channel_count(self) -> int:
        return 1 + self.multifd_channels

    def capabilities(self) -> list[Obj]:
        caps = {
            "auto-converge": self.auto_converge,
            "postcopy-ram": self.postcopy,
            "multifd": self.multifd_channels > 0,
            "events": True,  # a MIGRATION event wakes the monitor: QEMU's completion at once
        }
        return [{"capability": k, "state": v} for k, v in caps.items()]

    def parameters(self) -> Obj:
        params: Obj = {"max-bandwidth": self.bandwidth, "downtime-limit": self.downtime_ms}
        if self.postcopy:
            # bandwidthPerMigration caps pre-copy only, as KubeVirt's (libvirt sets no
            # post-copy bandwidth): every page the guest waits for arrives at full speed
            params["max-postcopy-bandwidth"] = 0
        if self.multifd_channels:
            params["multifd-channels"] = self.multifd_channels
        return params
