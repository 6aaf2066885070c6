"""A memvm guest re-adopted in post-copy keeps what it had: a new handle (a restarted
handler's) maps the present/requested bitmaps the guest still uses as they are, never
refilled, so the missing pages are exactly those that had not arrived."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from handler.drivers.base import DriverError, GuestSpec
from handler.drivers.memvm_handle import MemVMHandle

SPEC = GuestSpec(memory_bytes=1 << 20)


def handle(tmp_path: Path) -> MemVMHandle:
    ram, dirty = tmp_path / "g.ram", tmp_path / "g.dirty"
    for path, size in ((ram, SPEC.memory_bytes), (dirty, SPEC.page_count)):
        if not path.exists():
            with open(path, "wb") as f:
                f.truncate(size)
    return MemVMHandle("g", SPEC, 0, None, tmp_path, ram, dirty)


def test_a_new_handle_maps_the_surviving_bitmaps_as_they_are(tmp_path: Path) -> None:
    before = handle(tmp_path)
    before.prepare_postcopy(np.array([3, 5, 9], dtype=np.int64))
    before.mark_present(np.array([5], dtype=np.int64))
    before.close()  # the handler dies; the guest and its files stay
    after = handle(tmp_path)
    assert after.missing_pages().tolist() == [3, 9]
    after.mark_present(np.array([3, 9], dtype=np.int64))
    assert after.missing_pages().size == 0
    after.close()


def test_a_guest_never_in_post_copy_has_no_bitmap(tmp_path: Path) -> None:
    h = handle(tmp_path)
    with pytest.raises(DriverError, match="not in post-copy"):
        h.missing_pages()
    h.close()
