"""``make demo``: a real live migration on a local 3-node lab, narrated.

Brings a lab up in ``./.lab`` (controller + 3 handlers as processes, mTLS with a fresh
cluster CA), starts a 256 MiB VM whose guest dirties memory continuously, live-migrates
it with ``vmferry migrate --wait``, prints a summary and brings the lab down again.
Every step is the real ``vmferry`` command, shown as it runs.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from vmferry.config import CONFIG_ENV
from vmferry.lab import LAB_ENV
from vmferry.migration_state import MigrationPhase, MigrationState, VMIPhase
from vmferry.objects.conditions import parse_time

ROOT = Path(__file__).resolve().parents[2]  # the repository (vmferry/lab/demo.py)
VM_MANIFEST = ROOT / "deploy" / "examples" / "vm-memvm.yaml"


def run(*args: str, capture: bool = False, check: bool = True) -> str:
    """Run and show one vmferry command; returns its stdout when captured."""
    print(f"\n$ vmferry {' '.join(shlex.quote(a) for a in args)}", flush=True)
    proc = subprocess.run(
        [sys.executable, "-m", "vmferry.cli.main", *args],
        text=True,
        stdout=subprocess.PIPE if capture else None,
        check=False,
    )
    if check and proc.returncode != 0:
        raise SystemExit(f"demo: 'vmferry {' '.join(args)}' failed (exit {proc.returncode})")
    return proc.stdout or ""


def get_json(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "vmferry.cli.main", "get", *args, "-o", "json"],
        text=True,
        capture_output=True,
        check=True,
    ).stdout
    result: dict = json.loads(out)
    return result


def summary(vmim: dict, vmi: dict) -> str:
    status = vmim["status"]
    ms = MigrationState.of(vmi)
    t = ms.transfer
    stamps = status["phaseTransitionTimestamps"]
    start = parse_time(stamps[0]["phaseTransitionTimestamp"])
    lines = ["", "=" * 64, "Live migration summary", "=" * 64]
    lines.append(
        f"VM            {vmi['metadata']['name']} ({t.get('dataTotalBytes', 0) >> 20} MiB, guest writing memory)"
    )
    lines.append(
        f"moved         {ms.source_node} -> {ms.target_node} (migration network {ms.target_address})"
    )
    lines.append(f"result        {status['phase']}")
    lines.append(
        "phases        "
        + "  ".join(
            f"{s['phase']} +{(parse_time(s['phaseTransitionTimestamp']) - start).total_seconds():.3f}s"
            for s in stamps
        )
    )
    total = (parse_time(stamps[-1]["phaseTransitionTimestamp"]) - start).total_seconds()
    lines.append(f"total time    {total:.2f} s (VMIM created -> Succeeded)")
    lines.append(
        f"downtime      {t.get('guestDowntimeMilliseconds', 0):.1f} ms as the guest saw it (heartbeat gap)"
    )
    parts = t.get("downtimePartsMilliseconds") or {}
    if parts:
        lines.append("              " + ", ".join(f"{k} {v:.1f} ms" for k, v in parts.items()))
    lines.append(
        f"bytes sent    {t.get('wireBytes', 0) / 2**20:.1f} MiB on the wire for "
        f"{t.get('dataProcessedBytes', 0) / 2**20:.1f} MiB of memory pages"
    )
    lines.append(
        f"rounds        {t.get('rounds')} (transfer {t.get('transferRateBytes', 0) / 2**20:.0f} MiB/s, "
        f"guest dirty rate {t.get('dirtyRateBytes', 0) / 2**20:.1f} MiB/s)"
    )
    verified = (
        "yes" if t.get("digestVerified") and t.get("digest") == t.get("targetDigest") else "NO"
    )
    lines.append(
        f"digest        verified: {verified} (sha256 {str(t.get('digest'))[:16]}… on both sides)"
    )
    lines.append("=" * 64)
    return "\n".join(lines)


def main() -> None:
    lab_dir = ROOT / ".lab"
    os.environ[LAB_ENV] = str(lab_dir)
    os.environ[CONFIG_ENV] = str(lab_dir / "client.yaml")
    run("lab", "down", check=False, capture=True)
    try:
        run("lab", "up", "--nodes", "3")
        run("get", "nodes", "-o", "wide")
        run(
            "apply",
            "-f",
            str(VM_MANIFEST.relative_to(ROOT)) if Path.cwd() == ROOT else str(VM_MANIFEST),
        )
        deadline = time.monotonic() + 60
        while get_json("vmi", "busy-vm").get("status", {}).get("phase") != VMIPhase.RUNNING:
            if time.monotonic() > deadline:
                raise SystemExit("demo: the VM did not start within 60 s")
            time.sleep(0.3)
        run("get", "vmi", "-o", "wide")
        time.sleep(2)  # let the guest dirty memory for a while
        run("migrate", "busy-vm", "--wait")
        listing = get_json("vmim")["items"]
        name = max(listing, key=lambda v: v["metadata"]["creationTimestamp"])["metadata"]["name"]
        run("get", "vmim", "-o", "wide")
        run("get", "vmi", "-o", "wide")
        print(summary(get_json("vmim", name), get_json("vmi", "busy-vm")))
        if MigrationPhase.of(get_json("vmim", name)) != MigrationPhase.SUCCEEDED:
            raise SystemExit("demo: the migration did not succeed")
    finally:
        run("lab", "down")


if __name__ == "__main__":
    main()
