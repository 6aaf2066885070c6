"""kubectl's JSONPath template dialect, for ``vmferry get -o jsonpath='{.status.phase}'``.

The grammar and the output follow ``k8s.io/client-go/util/jsonpath``:

- Text outside ``{...}`` is printed as it is, except that ``\\n`` and ``\\t`` become a
  newline and a tab. Inside an action, ``{"\\n"}`` / ``{'\\t'}`` are string literals.
- Paths: ``.field`` (``\\.`` escapes a dot inside a name: ``{.data.ca\\.crt}``), ``.*``,
  ``..field`` (recursive descent), ``[n]``, ``[-1]``, slices ``[start:end:step]``,
  ``[*]``, quoted keys ``['name']`` (as in kubectl, an unescaped dot in a quoted key
  separates fields: ``['app\\.kubernetes\\.io/name']`` is one key), unions ``[a,b]``
  and filters ``[?(@.type=="Ready")]`` with ``== != < > <= >=`` or a bare path
  (existence). ``@`` and ``$`` both mean the current object.
- ``{range <path>}...{end}`` repeats its body for each value (nestable).
- Each action prints its values separated by one space: strings raw, numbers as Go's
  ``%v`` prints them, booleans lowercase, ``null`` for null, objects and lists as compact
  JSON with sorted keys (as Go's ``encoding/json`` writes a map).

``parse()`` only parses, so parse errors can be reported (and tested) before any data is
fetched; ``Template.execute()`` / ``render()`` evaluate. Both raise :class:`JsonPathError`,
whose message starts with ``error parsing jsonpath "<template>":`` or ``error executing
jsonpath "<template>":``.
"""

from vmferry.objects.jsonpath.syntax import JsonPathError
from vmferry.objects.jsonpath.template import (
    Template,
    format_value,
    parse,
    render,
    to_compact_json,
    to_indented_json,
)

__all__ = [
    "JsonPathError",
    "Template",
    "format_value",
    "parse",
    "render",
    "to_compact_json",
    "to_indented_json",
]
