"""The object model: the Kubernetes-shaped objects every part of vmferry reads and writes.

Pure functions over plain dicts, no I/O, no asyncio; the controller's API, the handlers,
the CLI and the console all use them. One module per concept:

- ``kinds``: the kinds the API serves (names, groups, scope, short names), ``resolve()``;
- ``names``: the naming rules (DNS-1123 names, RBAC names, label keys and values);
- ``schema``: validation and defaulting of manifests (a package: the DSL, the kinds'
  schemas, ``validate``, defaults);
- ``quantity``: Kubernetes quantities (``2Gi``);
- ``labels``: label selectors (``app=web,tier in (a,b)``);
- ``conditions``: status conditions, phases and their timestamps;
- ``patch``: JSON patch and merge patch;
- ``jsonpath``: kubectl's JSONPath templates (``-o jsonpath=...``);
- ``limits``: the API's request limits (object and body size, nesting depth, label
  count, quantities, Unicode) and error messages cut to fit.

Import the module you need (``from vmferry.objects import schema, quantity``); this
``__init__`` imports nothing, so the migration contract (:mod:`vmferry.migration_state`)
can use ``kinds`` and ``quantity`` while ``schema`` uses the contract.
"""
