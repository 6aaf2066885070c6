"""The local lab: a whole cluster on one machine, for the demo, the tests and the benches.

- ``cluster``: :class:`Lab` brings up a controller and N handlers as real processes on
  loopback with a fresh cluster CA (``vmferry lab up|down|kill``);
- ``multi``: :class:`~vmferry.lab.multi.MultiLab`, several clusters (``vmferry lab up
  --clusters 2``): one ``Lab`` per cluster in a subdirectory, each the other's peer,
  client contexts, components named ``<cluster>/<component>``;
- ``demo``: ``make demo`` (``python -m vmferry.lab.demo``), a narrated live migration.

Public surface: what this ``__init__`` re-exports.
"""

from vmferry.lab import netns
from vmferry.lab.cluster import (
    DEFAULT_LAB_DIR,
    LAB_ENV,
    Component,
    Lab,
    LabError,
    default_dir,
    free_port,
)

__all__ = [
    "DEFAULT_LAB_DIR",
    "LAB_ENV",
    "Component",
    "Lab",
    "LabError",
    "default_dir",
    "free_port",
    "netns",
]
