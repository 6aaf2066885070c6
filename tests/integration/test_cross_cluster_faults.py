"""Faults during a cross-cluster live migration (issue 18, "never lost, never running
twice"), in a two-cluster loopback lab (``vmferry lab up --clusters 2 --nodes 2``).

Each case moves a busy memvm VM (content random, 64Mi, dirtying) from cluster1 to
cluster2 with the two VMIMs (as ``test_cross_cluster.py`` does) and injects one fault:
kill -9 of a sync controller at a phase, a daemon's failpoint (``vmferry.failpoints``,
the cases of ``test_cross_cluster_failpoints.py``, which run through :func:`run_case`) on
either side of the decision, or the link between the sync controllers cut (SIGSTOP or
kill -9 of a sync controller) around the decision, also with the source dying between its
decision and its Commit frame, so that cluster2 cannot learn the decision at all until the
link returns (its target guest must stay paused meanwhile). Faults are timed by the
daemons' log lines (the 64Mi hand-off takes well under a second; the API is too slow to
poll) and checked to land where meant (e.g. the decision's log stamp after the stop).
The invariant is then checked from outside:

- both VMIMs end (Succeeded or Failed, as the case implies) within ``FINAL_WITHIN``;
- the arbiter, cluster1's source VMI ``migrationState.switchover``, names the side:
  Committed → cluster2, anything else → cluster1;
- exactly one guest of the VM is alive across both clusters, in that cluster, on the node
  its VMI there names, the VMI Running; its memory is correct
  (:func:`tests.integration.test_chaos.check_memory`) and its console ticks;
- never two guests running at once: while the fault lasts a sampler reads every live
  guest's console (a guest runs when its last line is a recent tick: a paused guest's last
  line says ``paused``, an incoming one never ticked), and afterwards the tick lines of
  every guest seen must not interleave in time.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_chaos import check_memory
from tests.integration.test_cross_cluster import (
    DST,
    SRC,
    VMIM,
    all_guests,
    apply_in,
    busy_vm,
    phase_of,
    receiving_copy,
    sync_address,
    try_get_in,
    vmim,
    wait_phase,
)
from tests.support.lab import MultiLabHarness
from vmferry.failpoints import Step
from vmferry.lab.cluster import SYNC, sync_unavailable_reason
from vmferry.migration_state import Field, Switchover

Obj = dict[str, Any]
FINAL = {"Succeeded", "Failed"}
EITHER = "either"  # the case may end either way; the arbiter says which
FINAL_WITHIN = 90.0  # s from the fault's end to both VMIMs' final phases
SETTLED_WITHIN = 30.0  # s more for exactly one guest (a stale guest's cleanup)
DIE_WITHIN = 45.0  # s for an armed daemon to reach its failpoint
PARTITION_SECONDS = 6.0  # how long a sync controller stays stopped after the decision
RUNNING_IF_TICKED_WITHIN = 2.5  # s: a guest whose last console line is a tick this fresh runs
SAMPLE_EVERY = 0.2  # s
# the source handler's log line "migration UID: switchover DECISION recorded"
DECIDED = (": switchover ", " recorded")

pytestmark = pytest.mark.skipif(
    sync_unavailable_reason() is not None,
    reason=f"no sync controllers: {sync_unavailable_reason()}",
)


@pytest.fixture(scope="module")
def labs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MultiLabHarness]:
    harness = MultiLabHarness(Path(tmp_path_factory.mktemp("xfaults")))
    try:
        harness.up_clusters(2, nodes=2, memory="1Gi")
        yield harness
    finally:
        harness.down()


# -- watching the guests ----------------------------------------------------------------------


def console_lines(guest_dir: str) -> list[tuple[float, str]]:
    """(timestamp, message) of every line of a guest's console."""
    log = Path(guest_dir) / "console.log"
    out = []
    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
        if line.startswith("[") and "] " in line:
            stamp, message = line[1:].split("] ", 1)
            try:
                out.append((float(stamp), message))
            except ValueError:
                continue
    return out


def runs_now(guest_dir: str, now: float) -> bool:
    """The guest runs: its console's last line is a tick, and a recent one (pausing writes
    ``paused at tick N``, stopping ``stopped``; an incoming guest never ticks)."""
    lines = console_lines(guest_dir)
    if not lines:
        return False
    stamp, message = lines[-1]
    return message.startswith("tick=") and now - stamp < RUNNING_IF_TICKED_WITHIN


@dataclass
class Sampler:
    """Samples every live guest of the VM (both clusters) until stopped: records any moment
    with two guests running, and every guest directory seen (for the interleaving check)."""

    labs: MultiLabHarness
    uids: set[str]
    seen: dict[str, str] = field(default_factory=dict)  # guest dir -> cluster/node
    twice: list[str] = field(default_factory=list)
    paused_targets: int = 0  # samples with a live, not running guest in cluster2
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception as e:  # a file read while a guest goes away
                if "No such file" not in str(e):
                    self.twice.append(f"sampler error: {e!r}")
            self._stop.wait(SAMPLE_EVERY)

    def sample(self) -> None:
        now = time.time()
        running = []
        for where, guest in all_guests(self.labs, self.uids):
            self.seen.setdefault(guest["dir"], where)
            if runs_now(guest["dir"], now):
                running.append(where)
            elif where.startswith(f"{DST}/"):
                self.paused_targets += 1
        if len(running) > 1:
            self.twice.append(f"{time.strftime('%H:%M:%S')}: guests running on {running}")

    def interleaved(self) -> list[str]:
        """Tick lines of all guests seen, in time order, collapsed into runs of one guest:
        one guest's ticks in two runs means another guest ticked in between (two ran)."""
        events = sorted(
            (stamp, where_dir)
            for where_dir in self.seen
            for stamp, message in console_lines(where_dir)
            if message.startswith("tick=")
        )
        runs: list[str] = []
        for _, guest_dir in events:
            if not runs or runs[-1] != guest_dir:
                runs.append(guest_dir)
        return (
            [f"{self.seen[d]} ({Path(d).name})" for d in runs]
            if len(runs) != len(set(runs))
            else []
        )


# -- the cases --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    phase: str  # "Succeeded", "Failed" or EITHER
    inject: Callable[[Run], None]
    paused_target: bool = False  # cluster2 must hold a paused target while it cannot know


@dataclass
class Run:
    """One migration under a fault: names, the lab, the arbiter's last seen decision."""

    labs: MultiLabHarness
    vm: str
    source_node: str
    uids: set[str]
    decisions: list[str] = field(default_factory=list)

    @property
    def out(self) -> str:
        return f"{self.vm}-out"

    @property
    def into(self) -> str:
        return f"{self.vm}-in"

    def switchover(self) -> str:
        """The arbiter's decision: cluster1's source VMI ``migrationState.switchover`` while
        that VMI holds this migration's record; once the VMI is gone (the VM halted after
        the move), the copy the sending VMIM's status keeps of that record."""
        vmi = try_get_in(self.labs, SRC, "vmi", self.vm)
        ms = ((vmi or {}).get("status") or {}).get("migrationState") or {}
        if not ms:
            sent = try_get_in(self.labs, SRC, VMIM, self.out)
            ms = ((sent or {}).get("status") or {}).get("migrationState") or {}
        value = str(ms.get(Field.SWITCHOVER) or "")
        if value:
            self.decisions.append(value)
        return value

    def start_sending(self) -> None:
        apply_in(self.labs, SRC, vmim(self.out, self.vm, send=f"m-{self.vm}",
                                      url=sync_address(self.labs, DST)))  # fmt: skip

    def wait(self, what: str, fn: Callable[[], Any], timeout: float, interval: float = 0.1) -> Any:
        return self.labs.wait_for(what, fn, timeout, interval=interval)

    def source(self) -> str:
        return f"{SRC}/{self.source_node}"

    def kill(self, component: str, sig: str = "KILL") -> None:
        self.labs.cli("lab", "kill", component, "--signal", sig)


class LogWatch:
    """Waits for a line in daemons' logs, read from where they were when it was made: a
    fault timed by what a daemon just did, a few milliseconds after it (the API is too slow
    to poll: the whole hand-off of 64Mi takes under a second)."""

    def __init__(self, logs: list[Path]) -> None:
        self.offsets = {log: log.stat().st_size if log.exists() else 0 for log in logs}

    def wait(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for log, offset in self.offsets.items():
                if log.exists():
                    with log.open("rb") as f:
                        f.seek(offset)
                        if text.encode() in f.read():
                            return
            time.sleep(0.005)
        raise AssertionError(
            f"timed out after {timeout}s waiting for {text!r} in {list(self.offsets)}"
        )

    def stamp_of(self, *texts: str) -> float | None:
        """The ``ts=`` of the first new line holding all ``texts`` (epoch seconds), if any."""
        for log, offset in self.offsets.items():
            with log.open("rb") as f:
                f.seek(offset)
                for line in f.read().decode(errors="replace").splitlines():
                    if all(t in line for t in texts) and line.startswith("ts="):
                        stamp = line.split()[0][3:].rstrip("Z")
                        return datetime.fromisoformat(stamp).replace(tzinfo=UTC).timestamp()
        return None


def log_of(run: Run, cluster: str, component: str) -> Path:
    return run.labs.cluster(cluster).log_dir / f"{component}.log"


def node_logs(run: Run, cluster: str) -> list[Path]:
    return [log_of(run, cluster, n) for n in run.labs.cluster(cluster).node_names()]


def signal_sync(run: Run, cluster: str, sig: signal.Signals) -> float:
    """``sig`` to a sync controller, directly (``vmferry lab kill`` takes a Python start-up:
    too slow to time a fault to a step of the hand-off); returns when it was sent (a
    SIGKILL is then waited for, which takes a poll interval or more)."""
    pid = run.labs.cluster(cluster).pid(SYNC)
    assert pid is not None, f"{cluster}/{SYNC} is not running"
    os.kill(pid, sig)
    sent = time.time()
    if sig == signal.SIGKILL:
        run.wait(f"{cluster}/{SYNC} to die", lambda: run.labs.cluster(cluster).pid(SYNC) is None, 5)
    return sent


def target_prepared(run: Run) -> bool:
    vmi = try_get_in(run.labs, DST, "vmi", run.vm)
    ms = ((vmi or {}).get("status") or {}).get("migrationState") or {}
    return bool(ms.get(Field.TARGET_NODE_ADDRESS))


def kill_sending_sync_while_synchronizing(run: Run) -> None:
    """kill -9 cluster1's sync controller once the receiving side knows the sender (the
    sending VMIM is Synchronizing), before the receiver's target is relayed back."""
    watch = LogWatch([log_of(run, DST, SYNC)])
    run.start_sending()
    watch.wait(f"vmim {run.into}: receiving default/{run.vm}", 30)
    signal_sync(run, SRC, signal.SIGKILL)
    sent = try_get_in(run.labs, SRC, VMIM, run.out)
    assert phase_of(sent) == "Synchronizing", f"killed after the hand-off: {sent}"
    time.sleep(1)
    run.labs.restart(f"{SRC}/{SYNC}")


def kill_receiving_sync_after_target_prepared(run: Run) -> None:
    watch = LogWatch(node_logs(run, DST))
    run.start_sending()
    watch.wait(f"target prepared for default/{run.vm}", 45)
    signal_sync(run, DST, signal.SIGKILL)
    time.sleep(1)
    run.labs.restart(f"{DST}/{SYNC}")


def arm_source(step: Step) -> Callable[[Run], None]:
    def inject(run: Run) -> None:
        run.labs.restart(run.source(), step.value)
        run.start_sending()
        lab = run.labs.cluster(SRC)
        run.wait(f"{run.source()} to die at {step}", lambda: lab.pid(run.source_node) is None,
                 DIE_WITHIN)  # fmt: skip
        run.switchover()
        run.labs.restart(run.source())

    return inject


def arm_targets(step: Step) -> Callable[[Run], None]:
    """The target node armed: cluster2's other nodes are cordoned, so the receiving sync
    controller places the target on the first."""

    def inject(run: Run) -> None:
        lab = run.labs.cluster(DST)
        target, *others = lab.node_names()
        for node in others:
            run.labs.in_cluster(DST, "adm", "cordon", node)
        try:
            run.labs.restart(f"{DST}/{target}", step.value)
            run.start_sending()
            run.wait(f"{DST}/{target} to die at {step}", lambda: lab.pid(target) is None,
                     DIE_WITHIN)  # fmt: skip
            run.switchover()
            run.labs.restart(f"{DST}/{target}")
        finally:
            for node in others:
                run.labs.in_cluster(DST, "adm", "uncordon", node)

    return inject


def target_stays_paused(run: Run, seconds: float) -> None:
    """For ``seconds``: cluster2 holds the incoming guest, and it does not run."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        now = time.time()
        held = [(w, g) for w, g in all_guests(run.labs, run.uids) if w.startswith(f"{DST}/")]
        assert held, f"{DST} lost the incoming guest before it could learn the decision"
        running = [w for w, g in held if runs_now(g["dir"], now)]
        assert not running, f"the target guest runs on {running} without knowing the decision"
        time.sleep(SAMPLE_EVERY)


def sync_down(run: Run, cluster: str, sig: signal.Signals) -> float:
    """The sync controller stopped or killed; when the signal went."""
    return signal_sync(run, cluster, sig)


def sync_up(run: Run, cluster: str, sig: signal.Signals) -> None:
    """Undo :func:`sync_down`: SIGCONT a stopped sync controller, start a killed one."""
    if sig == signal.SIGSTOP:
        signal_sync(run, cluster, signal.SIGCONT)
    else:
        run.labs.restart(f"{cluster}/{SYNC}")


def receiving_sync_down_across_decision(sig: signal.Signals) -> Callable[[Run], None]:
    """The receiving sync controller stopped (or killed) once the sending one wrote the
    source's hand-off (the handlers stream directly; the decision comes after); the source
    records Committed and dies before sending Commit: cluster2 cannot learn the decision,
    so its target guest must stay paused. Then the source returns (cluster2 still cannot
    learn it), then the receiving sync controller."""

    def inject(run: Run) -> None:
        run.labs.restart(run.source(), Step.SOURCE_COMMITTED.value)
        watch = LogWatch([log_of(run, SRC, SYNC)])
        decision = LogWatch([log_of(run, SRC, run.source_node)])
        run.start_sending()
        watch.wait(f"vmim {run.out}: hand-off", 45)
        stopped = sync_down(run, DST, sig)
        try:
            lab = run.labs.cluster(SRC)
            run.wait(f"{run.source()} to die at {Step.SOURCE_COMMITTED}",
                     lambda: lab.pid(run.source_node) is None, DIE_WITHIN)  # fmt: skip
            assert run.switchover() == Switchover.COMMITTED
            decided = decision.stamp_of(*DECIDED)
            assert decided is not None and decided > stopped, "the decision came before the stop"
            target_stays_paused(run, PARTITION_SECONDS / 2)
            run.labs.restart(run.source())  # the source returns; cluster2 still cannot know
            target_stays_paused(run, PARTITION_SECONDS / 2)
            received = try_get_in(run.labs, DST, VMIM, run.into)
            assert phase_of(received) not in FINAL, f"final without the decision: {received}"
        finally:
            sync_up(run, DST, sig)

    return inject


def sending_sync_down_before_decision(
    sig: signal.Signals, *, source_dies: bool = False
) -> Callable[[Run], None]:
    """cluster1's sync controller stopped (or killed) right after it wrote the source's
    hand-off (before the decision, which the handlers take over their own stream): nothing
    relays the decision until it is back. With ``source_dies``, the source records
    Committed and dies before its Commit frame: cluster2 cannot learn the decision at all
    until the sync controller returns, so its target guest must stay paused until then
    (the source comes back first)."""

    def inject(run: Run) -> None:
        if source_dies:
            run.labs.restart(run.source(), Step.SOURCE_COMMITTED.value)
        watch = LogWatch([log_of(run, SRC, SYNC)])
        decision = LogWatch([log_of(run, SRC, run.source_node)])
        run.start_sending()
        watch.wait(f"vmim {run.out}: hand-off", 45)
        stopped = sync_down(run, SRC, sig)
        try:
            if source_dies:
                lab = run.labs.cluster(SRC)
                run.wait(f"{run.source()} to die at {Step.SOURCE_COMMITTED}",
                         lambda: lab.pid(run.source_node) is None, DIE_WITHIN)  # fmt: skip
            run.wait("the arbiter's decision", run.switchover, PARTITION_SECONDS * 2, 0.2)
            decided = decision.stamp_of(*DECIDED)
            assert decided is not None and decided > stopped, "the decision came before the stop"
            if source_dies:
                target_stays_paused(run, PARTITION_SECONDS / 2)
                run.labs.restart(run.source())
                target_stays_paused(run, PARTITION_SECONDS / 2)
            else:
                time.sleep(PARTITION_SECONDS / 2)
            sent = try_get_in(run.labs, SRC, VMIM, run.out)
            assert phase_of(sent) not in FINAL, f"final with its sync controller down: {sent}"
        finally:
            sync_up(run, SRC, sig)

    return inject


CASES = [
    Case("kill-sending-sync-synchronizing", EITHER, kill_sending_sync_while_synchronizing),
    Case("kill-receiving-sync-target-prepared", EITHER, kill_receiving_sync_after_target_prepared),
    Case(
        "receiving-sync-stopped-across-decision",
        "Succeeded",
        receiving_sync_down_across_decision(signal.SIGSTOP),
        paused_target=True,
    ),
    Case(
        "receiving-sync-killed-across-decision",
        "Succeeded",
        receiving_sync_down_across_decision(signal.SIGKILL),
        paused_target=True,
    ),
    Case(
        "sending-sync-stopped-before-decision",
        EITHER,
        sending_sync_down_before_decision(signal.SIGSTOP),
    ),
    Case(
        "sending-sync-killed-before-decision",
        EITHER,
        sending_sync_down_before_decision(signal.SIGKILL),
    ),
    Case(
        "sending-sync-killed-source-dies-after-decision",
        "Succeeded",
        sending_sync_down_before_decision(signal.SIGKILL, source_dies=True),
        paused_target=True,
    ),
]


def the_one_guest(labs: MultiLabHarness, cluster: str, vm: str, uids: set[str]) -> Any:
    vmi = try_get_in(labs, cluster, "vmi", vm)
    guests = all_guests(labs, uids)
    if phase_of(vmi) != "Running" or len(guests) != 1 or vmi is None:
        return None
    where, guest = guests[0]
    return (vmi, guest) if where == f"{cluster}/{vmi['status'].get('nodeName')}" else None


def every_daemon_up(labs: MultiLabHarness) -> None:
    for cluster in (SRC, DST):
        lab = labs.cluster(cluster)
        for name in [*lab.node_names(), SYNC]:
            component = f"{cluster}/{name}"
            if lab.pid(name) is None:
                labs.restart(component)
            elif name == SYNC:
                labs.cli("lab", "kill", component, "--signal", "CONT", check=False)


@pytest.mark.timeout(int(DIE_WITHIN + FINAL_WITHIN + SETTLED_WITHIN + 90))
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_cross_cluster_fault(labs: MultiLabHarness, case: Case) -> None:
    run_case(labs, case, f"f{CASES.index(case)}")


def run_case(labs: MultiLabHarness, case: Case, name: str) -> None:
    """Move a busy VM ``name`` from cluster1 to cluster2 under ``case``'s fault and check
    the invariant (the module docstring); every daemon is up again afterwards, the VMs and
    VMIMs deleted. Other fault suites (e.g. ``test_cross_cluster_netcut.py``) run their
    cases through this too."""
    vm = busy_vm(name)
    apply_in(labs, SRC, vm)
    source_vmi = wait_phase(labs, SRC, "vmi", name, {"Running"}, 60)
    apply_in(labs, DST, receiving_copy(vm))
    receiving = wait_phase(labs, DST, "vmi", name, {"WaitingForSync"}, 30)
    uids = {source_vmi["metadata"]["uid"], receiving["metadata"]["uid"]}
    apply_in(labs, DST, vmim(f"{name}-in", name, receive=f"m-{name}"))
    wait_phase(labs, DST, VMIM, f"{name}-in", {"WaitingForSync"}, 30)
    run = Run(labs, name, source_vmi["status"]["nodeName"], uids)
    time.sleep(1)  # the guest writes for a while before it moves
    try:
        with Sampler(labs, uids) as sampler:
            case.inject(run)

            def both_final() -> tuple[Obj, Obj] | None:
                run.switchover()
                sent = try_get_in(labs, SRC, VMIM, run.out)
                received = try_get_in(labs, DST, VMIM, run.into)
                if phase_of(sent) in FINAL and phase_of(received) in FINAL:
                    return sent or {}, received or {}
                return None

            sent, received = labs.wait_for("both VMIMs final", both_final, FINAL_WITHIN, 0.3)
            run.switchover()
            decision = run.decisions[-1] if run.decisions else ""
            side = DST if decision == Switchover.COMMITTED else SRC
            expected = "Succeeded" if side == DST else "Failed"
            statuses = f"sent {sent.get('status')}\nreceived {received.get('status')}"
            assert phase_of(sent) == expected, f"arbiter {decision!r}: {statuses}"
            assert phase_of(received) == expected, f"arbiter {decision!r}: {statuses}"
            if case.phase != EITHER:
                assert expected == case.phase, f"arbiter {decision!r}: {statuses}"
            _, guest = labs.wait_for(
                f"exactly one guest, in {side}, on the node its VMI names",
                lambda: the_one_guest(labs, side, name, uids),
                SETTLED_WITHIN,
            )
            check_memory(guest)
            ticks = labs.console_ticks(guest["dir"])
            labs.wait_for(
                f"the console ticking in {side}",
                lambda: max(labs.console_ticks(guest["dir"]) or [0]) > max(ticks or [0]),
                10,
            )
        assert not sampler.twice, sampler.twice
        assert not sampler.interleaved(), f"guests ticked interleaved: {sampler.interleaved()}"
        if case.paused_target:
            assert sampler.paused_targets > 0, "no paused target guest seen in the partition"
        print(f"{case.name}: arbiter {decision or '(none)'}, VM on {side}, phases "
              f"{phase_of(sent)}/{phase_of(received)}")  # fmt: skip
    except AssertionError as e:
        raise AssertionError(f"{e}\n{labs.log_tails(30)}") from None
    finally:
        every_daemon_up(labs)
        for cluster in (SRC, DST):
            labs.in_cluster(cluster, "delete", "vm", name, check=False)
        labs.in_cluster(SRC, "delete", VMIM, run.out, check=False)
        labs.in_cluster(DST, "delete", VMIM, run.into, check=False)
