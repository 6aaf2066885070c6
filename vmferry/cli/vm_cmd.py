"""virtctl's VM verbs: ``start``, ``stop``, ``restart``, ``pause``, ``unpause`` — same
arguments, same messages
(``VM vm1 was scheduled to start``; ``Error starting VirtualMachine Operation cannot be
fulfilled on virtualmachine.kubevirt.io "vm1": VM is already running``).

``start``/``stop`` set the VM's ``spec.runStrategy`` (``Always``/``Halted``; a legacy
``running`` field is replaced), as virt-api's start/stop subresources do for those
strategies; ``restart`` deletes the VM's VMI, which the VM controller creates again;
``pause``/``unpause`` set or clear the VMI's ``vmferry.io/paused`` annotation, which the
handler running the guest acts on (handler/vm_pause.py).
"""

from __future__ import annotations

import argparse
from enum import StrEnum
from typing import Any

from vmferry.cli.common import Obj, error, namespace, run_with_client
from vmferry.client import ApiClient
from vmferry.config import ClientConfig
from vmferry.errors import NotFound
from vmferry.migration_state import VMI_FINAL_PHASES
from vmferry.objects import kinds

VM = "VirtualMachine"
VMI = "VirtualMachineInstance"
RUNNING_STRATEGIES = ("Always", "RerunOnFailure")


class Verb(StrEnum):
    START = "start"
    STOP = "stop"
    RESTART = "restart"


# virtctl's error prefix per verb ("Error starting VirtualMachine %v").
_FAILURE = {
    Verb.START: "Error starting VirtualMachine",
    Verb.STOP: "Error stopping VirtualMachine",
    Verb.RESTART: "Error restarting VirtualMachine",
}


def _conflict(name: str, why: str) -> str:
    return f'Operation cannot be fulfilled on virtualmachine.kubevirt.io "{name}": {why}'


def refusal(verb: Verb, vm: Obj, vmi: Obj | None) -> str | None:
    """Why ``verb`` cannot act on ``vm`` now (virt-api's answers), or None."""
    name = vm["metadata"]["name"]
    spec = vm.get("spec") or {}
    strategy = spec.get("runStrategy") or ("Always" if spec.get("running") else "Halted")
    alive = vmi is not None and (vmi.get("status") or {}).get("phase") not in VMI_FINAL_PHASES
    if verb == Verb.START and strategy in RUNNING_STRATEGIES and alive:
        return _conflict(name, "VM is already running")
    if verb == Verb.STOP and strategy == "Halted" and not alive:
        return _conflict(name, "VM is not running")
    if verb == Verb.RESTART and (strategy == "Halted" or vmi is None):
        return _conflict(name, "VM is not running")
    return None


async def act(api: ApiClient, verb: Verb, ns: str, name: str, dry_run: bool = False) -> None:
    vm = await api.get(VM, ns, name)
    try:
        vmi: Obj | None = await api.get(VMI, ns, name)
    except NotFound:
        vmi = None
    problem = refusal(verb, vm, vmi)
    if problem:
        raise _VerbError(f"{_FAILURE[verb]} {problem}")
    if verb == Verb.RESTART:
        assert vmi is not None
        await api.delete(VMI, ns, name, uid=vmi["metadata"]["uid"], dry_run=dry_run)
        return
    strategy = "Always" if verb == Verb.START else "Halted"
    await api.patch(
        VM,
        ns,
        name,
        {"spec": {"runStrategy": strategy, "running": None}},
        patch_type="merge",
        resource_version=vm["metadata"]["resourceVersion"],
        dry_run=dry_run,
    )


class _VerbError(Exception):
    pass


def _command(verb: Verb) -> Any:
    def cmd(args: argparse.Namespace) -> int:
        async def run(api: ApiClient, config: ClientConfig) -> int:
            try:
                await act(api, verb, namespace(args, config), args.vm, dry_run=args.dry_run)
            except _VerbError as e:
                return error(str(e))
            print(f"VM {args.vm} was scheduled to {verb}")
            return 0

        return run_with_client(args, run)

    return cmd


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    helps = {
        Verb.START: "start a virtual machine (runStrategy Always)",
        Verb.STOP: "stop a virtual machine (runStrategy Halted)",
        Verb.RESTART: "restart a virtual machine (its VMI is recreated)",
    }
    for verb, help_text in helps.items():
        p = sub.add_parser(str(verb), parents=[common], help=help_text)
        p.add_argument("vm", metavar="VM")
        p.add_argument("--dry-run", action="store_true", help="validate only; change nothing")
        p.set_defaults(func=_command(verb))
    add_pause_parsers(sub, common)


# -- pause / unpause (virtctl pause|unpause vm|vmi NAME) ------------------------------------


def _vmi_conflict(name: str, why: str) -> str:
    return f'Operation cannot be fulfilled on virtualmachineinstance.kubevirt.io "{name}": {why}'


def pause_refusal(pause: bool, vmi: Obj) -> str | None:
    """Why the VMI cannot be paused (``pause``) or unpaused now (virt-api's words)."""
    name = vmi["metadata"]["name"]
    if (vmi.get("status") or {}).get("phase") != "Running":
        return _vmi_conflict(name, "VMI is not running")
    annotations = vmi["metadata"].get("annotations") or {}
    paused = str(annotations.get(kinds.PAUSE_ANNOTATION, "")).lower() == "true"
    if pause and paused:
        return _vmi_conflict(name, "VMI is already paused")
    if not pause and not paused:
        return _vmi_conflict(name, "VMI is not paused")
    return None


async def pause_vmi(
    api: ApiClient, pause: bool, kind: str, ns: str, name: str, dry_run: bool = False
) -> None:
    """Raise _VerbError with virtctl's message when it cannot."""
    doing = "pausing" if pause else "unpausing"
    if kinds.resolve(kind).kind == VM:
        try:
            vm = await api.get(VM, ns, name)
        except NotFound as e:
            raise _VerbError(f"Error getting VirtualMachine {name}: {e.message}") from None
        try:
            vmi = await api.get(VMI, ns, name)
        except NotFound:
            if refusal(Verb.STOP, vm, None) is not None:  # halted
                raise _VerbError(
                    f"Error {doing} VirtualMachineInstance {name}. VirtualMachine {name} "
                    "is not set to run"
                ) from None
            raise _VerbError(
                f"Error {doing} VirtualMachineInstance {name}, it was not found"
            ) from None
    else:
        try:
            vmi = await api.get(VMI, ns, name)
        except NotFound as e:
            raise _VerbError(f"Error {doing} VirtualMachineInstance {name}: {e.message}") from None
    problem = pause_refusal(pause, vmi)
    if problem:
        raise _VerbError(f"Error {doing} VirtualMachineInstance {name}: {problem}")
    await api.patch(
        VMI,
        ns,
        name,
        {"metadata": {"annotations": {kinds.PAUSE_ANNOTATION: "true" if pause else None}}},
        patch_type="merge",
        resource_version=vmi["metadata"]["resourceVersion"],
        dry_run=dry_run,
    )


def _pause_command(pause: bool) -> Any:
    verb = "pause" if pause else "unpause"

    def cmd(args: argparse.Namespace) -> int:
        if kinds.resolve(args.type).kind not in (VM, VMI):
            return error(f"{verb} takes vm or vmi, not {args.type!r}")

        async def run(api: ApiClient, config: ClientConfig) -> int:
            ns = namespace(args, config)
            try:
                await pause_vmi(api, pause, args.type, ns, args.name, dry_run=args.dry_run)
            except _VerbError as e:
                return error(str(e))
            print(f"VMI {args.name} was scheduled to {verb}")
            return 0

        return run_with_client(args, run)

    return cmd


def add_pause_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    for pause in (True, False):
        verb = "pause" if pause else "unpause"
        p = sub.add_parser(
            verb,
            parents=[common],
            help=f"{verb} a virtual machine's guest (vm or vmi; condition Paused)",
        )
        p.add_argument("type", metavar="vm|vmi")
        p.add_argument("name", metavar="NAME")
        p.add_argument("--dry-run", action="store_true", help="validate only; change nothing")
        p.set_defaults(func=_pause_command(pause))
