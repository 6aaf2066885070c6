"""The bench's scenario names that have their own runner (the lab scenarios are named in
``bench.run.scenarios``); ``bench.run`` and ``bench.report`` both use them."""

XCLUSTER = "xcluster"  # its own two-cluster lab (bench/xcluster_runs.py)
DIGEST = "digest"  # no lab (bench/digest_bench.py)
STORAGE = "storage"  # its own lab and QEMU guests (bench/storage_runs.py)
QEMU_GUEST = "qemu"  # its own lab, TCG guests through the tunnel (bench/qemu_runs.py)
SCENARIO_NAMES = [
    "grpc",
    "random",
    "zero",
    "text",
    "busy",
    "sched",
    XCLUSTER,
    DIGEST,
    STORAGE,
    QEMU_GUEST,
]
NETNS = "netns"  # not in the default set: it needs root and network namespaces
SCALE = "scale"  # not in the default set: its own controllers and fleet, several minutes
