"""What build this is: the one place the client, the controller and the handlers ask."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from importlib import metadata

PACKAGE = "vmferry"


def package_version() -> str:
    """The installed distribution's version (``0.1.0``); ``unknown`` when vmferry runs
    from a source tree that was never installed."""
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class BuildInfo:
    version: str
    python_version: str
    platform: str

    @classmethod
    def here(cls) -> BuildInfo:
        machine = {"x86_64": "amd64", "aarch64": "arm64"}.get(
            platform.machine(), platform.machine()
        )
        return cls(
            package_version(),
            platform.python_version(),
            f"{platform.system().lower()}/{machine}",
        )

    def as_dict(self) -> dict[str, str]:
        """kubectl's version.Info keys: gitVersion, goVersion (ours: pythonVersion), platform."""
        return {
            "gitVersion": f"v{self.version}",
            "pythonVersion": self.python_version,
            "platform": self.platform,
        }
