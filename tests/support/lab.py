"""A real lab for integration tests: real daemons as processes, real mTLS, driven by the
real CLI (``python -m vmferry.cli.main``) and inspected through the API and the files
the handlers keep."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from vmferry.config import CONFIG_ENV
from vmferry.failpoints import ENV as FAILPOINTS_ENV
from vmferry.lab import LAB_ENV, Lab
from vmferry.lab.cluster import SYNC
from vmferry.lab.multi import MultiLab, split_component

T = TypeVar("T")
Obj = dict[str, Any]

MIGRATION_PHASES = [
    "Pending",
    "Scheduling",
    "Scheduled",
    "PreparingTarget",
    "TargetReady",
    "Running",
    "Succeeded",
]


def vm_manifest(
    name: str,
    memory: str = "128Mi",
    dirty_rate: str = "8Mi",
    hot_set: str = "32Mi",
    content: str = "mixed",
    labels: dict[str, str] | None = None,
) -> str:
    return json.dumps(
        {
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachine",
            "metadata": {"name": name, "labels": labels or {}},
            "spec": {
                "runStrategy": "Always",
                "template": {
                    "metadata": {"labels": labels or {}},
                    "spec": {
                        "evictionStrategy": "LiveMigrate",
                        "domain": {"memory": {"guest": memory}},
                        "memvm": {
                            "workload": {
                                "content": content,
                                "dirtyRate": dirty_rate,
                                "hotSet": hot_set,
                            }
                        },
                    },
                },
            },
        }
    )


def migration_name(migrate_stdout: str) -> str:
    """The VMIM ``vmferry migrate`` created: the name it prints in parentheses."""
    return migrate_stdout.split("(")[1].split(")")[0]


class LabHarness:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.lab = Lab(root / "lab")
        self.env = dict(os.environ)
        self.env[CONFIG_ENV] = str(root / "client.yaml")
        self.env[LAB_ENV] = str(self.lab.dir)

    # -- the CLI ------------------------------------------------------------------------------

    def cli(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 120,
        input: str | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        env = {**self.env, **(extra_env or {})}
        proc = subprocess.run(
            [sys.executable, "-m", "vmferry.cli.main", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            input=input,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"vmferry {' '.join(args)} exited {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return proc

    def cli_background(self, *args: str) -> subprocess.Popen[str]:
        """``vmferry ARGS`` started and left running (``communicate()`` for its output)."""
        return subprocess.Popen(
            [sys.executable, "-m", "vmferry.cli.main", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
        )

    def up(
        self,
        nodes: int = 3,
        memory: str = "4Gi",
        *,
        netns: bool = False,
        migration_link: str | None = None,
        main_link: str | None = None,
        ha: bool = False,
        stream_workers: int | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``vmferry lab up``; with ``netns``, nodes in their own network namespaces
        (``migration_link``/``main_link``: ``RATE[,DELAY]``); ``ha``: 3 etcd members and
        3 controller replicas; ``stream_workers``: each handler's."""
        args = ["lab", "up", "--nodes", str(nodes), "--memory", memory]
        if stream_workers is not None:
            args += ["--stream-workers", str(stream_workers)]
        if ha:
            args.append("--ha")
        if netns:
            args.append("--netns")
        if migration_link:
            args += ["--migration-link", migration_link]
        if main_link:
            args += ["--main-link", main_link]
        return self.cli(*args, timeout=120)

    def down(self) -> None:
        self.cli("lab", "down", check=False, timeout=60)

    def get(self, kind: str, name: str, namespace: str = "default") -> Obj:
        out: Obj = json.loads(self.cli("get", kind, name, "-n", namespace, "-o", "json").stdout)
        return out

    def try_get(self, kind: str, name: str, namespace: str = "default") -> Obj | None:
        proc = self.cli("get", kind, name, "-n", namespace, "-o", "json", check=False)
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    def apply(self, manifest: str) -> None:
        self.cli("apply", "-f", "-", input=manifest)

    # -- observability endpoints --------------------------------------------------------------

    def info(self) -> Obj:
        """The lab's lab.json: nodes and the ports of every endpoint."""
        info: Obj = json.loads((self.lab.dir / "lab.json").read_text())
        return info

    def metrics_url(self, component: str, path: str = "/metrics") -> str:
        """``https://…/metrics`` (or another ``path``) of ``controller`` or a node."""
        return f"https://127.0.0.1:{self.info()['metricsPorts'][component]}{path}"

    def metrics_ssl(self) -> ssl.SSLContext:
        """TLS to the daemons' metrics endpoints: the lab CA, the admin's certificate."""
        ctx = ssl.create_default_context(cafile=str(self.lab.pki_dir / "ca.crt"))
        users = self.lab.pki_dir / "users"
        ctx.load_cert_chain(users / "admin.crt", users / "admin.key")
        return ctx

    def fetch_metrics(self, component: str, path: str = "/metrics") -> tuple[str, str]:
        """GET ``path`` of a daemon's metrics endpoint: (Content-Type, body)."""
        url = self.metrics_url(component, path)
        with urllib.request.urlopen(url, timeout=5, context=self.metrics_ssl()) as resp:
            return resp.headers["Content-Type"], resp.read().decode()

    def console_url(self) -> str:
        return f"https://127.0.0.1:{self.info()['consolePort']}/"

    def scrape(self, component: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """One scrape of a daemon: {(sample name, sorted labels): value}."""
        from prometheus_client.parser import text_string_to_metric_families

        _, text = self.fetch_metrics(component)
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    # -- daemons ------------------------------------------------------------------------------

    def restart(
        self, component: str, failpoint: str = "", *, signal: str = "KILL", ready: bool = True
    ) -> None:
        """Stop ``component`` (``signal``; guests stay) if it runs, start it (with
        ``failpoint`` armed, if given) and, with ``ready``, wait until it serves again: the
        controller answers, or the node's handler posted Ready after this start (a node
        restarted moments after a kill may still show its old Ready, or the NotReady the
        controller wrote meanwhile)."""
        if self.lab.pid(component) is not None:
            self.cli("lab", "kill", component, "--signal", signal)
            self.wait_for(f"{component} to stop", lambda: self.lab.pid(component) is None, 15)
        started = time.time()
        self.cli("lab", "start", component, extra_env={FAILPOINTS_ENV: failpoint})
        if not ready:
            return
        if component == "controller":
            node = self.lab.node_names()[0]
            self.wait_for(
                "the controller to answer",
                lambda: self.cli("get", "node", node, check=False).returncode == 0,
                30,
            )
            return

        def posted_ready() -> bool:
            node = self.try_get("node", component)
            for c in ((node or {}).get("status") or {}).get("conditions") or []:
                if c["type"] == "Ready" and c["status"] == "True":
                    beat = c.get("lastHeartbeatTime") or ""
                    return beat >= time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started))
            return False

        self.wait_for(f"{component} to post Ready", posted_ready, 30)

    def log_tails(self, lines: int = 40) -> str:
        """The last ``lines`` of every daemon's log: for a failure message."""
        parts = []
        for log in sorted(self.lab.log_dir.glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name} ---\n" + "\n".join(tail))
        return "\n".join(parts)

    # -- waiting ------------------------------------------------------------------------------

    @staticmethod
    def wait_for(
        what: str, fn: Callable[[], T | None], timeout: float = 60, interval: float = 0.2
    ) -> T:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                value = fn()
                if value:
                    return value
            except Exception as e:
                last = e
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last})")

    def wait_vmi_running(self, name: str, timeout: float = 60) -> Obj:
        def running() -> Obj | None:
            vmi = self.try_get("vmi", name)
            return vmi if vmi and (vmi.get("status") or {}).get("phase") == "Running" else None

        return self.wait_for(f"VMI {name} Running", running, timeout)

    def wait_vmim_final(self, name: str, timeout: float = 120) -> Obj:
        def final() -> Obj | None:
            vmim = self.try_get("vmim", name)
            phase = ((vmim or {}).get("status") or {}).get("phase")
            return vmim if phase in ("Succeeded", "Failed") else None

        return self.wait_for(f"migration {name} to finish", final, timeout, interval=0.3)

    def migrate_to(self, name: str, node: str) -> str:
        """``vmferry migrate`` VMI ``name`` to lab node ``node`` (by its lab-node label);
        the VMIM's name."""
        out = self.cli("migrate", name, "--addedNodeSelector", f"vmferry.io/lab-node={node[-1]}")
        return migration_name(out.stdout)

    def wait_post_copy(self, name: str, timeout: float = 60) -> None:
        """Until VMI ``name``'s migration has switched to post-copy."""
        self.wait_for(
            "post-copy to start",
            lambda: (
                (self.get("vmi", name)["status"].get("migrationState") or {}).get("mode")
                == "PostCopy"
            ),
            timeout=timeout,
            interval=0.1,
        )

    def set_live_migration_config(self, **fields: Any) -> None:
        self.cli(
            "patch",
            "hyperconverged",
            "kubevirt-hyperconverged",
            "-n",
            "openshift-cnv",
            "--type",
            "merge",
            "-p",
            json.dumps({"spec": {"liveMigrationConfig": fields}}),
        )

    # -- guests on the nodes ------------------------------------------------------------------

    def guests(self, vmi_uid: str) -> list[tuple[str, Obj]]:
        """(node, vm.json) of every guest of this VMI whose process is alive, on any node."""
        found = []
        for node in self.lab.node_names():
            for vm_json in (self.lab.runtime_dir(node) / "guests").glob(f"{vmi_uid}*/vm.json"):
                try:
                    record = json.loads(vm_json.read_text())
                    os.kill(int(record["pid"]), 0)
                except (OSError, ValueError, KeyError):
                    continue
                stat = Path(f"/proc/{record['pid']}/stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] == "Z":
                    continue
                found.append((node, {**record, "dir": str(vm_json.parent)}))
        return found

    @staticmethod
    def console_ticks(guest_dir: str) -> list[int]:
        ticks = []
        log = Path(guest_dir) / "console.log"
        for line in log.read_text().splitlines() if log.exists() else []:
            for field in line.split():
                if field.startswith("tick="):
                    ticks.append(int(field[5:]))
        return ticks


class MultiLabHarness(LabHarness):
    """Several clusters (``vmferry lab up --clusters N``): the CLI in one cluster with
    ``--context``, each cluster's :class:`Lab` (its pids, logs, nodes' runtime)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.multi = MultiLab(self.lab.dir)

    def up_clusters(
        self, clusters: int = 2, nodes: int = 2, memory: str = "4Gi", *, netns: bool = False
    ) -> subprocess.CompletedProcess[str]:
        args = ["lab", "up", "--clusters", str(clusters), "--nodes", str(nodes)]
        args += ["--memory", memory] + (["--netns"] if netns else [])
        return self.cli(*args, timeout=180)

    def cluster(self, name: str) -> Lab:
        return self.multi.lab(name)

    def in_cluster(
        self, cluster: str, *args: str, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """``vmferry --context CLUSTER ARGS...``."""
        return self.cli("--context", cluster, *args, **kwargs)

    def get_in(self, cluster: str, kind: str, name: str, namespace: str = "default") -> Obj:
        out: Obj = json.loads(
            self.in_cluster(cluster, "get", kind, name, "-n", namespace, "-o", "json").stdout
        )
        return out

    def restart(
        self, component: str, failpoint: str = "", *, signal: str = "KILL", ready: bool = True
    ) -> None:
        """As :meth:`LabHarness.restart`, for a qualified component (``cluster2/node1``,
        ``cluster1/sync``, ``cluster1/controller``); a sync controller is ready when it
        listens again."""
        cluster, name = split_component(component)
        lab = self.cluster(cluster)
        if lab.pid(name) is not None:
            self.cli("lab", "kill", component, "--signal", signal)
            self.wait_for(f"{component} to stop", lambda: lab.pid(name) is None, 15)
        started = time.time()
        self.cli("lab", "start", component, extra_env={FAILPOINTS_ENV: failpoint})
        if not ready:
            return
        if name == SYNC:
            self.wait_for(f"{component} to listen", lambda: asyncio.run(lab.sync_listening()), 30)
            return
        if name == "controller":
            node = lab.node_names()[0]
            self.wait_for(
                f"{component} to answer",
                lambda: self.in_cluster(cluster, "get", "node", node, check=False).returncode == 0,
                30,
            )
            return

        def posted_ready() -> bool:
            proc = self.in_cluster(cluster, "get", "node", name, "-o", "json", check=False)
            node = json.loads(proc.stdout) if proc.returncode == 0 else {}
            for c in (node.get("status") or {}).get("conditions") or []:
                if c["type"] == "Ready" and c["status"] == "True":
                    beat = c.get("lastHeartbeatTime") or ""
                    return beat >= time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started))
            return False

        self.wait_for(f"{component} to post Ready", posted_ready, 30)

    def log_tails(self, lines: int = 40) -> str:
        parts = []
        for cluster in self.multi.clusters():
            for log in sorted(self.cluster(cluster).log_dir.glob("*.log")):
                tail = log.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {cluster}/{log.name} ---\n" + "\n".join(tail))
        return "\n".join(parts)
