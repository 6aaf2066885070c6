"""Sampling profiles of the handlers during a migration (py-spy), reduced to top entries.

py-spy (a dev extra) attaches to a running process by pid, samples every Python thread's
stack without instrumenting it, and writes "collapsed" stacks (``frame;frame;… count``)
when it gets SIGINT. :func:`top_entries` turns those into self-time and inclusive-time
rankings plus the share of samples per thread (event loop vs. worker threads).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SAMPLE_RATE = 250  # Hz
_THREAD_RE = re.compile(r"^thread \((\w+)\)(?::\s*(.*))?$")
# Frames every stack passes through (interpreter start-up, the event loop's and the thread
# pools' machinery): left out of the inclusive ranking, which would otherwise show only them.
GENERIC_FILES = (
    "<frozen runpy>",
    "asyncio/runners.py",
    "asyncio/base_events.py",
    "asyncio/events.py",
    "threading.py",
    "futures/thread.py",
    "handler/main.py",
)
_PROCESS_RE = re.compile(r"^process \d+:")


def py_spy() -> str | None:
    """The py-spy executable (next to this interpreter first), or None."""
    local = Path(sys.executable).parent / "py-spy"
    if local.exists():
        return str(local)
    return shutil.which("py-spy")


@dataclass
class Recorder:
    """``py-spy record`` attached to one pid until :meth:`stop`."""

    pid: int
    output: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = py_spy()
        if exe is None:
            raise RuntimeError("py-spy is not installed (make venv installs the dev extras)")
        self.proc = subprocess.Popen(
            [
                exe,
                "record",
                "--pid",
                str(self.pid),
                "--rate",
                str(SAMPLE_RATE),
                "--format",
                "raw",
                "--threads",
                "--nonblocking",
                "--output",
                str(self.output),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.output.with_suffix(".log"), "wb"),
        )

    def stop(self, timeout: float = 30) -> bool:
        """SIGINT (py-spy writes its file), wait; True if the output exists."""
        if self.proc is None:
            return False
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.output.exists()


def _short(frame: str) -> str:
    """'func (path/to/module.py:123)' -> 'func (module.py)': one entry per function."""
    m = re.match(r"^(.*) \((.*?):\d+\)$", frame)
    if not m:
        return frame
    func, path = m.groups()
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if len(parts) >= 2 else path
    return f"{func} ({short})"


def parse_collapsed(text: str) -> list[tuple[list[str], int]]:
    """[(stack frames root..leaf, samples)] from py-spy's raw output."""
    stacks = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        stacks.append((stack.split(";"), int(count)))
    return stacks


def top_entries(text: str, limit: int = 15) -> dict[str, Any]:
    """Self and inclusive top functions (percent of all samples), the event loop thread's
    own self-time ranking, and the share of samples per thread (pools merged)."""
    stacks = parse_collapsed(text)
    total = sum(c for _, c in stacks)
    self_counts: Counter[str] = Counter()
    incl_counts: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    loop_counts: Counter[str] = Counter()  # self samples on the event loop thread
    for frames, count in stacks:
        thread = "?"
        code = []
        for f in frames:
            if _PROCESS_RE.match(f):
                continue
            if m := _THREAD_RE.match(f):
                # "asyncio_3" and "ram-digest_0" are pools: one entry per pool.
                thread = re.sub(r"_\d+$", "", m.group(2) or m.group(1))
                continue
            code.append(_short(f))
        threads[thread] += count
        if not code:
            continue
        self_counts[code[-1]] += count
        if thread == "MainThread":
            loop_counts[code[-1]] += count
        for name in set(code):
            if not name.rstrip(")").endswith(GENERIC_FILES):
                incl_counts[name] += count

    def ranked(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"function": name, "samples": n, "percent": round(100 * n / total, 1) if total else 0}
            for name, n in counter.most_common(limit)
        ]

    return {
        "samples": total,
        "sampleRateHz": SAMPLE_RATE,
        "self": ranked(self_counts),
        "inclusive": ranked(incl_counts),
        "eventLoopSelf": ranked(loop_counts),
        "threads": [
            {"thread": t, "samples": n, "percent": round(100 * n / total, 1) if total else 0}
            for t, n in threads.most_common()
        ],
    }
