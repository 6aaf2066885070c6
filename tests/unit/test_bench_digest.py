"""The digest bench (bench/digest_bench.py) at a tiny size: every figure is there, and both
verify variants really find and repair the lost pages."""

from __future__ import annotations

import mmap

import numpy as np

from bench import digest_bench as db
from handler import pagehash, qemu_verify

MiB = 1 << 20


def test_digest_bench_reports_every_implementation_and_the_verify_cost() -> None:
    logged: list[str] = []
    res = db.run_digest(True, 1, logged.append, sizes=[4 * MiB])
    assert res["runs"] == 1 and res["native"] == pagehash.native_available()
    [size] = res["sizes"]
    assert size["memoryBytes"] == 4 * MiB and len(size["loadavgStart"]) == 3
    names = {f"{i.name}/{i.threads}t" for i in db.implementations(res["native"])}
    assert set(size["digestThroughput"]) == names
    assert all(s["median"] > 0 for s in size["digestThroughput"].values())
    verify = size["verifyMilliseconds"]
    assert verify["old"]["median"] > 0
    assert ("new" in verify) == res["native"]
    assert pagehash.native_available() == res["native"]  # the fallback run restored it
    text = "\n".join(db.table_lines(res))
    assert "4 MiB" in text and "verify: old" in text


def test_verify_variants_repair_exactly_the_lost_pages() -> None:
    size = 2 * MiB
    source = db._filled(size, np.arange(MiB, dtype=np.uint64).view(np.uint8)[:MiB])
    target = mmap.mmap(-1, size)
    for fn in (db.verify_old, db.verify_new):
        db._lose_pages(source, target, size, seed=1)
        with memoryview(source) as src, memoryview(target) as dst:
            assert not db._equal(src, dst)
            assert fn(src, dst) == db.LOST_PAGES
            assert db._equal(src, dst)
            assert qemu_verify.compare(
                qemu_verify.page_digests(src), qemu_verify.page_digests(dst)
            ).match
    source.close()
    target.close()


def test_the_former_mix_is_a_per_page_digest() -> None:
    ram = bytearray(np.random.default_rng(1).integers(0, 256, 8 * 4096, np.uint8).tobytes())
    base = db.mix_digests(memoryview(ram), 1)
    assert (db.mix_digests(memoryview(ram), db.DIGEST_THREADS) == base).all()
    ram[5 * 4096 + 9] ^= 1
    changed = db.mix_digests(memoryview(ram), 1)
    assert np.flatnonzero((changed != base).any(axis=1)).tolist() == [5]
