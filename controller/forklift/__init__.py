"""The cross-cluster orchestrator: vmferry's Migration Toolkit for Virtualization (MTV,
reference 12.4.2 and 12.6).

- :mod:`controller.forklift.cluster`: what the orchestrator needs of a cluster's API
  (:class:`~controller.forklift.cluster.ClusterApi`), this cluster's (``LocalApi``, with
  validation, defaults and admission, as the API server would) and the singleton.
- :mod:`controller.forklift.provider`: a ``Provider`` is checked by connecting to its
  ``spec.url`` with its Secret's ``token`` over TLS verified with its ``cacert``;
  status condition ``Ready`` says so or why not. A Provider without a url is this cluster
  (MTV's local ``host`` provider).
- :mod:`controller.forklift.plan`: a ``Plan``'s references (providers, VMs) are checked;
  condition ``Ready``.
- :mod:`controller.forklift.migration`: a ``Migration`` runs its ``live`` plan: per VM the
  receiving VM and VMIM on the destination (through its provider's token), the sending
  VMIM here, then follows both and reports per VM. Deleting the Migration cancels.
- :mod:`controller.forklift.run`: the informers and queues that drive them in the
  controller.
"""
