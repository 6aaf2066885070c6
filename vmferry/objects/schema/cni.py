"""Schema of Multus' kind (``k8s.cni.cncf.io/v1``): the NetworkAttachmentDefinition.

Only its shape is checked here: ``spec.config`` is a string. What the string holds (a CNI
configuration as JSON) is read by :func:`vmferry.migration_network.parse_nad_config`, the
one place that knows it; the API runs it on create and update (``controller.admission``),
because whether the range overlaps the main network depends on the registered Nodes.
"""

from __future__ import annotations

from vmferry.objects.schema.dsl import Obj, Str

NAD_SPEC = Obj({"config": Str(nonempty=True)}, required=("config",))
