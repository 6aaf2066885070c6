"""The QEMU command line: a migration target that cannot switch to post-copy
preallocates its RAM file (in its own cgroup, while it is prepared); a guest started
fresh, and a target that may receive post-copy, do not."""

from __future__ import annotations

from pathlib import Path

from handler.drivers.qemu import QemuDriver
from handler.drivers.qemu_handle import QemuSpec


def backend(args: list[str]) -> str:
    return next(a for a in args if a.startswith("memory-backend-file,"))


def test_only_a_preallocating_target_asks_qemu_to_preallocate(tmp_path: Path) -> None:
    driver = QemuDriver(tmp_path / "qemu", tmp_path / "ram")
    spec = QemuSpec(memory_bytes=512 << 20, kernel="/boot/vmlinuz")
    ram = tmp_path / "ram" / "vm.ram"
    fresh = backend(driver._command("vm", spec, ram, tmp_path))
    prealloc = backend(driver._command("vm", spec, ram, tmp_path, prealloc=True))
    assert ",prealloc=" not in fresh and fresh.endswith("share=on")
    assert prealloc.startswith(fresh + ",prealloc=on,prealloc-threads=")
