"""Structured logging: one event per line, logfmt (``ts= level= component= msg=``).

Under systemd, when stderr is the journal's stream (``$JOURNAL_STREAM`` names its
device and inode: systemd.exec(5)), each line starts with its syslog priority
(``<3>`` error ... ``<7>`` debug, sd-daemon(3)), so ``journalctl -p err`` finds the errors.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import TextIO

JOURNAL_STREAM = "JOURNAL_STREAM"
# logging level -> syslog priority (sd-daemon(3) prefixes); NOTICE (5) has no logging level.
PRIORITIES = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}
LEVELS = ("debug", "info", "warning", "error")


def priority(levelno: int) -> int:
    """The syslog priority of a logging level (a custom level: the next standard one up)."""
    for level in sorted(PRIORITIES):
        if levelno <= level:
            return PRIORITIES[level]
    return PRIORITIES[logging.CRITICAL]


class LogfmtFormatter(logging.Formatter):
    def __init__(self, component: str, journal: bool = False) -> None:
        super().__init__()
        self.component = component
        self.journal = journal  # prefix each line with <priority> for journald

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        ts += f".{int(record.msecs):03d}Z"
        msg = record.getMessage().replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        line = (
            f"ts={ts} level={record.levelname.lower()} component={self.component} "
            f'logger={record.name} msg="{msg}"'
        )
        if record.exc_info:
            exc = self.formatException(record.exc_info).replace("\n", "\\n").replace('"', "'")
            line += f' exc="{exc}"'
        if self.journal:
            line = f"<{priority(record.levelno)}>{line}"
        return line


def journal_stream(stream: TextIO, env: Mapping[str, str] | None = None) -> bool:
    """True when ``stream`` is the journal's (``$JOURNAL_STREAM`` = ``device:inode``
    of it; a redirected stderr of a child of the service is not)."""
    value = (os.environ if env is None else env).get(JOURNAL_STREAM, "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):  # no file descriptor (a test's StringIO)
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def setup(component: str, level: str = "info") -> None:
    """Route every logger to stderr in logfmt; ``level`` is debug|info|warning|error."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter(component, journal=journal_stream(sys.stderr)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_level(level)
    logging.getLogger("grpc").setLevel(logging.WARNING)


def set_level(level: str) -> None:
    """Change the level of every logger (a reload applies ``log_level`` with it)."""
    if level not in LEVELS:
        raise ValueError(f"log level {level!r}: expected one of {', '.join(LEVELS)}")
    logging.getLogger().setLevel(level.upper())
