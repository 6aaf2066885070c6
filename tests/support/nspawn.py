"""Host containers booted with ``systemd-nspawn`` for the install test.

A container's root is a small private tree: a copy of this machine's ``/etc`` (without
its enabled units), empty ``/var``, ``/opt``, ``/root``, and this machine's ``/usr``
bound read-only (``/bin``, ``/lib``... are the usual merged-/usr symlinks), so nothing is
downloaded to make one. systemd runs as PID 1 *inside* it only: nspawn gives it its own
mount and PID namespaces (never start an init on the machine itself). The containers
share this machine's network (each daemon gets its own port).

Commands run inside with ``nsenter`` into every namespace of the container's init, so
``systemctl`` talks to the container's systemd.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

BOOT_TIMEOUT = 60.0  # s; a container reaches multi-user in ~3 s here
PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def unavailable() -> str | None:
    """Why no container can be booted here, or None."""
    if os.geteuid() != 0:
        return "systemd-nspawn needs root"
    for tool in ("systemd-nspawn", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (make install-nspawn: Debian systemd-container)"
    if not Path("/usr/lib/systemd/systemd").exists():
        return "systemd is not installed"
    return None


@dataclass
class Host:
    """One booted container named ``name`` under ``base``."""

    name: str
    base: Path
    binds: list[str] = field(default_factory=list)  # nspawn --bind/--bind-ro values
    proc: subprocess.Popen[bytes] | None = None

    @property
    def root(self) -> Path:
        return self.base / self.name

    @property
    def console_log(self) -> Path:
        return self.base / f"{self.name}.console"

    def make_tree(self) -> None:
        root = self.root
        for d in ("usr", "var/tmp", "var/lib", "var/log", "tmp", "root", "opt", "home", "run"):
            (root / d).mkdir(parents=True, exist_ok=True)
        for link in ("bin", "lib", "lib64", "sbin"):
            if Path("/", link).is_symlink():
                (root / link).symlink_to(os.readlink(Path("/", link)))
        subprocess.run(["cp", "-a", "/etc", str(root / "etc")], check=True)
        etc = root / "etc"
        for unit_dir in (etc / "systemd" / "system").iterdir():
            if unit_dir.is_dir() and not unit_dir.is_symlink():
                shutil.rmtree(unit_dir)
            else:
                unit_dir.unlink()
        shutil.rmtree(etc / "vmferry", ignore_errors=True)
        (etc / "os-release").unlink(missing_ok=True)  # a link into /usr, bound only at boot
        shutil.copy("/usr/lib/os-release", etc / "os-release")
        (etc / "machine-id").write_text("")
        (etc / "hostname").write_text(self.name + "\n")

    def boot(self) -> None:
        self.make_tree()
        argv = [
            "systemd-nspawn",
            "--boot",
            "--quiet",
            f"--directory={self.root}",
            f"--machine={self.name}",
            "--bind-ro=/usr",
            "--register=no",  # this machine runs no systemd-machined
            "--keep-unit",  # nor a system manager to ask for a scope
            "--console=read-only",
            *self.binds,
        ]
        with self.console_log.open("wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)

    def leader(self) -> int:
        """The pid (on this machine) of the container's systemd."""
        assert self.proc is not None
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        for pid in children.read_text().split():
            if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                return int(pid)
        raise RuntimeError(f"{self.name}: no systemd under nspawn pid {self.proc.pid}")

    def wait_booted(self) -> None:
        deadline = time.monotonic() + BOOT_TIMEOUT
        state = ""
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: nspawn exited:\n{self.console_tail()}")
            try:
                state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
            except RuntimeError:
                state = "no init yet"
            if state in ("running", "degraded"):
                return
            time.sleep(0.3)
        raise RuntimeError(f"{self.name}: not booted in {BOOT_TIMEOUT}s ({state})")

    def run(
        self, *argv: str, check: bool = True, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``argv`` inside the container (a clean environment), as root."""
        cmd = ["nsenter", "-t", str(self.leader()), "-a", "--", "/usr/bin/env", "-i", PATH]
        proc = subprocess.run(
            [*cmd, "LANG=C.UTF-8", "HOME=/root", *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{self.name}: {' '.join(argv)} exited {proc.returncode}\n"
                f"stdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}"
            )
        return proc

    def journal(self, unit: str, *args: str) -> str:
        return self.run("journalctl", "-u", unit, "--no-pager", "-o", "cat", *args).stdout

    def console_tail(self, lines: int = 30) -> str:
        text = self.console_log.read_text(errors="replace") if self.console_log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def poweroff(self) -> None:
        """SIGTERM to nspawn powers the container off; SIGKILL after 30 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
