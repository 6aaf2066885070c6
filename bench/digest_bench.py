"""``make bench BENCH_ARGS="--scenario digest"``: what the page digests cost (issue 22 part 3).

For guest RAM of 512 MiB, 1, 2 and 4 GiB of random content (an anonymous mapping, as a
guest's RAM is one), medians of several runs (each round runs every implementation once):

- digest throughput (RAM bytes / seconds) of every implementation there was or is:
  ``mix``, the QEMU driver's former numpy mix (handler/qemu_verify.py until issue 22:
  several passes and temporaries per page, kept here only to measure against);
  ``xxh3-python``, the memvm digest's former page loop (one xxhash call per page under one
  lock, now the fallback without the native library); ``xxh3-native``, handler/pagehash.py
  -- each on 1 thread and on all cores where it can use them; and ``chunkdigest``, the
  memvm engine's whole digest (ChunkDigest: page hashes, group hashes, root) on all cores.
- the QEMU switchover's verify cost: both sides digest their RAM at once (the source and
  the target in one process here, on the same cores, as on a one-machine lab), the source
  compares, re-sends the LOST_PAGES pages that differ, and the target writes them and
  re-digests them: the time, per GiB, old (mix) and new.

The machine's load average is recorded at the start and end of every size: on a shared,
loaded machine the figures are lower bounds and noisy (the spread is in the summaries).
"""

from __future__ import annotations

import concurrent.futures
import mmap
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.stats import fmt_summary, summarize
from handler import pagehash, qemu_verify
from handler.digest import ChunkDigest
from handler.drivers.base import DIGEST_THREADS, hash_pool

Obj = dict[str, Any]
GiB = 1 << 30
MiB = 1 << 20
PAGE = qemu_verify.PAGE_SIZE
SIZES = [512 * MiB, 1 * GiB, 2 * GiB, 4 * GiB]
QUICK_SIZES = [64 * MiB, 256 * MiB]
LOST_PAGES = 64  # pages the target "failed to copy", repaired in the verify measurement
FILL_BLOCK = 64 * MiB  # random bytes generated once, repeated over the RAM
Log = Callable[[str], None]

# -- the former QEMU page digest (only here, to measure against) ------------------------------

_WORDS = PAGE // 8
_MIX_CHUNK = 256  # pages per task, as it was
_KEYS = np.random.default_rng(0x766D6665727279).integers(
    0, 2**63, size=_WORDS, dtype=np.uint64
) | np.uint64(1)
_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB9FE1A85EC53)


def _mix_chunk(pages: npt.NDArray[np.uint8], out: npt.NDArray[np.uint64], a: int, b: int) -> None:
    x = pages[a:b].view(np.uint64) ^ _KEYS
    x ^= x >> np.uint64(33)
    x *= _M1
    x ^= x >> np.uint64(29)
    out[a:b, 0] = x.sum(axis=1, dtype=np.uint64)
    x *= _M2
    out[a:b, 1] = np.bitwise_xor.reduce(x, axis=1)


def mix_digests(buf: memoryview, threads: int) -> npt.NDArray[np.uint64]:
    """The former numpy mix: two uint64 lanes per page, chunks in the hashing pool."""
    pages = np.frombuffer(buf, dtype=np.uint8).reshape(-1, PAGE)
    out = np.empty((len(pages), 2), dtype=np.uint64)
    starts = range(0, len(pages), _MIX_CHUNK)
    if threads == 1:
        for s in starts:
            _mix_chunk(pages, out, s, min(s + _MIX_CHUNK, len(pages)))
        return out
    jobs = [
        hash_pool().submit(_mix_chunk, pages, out, s, min(s + _MIX_CHUNK, len(pages)))
        for s in starts
    ]
    for j in jobs:
        j.result()
    return out


# -- the measurements --------------------------------------------------------------------------


@dataclass(frozen=True)
class Impl:
    name: str
    threads: int  # 1, or DIGEST_THREADS (all cores)


def _native(buf: memoryview, threads: int) -> None:
    saved = pagehash.THREADS
    pagehash.THREADS = threads
    try:
        qemu_verify.page_digests(buf)
    finally:
        pagehash.THREADS = saved


def _python(buf: memoryview, threads: int) -> None:
    saved = pagehash.native_available()
    pagehash._set_native(False)
    try:
        ChunkDigest(buf, PAGE).refresh()
    finally:
        pagehash._set_native(saved)


def _chunkdigest(buf: memoryview, threads: int) -> None:
    ChunkDigest(buf, PAGE).refresh()


RUNNERS: dict[str, Callable[[memoryview, int], object]] = {
    "mix": mix_digests,
    "xxh3-python": _python,
    "xxh3-native": _native,
    "chunkdigest": _chunkdigest,
}


def implementations(native: bool) -> list[Impl]:
    out = [Impl("mix", 1), Impl("mix", DIGEST_THREADS), Impl("xxh3-python", 1)]
    if native:
        out += [Impl("xxh3-native", 1), Impl("xxh3-native", DIGEST_THREADS)]
        out += [Impl("chunkdigest", DIGEST_THREADS)]
    return out


def verify_new(source: memoryview, target: memoryview) -> int:
    """The switchover's verify with repair, today's code (qemu_verify); pages repaired."""
    with concurrent.futures.ThreadPoolExecutor(1) as other_side:
        theirs = other_side.submit(qemu_verify.page_digests, target)
        ours = qemu_verify.page_digests(source)
        cmp = qemu_verify.compare(ours, theirs.result())
    payload = qemu_verify.gather_pages(source, cmp.differing)
    repaired = qemu_verify.apply_pages(target, cmp.differing, payload)
    if not (repaired == ours[cmp.differing]).all():
        raise AssertionError("repaired pages still differ")
    return int(cmp.differing.size)


def verify_old(source: memoryview, target: memoryview) -> int:
    """The same with the former numpy mix (compare, gather and write are unchanged)."""
    with concurrent.futures.ThreadPoolExecutor(1) as other_side:
        theirs = other_side.submit(mix_digests, target, DIGEST_THREADS)
        ours = mix_digests(source, DIGEST_THREADS)
        differing = np.nonzero((ours != theirs.result()).any(axis=1))[0]
    payload = qemu_verify.gather_pages(source, differing)
    pages = np.frombuffer(target, dtype=np.uint8).reshape(-1, PAGE)
    pages[differing] = np.frombuffer(payload, dtype=np.uint8).reshape(-1, PAGE)
    again = mix_digests(memoryview(pages[differing].tobytes()), 1)
    if not (again == ours[differing]).all():
        raise AssertionError("repaired pages still differ")
    return int(differing.size)


def _filled(size: int, block: npt.NDArray[np.uint8]) -> mmap.mmap:
    ram = mmap.mmap(-1, size)
    view = np.frombuffer(ram, dtype=np.uint8)
    for at in range(0, size, block.size):
        n = min(block.size, size - at)
        view[at : at + n] = block[:n]
        # a different block each time round: no two pages alike across blocks
        view[at : at + n : PAGE] ^= np.uint8((at // block.size) & 0xFF)
    del view
    return ram


def _equal(a: memoryview, b: memoryview) -> bool:
    """Byte-equal, compared a block at a time (no copy of either)."""
    x, y = np.frombuffer(a, dtype=np.uint8), np.frombuffer(b, dtype=np.uint8)
    return all(
        np.array_equal(x[at : at + FILL_BLOCK], y[at : at + FILL_BLOCK])
        for at in range(0, x.size, FILL_BLOCK)
    )


def _timed_impl(impl: Impl, ram: mmap.mmap) -> float:
    with memoryview(ram) as view:
        t = time.perf_counter()
        RUNNERS[impl.name](view, impl.threads)
        return time.perf_counter() - t


def _lose_pages(source: mmap.mmap, target: mmap.mmap, size: int, seed: int) -> None:
    """target := source with LOST_PAGES pages left stale (as a missed copy leaves them)."""
    target[:] = source
    pages = np.random.default_rng(seed).choice(size // PAGE, LOST_PAGES, replace=False)
    view = np.frombuffer(target, dtype=np.uint8).reshape(-1, PAGE)
    view[pages, 0] ^= 0xFF
    del view


def run_size(size: int, runs: int, log: Log) -> Obj:
    rng = np.random.default_rng(size)
    block = rng.integers(0, 256, min(FILL_BLOCK, size), dtype=np.uint8)
    load_start = os.getloadavg()
    source = _filled(size, block)
    target = mmap.mmap(-1, size)
    try:
        digest: Obj = {}
        native = pagehash.native_available()
        impls = implementations(native)
        # round-robin: every implementation's runs spread over the same stretch of time,
        # so the machine's changing load is shared alike
        timings = [[_timed_impl(i, source) for i in impls] for _ in range(runs)]
        for k, impl in enumerate(impls):
            s = summarize([size / run[k] for run in timings])
            digest[f"{impl.name}/{impl.threads}t"] = s.as_dict() if s else None
            log(
                f"digest {size // MiB} MiB {impl.name} {impl.threads}t: {fmt_summary(s, 'GiB/s', GiB)}"
            )
        verify: Obj = {}
        variants = [("old", verify_old)] + ([("new", verify_new)] if native else [])
        for name, fn in variants:
            times = []
            for run in range(runs):
                _lose_pages(source, target, size, run)
                src, dst = memoryview(source), memoryview(target)
                t = time.perf_counter()
                repaired = fn(src, dst)
                times.append(time.perf_counter() - t)
                if repaired != LOST_PAGES or not _equal(src, dst):
                    raise AssertionError(f"verify {name}: {repaired} pages repaired")
                src.release()
                dst.release()
            s = summarize([t * 1000 for t in times])
            verify[name] = s.as_dict() if s else None
            verify[f"{name}PerGiB"] = s.median * GiB / size if s else None
            log(f"verify {size // MiB} MiB {name}: {fmt_summary(s, 'ms')}")
    finally:
        source.close()
        target.close()
    return {
        "memoryBytes": size,
        "loadavgStart": load_start,
        "loadavgEnd": os.getloadavg(),
        "digestThroughput": digest,  # bytes/s summaries
        "verifyMilliseconds": verify,
        "lostPages": LOST_PAGES,
    }


def run_digest(quick: bool, runs: int | None, log: Log, sizes: list[int] | None = None) -> Obj:
    """Every size in turn (blocking: call it in a thread)."""
    n = runs or (3 if quick else 5)
    chosen = sizes or (QUICK_SIZES if quick else SIZES)
    log(
        f"digest: {[s // MiB for s in chosen]} MiB x {n} runs, {DIGEST_THREADS} threads = all "
        f"cores, native library {'loaded' if pagehash.native_available() else 'MISSING'}"
    )
    return {
        "threadsAllCores": DIGEST_THREADS,
        "native": pagehash.native_available(),
        "runs": n,
        "sizes": [run_size(s, n, log) for s in chosen],
    }


def table_lines(res: Obj) -> list[str]:
    """The report's section: GiB/s per implementation, and the verify cost."""
    all_t = res["threadsAllCores"]
    lines = [
        "",
        f"== page digests (issue 22): GiB/s, median of {res['runs']}; {all_t}t = all cores; "
        f"verify = both sides digest + compare + repair {LOST_PAGES} pages ==",
    ]
    for size in res["sizes"]:
        load = f"load {size['loadavgStart'][0]:.2f}->{size['loadavgEnd'][0]:.2f}"
        cells = []
        for key, s in size["digestThroughput"].items():
            cells.append(f"{key} {s['median'] / GiB:.2f}" if s else f"{key} -")
        lines.append(f"  {size['memoryBytes'] // MiB:>5} MiB  " + ", ".join(cells) + f"  ({load})")
        v = size["verifyMilliseconds"]
        parts = [
            f"{name} {v[name]['median']:.0f} ms ({v[name + 'PerGiB']:.0f} ms/GiB)"
            for name in ("old", "new")
            if v.get(name)
        ]
        lines.append(f"  {'':>5}      verify: " + ", ".join(parts))
    return lines
