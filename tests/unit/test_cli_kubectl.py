"""kubectl's and virtctl's habits (issue 21 part 2), each case quoted in the issue pinned:
global flags anywhere, positionals after flags, a bad flag's usage and exit code,
``get TYPE1,TYPE2``, ``--show-labels``, ``--sort-by``, ``-w``'s header, the error
prefixes, a closed pipe, ``version``, ``completion``, virtctl's VM verbs and messages."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from vmferry.cli import get_cmd, manifests, printers, vm_cmd
from vmferry.cli.args import parse, split_globals
from vmferry.cli.common import DryRun, server_error
from vmferry.cli.main import SIGPIPE_EXIT, build_parser
from vmferry.cli.version_cmd import completion_script
from vmferry.errors import BadRequest, NotFound
from vmferry.objects import kinds

Obj = dict[str, Any]
NOW = datetime(2027, 1, 15, 8, 0, 0, tzinfo=UTC)


def args_of(*argv: str) -> Any:
    return parse(build_parser(), list(argv))


@pytest.mark.parametrize(
    ("argv", "command", "namespace", "targets"),
    [
        (["-n", "default", "get", "vmi"], "get", "default", ["vmi"]),  # was: invalid choice
        (["get", "vmi", "-n", "seed", "NAME"], "get", "seed", ["vmi", "NAME"]),
        (["describe", "vmi", "-n", "seed", "X"], "describe", "seed", ["vmi", "X"]),
        (["get", "vmi", "-o", "wide", "X"], "get", None, ["vmi", "X"]),
        (["--namespace=seed", "get", "vm,vmi"], "get", "seed", ["vm,vmi"]),
        (["get", "-nseed", "vmi"], "get", "seed", ["vmi"]),
        (["-n", "a", "get", "vmi", "-n", "b"], "get", "b", ["vmi"]),  # the last one wins
    ],
)
def test_global_flags_and_positionals_go_anywhere(
    argv: list[str], command: str, namespace: str | None, targets: list[str]
) -> None:
    args = args_of(*argv)
    assert (args.command, args.namespace, args.targets) == (command, namespace, targets)


def test_global_flags_reach_verbs_without_targets() -> None:
    args = args_of("migrate", "-n", "seed", "vm1", "--context", "c2")
    assert (args.vm, args.namespace, args.context) == ("vm1", "seed", "c2")
    assert split_globals(["patch", "vm", "x", "-p", "{}", "--", "-n"]).rest[-2:] == ["--", "-n"]


def test_a_bad_flag_prints_its_verbs_usage_and_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        args_of("get", "vmi", "--bogus")
    assert exit_.value.code == 1  # kubectl's, not argparse's 2
    err = capsys.readouterr().err
    assert err.startswith("usage: vmferry get ")
    assert "error: unknown flag: --bogus\nSee 'vmferry get --help' for usage.\n" in err
    with pytest.raises(SystemExit) as exit_:
        args_of("get", "vmi", "-n")
    assert exit_.value.code == 1
    assert "error: flag needs an argument: -n" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        args_of("migrate", "vm1", "extra")
    assert 'error: unexpected argument "extra"' in capsys.readouterr().err


def test_client_side_errors_are_not_from_the_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad1.yaml"
    bad.write_text("kind: [\n")
    with pytest.raises(BadRequest) as info:
        manifests.load([str(bad)])
    assert server_error(info.value) == 1
    assert capsys.readouterr().err.startswith(f"error: error parsing {bad}: ")
    with pytest.raises(BadRequest) as info:
        manifests.load([str(tmp_path / "nope.yaml")])
    server_error(info.value)
    assert capsys.readouterr().err == f'error: the path "{tmp_path / "nope.yaml"}" does not exist\n'
    answered = NotFound('virtualmachineinstances.kubevirt.io "x" not found')
    answered.from_server = True
    server_error(answered)
    assert capsys.readouterr().err == (
        'Error from server (NotFound): virtualmachineinstances.kubevirt.io "x" not found\n'
    )


def test_a_closed_pipe_ends_quietly() -> None:
    """``vmferry ... | head -1``: the reader is gone before the first write."""
    read, write = os.pipe()
    os.close(read)
    proc = subprocess.run(
        [sys.executable, "-m", "vmferry.cli.main", "completion", "bash"],
        stdout=write,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
    )
    os.close(write)
    assert proc.returncode == SIGPIPE_EXIT
    assert proc.stderr == ""  # no BrokenPipeError traceback


def _vm(
    name: str, labels: dict[str, str] | None = None, created: str = "2027-01-15T07:00:00Z"
) -> Obj:
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {
            "name": name,
            "namespace": "default",
            "labels": labels or {},
            "creationTimestamp": created,
        },
        "spec": {"runStrategy": "Always"},
        "status": {"printableStatus": "Running", "ready": True},
    }


def test_get_several_types_show_labels_and_sort_by() -> None:
    assert get_cmd.split_types(["vm,vmi", "a"]) == (
        [kinds.by_kind("VirtualMachine"), kinds.by_kind("VirtualMachineInstance")],
        ["a"],
    )
    assert get_cmd.split_types(["vm/a", "vm/b"]) == ([kinds.by_kind("VirtualMachine")], ["a", "b"])
    with pytest.raises(BadRequest, match="one type"):
        get_cmd.split_types(["vm/a", "vmi/b"])
    vms = [_vm("b", {"app": "db", "tier": "x"}, "2027-01-15T07:59:00Z"), _vm("a")]
    out = printers.print_objects(
        vms, kinds.by_kind("VirtualMachine"), None, now=NOW, show_labels=True, name_prefix=True
    )
    assert out == (
        "NAME                           AGE   STATUS    READY   LABELS\n"
        "virtualmachine.kubevirt.io/b   60s   Running   True    app=db,tier=x\n"
        "virtualmachine.kubevirt.io/a   60m   Running   True    <none>\n"
    )
    names = [o["metadata"]["name"] for o in get_cmd.sort_objects(vms, ".metadata.name")]
    assert names == ["a", "b"]
    newest_last = get_cmd.sort_objects(vms, "{.metadata.creationTimestamp}")
    assert [o["metadata"]["name"] for o in newest_last] == ["a", "b"]
    counts = [{"n": 10}, {"n": 9}, {}]
    assert get_cmd.sort_objects(counts, ".n") == [{}, {"n": 9}, {"n": 10}]  # numerically


def test_watch_prints_the_header_first_even_on_an_empty_list() -> None:
    vmim = kinds.resolve("vmim")
    assert printers.header_line(vmim, None) == "NAME   PHASE   VMI\n"
    assert printers.header_line(vmim, "wide").split() == [
        "NAME",
        "PHASE",
        "VMI",
        "SOURCE",
        "TARGET",
        "PROGRESS",
    ]
    assert printers.has_header(None) and not printers.has_header("yaml")


def test_dry_run_suffixes_as_kubectl() -> None:
    assert args_of("create", "-f", "x.yaml").dry_run == DryRun.NONE
    assert args_of("create", "-f", "x.yaml", "--dry-run").dry_run == DryRun.CLIENT
    assert args_of("apply", "-f", "x", "--dry-run=server").dry_run.suffix == " (server dry run)"
    assert args_of("delete", "vm", "x", "--dry-run=client").dry_run.suffix == " (dry run)"
    assert args_of("patch", "vm", "x", "-p", "{}", "--dry-run=server").dry_run == DryRun.SERVER


def test_version_client_only(capsys: pytest.CaptureFixture[str]) -> None:
    args = args_of("version", "--client")
    assert args.func(args) == 0
    assert capsys.readouterr().out.startswith("Client Version: v")


def test_completion_scripts_know_the_verbs_flags_and_types() -> None:
    bash = completion_script(build_parser(), "bash")
    assert "complete -F _vmferry_complete vmferry" in bash
    get_line = next(line for line in bash.splitlines() if line.strip().startswith("get)"))
    for word in ("--show-labels", "--sort-by", "--field-selector", "vmis", "events"):
        assert word in get_line
    assert "'adm drain'" in bash or "adm drain)" in bash
    zsh = completion_script(build_parser(), "zsh")
    assert zsh.startswith("autoload -U +X bashcompinit && bashcompinit\n")
    check = subprocess.run(["bash", "-n"], input=bash, text=True, capture_output=True, timeout=30)
    assert check.returncode == 0, check.stderr


def _vm_obj(strategy: str) -> Obj:
    return {"metadata": {"name": "vm1"}, "spec": {"runStrategy": strategy}}


RUNNING_VMI: Obj = {"status": {"phase": "Running"}}


def test_virtctl_verbs_refuse_with_virtctls_words() -> None:
    conflict = 'Operation cannot be fulfilled on virtualmachine.kubevirt.io "vm1": '
    assert vm_cmd.refusal(vm_cmd.Verb.START, _vm_obj("Always"), RUNNING_VMI) == (
        conflict + "VM is already running"
    )
    assert (
        vm_cmd.refusal(vm_cmd.Verb.STOP, _vm_obj("Halted"), None) == conflict + "VM is not running"
    )
    assert vm_cmd.refusal(vm_cmd.Verb.RESTART, _vm_obj("Halted"), None) == (
        conflict + "VM is not running"
    )
    assert vm_cmd.refusal(vm_cmd.Verb.START, _vm_obj("Halted"), None) is None
    assert vm_cmd.refusal(vm_cmd.Verb.STOP, _vm_obj("Always"), RUNNING_VMI) is None
    assert vm_cmd.refusal(vm_cmd.Verb.RESTART, _vm_obj("Always"), RUNNING_VMI) is None
    legacy = {"metadata": {"name": "vm1"}, "spec": {"running": True}}
    assert vm_cmd.refusal(vm_cmd.Verb.START, legacy, RUNNING_VMI) is not None


def test_pause_and_unpause_refuse_with_virt_apis_words() -> None:
    def vmi_obj(phase: str, paused: bool) -> Obj:
        annotations = {kinds.PAUSE_ANNOTATION: "true"} if paused else {}
        return {"metadata": {"name": "vm1", "annotations": annotations}, "status": {"phase": phase}}

    conflict = 'Operation cannot be fulfilled on virtualmachineinstance.kubevirt.io "vm1": '
    assert (
        vm_cmd.pause_refusal(True, vmi_obj("Running", True)) == conflict + "VMI is already paused"
    )
    assert vm_cmd.pause_refusal(False, vmi_obj("Running", False)) == conflict + "VMI is not paused"
    assert (
        vm_cmd.pause_refusal(True, vmi_obj("Scheduled", False)) == conflict + "VMI is not running"
    )
    assert vm_cmd.pause_refusal(True, vmi_obj("Running", False)) is None
    assert vm_cmd.pause_refusal(False, vmi_obj("Running", True)) is None
    args = args_of("pause", "vm", "vm1", "-n", "seed")
    assert (args.type, args.name, args.namespace) == ("vm", "vm1", "seed")
