"""The QEMU verified switchover's page digests, comparison and repair (no QEMU needed)."""

from __future__ import annotations

import numpy as np
import pytest
import xxhash

from handler import qemu_verify as qv
from handler.drivers.qemu import QemuSpec, last_heartbeat
from handler.migration.qemu_plan import QemuPlan
from vmferry.migration_state import MigrationConfig

PAGES = 2048  # 8 MiB


def _ram(seed: int = 1) -> bytearray:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=PAGES * qv.PAGE_SIZE, dtype=np.uint8)
    data[: 64 * qv.PAGE_SIZE] = 0  # some zero pages, as guests have
    return bytearray(data.tobytes())


def test_identical_ram_matches() -> None:
    ram = _ram()
    a, b = qv.page_digests(ram), qv.page_digests(bytes(ram))
    assert a.shape == (PAGES, qv.DIGEST_BYTES)
    assert qv.compare(a, b).match


def test_page_digests_are_each_pages_xxh3_128() -> None:
    """The memvm engine's page hash (handler/pagehash.py), zero pages included."""
    ram = _ram(2)
    d = qv.page_digests(ram)
    for page in (0, 63, 64, 1000, PAGES - 1):
        chunk = bytes(ram[page * qv.PAGE_SIZE : (page + 1) * qv.PAGE_SIZE])
        assert d[page].tobytes() == xxhash.xxh3_128_digest(chunk), page


@pytest.mark.parametrize(
    "pages",
    [[0], [5, 6, 7], [PAGES - 1], list(range(100, 2000, 97))],
)
def test_lost_pages_are_found_exactly_and_repaired(pages: list[int]) -> None:
    source = _ram()
    target = bytearray(source)
    for i in pages:  # a page the hypervisor failed to copy: target keeps the old content
        target[i * qv.PAGE_SIZE + 100] ^= 0xFF
    src_d = qv.page_digests(source)
    cmp = qv.compare(src_d, qv.page_digests(target))
    assert not cmp.match
    assert cmp.differing.tolist() == pages
    assert f"{len(pages)} of {PAGES} pages differ" in cmp.describe()

    payload = qv.gather_pages(memoryview(source), cmp.differing)
    new = qv.apply_pages(memoryview(target), cmp.differing, payload)
    assert (new == src_d[cmp.differing]).all()
    assert bytes(target) == bytes(source)
    assert qv.compare(src_d, qv.page_digests(target)).match


def test_single_bit_flips_anywhere_change_the_digest() -> None:
    ram = _ram(3)
    base = qv.page_digests(ram)[7]
    for word in (0, 1, 255, 511):
        for bit in (0, 31, 63):
            changed = bytearray(ram)
            offset = 7 * qv.PAGE_SIZE + word * 8 + bit // 8
            changed[offset] ^= 1 << (bit % 8)
            assert (qv.page_digests(changed)[7] != base).any(), (word, bit)


def test_paired_high_bit_flips_are_not_a_blind_spot() -> None:
    # A purely linear sum would miss top-bit flips in two words; the mix must not.
    ram = bytearray(qv.PAGE_SIZE)
    changed = bytearray(ram)
    changed[7] ^= 0x80
    changed[15] ^= 0x80
    assert not qv.compare(qv.page_digests(ram), qv.page_digests(changed)).match


def test_digests_round_trip_the_wire_and_check_geometry() -> None:
    d = qv.page_digests(_ram())
    blob = qv.digests_to_bytes(d)
    assert len(blob) == PAGES * qv.DIGEST_BYTES
    assert (qv.digests_from_bytes(blob, PAGES) == d).all()
    with pytest.raises(ValueError, match="not a multiple"):
        qv.digests_from_bytes(blob[:-1])
    with pytest.raises(ValueError, match="the guest has"):
        qv.digests_from_bytes(blob, PAGES + 1)
    with pytest.raises(ValueError, match="geometry"):
        qv.compare(d, d[:-1])


def test_repair_checks_bounds_and_sizes_before_writing() -> None:
    ram = _ram()
    before = bytes(ram)
    with pytest.raises(ValueError, match="out of bounds"):
        qv.apply_pages(memoryview(ram), np.array([PAGES], dtype=np.int64), bytes(qv.PAGE_SIZE))
    with pytest.raises(ValueError, match="payload"):
        qv.apply_pages(memoryview(ram), np.array([1, 2], dtype=np.int64), bytes(qv.PAGE_SIZE))
    assert bytes(ram) == before
    with pytest.raises(ValueError, match="whole number"):
        qv.page_digests(bytes(100))


def test_plan_maps_the_migration_configuration_onto_qemu() -> None:
    plan = QemuPlan.from_config(
        MigrationConfig.from_dict(
            {
                "bandwidthPerMigration": "64Mi",
                "downtimeBudgetMilliseconds": 150,
                "allowAutoConverge": True,
                "parallelStreams": 3,
            }
        )
    )
    assert plan.parameters() == {
        "max-bandwidth": 64 << 20,
        "downtime-limit": 30,  # the first pass's (QemuPlan.downtime_at)
        "multifd-channels": 3,
    }
    assert plan.downtime_ms == 150 - 20  # the hand-off's share of the budget is not QEMU's
    caps = {c["capability"]: c["state"] for c in plan.capabilities()}
    assert caps == {"auto-converge": True, "postcopy-ram": False, "multifd": True, "events": True}
    assert plan.channel_count == 4
    # post-copy excludes multifd; 0 bandwidth means unlimited (QEMU's default is 128 MiB/s)
    post = QemuPlan.from_config(
        MigrationConfig.from_dict({"allowPostCopy": True, "parallelStreams": 4})
    )
    assert post.multifd_channels == 0 and post.postcopy and post.channel_count == 1
    assert post.parameters()["max-bandwidth"] > 1 << 30


@pytest.mark.parametrize(
    ("budget", "memory", "verify", "limit"),
    [
        (300, 512 << 20, True, 300 - 20 - 75),  # 150 ms per GiB for the verification
        (300, 512 << 20, False, 300 - 20),
        (300, 2 << 30, True, 100),  # the verification alone is the budget: QEMU's floor
        (1000, 2 << 30, True, 1000 - 20 - 300),
        (50, 512 << 20, True, 50),  # never more than the budget
    ],
)
def test_qemus_downtime_limit_is_the_budget_less_the_switchover(
    budget: int, memory: int, verify: bool, limit: int
) -> None:
    config = MigrationConfig.from_dict({"downtimeBudgetMilliseconds": budget})
    plan = QemuPlan.from_config(config, memory_bytes=memory, verify=verify)
    assert plan.downtime_ms == limit


def test_qemus_downtime_limit_grows_with_each_pass_to_the_whole() -> None:
    config = MigrationConfig.from_dict({"downtimeBudgetMilliseconds": 300})
    plan = QemuPlan.from_config(config, memory_bytes=512 << 20, verify=True)
    limits = [plan.downtime_at(n) for n in range(0, 9)]
    assert limits == [30, 30, 65, 100, 135, 170, 205, 205, 205]
    small = QemuPlan.from_config(MigrationConfig.from_dict({"downtimeBudgetMilliseconds": 20}))
    assert {small.downtime_at(n) for n in range(1, 9)} == {20}  # never above the budget


def test_qemu_spec_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"qemu\.verify"):
        QemuSpec(memory_bytes=64 << 20, kernel="/k", verify="maybe")
    with pytest.raises(ValueError, match=r"qemu\.kernel"):
        QemuSpec(memory_bytes=64 << 20, kernel="")
    with pytest.raises(ValueError, match="2 MiB"):
        QemuSpec(memory_bytes=(64 << 20) + 4096, kernel="/k")
    spec = QemuSpec(memory_bytes=64 << 20, kernel="/k", extra_args=("-x",))
    assert QemuSpec.from_json(spec.to_json()) == spec


def test_last_heartbeat_parses_the_console() -> None:
    text = b"boot\nHB 1 1000 50.0 3 0\nnoise\nHB 2 2000 50.0 6 0\npartial HB"
    assert last_heartbeat(text) == (2, 2000)
    assert last_heartbeat(b"no heartbeat yet") is None
