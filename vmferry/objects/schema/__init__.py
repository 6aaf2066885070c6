"""Validation and defaulting of manifests, for every kind in :data:`vmferry.objects.kinds.KINDS`.

:func:`validate` checks a manifest against a small declarative schema and returns a
normalized deep copy; it raises :class:`~vmferry.errors.Invalid` listing *every* problem
it found, each prefixed by its field path, the way ``kubectl`` reports them::

    VirtualMachineInstance "vm1": spec.domain.memroy: unknown field "memroy" (did you mean
    "memory"?); spec.domain.cpu.cores: expected integer, got string "2"

:func:`apply_defaults` fills in what the API server fills in (run it after ``validate``;
:func:`fill_defaults` does it in place); :func:`memory_bytes` reads a VMI spec's guest
memory.

Normalization (what the returned copy differs in):

- a field whose value is ``null`` is dropped, as if absent (timestamps keep their nulls);
- an integer given as an integral float (``2.0``) becomes an ``int``;
- a timestamp that YAML parsed into a ``datetime`` becomes an RFC 3339 string
  (``2024-05-01T10:00:00Z``), so ``get -o yaml`` output re-applies unchanged.

The modules, one concern each:

- ``dsl``: the schema language (``Obj``, ``Str``, ``Int``, ``Quantity``, ... and ``Errors``);
- ``core``: metadata, conditions, Namespace, Node and the RBAC shapes;
- ``kubevirt``: the VMI, VM, migration, HyperConverged and MigrationPolicy schemas, whose
  enums and keys come from :mod:`vmferry.migration_state`;
- ``cni``: the NetworkAttachmentDefinition (its ``spec.config`` is read by
  :mod:`vmferry.migration_network`);
- ``registry``: ``SCHEMAS``, every kind's schema (adding a kind starts there);
- ``validation``: :func:`validate` and the identity checks (apiVersion, names, namespace);
- ``defaults``: :func:`apply_defaults`, :func:`fill_defaults`, :func:`memory_bytes`.

This package's public surface is what it re-exports below; the object-naming rules are in
:mod:`vmferry.objects.names`.
"""

from vmferry.objects.schema.defaults import (
    DEFAULT_CPU_MODEL,
    apply_defaults,
    fill_defaults,
    memory_bytes,
)
from vmferry.objects.schema.registry import SCHEMAS, KindSchema
from vmferry.objects.schema.validation import validate

__all__ = [
    "DEFAULT_CPU_MODEL",
    "SCHEMAS",
    "KindSchema",
    "apply_defaults",
    "fill_defaults",
    "memory_bytes",
    "validate",
]
