"""``get`` and ``describe``, as kubectl reads and prints them.

``get TYPE1,TYPE2 [NAME...]`` (one table per type, names prefixed with the type when
there are several), ``-o``, ``-l``, ``--field-selector`` (applied by the client to what
the API lists), ``--show-labels``, ``--sort-by=<jsonpath>``, ``-w`` (the header first,
even on an empty list). ``describe`` ends with the object's Events.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Sequence
from typing import Any

from vmferry.cli import events_view, printers
from vmferry.cli.common import Obj, namespace, run_with_client
from vmferry.client import ApiClient
from vmferry.config import ClientConfig
from vmferry.errors import ApiError, BadRequest, Forbidden
from vmferry.events import CLUSTER_EVENTS_NAMESPACE, EVENT_KIND
from vmferry.objects import jsonpath, kinds


def split_types(targets: Sequence[str]) -> tuple[list[kinds.Kind], list[str]]:
    """``TYPE[,TYPE...] NAME...`` or ``TYPE/NAME...`` -> (kinds, names)."""
    if not targets:
        raise BadRequest("you must specify the type of resource to get")
    if "/" in targets[0]:
        pairs = [t.partition("/") for t in targets]
        if any(not sep for _, sep, _ in pairs):
            raise BadRequest(
                "there is no need to specify a resource type as a separate argument when passing arguments in resource/name form"
            )
        types = {p[0] for p in pairs}
        if len(types) > 1:
            raise BadRequest(
                "TYPE/NAME arguments of several types are not supported; give one type"
            )
        return [kinds.resolve(pairs[0][0])], [p[2] for p in pairs]
    found: list[kinds.Kind] = []
    for name in targets[0].split(","):
        kind = kinds.resolve(name)
        if kind not in found:
            found.append(kind)
    return found, list(targets[1:])


def scope_ns(kind: kinds.Kind, ns: str) -> str | None:
    return ns if kind.namespaced else None


def sort_key(expression: str) -> jsonpath.Template:
    """kubectl's ``--sort-by``: a relaxed JSONPath (``.metadata.name``, ``{.spec.x}``)."""
    return printers.relaxed_template(expression.strip())


def sort_objects(objs: list[Obj], expression: str) -> list[Obj]:
    """Objects ordered by the value at ``expression``: numbers numerically, everything
    else as text; objects without the field first (kubectl's order)."""
    template = sort_key(expression)

    def key(obj: Obj) -> tuple[int, float, str]:
        results = template.find_results(obj, allow_missing_keys=True)
        values = [v for group in results for v in group]
        if not values or values[0] is None:
            return (0, 0.0, "")
        value = values[0]
        if isinstance(value, bool):
            return (1, 0.0, str(value).lower())
        if isinstance(value, int | float):
            return (1, float(value), "")
        return (2, 0.0, value if isinstance(value, str) else jsonpath.to_compact_json(value))

    return sorted(objs, key=key)


async def _fetch(
    api: ApiClient, kind: kinds.Kind, ns: str, names: list[str], args: argparse.Namespace
) -> list[Obj]:
    scope = None if args.all_namespaces else scope_ns(kind, ns)
    if names:
        objs = [await api.get(kind.kind, scope_ns(kind, ns), n) for n in names]
    else:
        objs, _ = await api.list(kind.kind, scope, label_selector=args.selector or "")
    if args.field_selector:
        objs = events_view.select(objs, events_view.parse_field_selector(args.field_selector))
    if args.sort_by:
        objs = sort_objects(objs, args.sort_by)
    return objs


def _emit(text: str) -> None:
    print(text, end="" if text.endswith("\n") else "\n", flush=True)


def cmd_get(args: argparse.Namespace) -> int:
    if args.field_selector:
        events_view.parse_field_selector(args.field_selector)  # a bad one fails before the API
    if args.sort_by:
        sort_key(args.sort_by)

    async def run(api: ApiClient, config: ClientConfig) -> int:
        types, names = split_types(args.targets)
        if args.watch and len(types) > 1:
            raise BadRequest("you may only watch one resource type at a time")
        ns = namespace(args, config)
        printed = False
        empty_scope: str | None = None
        for kind in types:
            objs = await _fetch(api, kind, ns, names, args)
            scope = None if args.all_namespaces else scope_ns(kind, ns)
            if not objs:
                empty_scope = scope if kind.namespaced else None
                if args.watch and not args.no_headers and printers.has_header(args.output):
                    _emit(
                        printers.header_line(
                            kind, args.output, args.all_namespaces, args.show_labels
                        )
                    )
                continue
            out = printers.print_objects(
                objs,
                kind,
                args.output,
                single=len(names) == 1 and len(types) == 1,
                namespace=scope,
                all_namespaces=args.all_namespaces,
                no_headers=args.no_headers,
                show_labels=args.show_labels,
                name_prefix=len(types) > 1,
            )
            if printed and printers.has_header(args.output):
                print()
            _emit(out)
            printed = True
        if not printed and not args.watch:
            kind = types[0]
            print(
                printers.empty_message(kind, None if args.all_namespaces else empty_scope),
                file=sys.stderr,
            )
        if args.watch:
            await _watch(
                api, types[0], None if args.all_namespaces else scope_ns(types[0], ns), args
            )
        return 0

    return run_with_client(args, run)


async def _watch(
    api: ApiClient, kind: kinds.Kind, scope: str | None, args: argparse.Namespace
) -> None:
    """``get -w``: print a row per change until interrupted (the stream reconnects)."""
    selector = events_view.parse_field_selector(args.field_selector or "")
    _, rv = await api.list(kind.kind, scope)
    while True:
        try:
            async for etype, obj in api.watch(
                kind.kind, scope, resource_version=rv, label_selector=args.selector or ""
            ):
                rv = obj["metadata"].get("resourceVersion", rv)
                if etype == "BOOKMARK" or not events_view.select([obj], selector):
                    continue
                _emit(
                    printers.print_objects(
                        [obj],
                        kind,
                        args.output,
                        no_headers=True,
                        all_namespaces=args.all_namespaces,
                        namespace=scope,
                        show_labels=args.show_labels,
                    )
                )
        except ApiError:
            await asyncio.sleep(1)
            with contextlib.suppress(ApiError):
                _, rv = await api.list(kind.kind, scope)


async def events_about(api: ApiClient, objs: Sequence[Obj], kind: kinds.Kind) -> list[Obj]:
    """The Events of the namespace(s) the objects' events live in; none when the caller
    may not list them (kubectl's describe then shows none too)."""
    namespaces = {
        (o.get("metadata") or {}).get("namespace") or CLUSTER_EVENTS_NAMESPACE for o in objs
    }
    found: list[Obj] = []
    for ns in sorted(namespaces):
        with contextlib.suppress(Forbidden):
            found += (await api.list(EVENT_KIND, ns))[0]
    return found


def cmd_describe(args: argparse.Namespace) -> int:
    async def run(api: ApiClient, config: ClientConfig) -> int:
        types, names = split_types(args.targets)
        ns = namespace(args, config)
        texts = []
        for kind in types:
            scope = scope_ns(kind, ns)
            objs = (
                [await api.get(kind.kind, scope, n) for n in names]
                if names
                else (await api.list(kind.kind, scope, label_selector=args.selector or ""))[0]
            )
            events = await events_about(api, objs, kind) if objs else []
            texts += [printers.describe(o, kind, events).rstrip("\n") for o in objs]
        print("\n\n".join(texts))
        return 0

    return run_with_client(args, run)


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    output_help = "output format: yaml|json|wide|name|jsonpath=TEMPLATE|custom-columns=SPEC"
    p = sub.add_parser("get", parents=[common], help="display one or many resources")
    p.add_argument("targets", nargs="+", metavar="TYPE[,TYPE...] [NAME...]")
    p.add_argument("-o", "--output", help=output_help)
    p.add_argument("-l", "--selector", help="label selector (e.g. app=db,tier!=web)")
    p.add_argument(
        "--field-selector",
        metavar="SELECTOR",
        help="field selector (e.g. involvedObject.name=vm1,type!=Normal); =, == and !=",
    )
    p.add_argument("-A", "--all-namespaces", action="store_true", help="list across all namespaces")
    p.add_argument("-w", "--watch", action="store_true", help="after listing, watch for changes")
    p.add_argument("--no-headers", action="store_true")
    p.add_argument("--show-labels", action="store_true", help="add a LABELS column")
    p.add_argument(
        "--sort-by", metavar="JSONPATH", help="sort by a field (e.g. .metadata.creationTimestamp)"
    )
    p.set_defaults(func=cmd_get)

    p = sub.add_parser(
        "describe", parents=[common], help="show details of resources and their events"
    )
    p.add_argument("targets", nargs="+", metavar="TYPE[,TYPE...] [NAME...]")
    p.add_argument("-l", "--selector")
    p.set_defaults(func=cmd_describe)
